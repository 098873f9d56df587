"""The sync parts of tensor parallel that need no second rank: seeds, shard checks."""

from __future__ import annotations

import pytest

from kvgrove.actors.messages import Start, Step, StepItem
from kvgrove.distributed.executor import fix_seeds
from kvgrove.distributed.shard import ShardError, shard_loaded
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model


def _start(seed: int) -> Start:
    return Start(SamplingParams(temperature=0.7, seed=seed), (1, 2, 3), 100)


def test_random_seeds_are_fixed_before_broadcast_and_the_rest_left_alone():
    reply = object()
    step = Step(
        items=(
            StepItem(1, (1, 2, 3), True, _start(-1)),
            StepItem(2, (1, 2, 3), True, _start(42)),
            StepItem(3, (7,), True),
        ),
        release=(9,),
        reply=reply,
    )
    fixed = fix_seeds(step)
    assert fixed.reply is reply and fixed.release == (9,)
    assert 0 <= fixed.items[0].start.params.seed < 2**63
    assert fixed.items[0].start.params == SamplingParams(
        temperature=0.7, seed=fixed.items[0].start.params.seed
    )
    assert fixed.items[1:] == step.items[1:]
    assert fix_seeds(fixed) is fixed  # nothing random left: the same object


class _Group:
    """The two methods of an mx.distributed.Group that the checks read (they run before any
    collective, so no second rank is needed to reach them)."""

    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tp") / "llama", "llama")


def test_heads_that_do_not_divide_are_refused_by_name(tiny_llama):
    with pytest.raises(ShardError, match="n_heads=4, which does not divide by 3"):
        shard_loaded(load(tiny_llama), _Group(3))


def test_heads_that_do_not_divide_split_the_mlp_alone(tmp_path):
    from kvgrove.distributed.shard import layout

    model = load(write_tiny_model(tmp_path / "odd", "llama_3heads")).model
    assert layout(model, 2) == "mlp"  # 3 heads, MLP width 128
    assert layout(model, 4) == "mlp"
    with pytest.raises(ShardError, match="MLP width 128 does not divide by 3"):
        layout(model, 3)


def test_an_architecture_without_shard_is_refused_by_name(tmp_path):
    # Refused before any collective, so a group that only reports its size reaches it (on
    # real ranks the message then surfaces on rank 0 as any startup error does).
    loaded = load(write_tiny_model(tmp_path / "gemma3", "gemma3"))
    with pytest.raises(ShardError, match="mlx-lm's 'gemma3_text' model has no shard"):
        shard_loaded(loaded, _Group(2))


def test_a_group_of_one_leaves_the_model_alone(tiny_llama):
    loaded = load(tiny_llama)
    assert shard_loaded(loaded, _Group(1)) is loaded


def test_tensor_parallel_flags_and_environment(monkeypatch):
    import argparse

    from kvgrove.config import Settings, add_serve_arguments, settings_from_args
    from kvgrove.distributed.executor import tensor_parallel_settings

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    monkeypatch.setenv("KVGROVE_HOSTFILE", "")
    settings = settings_from_args(parser.parse_args(["--tensor-parallel", "3"]))
    assert settings.tensor_parallel == 3 and settings.hostfile is None
    settings = settings_from_args(parser.parse_args(["--hostfile", "hosts.json"]))
    assert settings.hostfile == "hosts.json" and settings.tensor_parallel == 1
    with pytest.raises(ValueError, match="tensor_parallel"):
        Settings(tensor_parallel=0)
    # Every rank keeps the prefix cache (its shard of it) but loads no models on demand.
    tp = tensor_parallel_settings(Settings(tensor_parallel=2))
    assert tp.prefix_cache and tp.max_loaded_models == 0 and tp.tensor_parallel == 2
    settings = settings_from_args(parser.parse_args(["--tp-timeout-seconds", "7.5"]))
    assert settings.tp_timeout_seconds == 7.5
    with pytest.raises(ValueError, match="tp_timeout_seconds"):
        Settings(tp_timeout_seconds=0)


def test_the_watchdog_fires_once_for_a_section_past_its_timeout_and_never_for_one_in_time():
    import threading

    from kvgrove.distributed.watchdog import Watchdog

    calm = Watchdog(60.0, lambda what, s: pytest.fail(f"fired for {what}"))
    with calm.guard("outer"), calm.guard("inner"):  # nested: one section
        pass
    calm.close()
    assert calm.fired is None

    fired: list[tuple[str, float]] = []
    done = threading.Event()

    def on_timeout(what: str, seconds: float) -> None:
        fired.append((what, seconds))
        done.set()

    dog = Watchdog(0.05, on_timeout)
    with dog.guard("step 7"), dog.guard("inner"):
        assert done.wait(timeout=30)  # the section outlasts the timeout: it fires meanwhile
    assert fired[0][0] == "step 7" and fired[0][1] >= 0.05 and len(fired) == 1
    assert dog.fired == "step 7"
    dog.close()
