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
from concurrent.futures import ThreadPoolExecutor
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


ARCHS = ("llama", "qwen3", "llama_3heads")  # the last: MLP split, attention replicated
TURNS = "--turns=0,1"  # the prefix-cache turns for llama and qwen3


def spawn_ranks(tmp_path: Path, args: list[str], n: int = 2, *, rank0_only: bool = False):
    """Start n ranks of tp_ranks.py on the loopback ring ourselves (no mlx.launch, so each
    exit code is the rank's own); every one under the deadline, every group killed after
    (with `rank0_only`, as soon as rank 0 has exited: a stopped rank never would)."""
    base = _free_ports(n)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(_pythonpath())}
    cmd = [sys.executable, str(RANKS), *args]
    procs = []
    try:
        for rank in range(n):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**env, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)},
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        first = procs[0].communicate(timeout=DEADLINE_S)[0]
        if rank0_only:
            for p in procs[1:]:
                os.killpg(p.pid, signal.SIGKILL)
        outputs = [first, *(p.communicate(timeout=DEADLINE_S)[0] for p in procs[1:])]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return procs, outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One plain run and one 2-rank run, each over all ARCHS in the same processes."""
    tmp = tmp_path_factory.mktemp("tp")
    models = [str(write_tiny_model(tmp / arch, arch)) for arch in ARCHS]
    (tmp / "plain").mkdir()
    (tmp / "tp").mkdir()
    plain = [sys.executable, str(RANKS), str(tmp / "plain"), *models, "--plain", TURNS]
    with ThreadPoolExecutor(2) as pool:  # the two runs at once (each waits in its own thread)
        one = pool.submit(run_group, plain)
        two = pool.submit(launch, 2, [str(tmp / "tp"), *models, TURNS])
        one, two = one.result(), two.result()
    assert one.returncode == 0, one.stdout
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

    # Greedy requests of every prompt length, the seeded sampled one and the one under a
    # grammar: the same tokens.
    for rid in ("1", "2", "3", "4", "6"):
        assert isinstance(reference[rid], list) and len(reference[rid]) > 0
        assert rank0[rid] == reference[rid], rid
    assert len(reference["3"]) == 10 and len(reference["1"]) == 12
    # Rank 1 drew, from the all-reduced logits, exactly the tokens rank 0 sent out, the
    # random-seed request (-1) included; the cancelled one only its first three before going.
    for rid in ("1", "2", "3", "4", "5", "6"):
        assert rank1[rid] == rank0[rid], rid
    # The grammar that does not compile fails that request alone, as on one rank.
    assert reference["7"].startswith("failed: ") and "grammar" in reference["7"].lower()
    assert rank0["7"] == reference["7"] and "7" not in rank1 and "lost" not in rank0
    assert rank0["9"] == reference["9"] == rank1["9"][:3]
    # Several requests shared batched decode steps, and rank 1 ran every step rank 0 planned.
    assert rank0["max_batch_rows"] >= 3
    assert rank1["steps"] >= rank0["steps"] > 0
    split = "MLP split, attention replicated" if arch == "llama_3heads" else "heads and MLP split"
    assert split in rank0["layout"] and split in rank1["layout"]


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_later_turns_hit_the_prefix_cache_on_every_rank_with_the_tokens_of_no_cache(runs, arch):
    """tp_ranks.py's turns: the prefix cache on (every span to host memory at once, then to
    disk at the first phase's end), against the same turns with it off on one rank."""
    i = ARCHS.index(arch)
    reference = json.loads((runs / "plain" / f"{i}-turns-rank0.json").read_text())
    rank0 = json.loads((runs / "tp" / f"{i}-turns-rank0.json").read_text())
    rank1 = json.loads((runs / "tp" / f"{i}-turns-rank1.json").read_text())
    for phase, turns in (("1", ("a1", "a2", "b1")), ("2", ("a3", "b2"))):
        for turn in turns:
            assert rank0[phase][turn]["tokens"] == reference[phase][turn]["tokens"], turn
            assert len(reference[phase][turn]["tokens"]) == 8
            assert reference[phase][turn]["cached"] == 0
    # A's second turn restored its prefix from the host tier, its third (the next start) from
    # the disk tier, on both ranks.
    assert rank0["1"]["a2"]["cached"] > 0 and rank0["2"]["a3"]["cached"] > 0
    for rank in (rank0, rank1):
        assert rank["1"]["cache"]["moved_bytes"]["host->device"] > 0
        assert rank["2"]["cache"]["moved_bytes"]["disk->device"] > 0
        assert rank["2"]["cache"]["recovered_nodes"] > 0
    # Rank 1's files of B were damaged before the second start: rank 0 had B's prefix, rank 1
    # read it back corrupt, so every rank recomputed it (0 cached), with the same tokens.
    assert rank1["damaged_files"] > 0 and rank1["2"]["cache"]["corrupt_entries"] > 0
    assert rank0["2"]["b2"]["cached"] == 0
    assert rank0["2"]["cache"]["corrupt_entries"] == 0


