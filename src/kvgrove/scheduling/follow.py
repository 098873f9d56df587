"""Decode follow: the device does not wait for the tokens to reach the clients. No trio here.

A step that only decodes (every running sequence, nothing joining, leaving or preempted) is sent
with `follow`: right after it the executor runs its continuation, each row fed the token it just
sampled, without waiting for the scheduler. While that continuation runs the scheduler takes the
step's result, routes the tokens, and decides: if nothing is changing it grants one more
continuation (`kvgrove.actors.messages.Follow`), else it holds, takes the running one's result
too and plans the next step with everything known. So at most one step runs that the scheduler
has not seen the start of; a row that ends by a stop token, a stop string or a cancel costs at
most one wasted row-step, one that reaches its token or context limit none (it is foreseen).

With `Settings.decode_overlap` a step the scheduler expects rows of to decode next
(`Step.ahead`, `Follow.ahead`: `SchedulerCore.decodes_again`) also launches that next forward
from its own still-lazy tokens, so the device never waits for the host between continuations.
A plan that keeps the rows (new prompts prefilling beside them, rows leaving) uses it; each row
it does not decode costs one row-step more (`StepRunner.wasted_row_steps`). Nothing runs ahead
of a step a row joins after (it would take the step run ahead off the whole batch), nor of one
whose rows all reach their limits.
"""

from __future__ import annotations

from kvgrove.models.steps import StepItem, StepResult
from kvgrove.scheduling.core import SchedulerCore


def continued(result: StepResult) -> tuple[StepItem, ...]:
    """The items of the continuation of a step that gave `result`: each row that sampled a
    token is fed it, in the same order (the executor and the scheduler build the same)."""
    return tuple(
        StepItem(r.request_id, (r.token,), True)
        for r in result.results
        if r.token is not None and r.error is None
    )


class InFlight:
    """The scheduler's count of the executor's results still to come, and what they are for."""

    def __init__(self, core: SchedulerCore, *, enabled: bool) -> None:
        self.core = core
        self.enabled = enabled
        self.results = 0  # 2 while a continuation runs after the step in flight
        self._coming: tuple[StepItem, ...] = ()  # the items of the next result to come
        self.follows = 0  # continuations run, in all

    @property
    def following(self) -> bool:
        """A continuation runs: the next result is for it; nothing is to be planned."""
        return self.results > 0

    def sent(
        self, items: tuple[StepItem, ...], *, release: tuple, preempt: tuple
    ) -> tuple[bool, bool]:
        """A planned step goes out; returns whether the executor is to follow it, and its
        `Step.ahead`: for a followed step, whether the continuation is expected to be continued
        too; else whether the scheduler's next plan is expected to decode the same rows (a step
        releasing rows as they end; any, with follow off)."""
        follow = not release and not preempt and self._follow(items)
        self.results, self._coming = (2 if follow else 1), items
        return follow, self.core.decodes_again(items, tokens=2 if follow else 1)

    def grant(self) -> tuple[bool, bool]:
        """While a continuation runs: whether to ask for the one after it (`Follow`), and
        whether some of its rows are expected to decode after it (`Follow.ahead`)."""
        if self.results == 1 and self._follow(self._coming):
            self.results = 2
            return True, self.core.decodes_again(self._coming, tokens=2)
        return False, False

    def took(self, result: StepResult) -> tuple[StepItem, ...]:
        """A result came: the items it is for. No continuation follows a step that failed."""
        items, self._coming = self._coming, continued(result)
        self.results = 0 if result.error is not None else self.results - 1
        return items

    def _follow(self, items: tuple[StepItem, ...]) -> bool:
        if not (self.enabled and self.core.plan_follow(items)):
            return False
        self.follows += 1
        return True
