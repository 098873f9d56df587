"""Servers for the benchmarks: kvgrove and mlx-lm's, each a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
# mlx-lm's server, with kvgrove imported first so both servers run on the same OpenBLAS.
MLX_LM_SERVER = "import kvgrove, runpy; runpy.run_module('mlx_lm.server', run_name='__main__')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def mlx_folder(model: str | None) -> tuple[str, Path]:
    """The model as an MLX folder (weights, config, tokenizer), written once into the cache."""
    from mlx_lm.utils import save_config, save_model

    from kvgrove.models.loading import load
    from kvgrove.paths import cache_dir

    lm = load(model)
    folder = cache_dir() / "bench" / f"{lm.info.name}-{lm.info.fingerprint}-mlx"
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        save_model(folder, lm.model)
        lm.tokenizer.backend.tok.save(str(folder / "tokenizer.json"))
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": lm.tokenizer.eos_token,
            "bos_token": lm.tokenizer.bos_token,
            "chat_template": lm.tokenizer.chat_template,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        save_config(dict(lm.config), folder / "config.json")  # last: marks the folder complete
    return lm.info.name, folder


def _pythonpath() -> str:
    """This checkout's src first, then whatever PYTHONPATH the run already has (its
    dependencies may come from there)."""
    return os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)


def _output(log: Path | None):
    return subprocess.DEVNULL if log is None else open(log, "ab")


def start_kvgrove(
    port: int,
    model: str | None,
    flags: Sequence[str] = (),
    env: dict | None = None,
    log: Path | None = None,
) -> subprocess.Popen:
    """`log`: a file that gets the server's stdout and stderr (None = discarded)."""
    argv = [sys.executable, "-m", "kvgrove.serve", "--port", str(port)]
    argv += ["--model", model] if model else []
    environ = {**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}
    out = _output(log)
    return subprocess.Popen([*argv, *flags], env=environ, stdout=out, stderr=out)


def start_mlx_lm(
    port: int, folder: Path, flags: Sequence[str] = (), log: Path | None = None
) -> subprocess.Popen:
    argv = [sys.executable, "-c", MLX_LM_SERVER, "--model", str(folder)]
    argv += ["--host", "127.0.0.1", "--port", str(port), *flags]
    environ = {**os.environ, "PYTHONPATH": _pythonpath()}
    out = _output(log)
    return subprocess.Popen(argv, env=environ, stdout=out, stderr=out)


# llama.cpp's server (llama-cpp-python's), built into a venv of its own (DEVELOPERS.md says how).
LLAMA_CPP_PYTHON = os.environ.get("KVGROVE_LLAMA_CPP_PYTHON", "/work/llamacpp-venv/bin/python")


def start_llama_cpp(
    port: int, gguf: Path, n_ctx: int = 4096, flags: Sequence[str] = ()
) -> subprocess.Popen:
    """`python -m llama_cpp.server` on `gguf`, one thread per core (as kvgrove's MLX uses)."""
    argv = [LLAMA_CPP_PYTHON, "-m", "llama_cpp.server", "--model", str(gguf)]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx)]
    argv += ["--n_threads", str(os.cpu_count() or 1), *flags]
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # its own venv only
    # OpenMP's default spin-waiting collapses when the cores are shared (measured here, load ~10
    # on 2 cores: a 261-token prefill took 31 s on 2 spinning threads, 7.7 s passive or on 1).
    environ.setdefault("OMP_WAIT_POLICY", "passive")
    return subprocess.Popen(argv, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def wait_ready(url: str, proc: subprocess.Popen, deadline_seconds: float = 300) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        with trio.fail_after(deadline_seconds):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}")
                try:
                    if (await client.get("/v1/models")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.25)
