"""Tensor parallel on this CPU: 2 ranks over the loopback ring answer what 1 rank answers.

Each run is a real `mlx.launch --backend ring -n 2` of tests/distributed/tp_ranks.py (rank 0
the real scheduler and TensorParallelExecutor, rank 1 the follower), against the same script
alone with the plain Executor. Every process runs under a deadline in its own session, and the
whole group is killed in a `finally`, so no rank outlives the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import write_tiny_model

HERE = Path(__file__).parent
RANKS = HERE / "tp_ranks.py"
DEADLINE_S = 90
LAUNCH = Path(sys.executable).parent / "mlx.launch"


def _free_ports(n: int) -> int:
    """A base port with `n` consecutive free ports after it (the ring listens on base + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError("no free consecutive ports")


def run_group(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run cmd in a session of its own under DEADLINE_S; its whole process group is killed
    afterwards whatever happened."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_pythonpath())}
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
        return subprocess.CompletedProcess(cmd, proc.returncode, out)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _pythonpath() -> list[str]:
    import kvgrove

    src = str(Path(kvgrove.__file__).parent.parent)
    return [src, str(HERE.parent), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]


def launch(n: int, args: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(LAUNCH), "--backend", "ring", "-n", str(n), "--starting-port"]
    cmd += [str(_free_ports(n)), "--python", sys.executable, str(RANKS), *args]
    return run_group(cmd)


def read(out: Path, model: int, rank: int) -> dict:
    return json.loads((out / f"{model}-rank{rank}.json").read_text())


ARCHS = ("llama", "qwen3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One plain run and one 2-rank run, each over all ARCHS in the same processes."""
    tmp = tmp_path_factory.mktemp("tp")
    models = [str(write_tiny_model(tmp / arch, arch)) for arch in ARCHS]
    (tmp / "plain").mkdir()
    (tmp / "tp").mkdir()
    one = run_group([sys.executable, str(RANKS), str(tmp / "plain"), *models, "--plain"])
    assert one.returncode == 0, one.stdout
    two = launch(2, [str(tmp / "tp"), *models])
    assert two.returncode == 0, two.stdout
    return tmp


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_give_the_tokens_one_rank_gives(runs, arch):
    i = ARCHS.index(arch)
    reference, rank0, rank1 = (
        read(runs / "plain", i, 0),
        read(runs / "tp", i, 0),
        read(runs / "tp", i, 1),
    )

    # Greedy requests of every prompt length, and the seeded sampled one: the same tokens.
    for rid in ("1", "2", "3", "4"):
        assert isinstance(reference[rid], list) and len(reference[rid]) > 0
        assert rank0[rid] == reference[rid], rid
    assert len(reference["3"]) == 10 and len(reference["1"]) == 12
    # Rank 1 drew, from the all-reduced logits, exactly the tokens rank 0 sent out, the
    # random-seed request (-1) included; the cancelled one only its first three before going.
    for rid in ("1", "2", "3", "4", "5"):
        assert rank1[rid] == rank0[rid], rid
    assert rank0["9"] == reference["9"] == rank1["9"][:3]
    # Several requests shared batched decode steps, and rank 1 ran every step rank 0 planned.
    assert rank0["max_batch_rows"] >= 3
    assert rank1["steps"] >= rank0["steps"] > 0
