"""Models Ollama has already pulled: its manifests and blobs, read in place (never copied).

Layout (Ollama's server/modelpath.go and manifest.go): under `$OLLAMA_MODELS`, else
`~/.ollama/models`,
- `manifests/<host>/<namespace>/<model>/<tag>`: a JSON manifest whose `layers` each name a
  `mediaType` and a `digest` ("sha256:<hex>");
- `blobs/sha256-<hex>`: the layer contents.
A name `llama3.2:3b` is host `registry.ollama.ai`, namespace `library`, model `llama3.2`, tag `3b`
(tag `latest` when none is given); `user/model` has namespace `user`; `hf.co/org/repo:Q4_K_M`
has host `hf.co`. The `application/vnd.ollama.image.model` layer is the GGUF; `.params` holds
default options (JSON), `.template` Ollama's Go prompt template, `.system` a system prompt.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import attrs

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_MEDIA = "application/vnd.ollama.image."


@attrs.frozen
class OllamaModel:
    name: str  # the short form Ollama lists: "llama3.2:3b", "hf.co/org/repo:Q4_K_M"
    manifest: Path
    gguf: Path
    digest: str  # "sha256:<hex>" of the model layer
    size: int  # bytes of all layers
    modified_at: datetime.datetime
    params: dict[str, Any]  # the params layer (Ollama option names), {} when none
    template: str | None  # Ollama's Go template text (shown, not run: GGUF's Jinja one is)
    system: str | None


def store_root() -> Path:
    explicit = os.environ.get("OLLAMA_MODELS")
    return Path(explicit).expanduser() if explicit else Path.home() / ".ollama" / "models"


def split_name(name: str) -> tuple[str, str, str, str]:
    """An Ollama model name -> (host, namespace, model, tag), Ollama's defaults filled in."""
    rest, tag = name, DEFAULT_TAG
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
    parts = rest.split("/")
    if len(parts) == 1:
        return DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0], tag
    if len(parts) == 2:
        return DEFAULT_HOST, parts[0], parts[1], tag
    return parts[0], "/".join(parts[1:-1]), parts[-1], tag


def short_name(host: str, namespace: str, model: str, tag: str) -> str:
    """What Ollama lists: the default host and namespace left out."""
    if host == DEFAULT_HOST and namespace == DEFAULT_NAMESPACE:
        return f"{model}:{tag}"
    if host == DEFAULT_HOST:
        return f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def _blob(root: Path, digest: str) -> Path:
    return root / "blobs" / digest.replace(":", "-")


def _read_manifest(root: Path, manifest: Path, name: str) -> OllamaModel | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list):
        return None
    by_type: dict[str, dict] = {}
    for layer in layers:
        if isinstance(layer, dict) and isinstance(layer.get("mediaType"), str):
            by_type.setdefault(layer["mediaType"].removeprefix(_MEDIA).split(";")[0], layer)
    model = by_type.get("model")
    if model is None or not isinstance(model.get("digest"), str):
        return None  # e.g. a safetensors import kvgrove cannot read from the store
    gguf = _blob(root, model["digest"])
    if not gguf.is_file():
        return None

    def text(kind: str) -> str | None:
        layer = by_type.get(kind)
        if layer is None or not isinstance(layer.get("digest"), str):
            return None
        try:
            return _blob(root, layer["digest"]).read_text(encoding="utf-8")
        except OSError:
            return None

    params: dict[str, Any] = {}
    raw = text("params")
    if raw:
        try:
            loaded = json.loads(raw)
            params = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            params = {}
    size = sum(int(layer.get("size") or 0) for layer in layers if isinstance(layer, dict))
    modified = datetime.datetime.fromtimestamp(manifest.stat().st_mtime, datetime.UTC)
    return OllamaModel(
        name=name,
        manifest=manifest,
        gguf=gguf,
        digest=model["digest"],
        size=size,
        modified_at=modified,
        params=params,
        template=text("template"),
        system=text("system"),
    )


def lookup(name: str, root: Path | None = None) -> OllamaModel | None:
    """The store's model of that name, or None (no manifest, or no GGUF layer on disk)."""
    root = root or store_root()
    if not name or name.startswith(("/", ".")) or ".." in name.split("/"):
        return None
    host, namespace, model, tag = split_name(name)
    manifest = root / "manifests" / host / namespace / model / tag
    if not manifest.is_file():
        return None
    return _read_manifest(root, manifest, short_name(host, namespace, model, tag))


def list_models(root: Path | None = None) -> list[OllamaModel]:
    """Every model in the store with a GGUF layer on disk, by name."""
    root = root or store_root()
    base = root / "manifests"
    if not base.is_dir():
        return []
    found = []
    for manifest in sorted(p for p in base.rglob("*") if p.is_file()):
        parts = manifest.relative_to(base).parts
        if len(parts) < 4:
            continue
        host, *namespace, model, tag = parts
        name = short_name(host, "/".join(namespace), model, tag)
        entry = _read_manifest(root, manifest, name)
        if entry is not None:
            found.append(entry)
    return found
