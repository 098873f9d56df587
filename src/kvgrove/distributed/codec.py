"""A step plan as int32 words, and the fixed-size frames it is broadcast in. Pure, no MLX.

Every rank must run exactly the step rank 0 runs, so the plan is encoded losslessly: integers
as two int32 words (int64, so 63-bit seeds and large request ids fit), floats as the two words
of their float64 bits, token lists as their length then one word per token, text as its UTF-8
byte count then the bytes packed four to a word. `decode_step(encode_step(s))` equals `s` with
`reply=None` (the reply channel is rank 0's alone).

A message is a header of `HEADER_WORDS` words — magic, kind, payload length, CRC-32 of the
kind and payload — then the payload. The first frame is always `frame_words` long (every rank knows
that size in advance); when the message does not fit, the header says how long it is, and the
rest follows in one more broadcast padded to a whole number of frames (`rest_words`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from kvgrove.actors.messages import Start, Step, StepItem
from kvgrove.sampling import FLOAT_FIELDS, INT_FIELDS, SamplingParams

MAGIC = 0x6B764754  # "kvGT"
HEADER_WORDS = 4
FRAME_WORDS = 4096

# Message kinds.
STEP = 1
STOP = 2  # rank 0 is shutting down: followers leave their loop

_PARAM_INTS = (*INT_FIELDS, "top_logprobs")


class PlanError(ValueError):
    """Words that are not a message this codec wrote (torn, corrupt, or another protocol)."""


class _Writer:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []

    def int(self, value: int) -> None:
        self.parts.append(np.array([value], dtype=np.int64).view(np.int32))

    def float(self, value: float) -> None:
        self.parts.append(np.array([value], dtype=np.float64).view(np.int32))

    def tokens(self, values: Sequence[int]) -> None:
        array = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(array) and not (array.min() >= 0 and array.max() < 2**31):
            raise ValueError("token ids must be in [0, 2**31)")
        self.int(len(array))
        self.parts.append(array.astype(np.int32))

    def ids(self, values: Sequence[int]) -> None:
        self.int(len(values))
        for v in values:
            self.int(v)

    def text(self, value: str) -> None:
        data = value.encode("utf-8")
        self.int(len(data))
        padded = data + b"\0" * (-len(data) % 4)
        self.parts.append(np.frombuffer(padded, dtype=np.int32).copy())

    def words(self) -> np.ndarray:
        if not self.parts:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate(self.parts).astype(np.int32, copy=False)


class _Reader:
    def __init__(self, words: np.ndarray) -> None:
        self.words = np.ascontiguousarray(words, dtype=np.int32)
        self.at = 0

    def _take(self, n: int) -> np.ndarray:
        if n < 0 or self.at + n > len(self.words):
            raise PlanError(f"plan truncated at word {self.at} (wanted {n} more)")
        out = self.words[self.at : self.at + n]
        self.at += n
        return out

    def int(self) -> int:
        return int(self._take(2).view(np.int64)[0])

    def float(self) -> float:
        return float(self._take(2).view(np.float64)[0])

    def tokens(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self._take(self.int()))

    def ids(self) -> tuple[int, ...]:
        return tuple(self.int() for _ in range(self.int()))

    def text(self) -> str:
        n = self.int()
        raw = self._take((n + 3) // 4).tobytes()[:n]
        return raw.decode("utf-8")


def _write_params(w: _Writer, p: SamplingParams) -> None:
    for name in _PARAM_INTS:
        w.int(getattr(p, name))
    for name in FLOAT_FIELDS:
        w.float(getattr(p, name))
    w.int(int(bool(p.logprobs)))
    w.int(int(p.grammar is not None))  # every rank samples under the same grammar
    if p.grammar is not None:
        w.text(p.grammar)


def _read_params(r: _Reader) -> SamplingParams:
    ints = {name: r.int() for name in _PARAM_INTS}
    floats = {name: r.float() for name in FLOAT_FIELDS}
    logprobs = bool(r.int())
    grammar = r.text() if r.int() else None
    return SamplingParams(**ints, **floats, logprobs=logprobs, grammar=grammar)


def encode_step(step: Step) -> np.ndarray:
    """The step (less its reply channel) as int32 words."""
    w = _Writer()
    w.ids(step.release)
    w.ids(step.preempt)
    w.int(int(step.ahead))  # every rank runs the same decode ahead (its collectives pair up)
    w.int(len(step.items))
    for item in step.items:
        w.int(item.request_id)
        w.tokens(item.tokens)
        w.int(int(item.sample))
        w.int(item.resume_tokens)
        s = item.start
        w.int(int(s is not None))
        if s is not None:
            _write_params(w, s.params)
            w.tokens(s.prompt_tokens)
            w.int(s.context_tokens)
            w.text(s.namespace)
            w.int(s.cached_tokens)
    return w.words()


def decode_step(words: np.ndarray) -> Step:
    r = _Reader(words)
    release = r.ids()
    preempt = r.ids()
    ahead = bool(r.int())
    items = []
    for _ in range(r.int()):
        request_id = r.int()
        tokens = r.tokens()
        sample = bool(r.int())
        resume_tokens = r.int()
        start = None
        if r.int():
            params = _read_params(r)
            start = Start(
                params=params,
                prompt_tokens=r.tokens(),
                context_tokens=r.int(),
                namespace=r.text(),
                cached_tokens=r.int(),
            )
        items.append(StepItem(request_id, tokens, sample, start, resume_tokens))
    if r.at != len(r.words):
        raise PlanError(f"{len(r.words) - r.at} words left over after the plan")
    return Step(items=tuple(items), release=release, reply=None, preempt=preempt, ahead=ahead)


def _crc(kind: int, payload: np.ndarray) -> int:
    crc = zlib.crc32(payload.tobytes(), zlib.crc32(np.int32(kind).tobytes()))
    return int(np.array([crc], dtype=np.uint32).view(np.int32)[0])


def frame(kind: int, payload: np.ndarray, frame_words: int = FRAME_WORDS) -> np.ndarray:
    """Header + payload, zero-padded to a whole number of frames (at least one)."""
    if frame_words <= HEADER_WORDS:
        raise ValueError(f"frame_words must exceed the {HEADER_WORDS}-word header")
    payload = np.ascontiguousarray(payload, dtype=np.int32)
    header = np.array([MAGIC, kind, len(payload), _crc(kind, payload)], dtype=np.int32)
    total = HEADER_WORDS + len(payload)
    padded = -(-total // frame_words) * frame_words
    out = np.zeros(padded, dtype=np.int32)
    out[:HEADER_WORDS] = header
    out[HEADER_WORDS:total] = payload
    return out


def rest_words(first: np.ndarray) -> int:
    """How many words follow the first frame (0 when the message fits in it)."""
    magic, _, length, _ = (int(v) for v in first[:HEADER_WORDS])
    if magic != MAGIC:
        raise PlanError(f"bad magic {magic:#x}: not a kvgrove plan frame")
    if length < 0:
        raise PlanError(f"negative payload length {length}")
    frame_words = len(first)
    total = HEADER_WORDS + length
    return -(-total // frame_words) * frame_words - frame_words


def unframe(words: np.ndarray) -> tuple[int, np.ndarray]:
    """(kind, payload) from the frames `frame` made (the first frame and the rest, joined)."""
    words = np.ascontiguousarray(words, dtype=np.int32)
    if len(words) < HEADER_WORDS:
        raise PlanError("shorter than a header")
    magic, kind, length, crc = (int(v) for v in words[:HEADER_WORDS])
    if magic != MAGIC:
        raise PlanError(f"bad magic {magic:#x}: not a kvgrove plan frame")
    if not 0 <= length <= len(words) - HEADER_WORDS:
        raise PlanError(f"payload length {length} does not fit in {len(words)} words")
    payload = words[HEADER_WORDS : HEADER_WORDS + length]
    if _crc(kind, payload) != crc:
        raise PlanError("checksum mismatch (kind or payload damaged)")
    return kind, payload
