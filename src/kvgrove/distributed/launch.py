"""`kvgrove serve --tensor-parallel N`: start the ranks, run this process's rank.

Without `MLX_RANK` in the environment this process is the launcher. On one machine it starts
the N ranks itself over the loopback ring (what `mlx.launch --backend ring -n N` does: a
hostfile of 127.0.0.1 ports in `MLX_HOSTFILE`, the rank in `MLX_RANK`), each in its own
session, and supervises them: SIGINT/SIGTERM go to rank 0 (which stops the others); when any
rank exits, the rest get `settings.shutdown_grace_seconds` + 15 s to follow (5 s when rank 0
failed first: a follower still running then is hung), then are killed.
The exit code is rank 0's if it failed, else 1 if any rank failed, else 0. With `--hostfile`
it runs `mlx.launch --hostfile FILE` instead (ranks on several machines, started over ssh).

With `MLX_RANK` set this process is a rank: rank 0 serves HTTP with `TensorParallelExecutor`
and exits 1 when it loses the other ranks (a collective failed, or a step outlasted
`tp_timeout_seconds`: a hung rank), after failing the in-flight requests, within
`shutdown_grace_seconds` + 10 s at most; the others run the follower loop and exit 0 when
rank 0 says stop, 1 on any error or a step outlasting the timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from functools import partial
from pathlib import Path

from kvgrove.config import Settings

log = logging.getLogger(__name__)


def free_ports(n: int, avoid: tuple[int, ...] = ()) -> int:
    """A base port with n consecutive free loopback ports (the ring listens on base + rank),
    none of them in `avoid` (the HTTP port, not bound yet when the ranks start)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535 or any(base <= p < base + n for p in avoid):
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise RuntimeError(f"no {n} consecutive free loopback ports")


def main(settings: Settings, argv: list[str]) -> int:
    """The CLI's entry for `serve` with tensor_parallel > 1; argv is the CLI's own."""
    if "MLX_RANK" in os.environ:
        return run_rank(settings)
    command = [sys.executable, "-m", "kvgrove.cli", *argv]
    if settings.hostfile:
        launch = Path(sys.executable).parent / "mlx.launch"
        cmd = [str(launch), "--hostfile", settings.hostfile, "--python", sys.executable, "--"]
        return subprocess.call([*cmd, "-m", "kvgrove.cli", *argv])
    return supervise(settings, command)


def supervise(settings: Settings, command: list[str]) -> int:
    n = settings.tensor_parallel
    base = free_ports(n, avoid=(settings.port,))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump([[f"127.0.0.1:{base + r}"] for r in range(n)], f)
    procs: list[subprocess.Popen] = []
    previous = {}

    def forward(signum, frame):  # rank 0 shuts down gracefully and stops the others
        if procs:
            with contextlib.suppress(ProcessLookupError):
                procs[0].send_signal(signal.SIGTERM)

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)
        for rank in range(n):
            env = {**os.environ, "MLX_HOSTFILE": f.name, "MLX_RANK": str(rank)}
            procs.append(subprocess.Popen(command, env=env, start_new_session=True))
        pid, status = _wait_any(procs)
        first = next(p for p in procs if p.pid == pid)
        first.returncode = os.waitstatus_to_exitcode(status)
        if first.returncode != 0:
            log.error("rank %d exited with %d", procs.index(first), first.returncode)
        # Rank 0 failed: the followers' next collective fails at once, so one still running
        # after a short grace is hung. Otherwise the rest need their graceful stop (rank 0
        # failing the in-flight requests; the followers writing their prefix cache to disk).
        # A follower that died can leave rank 0 inside a collective the ring never fails (seen
        # under load): rank 0's watchdog ends it after tp_timeout_seconds, failing the in-flight
        # requests with an error first, so rank 0 gets that long before it is killed.
        failed0 = first is procs[0] and first.returncode != 0
        grace = 5.0 if failed0 else settings.shutdown_grace_seconds + 15
        if first is not procs[0]:
            grace += settings.tp_timeout_seconds
        for p in procs:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.error("rank %d did not stop within %.0fs: killing it", procs.index(p), grace)
                grace = 0.1
        codes = [p.returncode for p in procs]
        return codes[0] if codes[0] not in (0, None) else (1 if any(codes) else 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        os.unlink(f.name)


def _wait_any(procs: list[subprocess.Popen]) -> tuple[int, int]:
    """Block until one of procs exits (signals interrupt and resume the wait)."""
    pids = {p.pid for p in procs}
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid in pids:
            return pid, status


def run_rank(settings: Settings) -> int:
    import mlx.core as mx

    group = mx.distributed.init(strict=True)
    rank = group.rank()
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
        force=True,
    )
    if group.size() != settings.tensor_parallel:
        log.error(
            "%d ranks started, --tensor-parallel asks %d", group.size(), settings.tensor_parallel
        )
        return _exit(2)
    return _exit(_serve(settings, group) if rank == 0 else _follow(settings, group))


def _serve(settings: Settings, group) -> int:
    import trio

    from kvgrove import faults, serve
    from kvgrove.distributed.executor import TensorParallelExecutor, tensor_parallel_settings

    faults.arm_from_environment()
    settings = tensor_parallel_settings(settings)
    shutdown = trio.Event()
    lost: list[str] = []

    def on_lost(message: str) -> None:
        lost.append(message)
        shutdown.set()  # every step fails from now on: in-flight requests end with the error
        # The graceful stop has its grace; past it (something still waits on a hung rank),
        # leave regardless: rank 0 must not hang because another rank does.
        limit = settings.shutdown_grace_seconds + 10
        timer = threading.Timer(limit, _give_up, (limit,))
        timer.daemon = True
        timer.start()

    factory = partial(TensorParallelExecutor, group=group, on_lost=on_lost)
    try:
        trio.run(partial(serve.serve, settings, shutdown=shutdown, executor_factory=factory))
    except BaseException:
        log.exception("rank 0 failed")
        return 1
    return 1 if lost else 0


def _give_up(seconds: float) -> None:
    log.error("rank 0 did not stop within %.0fs of losing the other ranks: exiting", seconds)
    _exit(1)


def _follow(settings: Settings, group) -> int:
    from kvgrove.distributed.executor import follower

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when to stop
    try:
        steps = follower(settings, group).run()
    except BaseException:
        log.exception("follower failed")
        return 1
    log.info("stopped after %d steps", steps)
    return 0


def _exit(code: int) -> int:
    # Skip the interpreter's teardown (as `kvgrove serve` does): destroying MLX's stream
    # threads during finalization intermittently aborts the process after a clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
