"""Named fault points: where the real world can fail, the code says so, and a test can make it.

Production code calls `faults.check("disk.write")` at the few places where an operation can fail
for reasons outside the program (an allocation, a disk write or read, a file's bytes). Unarmed,
`check` is one dict lookup. A test (or the differential cache oracle) arms a point so that the
next matching call raises, exactly as the real failure would, and the real code around it has to
cope. Nothing is replaced or spied on: the component under test is the real one.

Point names in use (keep this list current):

- ``snapshot.take``     copying a live cache's span into a snapshot (device allocation)
- ``snapshot.evaluate`` evaluating a store's snapshots (taken lazily, evaluated together)
- ``tiers.promote``     bringing a node's snapshot back to the device (host/disk -> device)
- ``tiers.stitch``      stitching a matched path into a live cache
- ``tiers.demote``      copying a device snapshot to host memory
- ``disk.write``        writing a node's file (or a folder's recency index) to the disk tier;
                        an OSError here degrades the tier, the node is dropped
- ``disk.read``         reading a node's file back; an OSError here drops the node (recompute)
- ``disk.corrupt``      (not raised: `corrupt_bytes` flips a byte of what was just written)

Arming from a separate server process: ``KVGROVE_FAULTS="disk.write=0.2,tiers.promote=0.05"``
with ``KVGROVE_FAULTS_SEED=<int>`` arms each point with that probability per call.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import attrs


class InjectedFault(RuntimeError):
    """Raised by an armed point unless the arming named another exception type."""


@attrs.define
class _Arm:
    error: type[BaseException]
    probability: float = 1.0
    skip: int = 0  # let this many calls pass first
    times: int | None = None  # raise at most this many times (None: no limit)
    rng: random.Random = attrs.field(factory=random.Random)
    calls: int = 0
    raised: int = 0


_lock = threading.Lock()
_armed: dict[str, _Arm] = {}


def check(point: str) -> None:
    """Raise here if `point` is armed and its turn has come; otherwise do nothing."""
    if not _armed:
        return
    with _lock:
        arm = _armed.get(point)
        if arm is None:
            return
        arm.calls += 1
        if arm.calls <= arm.skip:
            return
        if arm.times is not None and arm.raised >= arm.times:
            return
        if arm.probability < 1.0 and arm.rng.random() >= arm.probability:
            return
        arm.raised += 1
        error = arm.error
    raise error(f"injected fault at {point}")


def arm(
    point: str,
    *,
    error: type[BaseException] = InjectedFault,
    probability: float = 1.0,
    skip: int = 0,
    times: int | None = None,
    seed: int | None = None,
) -> None:
    """Make `check(point)` raise `error` (after `skip` calls, at most `times` times)."""
    with _lock:
        _armed[point] = _Arm(error, probability, skip, times, random.Random(seed))


def disarm(point: str | None = None) -> None:
    """Disarm one point, or all of them."""
    with _lock:
        if point is None:
            _armed.clear()
        else:
            _armed.pop(point, None)


def raised(point: str) -> int:
    """How many times `point` has raised since it was armed."""
    with _lock:
        arm = _armed.get(point)
        return arm.raised if arm is not None else 0


@contextmanager
def injected(point: str, **kwargs) -> Iterator[None]:
    """`arm` for the duration of a with block."""
    arm(point, **kwargs)
    try:
        yield
    finally:
        disarm(point)


def arm_from_environment(environ: dict[str, str] | None = None) -> None:
    """Arm points named in KVGROVE_FAULTS (`point=probability,...`), seeded by KVGROVE_FAULTS_SEED.

    Disk errors raise OSError, as the operating system would; every other point raises
    `InjectedFault` (a MemoryError stand-in that no handler can mistake for a corruption).
    """
    env = os.environ if environ is None else environ
    spec = env.get("KVGROVE_FAULTS", "").strip()
    if not spec:
        return
    seed = int(env.get("KVGROVE_FAULTS_SEED", "0"))
    for i, part in enumerate(p for p in spec.split(",") if p.strip()):
        name, _, prob = part.strip().partition("=")
        error = OSError if name.startswith("disk.") else InjectedFault
        arm(name, error=error, probability=float(prob or 1.0), seed=seed + i)
