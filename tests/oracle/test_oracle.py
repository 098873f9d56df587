"""The differential cache oracle's fast seed set, over every cache kind (see tests/oracle/).

Each (kind, seed) is one generated scenario: concurrent conversations sharing prefixes,
cancellations in every state, stalled readers, tier moves forced by tiny budgets, preemption,
restarts on the same cache folder with damaged files, injected faults. It passes when every
promise of the prefix cache holds (driver.py lists them). A failure prints the seed, the
failures and the smallest scenario delta debugging found that still fails the same way.

`KNOWN_FAILING` names the combinations today's code fails, each with its defect (issue 9); they
are strict xfails, so a fix makes them pass loudly and the entry must go. The long mode is
`benchmarks/cache_oracle.py` (KVGROVE_ORACLE_SCENARIOS=5000).
"""

from __future__ import annotations

import pytest

from oracle.driver import References, check_seed
from oracle.workload import KINDS, generate
from tiny_models import write_tiny_model

# Seeds that gave the same verdict in four runs of seeds 0-7 (benchmarks/cache_oracle.py
# --scenarios 40). Seeds whose verdict depended on the interleaving are left to the long mode.
FAST_SEEDS = {
    "llama": (2, 3),
    "window": (0, 2, 3, 4, 6),
    "gemma3": (0, 2, 4, 5),
    "qwen3_next": (0, 1, 2, 3, 4),
    "glm4_moe_lite": (0, 1, 4, 5),
}

WINDOW_WRAP = "issue 9: WindowKVCache snapshots keys[..., :_idx], wrong once the ring has wrapped"
# A known defect whose appearance depends on the interleaving (so no seed fails it reliably):
# PrefixCache.release (a queued request cancelled) unlocks a node without rebalancing, so an
# unlocked node stays over its tier's budget until the next store or restore. The fast set counts
# it instead of failing; the long mode (benchmarks/cache_oracle.py) fails it.
TOLERATED = frozenset({"unlocked-over-budget"})
# window-3/4/6 and gemma3-2/4 failed here with WINDOW_WRAP until execpath's WindowKVCache fix
# reached main; they are now in FAST_SEEDS.
KNOWN_FAILING: dict[tuple[str, int], str] = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made: dict[str, tuple[str, References]] = {}

    def get(kind: str) -> tuple[str, References]:
        if kind not in made:
            folder = str(write_tiny_model(tmp_path_factory.mktemp("oracle") / kind, kind))
            made[kind] = (folder, References(folder))
        return made[kind]

    return get


def _params():
    for kind in KINDS:
        for seed in sorted({*FAST_SEEDS[kind], *(s for k, s in KNOWN_FAILING if k == kind)}):
            reason = KNOWN_FAILING.get((kind, seed))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(kind, seed, marks=marks, id=f"{kind}-{seed}")


@pytest.mark.parametrize(("kind", "seed"), list(_params()))
def test_cache_never_changes_an_answer(models, tmp_path, kind, seed):
    folder, refs = models(kind)
    known = (kind, seed) in KNOWN_FAILING
    outcome, report = check_seed(
        kind,
        seed,
        folder,
        refs,
        tmp_path / "kv",
        shrink_budget=0 if known else 30,
        tolerate=TOLERATED,
    )
    assert outcome.requests > 0
    assert report is None, report


def test_generator_is_seeded_and_covers_the_workload():
    """Same seed, same scenario; across the fast seeds every ingredient shows up."""
    assert generate(3, "llama") == generate(3, "llama")
    assert generate(3, "llama") != generate(4, "llama")
    scenarios = [generate(s, k) for k in KINDS for s in range(40)]
    actions = {r.action for sc in scenarios for r in sc.requests()}
    assert actions >= {"read", "cancel_queued", "cancel_prefill", "cancel_decode"}
    assert {"stall_resume", "stall_leave"} <= actions
    steps = {type(s).__name__ for sc in scenarios for s in sc.steps}
    assert steps == {"Wave", "Restart", "RemoveFolder"}
    points = {f.point for sc in scenarios for f in sc.faults}
    assert points >= {"snapshot.take", "tiers.demote", "tiers.promote", "disk.write"}
    bases = {r.base[0] for sc in scenarios for r in sc.requests()}
    assert bases == {"piece", "turn", "none"}
    assert {sc.settings["min_prefix_tokens"] for sc in scenarios} == {0, 16}
