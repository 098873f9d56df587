"""The scheduler's side of the pager's prefix locks. No trio here.

A submitted prompt is matched against the prefix cache before admission (the pager locks what
it finds and answers `Matched`); a sequence that waited for another's prefill is matched again;
one that ends before the executor saw it, or whose match is too short to be worth restoring
(`SeqQueue.worth`), has its lock released here (the executor's stores release the others).
The shell gives it `match` and `release`, which send to the pager without blocking and say
whether the pager took the message (None = no prefix cache).
"""

from __future__ import annotations

from collections.abc import Callable

from kvgrove.scheduling.core import SchedulerCore
from kvgrove.scheduling.messages import Submit


class PrefixLocks:
    def __init__(
        self,
        core: SchedulerCore,
        *,
        match: Callable[[int, str, tuple[int, ...]], bool] | None = None,
        release: Callable[[int], bool] | None = None,
    ) -> None:
        self.core = core
        self._match = match
        self._release = release
        self.matching: dict[int, Submit] = {}  # submitted, waiting for the pager's Matched
        self.rematching: set[int] = set()  # admitted, matched again after waiting for a prefill
        self.releases: list[int] = []  # refused by the pager's full inbox: retried

    def submit(self, submit: Submit) -> None:
        """Ask the pager how much of the prompt is cached (it locks that much), then admit."""
        rid, tokens = submit.request_id, submit.prompt_tokens
        if self._match is None or len(tokens) < 2:
            self.core.admit(submit)
        elif self._match(rid, submit.namespace, tokens):
            self.matching[rid] = submit
        else:  # the pager is swamped: compute this prompt in full
            self.core.admit(submit)

    def matched(self, request_id: int, cached_tokens: int) -> None:
        """The pager's answer: admit (or, after a wait, restart from) `cached_tokens`, or from
        0 when so short a prefix is not worth restoring (its lock released)."""
        if request_id in self.rematching:
            self.rematching.discard(request_id)
            if self.core.get(request_id) is None:  # gone while the pager looked again
                self.release(request_id)
            else:
                self.core.rematched(request_id, self._worth(request_id, cached_tokens))
            return
        submit = self.matching.pop(request_id, None)
        if submit is None or submit.handler_gone:  # cancelled while the pager looked
            self.release(request_id)
        else:
            self.core.admit(submit, cached_tokens=self._worth(request_id, cached_tokens))

    def _worth(self, request_id: int, cached_tokens: int) -> int:
        cached = self.core.worth(cached_tokens)
        if cached != cached_tokens:
            self.release(request_id)  # unlocked now: nothing will restore it
        return cached

    def send_rematches(self) -> None:
        """Sequences that waited for another's prefill ask the pager for the longer match."""
        self.send_releases()
        for rid in self.core.take_rematch():
            seq = self.core.get(rid)
            if seq is None:
                continue
            sub = seq.submit
            if rid in self.releases:  # a Release still to send would unlock the new match
                self.core.rematched(rid, seq.cached_tokens)
            elif self._match(rid, sub.namespace, sub.prompt_tokens):
                self.rematching.add(rid)
            else:  # the pager is swamped: start from what it has
                self.core.rematched(rid, seq.cached_tokens)

    def remove(self, request_id: int, *, cancelled: bool) -> None:
        """Forget a request, wherever it is; unlock its prefix if nobody else will."""
        if self.matching.pop(request_id, None) is not None:
            self.release(request_id)  # the pager unlocks after its Match (FIFO)
            return
        seq = self.core.remove(request_id, cancelled=cancelled)
        if seq is not None and not seq.started:
            self.release(request_id)  # the executor never saw it: unlock its prefix here

    def release(self, request_id: int) -> None:
        if self._release is not None:
            self.releases.append(request_id)
            self.send_releases()

    def send_releases(self) -> None:
        while self.releases and self._release(self.releases[0]):
            self.releases.pop(0)
