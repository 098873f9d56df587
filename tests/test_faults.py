"""The fault points the cache oracle and the defect tests arm."""

import pytest

from kvgrove import faults


def test_unarmed_points_do_nothing():
    faults.check("disk.write")


def test_skip_and_times():
    with faults.injected("disk.write", error=OSError, skip=1, times=2):
        faults.check("disk.write")  # skipped
        for _ in range(2):
            with pytest.raises(OSError, match=r"injected fault at disk\.write"):
                faults.check("disk.write")
        faults.check("disk.write")  # spent
        assert faults.raised("disk.write") == 2
    faults.check("disk.write")


def test_probability_is_seeded():
    def pattern():
        out = []
        with faults.injected("tiers.promote", probability=0.5, seed=7):
            for _ in range(40):
                try:
                    faults.check("tiers.promote")
                    out.append(0)
                except faults.InjectedFault:
                    out.append(1)
        return out

    first = pattern()
    assert first == pattern()
    assert 0 < sum(first) < 40


def test_arm_from_environment():
    try:
        faults.arm_from_environment({"KVGROVE_FAULTS": "disk.read=1,tiers.stitch=1"})
        with pytest.raises(OSError):
            faults.check("disk.read")
        with pytest.raises(faults.InjectedFault):
            faults.check("tiers.stitch")
    finally:
        faults.disarm()
