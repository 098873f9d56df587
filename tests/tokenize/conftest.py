"""Fixtures for the tokenizer tests: reference files fetched once from PyPI into the assets cache.

- llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf with .inp/.out) from the sdist of
  llama-cpp-python, which vendors llama.cpp.
- Real SentencePiece models from mistral-common's wheel (mistral_common/data/*.model.*).

Downloads are pinned by version and sha256, extracted into `kvgrove.paths.assets_dir()`, and
never enter the source tree.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import shutil
import tarfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest

from kvgrove.models.bundled import DEFAULT, pull
from kvgrove.paths import assets_dir

LLAMA_CPP_PYTHON = (
    "llama-cpp-python",
    "0.3.36",
    "sdist",
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
)
# A small multilingual corpus: CJK, emoji, combining marks, whitespace runs, code, RTL.
CORPUS: list[str] = [
    "Hello world",
    " leading space and trailing space ",
    "   three leading spaces",
    "tabs\tand\n\nnewlines\r\n  indented",
    "Unicode café naïve façade — “quotes” ‘single’ …",
    "Combining marks: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "中文测试：你好，世界！这是一个句子。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다.",
    "Русский текст с ёлкой.",
    "Ελληνικά κείμενα",
    "עברית מימין לשמאל: שלום עולם",
    "العربية من اليمين إلى اليسار: مرحبا بالعالم",
    "हिन्दी पाठ देवनागरी में",
    "ภาษาไทยไม่มีช่องว่าง",
    "Emoji: 🦙🚀👩‍👩‍👧‍👦 🇫🇷 👍🏽 ❤️",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
    "zero\u200bwidth\u200djoiner",
    "mixed 中文 and English and 日本語 and emoji 🎉",
    "a" * 50 + " " + "ab" * 20,
    "                    many spaces                    ",
    "\n\n\n\n",
    "It's we're they've I'm you'll he'd DON'T",
]


MISTRAL_COMMON = (
    "mistral-common",
    "1.13.1",
    "bdist_wheel",
    "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
)


def _fetch_release_file(name: str, version: str, packagetype: str, sha256: str) -> bytes:
    index_url = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(index_url, timeout=60) as r:
        index = json.load(r)
    for entry in index["releases"][version]:
        if entry["packagetype"] == packagetype and entry["digests"]["sha256"] == sha256:
            url = urllib.parse.urljoin(index_url, entry["url"])
            with urllib.request.urlopen(url, timeout=300) as r:
                data = r.read()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"sha256 mismatch for {url}")
            return data
    raise RuntimeError(f"{name}=={version} ({packagetype}, sha256 {sha256[:12]}) not on PyPI")


def _ready(folder: Path) -> bool:
    return (folder / ".complete").is_file()


def _publish(tmp: Path, folder: Path) -> Path:
    (tmp / ".complete").touch()
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def _unpacked(package: tuple[str, str, str, str], folder_name: str, unpack) -> Path:
    """The assets folder `folder_name`, filled once by `unpack(data, tmp)` from the package's
    release file (checked against its sha256) and published whole."""
    name, version, kind, sha = package
    folder = assets_dir() / folder_name
    if _ready(folder):
        return folder
    data = _fetch_release_file(name, version, kind, sha)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unpack(data, tmp)
    return _publish(tmp, folder)


@pytest.fixture(scope="session")
def llama_cpp_vocab_dir() -> Path:
    """Folder holding llama.cpp's ggml-vocab-*.gguf(.inp/.out) files."""

    def unpack(data: bytes, tmp: Path) -> None:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if (
                    member.isfile()
                    and len(parts) >= 2
                    and parts[-2] == "models"
                    and parts[-1].startswith("ggml-vocab-")
                    and "vendor/llama.cpp/models" in member.name
                ):
                    src = tar.extractfile(member)
                    assert src is not None
                    (tmp / parts[-1]).write_bytes(src.read())

    return _unpacked(LLAMA_CPP_PYTHON, f"llama.cpp-vocab-{LLAMA_CPP_PYTHON[1]}", unpack)


@pytest.fixture(scope="session")
def mistral_spm_dir() -> Path:
    """Folder holding mistral-common's SentencePiece models (tokenizer.model.v1, ...)."""

    def unpack(data: bytes, tmp: Path) -> None:
        with zipfile.ZipFile(io.BytesIO(data)) as whl:
            for member in whl.namelist():
                if member.startswith("mistral_common/data/") and ".model." in member:
                    (tmp / member.rsplit("/", 1)[1]).write_bytes(whl.read(member))

    return _unpacked(MISTRAL_COMMON, f"mistral-common-{MISTRAL_COMMON[1]}", unpack)


def _model_folder(tmp_root: Path, model_file: Path, name: str) -> Path:
    folder = tmp_root / name
    folder.mkdir(exist_ok=True)
    target = folder / "tokenizer.model"
    if not target.exists():
        shutil.copyfile(model_file, target)
    return folder


@pytest.fixture(scope="session")
def mistral_v1_folder(mistral_spm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with only tokenizer.model (Mistral 7B v0.1's SentencePiece model)."""
    root = tmp_path_factory.mktemp("spm")
    return _model_folder(root, mistral_spm_dir / "tokenizer.model.v1", "mistral-v1")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, fetched into kvgrove's cache on first use."""
    return pull(DEFAULT)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path: Path):
    from kvgrove.tokenize import read_gguf_metadata, tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf_path))


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return list(CORPUS)


@pytest.fixture(scope="session")
def llama_cpp_tokenizer(llama_cpp_vocab_dir: Path):
    """vocab name ('gpt-2', 'llama-spm', ...) -> Tokenizer, built once per session."""
    from kvgrove.tokenize import read_gguf_metadata, tokenizer_from_gguf

    @functools.cache
    def get(vocab: str):
        path = llama_cpp_vocab_dir / f"ggml-vocab-{vocab}.gguf"
        return tokenizer_from_gguf(read_gguf_metadata(path))

    return get
