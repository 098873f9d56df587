"""The cache oracle's long mode: thousands of seeded scenarios over every cache kind.

    PYTHONPATH=src python benchmarks/cache_oracle.py      # KVGROVE_ORACLE_SCENARIOS, or 200
    KVGROVE_ORACLE_SCENARIOS=5000 python benchmarks/cache_oracle.py --kinds llama,window

Scenarios are split evenly over the kinds (seeds from --first). Prints a table of scenarios,
requests, completions, cancellations, restarts, faults raised and damaged files per kind, then each
failing seed with its failures and (with --shrink) the smallest scenario that still fails.
KVGROVE_ORACLE_TRACE=1 prints the traceback of an actor that crashed.
Exit status 1 when any scenario failed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvgrove  # noqa: F401  (OpenBLAS before mlx)
from _common import table
from oracle.driver import References, check_seed
from oracle.workload import KINDS
from tiny_models import write_tiny_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenarios", type=int, default=int(os.environ.get("KVGROVE_ORACLE_SCENARIOS", 200))
    )
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--first", type=int, default=0, help="first seed")
    p.add_argument("--shrink", action="store_true", help="shrink each failure (slower)")
    args = p.parse_args()
    kinds = args.kinds.split(",")
    per_kind = max(1, args.scenarios // len(kinds))
    tmp = Path(tempfile.mkdtemp(prefix="kvgrove-oracle-"))
    rows, failing = [], []
    totals: collections.Counter = collections.Counter()
    t0 = time.perf_counter()
    for kind in kinds:
        folder = str(write_tiny_model(tmp / "models" / kind, kind))
        refs = References(folder)
        c: collections.Counter = collections.Counter()
        for seed in range(args.first, args.first + per_kind):
            outcome, report = check_seed(
                kind, seed, folder, refs, tmp / "kv", shrink_budget=40 if args.shrink else 0
            )
            c["scenarios"] += 1
            c["requests"] += outcome.requests
            c["completed"] += outcome.completed
            c["cancelled"] += sum(outcome.cancelled.values())
            c["restarts"] += outcome.restarts
            c["faults"] += sum(outcome.faults.values())
            c["damaged files"] += sum(outcome.damage.values())
            c["preempted"] += outcome.preempted
            c["restored tokens"] += outcome.restored_tokens
            c["locked overshoots"] += outcome.locked_overshoots
            if not outcome.ok:
                c["failed"] += 1
                failing.append((kind, seed, report))
        rows.append([kind, *(c[k] for k in COLUMNS)])
        totals.update(c)
    rows.append(["all", *(totals[k] for k in COLUMNS)])
    print(table(["kind", *COLUMNS], rows))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    for kind, seed, report in failing:
        print(f"\n--- {kind} seed {seed}\n{report}")
    return 1 if failing else 0


COLUMNS = [
    "scenarios",
    "requests",
    "completed",
    "cancelled",
    "preempted",
    "restarts",
    "faults",
    "damaged files",
    "restored tokens",
    "locked overshoots",
    "failed",
]

if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # no interpreter teardown: MLX's stream threads may abort it (see serve.py)
