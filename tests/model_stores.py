"""Fake model stores in temp folders: Ollama's manifests + blobs, the Hugging Face hub cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def _blob(store: Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def add_to_store(store: Path, name_path: str, gguf: Path, *, params=None, template=None) -> None:
    """Write a manifest and blobs as `ollama pull` lays them out."""
    layers = [
        {"mediaType": "application/vnd.ollama.image.model", **_blob(store, gguf.read_bytes())}
    ]
    if template is not None:
        layers.append(
            {
                "mediaType": "application/vnd.ollama.image.template",
                **_blob(store, template.encode()),
            }
        )
    if params is not None:
        layers.append(
            {
                "mediaType": "application/vnd.ollama.image.params",
                **_blob(store, json.dumps(params).encode()),
            }
        )
    config = _blob(store, b'{"model_format":"gguf"}')
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
        "layers": layers,
    }
    path = store / "manifests" / name_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


def fake_hf_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """The hub cache layout: models--org--repo/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snap / name)
    return snap