@pytest.fixture(scope="module")
def failures(tmp_path_factory) -> dict:
    """The failure scenarios' 2-rank runs, all at once (each waits in its own thread):
    name -> (folder, procs, outputs)."""
    tmp = tmp_path_factory.mktemp("failures")
    model = write_tiny_model(tmp / "llama", "llama")
    scenarios = {
        "killed": (["--die-after=10", "--tp-timeout=5"], False),
        "hung": (["--stop-after=10", "--tp-timeout=3"], True),
        "startup": ([f"--rank1-model={tmp / 'no-such-model'}"], False),
    }

    def run(name: str) -> tuple:
        flags, rank0_only = scenarios[name]
        folder = tmp / name
        folder.mkdir()
        args = [str(folder), str(model), *flags]
        return (folder, *spawn_ranks(folder, args, rank0_only=rank0_only))

    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(run, name) for name in scenarios}
        return {name: f.result() for name, f in futures.items()}


def test_killing_rank_1_mid_stream_fails_the_requests_and_stops_rank_0(failures):
    """Rank 1 SIGKILLs itself after drawing 10 tokens. Rank 0 (started here without
    mlx.launch, so its exit code is its own) fails every in-flight request with an error
    naming the lost rank, and exits with 2 within the deadline.

    MLX's ring reports the closed socket as an error only when rank 0 is sending or
    receiving at that moment; a collective already waiting on the dead rank can wait for ever
    (it did in 5 of 6 runs at load ~1). Then rank 0's watchdog (--tp-timeout 5 s) is what
    notices: both are the documented ways a lost follower is seen."""
    folder, procs, outputs = failures["killed"]
    assert procs[1].returncode == -signal.SIGKILL, outputs[1]
    assert procs[0].returncode == 2, outputs[0]
    rank0 = read(folder, 0, 0)
    seen = ("lost the other ranks", "did not complete within 5s")
    assert any(s in rank0["lost"] for s in seen), rank0["lost"]
    for rid in ("1", "2", "3", "4", "5"):  # (9 may have been cancelled before)
        assert rank0[rid].startswith("failed: tensor parallel: "), (rid, rank0[rid])


def test_a_hung_rank_1_fails_the_requests_and_stops_rank_0_within_the_timeout(failures):
    """Rank 1 SIGSTOPs itself after drawing 10 tokens: its socket stays open, so rank 0's
    collective just waits, until its watchdog (--tp-timeout 3 s) gives up on it: the
    in-flight requests fail naming the hang, and rank 0 exits with 2 on its own."""
    folder, procs, outputs = failures["hung"]
    assert procs[0].returncode == 2, outputs[0]
    rank0 = read(folder, 0, 0)
    assert "did not complete within 3s" in rank0["lost"] and "a rank is hung" in rank0["lost"]
    failed = [rid for rid in ("1", "2", "3", "4", "5") if isinstance(rank0[rid], str)]
    assert failed, rank0
    for rid in failed:
        assert rank0[rid].startswith("failed: tensor parallel: step "), rid
    assert procs[1].returncode == -signal.SIGKILL  # still stopped when rank 0 had gone


def test_a_startup_error_on_rank_1_surfaces_on_rank_0(failures):
    folder, procs, outputs = failures["startup"]
    assert procs[1].returncode != 0 and "FileNotFoundError" in outputs[1]
    assert procs[0].returncode != 0
    assert "1 rank(s) failed to start: rank 1: FileNotFoundError" in outputs[0]
    assert str(folder.parent / "no-such-model") in outputs[0]
