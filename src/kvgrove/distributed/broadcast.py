"""Rank 0's plan to every rank through `mx.distributed` (`all_sum`: rank 0 contributes the
frames, the others zeros, so every rank ends up holding rank 0's words exactly).

`all_sum` works on every backend (ring, MPI, NCCL, JACCL), which send/recv do not; with N
ranks it moves each word 2(N-1)/N times, which for a plan of a few kilowords is noise next to
the forward pass's own all-reduces. Calls run on the CPU stream, on the thread that runs the
model (the executor's MLX thread on rank 0, the follower loop elsewhere): every rank issues
the same collectives in the same order, or they would pair up wrongly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from kvgrove.distributed.codec import FRAME_WORDS, frame, rest_words, unframe


class PlanChannel:
    """Messages (kind, int32 payload) from rank 0 to all ranks of `group`."""

    def __init__(self, group: Any, frame_words: int = FRAME_WORDS) -> None:
        self.group = group
        self.frame_words = frame_words
        self.messages = 0
        self.words = 0  # words broadcast, frames' padding included

    def _all_sum(self, words: np.ndarray) -> np.ndarray:
        out = mx.distributed.all_sum(mx.array(words), group=self.group, stream=mx.cpu)
        mx.eval(out)
        self.messages += 1
        self.words += len(words)
        return np.array(out, copy=True)

    def send(self, kind: int, payload: np.ndarray) -> None:
        """Rank 0: broadcast one message."""
        assert self.group.rank() == 0, "only rank 0 sends plans"
        words = frame(kind, payload, self.frame_words)
        self._all_sum(words[: self.frame_words])
        if len(words) > self.frame_words:
            self._all_sum(words[self.frame_words :])

    def receive(self) -> tuple[int, np.ndarray]:
        """Other ranks: the next message rank 0 sent (PlanError if it arrived damaged)."""
        first = self._all_sum(np.zeros(self.frame_words, dtype=np.int32))
        rest = rest_words(first)
        if rest:
            first = np.concatenate([first, self._all_sum(np.zeros(rest, dtype=np.int32))])
        return unframe(first)


STATUS_BYTES = 2048  # room for one rank's startup error message


def gather_status(group: Any, error: str | None) -> dict[int, str]:
    """Every rank says whether it started (error None) or why not; every rank learns all.

    Each rank writes its message into its own row of a (size, STATUS_BYTES) array and the
    rows meet in one `all_sum`. Returns {rank: message} for the ranks that failed.
    """
    size, rank = group.size(), group.rank()
    rows = np.zeros((size, 1 + STATUS_BYTES // 4), dtype=np.int32)
    if error is not None:
        data = error.encode("utf-8", "replace")[:STATUS_BYTES]
        padded = data + b"\0" * (-len(data) % 4)
        rows[rank, 0] = len(data) + 1  # 0 = started
        rows[rank, 1 : 1 + len(padded) // 4] = np.frombuffer(padded, dtype=np.int32)
    out = mx.distributed.all_sum(mx.array(rows), group=group, stream=mx.cpu)
    summed = np.array(out, copy=True)
    failed = {}
    for r in range(size):
        n = int(summed[r, 0])
        if n:
            failed[r] = summed[r, 1:].tobytes()[: n - 1].decode("utf-8", "replace")
    return failed


def agree_each(group: Any, values: list[int]) -> tuple[list[int], list[list[int]]]:
    """Every rank's `values` (counts in [0, 2**31), as many on every rank) meet in one
    `all_sum`. Returns, for each position, what every rank can then do alike (the common value
    if all ranks hold the same, else 0), and every rank's value there."""
    size, rank = group.size(), group.rank()
    rows = np.zeros((size, max(1, len(values))), dtype=np.int32)
    rows[rank, : len(values)] = values
    out = mx.distributed.all_sum(mx.array(rows), group=group, stream=mx.cpu)
    summed = np.array(out, copy=True)
    each = [[int(summed[r, i]) for r in range(size)] for i in range(len(values))]
    agreed = [v if all(x == v for x in e) else 0 for v, e in zip(values, each, strict=True)]
    return agreed, each
