"""Delta debugging over a scenario's atoms (requests, faults, restarts, folder removals).

`shrink(scenario, still_fails)` returns a small scenario (1-minimal within `budget` reruns:
removing any one atom makes it pass) for which `still_fails` holds. Zeller's ddmin: try dropping
chunks, then single atoms. `signature` names a failure's kind, so shrinking keeps the same bug
instead of drifting to another.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from oracle.workload import Scenario


def signature(failure: str) -> str:
    """A failure line without its numbers, ids and paths: what kind of failure it is."""
    text = re.sub(r"segment \d+, [^:]*: ", "", failure)
    text = re.sub(r"(#\d+|\[[^\]]*\]|\([^)]*\)|\d+|/\S+|[0-9a-f]{16,}\S*)", "", text)
    return " ".join(text.split())[:60]


def shrink(
    scenario: Scenario, still_fails: Callable[[Scenario], bool], *, budget: int = 60
) -> Scenario:
    atoms = scenario.atoms()
    runs = 0
    n = 2
    while len(atoms) >= 2 and runs < budget:
        size = max(1, len(atoms) // n)
        chunks = [atoms[i : i + size] for i in range(0, len(atoms), size)]
        reduced = False
        for chunk in chunks:
            rest = [a for a in atoms if a not in chunk]
            if not rest:
                continue
            runs += 1
            if still_fails(scenario.keep(set(rest))):
                atoms, n, reduced = rest, max(n - 1, 2), True
                break
            if runs >= budget:
                break
        if not reduced:
            if size == 1:
                break
            n = min(len(atoms), 2 * n)
    return scenario.keep(set(atoms))
