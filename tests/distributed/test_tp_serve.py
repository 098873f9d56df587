"""`kvgrove serve --tensor-parallel 2` on a tiny llama: the real CLI starts two ranks over
the loopback ring; the real `ollama` client gets the answer one rank gives, SIGTERM stops every
rank cleanly, and killing rank 1 mid-stream ends the stream with an error and rank 0 with a
non-zero exit. Every process runs under a deadline and its group is killed in a `finally`."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import ollama
import pytest

from kvgrove.config import Settings
from kvgrove.distributed.launch import free_ports
from kvgrove.serve import background
from tiny_models import write_tiny_model

DEADLINE_S = 60
OPTIONS = {"temperature": 0, "num_predict": 16}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tp") / "llama", "llama")


def _pythonpath() -> str:
    import kvgrove

    src = str(Path(kvgrove.__file__).parent.parent)
    return os.pathsep.join([src, *filter(None, os.environ.get("PYTHONPATH", "").split(":"))])


@contextlib.contextmanager
def tp_server(model: Path, n: int = 2, kv_dir: Path | None = None, *extra: str):
    """The server; with `kv_dir`, the prefix cache on with its disk tier there."""
    port = free_ports(1)
    cmd = [sys.executable, "-m", "kvgrove.cli", "serve", "--tensor-parallel", str(n), *extra]
    cmd += ["--model", str(model), "--port", str(port)]
    cmd += ["--kv-cache-dir", str(kv_dir)] if kv_dir else ["--no-prefix-cache"]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEADLINE_S
        while True:  # readiness: /health answers 200 once the ranks have loaded
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the tensor-parallel server never got ready"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)  # polling for readiness, not standing in for synchronization
        yield proc, url
    finally:
        ranks = _children(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        proc.wait()


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's child that runs `rank` (by its MLX_RANK)."""
    for pid in _children(launcher):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"MLX_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} among the launcher's children")


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_two_ranks_answer_what_one_rank_answers_and_stop_cleanly(tiny_llama, tmp_path):
    with background(Settings(model=str(tiny_llama), port=0, prefix_cache=False)) as one:
        expected = ollama.Client(host=one.url).generate(
            model="llama", prompt=PROMPT, raw=True, options=OPTIONS
        )
    with tp_server(tiny_llama, kv_dir=tmp_path) as (proc, url):
        ranks = _children(proc.pid)
        assert len(ranks) == 2
        client = ollama.Client(host=url)
        got = client.generate(model="llama", prompt=PROMPT, raw=True, options=OPTIONS)
        assert got.response == expected.response and got.eval_count == expected.eval_count > 3
        streamed = "".join(
            part.response
            for part in client.generate(
                model="llama", prompt=PROMPT, raw=True, options=OPTIONS, stream=True
            )
        )
        assert streamed == expected.response  # its prompt's KV restored from the cache
        assert httpx.get(f"{url}/api/cache", timeout=10).json()["hit_tokens"] > 0
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 0, out
        assert "rank 1 kvgrove.distributed.launch: stopped after" in out
        assert all(not Path(f"/proc/{pid}").exists() for pid in ranks)
    # Each rank wrote its own shard of the cache to its own folder on the way out.
    for rank in (0, 1):
        (folder,) = tmp_path.glob(f"*+tp{rank}of2")
        assert list(folder.glob("*/*.safetensors")), rank


def test_killing_rank_1_mid_stream_errors_the_stream_and_exits_non_zero(tiny_llama):
    # A rank 0 left inside a collective the dead rank never answers (the ring does not always
    # fail it) is ended by its watchdog: 5 s here.
    with tp_server(tiny_llama, 2, None, "--tp-timeout-seconds", "5") as (proc, url):
        rank1 = _rank_pid(proc.pid, 1)
        client = ollama.Client(host=url)
        stream = client.generate(
            model="llama", prompt=PROMPT, raw=True, options={"temperature": 0}, stream=True
        )
        killed = False
        with pytest.raises(
            ollama.ResponseError,
            match=r"peer was lost|lost the other ranks|did not complete within",
        ) as failure:
            for i, _ in enumerate(stream):
                if i == 2:
                    os.kill(rank1, signal.SIGKILL)
                    killed = True
            # The random model can end its stream (EOS) before rank 0 has met the loss in a
            # collective: then the next request's first step meets it.
            if not killed:
                os.kill(rank1, signal.SIGKILL)
            client.generate(model="llama", prompt=PROMPT, raw=True, options={"num_predict": 8})
        out, _ = proc.communicate(timeout=DEADLINE_S)
        assert proc.returncode == 1, (failure.value, out)
        assert "tensor parallel: " in out
