"""The disk tier's format: one safetensors file per trie node, written atomically, verified on load.

A file's header (format `kvgrove-kv-2`) carries everything needed to rebuild the trie after a
restart (its span's tokens, where it starts, the key of the prefix it hangs from, its own key,
the whole-state flag, the MLX dtypes, its last use) and a CRC-32 of the header and the tensor
bytes, verified on every load. Files are written to a temporary name, fsynced and renamed, so a
crash mid-write leaves nothing that is trusted; stray temporary files are removed at startup.
A folder's `recency.json` keeps the last use of nodes touched since they were written.

A disk that fails to write is marked degraded (`DiskHealth`: logged once, counted in
statistics) until a back-off has passed; the next write that succeeds clears the flag. What the
tiers do about it (drop instead of writing) is tiers.py's policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from kvgrove import faults
from kvgrove.memory.snapshots import is_dtype_name

log = logging.getLogger(__name__)

FORMAT = "kvgrove-kv-2"
RECENCY = "recency.json"


class CorruptEntry(Exception):
    """A disk file failed to parse or to verify."""


@attrs.frozen
class StoredNode:
    """What a file's header says of its node (read without loading the tensors)."""

    key: str
    start: int  # where the node's span starts in its path
    prefix: str  # path_key of the path above the node
    tokens: tuple[int, ...]  # the node's span
    kinds: tuple[str, ...]
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    whole: bool
    restore_point: bool
    last_use: int
    checksum: int


def path_key(tokens: Sequence[int]) -> str:
    """A stable name for a token prefix (the disk files' keys)."""
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).hexdigest()


def node_key(path: Sequence[int], start: int) -> str:
    """The file key of the node whose span starts at `start` of the token path `path`."""
    return f"{path_key(path)}-{start}"


def node_header(
    path: Sequence[int],
    start: int,
    *,
    whole: bool,
    restore_point: bool,
    kinds: Sequence[str],
    dtypes: dict[str, str],
    last_use: int,
) -> dict[str, str]:
    """The header fields of the node `path[start:]` (DiskStore.write adds format, key, crc32)."""
    return {
        "start": str(start),
        "tokens": json.dumps(list(path[start:])),
        "prefix": path_key(path[:start]),
        "whole": "1" if whole else "0",
        "restore_point": "1" if restore_point else "0",
        "kinds": json.dumps(list(kinds)),
        "dtypes": json.dumps(dtypes),
        "last_use": str(last_use),
    }


def describes(meta: dict[str, str], key: str, path: Sequence[int], start: int) -> bool:
    """Whether a file's header (filed under `key`) is exactly that of the node path[start:]."""
    return (
        meta.get("tokens") == json.dumps(list(path[start:]))
        and meta.get("start") == str(start)
        and key == node_key(path, start)
    )


def read_header(store: DiskStore, key: str) -> StoredNode:
    """Parse every field recovery uses, so a damaged header fails here (any exception: the
    caller deletes the file) and never later; the checksum itself is verified at read."""
    meta = store.header(key)
    with safe_open(str(store.path(key)), framework="numpy") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    tokens = tuple(json.loads(meta["tokens"]))
    if not tokens:
        raise CorruptEntry(f"{key}: an empty span")
    dtypes = json.loads(meta["dtypes"])
    for name, dtype in dtypes.items():  # a flipped byte can name no dtype at all
        if not is_dtype_name(dtype) or name not in shapes:
            raise CorruptEntry(f"{key}: {name} has no dtype {dtype!r} or no tensor")
    kinds = tuple(json.loads(meta["kinds"]))
    if dtypes.keys() != shapes.keys():  # a flipped byte in a name (or a duplicate JSON key)
        raise CorruptEntry(f"{key}: tensors {sorted(shapes)} but dtypes for {sorted(dtypes)}")
    for name in shapes:
        layer, _, part = name.partition(".")
        if not (layer.isdigit() and int(layer) < len(kinds) and part.isdigit()):
            raise CorruptEntry(f"{key}: a tensor {name!r} of no layer")
    return StoredNode(
        key=key,
        start=int(meta["start"]),
        prefix=meta["prefix"],
        tokens=tokens,
        kinds=kinds,
        dtypes=dtypes,
        shapes=shapes,
        whole=meta["whole"] == "1",
        restore_point=str(meta["restore_point"]) == "1",
        last_use=int(meta.get("last_use", "0")),
        checksum=int(meta["crc32"]),
    )


