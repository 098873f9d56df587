"""Hugging Face repo names (`org/repo`, `org/repo:Q4_K_M` for a GGUF repo's file) through
huggingface_hub: resolved from the local cache (`HF_HOME` / `HF_HUB_CACHE`) without the network,
and downloaded into that cache by `pull`.

A snapshot with config.json is a model folder (mlx-community repos, plain transformers repos);
otherwise its .gguf files are candidates, picked by the `:tag` (matched case-insensitively in
the file name) or, with no tag, the only one there.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from pathlib import Path

REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<tag>[\w.-]+))?$")
FOLDER_FILES = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "*.tiktoken",
    "*.txt",
]

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


class NotInCache(LookupError):
    pass


def split(name: str) -> tuple[str, str | None] | None:
    """`org/repo[:tag]` -> (repo, tag), or None when `name` is not of that form."""
    m = REPO.match(name.removeprefix("hf.co/").removeprefix("huggingface.co/"))
    return (m["repo"], m["tag"]) if m else None


def cache_dir() -> Path:
    """HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (read at each call, so a
    changed environment is honoured)."""
    explicit = os.environ.get("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _pick(snapshot: Path, tag: str | None, name: str) -> Path:
    if (snapshot / "config.json").is_file() and tag is None:
        return snapshot
    ggufs = sorted(snapshot.rglob("*.gguf"))
    if tag is not None:
        ggufs = [p for p in ggufs if tag.lower() in p.name.lower()]
    if len(ggufs) == 1:
        return ggufs[0]
    if not ggufs:
        raise NotInCache(f"{name}: the cached snapshot {snapshot} has no model for it")
    names = ", ".join(p.name for p in ggufs)
    raise NotInCache(f"{name}: several GGUF files match ({names}); add :<quant> to the name")


def lookup(name: str) -> Path | None:
    """The cached folder or GGUF file for `name`, or None when it is not in the cache."""
    parsed = split(name)
    if parsed is None:
        return None
    repo, tag = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo, local_files_only=True, cache_dir=cache_dir()))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    try:
        return _pick(snapshot, tag, name)
    except NotInCache:
        return None


def pull(name: str, progress: Progress | None = None) -> Path:
    """Download `name` into the Hugging Face cache (only what kvgrove reads) and return it.

    progress: called with (bytes done, bytes total) as files arrive; None = huggingface_hub's
    own progress bars."""
    parsed = split(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a Hugging Face repo name (org/repo[:quant])")
    repo, tag = parsed
    from huggingface_hub import HfApi, snapshot_download

    patterns = None
    if tag:  # fnmatch is case-sensitive on Linux: the tag as given, lower- and upper-case
        patterns = list(dict.fromkeys(f"*{t}*.gguf" for t in (tag, tag.lower(), tag.upper())))
    if patterns is None:
        files = [
            s.rfilename for s in (HfApi().model_info(repo, files_metadata=False).siblings or [])
        ]
        patterns = FOLDER_FILES if "config.json" in files else ["*.gguf"]
    kwargs = {}
    if progress is not None:
        kwargs["tqdm_class"] = _progress_tqdm(progress)
    snapshot = Path(
        snapshot_download(repo, allow_patterns=patterns, cache_dir=cache_dir(), **kwargs)
    )
    return _pick(snapshot, tag, name)


def _progress_tqdm(progress: Progress) -> type:
    """A tqdm class that reports the byte-counting bars to `progress` (and prints nothing)."""
    from tqdm.auto import tqdm

    class Reporter(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = io.StringIO()
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            if self.unit == "B" and self.total:
                progress(int(self.n), int(self.total))
            return out

    return Reporter
