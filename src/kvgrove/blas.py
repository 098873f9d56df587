"""Swap MLX's reference BLAS for OpenBLAS on Linux CPUs.

MLX's Linux CPU wheel links the netlib reference BLAS, tens of times slower than OpenBLAS for
float32 matmul (README's figures come from benchmarks/blas.py). Loading an OpenBLAS with
RTLD_GLOBAL *before* mlx is imported makes the dynamic linker resolve MLX's `cblas_*` symbols to
it (same results, measured by benchmarks/blas.py).
This runs on `import kvgrove`, so every entry point gets it; it never raises.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import sys
import sysconfig
from pathlib import Path

log = logging.getLogger(__name__)

_state: dict[str, str | None] = {"path": None, "reason": None}


def _candidates() -> list[Path]:
    """Explicit path, then the distribution's (built for every CPU), then cmeel's wheel."""
    explicit = os.environ.get("KVGROVE_OPENBLAS")
    found: list[Path] = [Path(explicit)] if explicit else []
    for sys_dir in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"):
        for sub in ("openblas-pthread/", "openblas-openmp/", ""):
            found += [Path(p) for p in sorted(glob.glob(f"{sys_dir}/{sub}libopenblas.so.0"))]
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    for root in sorted(r for r in roots if r):
        found += [
            Path(p) for p in glob.glob(os.path.join(root, "cmeel.prefix/lib/libopenblas.so.0"))
        ]
    return found


# cmeel-openblas wheels are built for one CPU (0.3.29: ZEN, 0.3.31: SKYLAKEX), not for all: running
# a SKYLAKEX build on a CPU without AVX-512 dies with SIGILL, so check before trusting one.
_TARGET_NEEDS = {
    "SKYLAKEX": {"avx512f", "avx512bw", "avx512vl"},
    "COOPERLAKE": {"avx512f", "avx512_bf16"},
    "SAPPHIRERAPIDS": {"avx512f", "amx_tile"},
    "ZEN": {"avx2", "fma"},
    "HASWELL": {"avx2", "fma"},
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _unsupported_target(path: Path) -> str | None:
    """The build target if this CPU cannot run it, else None (probed with RTLD_LOCAL)."""
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
    try:
        get_config = lib.openblas_get_config
    except AttributeError:
        return None
    get_config.restype = ctypes.c_char_p
    config = get_config().decode(errors="replace")
    if "DYNAMIC_ARCH" in config:
        return None
    flags = _cpu_flags()
    for target, needs in _TARGET_NEEDS.items():
        if f" {target}" in config and flags and not needs <= flags:
            return target
    return None


def preload() -> str | None:
    """Load OpenBLAS globally if possible. Returns its path, or None (with a one-line warning)."""
    if _state["path"] or _state["reason"]:
        return _state["path"]
    if not sys.platform.startswith("linux") or os.environ.get("KVGROVE_OPENBLAS") == "off":
        _state["reason"] = "not needed on this platform" if sys.platform != "linux" else "disabled"
        return None
    if "mlx.core" in sys.modules:
        _state["reason"] = "mlx was imported before kvgrove"
    else:
        errors = []
        for path in _candidates():
            try:
                target = _unsupported_target(path)
                if target:
                    errors.append(f"{path.name} is built for {target}, which this CPU is not")
                    continue
                ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                errors.append(str(exc).split(":")[-1].strip())
                continue
            _state["path"] = str(path)
            return _state["path"]
        _state["reason"] = "; ".join(dict.fromkeys(errors)) or "no OpenBLAS found"
    log.warning(
        "OpenBLAS not loaded (%s): float32 matmul on CPU will be tens of times slower. "
        "Install it with `apt-get install libopenblas0-pthread` (or set KVGROVE_OPENBLAS).",
        _state["reason"],
    )
    return None


def status() -> dict[str, str | None]:
    """Which BLAS is in use, for /api/memory-style reports and benchmarks."""
    return dict(_state)