def _crc(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> int:
    """CRC-32 of the header (every field but the checksum itself) and the tensor bytes."""
    header = {k: v for k, v in meta.items() if k != "crc32"}
    crc = zlib.crc32(json.dumps(header, sort_keys=True).encode())
    for key in sorted(arrays):
        crc = zlib.crc32(key.encode(), crc)
        crc = zlib.crc32(np.ascontiguousarray(arrays[key]).data, crc)
    return crc


class DiskHealth:
    """Whether the disk tier is writable: degraded after a failed write, retried after a
    back-off (doubling up to `max_backoff`), cleared by the next write that succeeds. One per
    prefix cache (shared by its namespaces); `clock` is injectable for tests."""

    def __init__(
        self, *, backoff: float = 1.0, max_backoff: float = 60.0, clock: Any = time.monotonic
    ) -> None:
        self.backoff, self.max_backoff, self.clock = backoff, max_backoff, clock
        self.degraded = False
        self.write_errors = 0
        self.read_errors = 0
        self.dropped_writes = 0  # nodes dropped because they could not be written
        self.last_error = ""
        self._delay = backoff
        self._retry_at = 0.0

    def writable(self) -> bool:
        return not self.degraded or self.clock() >= self._retry_at

    def failed(self, exc: BaseException, where: Path) -> None:
        self.write_errors += 1
        self.last_error = f"{where}: {exc}"
        if not self.degraded:
            log.warning("disk tier degraded (writes dropped until it works again): %s", exc)
            self._delay = self.backoff
        else:
            self._delay = min(self._delay * 2, self.max_backoff)
        self.degraded = True
        self._retry_at = self.clock() + self._delay

    def succeeded(self) -> None:
        if self.degraded:
            log.warning("disk tier writable again")
        self.degraded = False

    def statistics(self) -> dict:
        return {
            "disk_degraded": self.degraded,
            "disk_write_errors": self.write_errors,
            "disk_read_errors": self.read_errors,
            "disk_dropped_writes": self.dropped_writes,
            "disk_last_error": self.last_error,
        }


class DiskStore:
    """One folder of safetensors files, written atomically and verified on load. The folder is
    made on the first write (an empty namespace leaves none)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.remove_strays()

    def remove_strays(self) -> list[str]:
        gone = []
        with contextlib.suppress(OSError):
            for stray in self.root.glob("*.tmp"):
                stray.unlink(missing_ok=True)
                gone.append(stray.name)
        return gone

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def write(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> int:
        """Write atomically; returns the checksum recorded in the header (raises OSError)."""
        meta = {**meta, "format": FORMAT, "key": key}
        checksum = _crc(arrays, meta)
        final = self.path(key)
        tmp = final.with_name(final.name + ".tmp")
        try:
            faults.check("disk.write")
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(arrays, str(tmp), metadata={**meta, "crc32": str(checksum)})
            if self.fsync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, final)
        except Exception as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise
            raise OSError(f"writing {final}: {exc}") from exc  # safetensors wraps some errors
        return checksum

    def read(self, key: str, checksum: int | None) -> tuple[dict[str, np.ndarray], dict]:
        """Load and verify (checksum over header and tensors, the header's own key); returns
        (arrays, header). Raises CorruptEntry on any failure, an I/O error included."""
        try:
            faults.check("disk.read")
            arrays = load_file(str(self.path(key)))
            meta = self.header(key)
            recorded = int(meta.get("crc32", "-1"))
            actual = _crc(arrays, meta)
        except Exception as exc:  # unreadable, or a damaged header the checksum cannot parse
            raise CorruptEntry(f"{key}: {exc}") from exc
        if actual != recorded or (checksum is not None and recorded != checksum):
            raise CorruptEntry(f"{key}: checksum mismatch")
        return arrays, meta

    def header(self, key: str) -> dict[str, str]:
        with safe_open(str(self.path(key)), framework="numpy") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CorruptEntry(f"{key}: not a {FORMAT} file")
        if meta.get("key") != key:
            raise CorruptEntry(f"{key}: the file says it is {meta.get('key')!r}")
        return meta

    def delete(self, key: str) -> None:
        with contextlib.suppress(OSError):  # a folder gone (or not one) holds no file to delete
            self.path(key).unlink(missing_ok=True)

    def stored_keys(self) -> list[str]:
        try:
            names = [p.name for p in self.root.glob("*.safetensors")]
        except OSError:
            return []
        return sorted(n.removesuffix(".safetensors") for n in names)

    def read_recency(self) -> dict[str, int]:
        try:
            data = json.loads((self.root / RECENCY).read_text())
            return {str(k): int(v) for k, v in data.items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def write_recency(self, recency: dict[str, int]) -> None:
        """Last use per key (rewritten at flush: disk nodes touched since they were written)."""
        final = self.root / RECENCY
        tmp = final.with_name(final.name + ".tmp")
        faults.check("disk.write")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(recency))
        os.replace(tmp, final)

    def remove_folder(self) -> None:
        """Remove the folder if nothing of ours is left in it."""
        with contextlib.suppress(OSError):
            (self.root / RECENCY).unlink(missing_ok=True)
            self.remove_strays()
            self.root.rmdir()
