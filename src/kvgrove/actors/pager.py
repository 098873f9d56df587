"""The pager actor: will own the prefix trie and its device / host / disk tiers.

For now it holds no snapshots: every `Match` finds nothing cached and every tier is empty. It
is a real actor on a bounded inbox so the scheduler and the memory endpoint already talk to it
as they will once the prefix cache lands.
"""

from __future__ import annotations

import trio

from kvgrove.actors.messages import Match, Matched, TierQuery
from kvgrove.config import Settings


class Pager:
    def __init__(self, settings: Settings) -> None:
        self.inbox, self._inbox = trio.open_memory_channel[object](settings.pager_inbox_items)
        self.tier_bytes = {"device": 0, "host": 0, "disk": 0}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer matches and tier queries until cancelled."""
        task_status.started()
        async for msg in self._inbox:
            match msg:
                case Match(reply=reply):
                    reply.send_nowait(Matched(cached_tokens=0))
                case TierQuery(reply=reply):
                    reply.send_nowait(dict(self.tier_bytes))
                case _:
                    raise AssertionError(f"pager: unexpected message {msg!r}")
