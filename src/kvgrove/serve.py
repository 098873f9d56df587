"""The composition root: opens the channels, starts the actors in order, serves HTTP, shuts down.

Lifetimes nest: the HTTP server starts first (so /health can say 503 while the model loads),
then the actors (`start_engine`: the accountant, the executor, which loads the model on its MLX
thread, the pager and the scheduler, each running before the next needs it). On
SIGINT/SIGTERM (or `shutdown`), hypercorn stops accepting, gives in-flight streams
`shutdown_grace_seconds` to finish, then cancels them; the actors are cancelled last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
import mlx.core as mx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from kvgrove import faults, timeline
from kvgrove.actors.api import Runtime
from kvgrove.actors.engine import start_engine
from kvgrove.actors.executor import Executor
from kvgrove.actors.registry import ModelRegistry
from kvgrove.actors.warmup import warm_up
from kvgrove.config import Settings, add_serve_arguments, settings_from_args
from kvgrove.http.app import create_app
from kvgrove.http.guard import Gate
from kvgrove.models import quant

log = logging.getLogger(__name__)


@attrs.define
class Server:
    """What `serve` hands its starter: where it listens and how to reach its parts."""

    runtime: Runtime
    binds: list[str]
    ready: trio.Event
    shutdown: trio.Event

    @property
    def url(self) -> str:
        return self.binds[0]


class _Config(HypercornConfig):
    """hypercorn's config, whose listening sockets get `send_buffer_bytes` as SO_SNDBUF
    (accepted connections inherit it)."""

    send_buffer_bytes = 0

    def create_sockets(self) -> Any:
        sockets = super().create_sockets()
        if self.send_buffer_bytes:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)
        return sockets


def _hypercorn_config(settings: Settings) -> HypercornConfig:
    config = _Config()
    config.send_buffer_bytes = settings.socket_send_buffer_bytes
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.graceful_timeout = settings.shutdown_grace_seconds
    config.accesslog = None
    # Deliberate (see Settings): idle connections and unfinished headers close after this;
    # the per-read timeout stays off unless asked for (it would cut silent streaming readers).
    config.keep_alive_timeout = settings.keep_alive_timeout_seconds
    config.read_timeout = settings.read_timeout_seconds or None
    return config


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def warn_if_exposed(settings: Settings) -> bool:
    """Log a warning when the server listens beyond loopback with no API keys; True if so."""
    if settings.api_keys or is_loopback(settings.host):
        return False
    log.warning(
        "listening on %s with no API keys: anyone who can reach this address can use the "
        "server and time its prefix cache; pass --api-key (or KVGROVE_API_KEYS) or bind "
        "127.0.0.1",
        settings.host,
    )
    return True


# The GIL switch interval with a GPU (`Settings.switch_interval_seconds`).
GPU_SWITCH_INTERVAL_SECONDS = 0.001


def configure_mlx(settings: Settings) -> None:
    """MLX settings read from the environment when first needed (so before the first forward
    pass); a variable the user set wins."""
    if not settings.cudnn_attention:
        os.environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "0")
    interval = settings.switch_interval_seconds
    if not interval and mx.default_device().type == mx.DeviceType.gpu:
        interval = GPU_SWITCH_INTERVAL_SECONDS
    if interval:
        sys.setswitchinterval(interval)
    # Sharding knows QuantizedLinear, not the dense copies: tensor parallel keeps none.
    quant.set_dense_rows(settings.quantized_dense_rows if settings.tensor_parallel == 1 else 0)


async def _watch_signals(shutdown: trio.Event, cancel: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                cancel.cancel()
                return
            log.info("%s: shutting down gracefully", signal.Signals(signum).name)
            shutdown.set()


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    loader: Callable[[str | None], Any] | None = None,
    executor_factory: Callable[..., Executor] = Executor,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the server until `shutdown` is set (or a signal arrives); report a `Server` once bound.

    `loader` replaces `kvgrove.models.loading.load`, for the server's model and those loaded on
    demand (tests use it to hold a load open). `executor_factory` makes the executor (tensor
    parallel passes rank 0's, which broadcasts each step).
    """
    warn_if_exposed(settings)
    configure_mlx(settings)
    gate = Gate.for_settings(settings)
    runtime = Runtime(settings, actors={"gate": gate})
    shutdown = shutdown if shutdown is not None else trio.Event()
    ready = trio.Event()
    http_done = trio.Event()
    app = create_app(runtime, gate)

    async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            await hypercorn_serve(
                app,
                _hypercorn_config(settings),
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        finally:
            http_done.set()

    async def mark_stopping() -> None:
        await shutdown.wait()
        runtime.state = "stopping"

    async with trio.open_nursery() as nursery:
        if handle_signals:
            nursery.start_soon(_watch_signals, shutdown, nursery.cancel_scope)
        nursery.start_soon(mark_stopping)
        binds = await nursery.start(run_http)
        log.info("listening on %s (loading the model)", ", ".join(binds))
        task_status.started(Server(runtime, binds, ready, shutdown))

        async with trio.open_nursery() as actors:
            engine = await start_engine(
                actors, settings, loader=loader, executor_factory=executor_factory
            )
            if settings.max_loaded_models:
                registry = ModelRegistry(settings, loader=loader, own_path=engine.loaded.info.path)
                await actors.start(registry.run)
                runtime.registry = registry
            runtime.loaded = engine.loaded
            runtime.scheduler_inbox = engine.scheduler.inbox
            runtime.accountant_inbox = engine.accountant.inbox
            runtime.pager_inbox = engine.pager.inbox
            runtime.actors.update(engine.actors)
            if settings.warm_up and not shutdown.is_set():
                await warm_up(
                    engine.scheduler.inbox,
                    engine.loaded.tokenizer,
                    context_tokens=min(
                        settings.default_context_tokens, engine.loaded.info.context_length
                    ),
                    reply_channel_items=settings.reply_channel_items,
                )
            if not shutdown.is_set():
                runtime.state = "ready"
            freeze_startup_objects()
            ready.set()
            log.info("ready: %s", engine.loaded.info.name)
            try:
                await http_done.wait()
            finally:
                gc.unfreeze()
            actors.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def freeze_startup_objects() -> None:
    """Leave what loading and the warm-up made out of Python's garbage collections from now on
    (`gc.freeze`; `serve` unfreezes it as it stops). An oldest-generation collection visits every
    tracked object and stops every thread meanwhile, the MLX thread's steps included: the
    startup's objects (modules, the tokenizer's tables, the model's modules) are most of what it
    would visit, and none of them becomes garbage while serving."""
    gc.collect()
    gc.freeze()


@attrs.define
class Background:
    """A server running in a thread of its own (see `background`)."""

    server: Server
    token: trio.lowlevel.TrioToken

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def runtime(self) -> Runtime:
        return self.server.runtime

    def on_server(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the server's trio thread (actor state is read only there); from a thread."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)


@contextlib.contextmanager
def background(settings: Settings, *, ready_seconds: float = 300) -> Iterator[Background]:
    """Serve in a thread (its own trio run) for the duration of the block, ready on entry;
    shut down gracefully on exit. For tests, benchmarks and embedding."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(partial(serve, settings, handle_signals=False))
            box["bg"] = Background(server, trio.lowlevel.current_trio_token())
            await server.ready.wait()
            ready.set()

    def thread_main() -> None:
        try:
            trio.run(run)
        except BaseException as e:  # surfaced to the caller below
            box["error"] = e
            ready.set()

    thread = threading.Thread(target=thread_main, name="kvgrove-server", daemon=True)
    thread.start()
    if not ready.wait(ready_seconds):
        raise TimeoutError("the server did not become ready")
    if "error" in box:
        raise box["error"]
    bg: Background = box["bg"]
    try:
        yield bg
    finally:
        with contextlib.suppress(trio.RunFinishedError):
            bg.token.run_sync_soon(bg.server.shutdown.set)
        thread.join(settings.shutdown_grace_seconds + 30)


def main(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    faults.arm_from_environment()  # only the fault-injection tests set KVGROVE_FAULTS
    if settings.timeline_file is not None:
        try:  # a path it cannot write fails now, not after serving
            with open(settings.timeline_file, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            message = f"--timeline-file: cannot write {settings.timeline_file}: {exc}"
            raise SystemExit(message) from None
        timeline.start()
    try:
        trio.run(partial(serve, settings))
    finally:
        if settings.timeline_file is not None:
            try:
                n = timeline.stop(settings.timeline_file)
                log.info("timeline: %d events written to %s", n, settings.timeline_file)
            except OSError:
                log.exception("writing the timeline to %s failed", settings.timeline_file)
    # Everything is shut down and the prefix cache is on disk. Skip the interpreter's teardown:
    # destroying MLX's stream worker threads during finalization intermittently aborted the
    # process ("terminate called without an active exception", exit 134) after a clean stop.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kvgrove.serve")
    add_serve_arguments(parser)
    main(settings_from_args(parser.parse_args()))
