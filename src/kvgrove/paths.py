"""Where kvgrove keeps what it downloads and caches (never inside the source tree)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The root cache directory: $KVGROVE_CACHE_DIR, else $XDG_CACHE_HOME/kvgrove, else ~/.cache."""
    explicit = os.environ.get("KVGROVE_CACHE_DIR")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "kvgrove"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def assets_dir() -> Path:
    """Downloaded third-party files (test vectors, reference tokenizers)."""
    path = cache_dir() / "assets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def kv_dir() -> Path:
    """The prefix cache's disk tier: $KVGROVE_KV_DIR, else <cache dir>/kv."""
    explicit = os.environ.get("KVGROVE_KV_DIR")
    path = Path(explicit) if explicit else cache_dir() / "kv"
    path.mkdir(parents=True, exist_ok=True)
    return path
