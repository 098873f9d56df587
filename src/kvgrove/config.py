"""Server settings: one frozen attrs class, from CLI flags over KVGROVE_* environment variables.

Every size and time carries its unit in its name (`_tokens`, `_bytes`, `_seconds`, `_items`).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Mapping
from typing import Any

import attrs

from kvgrove import paths

GiB = 2**30
MiB = 2**20


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


def _auto_or_non_negative(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value < -1:
        raise ValueError(f"{attribute.name} must be >= 0, or -1 for auto, got {value}")


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def default_budgets_bytes() -> dict[str, int]:
    """Tier budgets for this machine: the device tier (weights, live caches and cached KV; on a
    CPU or unified memory that is RAM) half of physical memory, the host tier a fifth, the disk
    tier half the free space where the cache lives, at most 64 GiB."""
    ram = _physical_memory_bytes()
    try:
        free = shutil.disk_usage(paths.cache_dir()).free
    except OSError:
        free = 0
    return {"device": ram // 2, "host": ram // 5, "disk": min(64 * GiB, free // 2)}


@attrs.frozen
class DeviceSplit:
    """The device budget's shares (bytes): `live_bytes` bounds the running sequences' caches
    (the scheduler preempts past it), `prefix_bytes` the prefix cache's device tier, which also
    gives way to live caches that outgrow their share within a step (the executor lowers it to
    what they leave before it rebalances)."""

    weights_bytes: int
    live_bytes: int
    prefix_bytes: int

    @property
    def room_bytes(self) -> int:
        """What the weights leave: live caches and cached KV together stay within it."""
        return self.live_bytes + self.prefix_bytes


# The auto values of `Settings.prefill_step_tokens` and `Settings.share_prefill_min_tokens` with
# a GPU (see there).
GPU_PREFILL_STEP_CHUNKS = 4
GPU_SHARE_PREFILL_MIN_TOKENS = 64


@attrs.frozen
class Settings:
    """Everything `kvgrove serve` can be told. Defaults bind where Ollama does."""

    host: str = "127.0.0.1"
    port: int = attrs.field(default=11434, validator=_non_negative)  # 0 = any free port
    model: str | None = None  # None = the bundled default
    # Work per scheduler step: a long prompt is prefilled this many tokens at a time, so a
    # cancellation or another request's decode step waits at most one chunk.
    prefill_chunk_tokens: int = attrs.field(default=2048, validator=_positive)
    # Prompt tokens one step prefills in all, over every prompt it starts (each one still in
    # pieces of at most `prefill_chunk_tokens`, which bound one prompt's attention); 0 = auto:
    # 4x prefill_chunk_tokens with a GPU, else prefill_chunk_tokens. On the H200 (8B bf16) a
    # burst of 64 prompts of ~52 tokens took four prefill steps at 2,048 (39 prompts in one,
    # then the rest) and two at 8,192 (`prefill_step_tokens_for`).
    prefill_step_tokens: int = attrs.field(default=0, validator=_non_negative)
    # Context window for requests that give no num_ctx; always capped by the model's maximum.
    default_context_tokens: int = attrs.field(default=4096, validator=_positive)
    # Hard cap on any request's context (0 = the model's maximum).
    max_context_tokens: int = attrs.field(default=0, validator=_non_negative)
    max_running_sequences: int = attrs.field(default=32, validator=_positive)
    # Channel capacities (items). The reply channel is per request: a client that stops
    # reading fills only its own and parks only its own sequence.
    scheduler_inbox_items: int = attrs.field(default=256, validator=_positive)
    reply_channel_items: int = attrs.field(default=64, validator=_positive)
    executor_inbox_items: int = attrs.field(default=1, validator=_positive)
    accountant_inbox_items: int = attrs.field(default=256, validator=_positive)
    pager_inbox_items: int = attrs.field(default=64, validator=_positive)
    # On SIGINT/SIGTERM in-flight streams get this long to finish, then are cancelled.
    shutdown_grace_seconds: float = attrs.field(default=5.0, validator=_non_negative)
    # Byte budgets per tier (the prefix cache fills them; the accountant reports them). The
    # defaults come from the machine: see default_budgets_bytes().
    device_budget_bytes: int = attrs.field(
        factory=lambda: default_budgets_bytes()["device"], validator=_non_negative
    )
    host_budget_bytes: int = attrs.field(
        factory=lambda: default_budgets_bytes()["host"], validator=_non_negative
    )
    disk_budget_bytes: int = attrs.field(
        factory=lambda: default_budgets_bytes()["disk"], validator=_non_negative
    )
    # Access: bearer keys accepted on every route but /health, / and /openapi.json. Empty =
    # open (then bind only to loopback; `serve` warns otherwise). Each key also selects its
    # own prefix-cache namespace.
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple, repr=False)
    # Generation requests (/api/generate, /api/chat, /v1/*completions) at once; beyond it they
    # queue, and beyond the queue they get 429 with Retry-After.
    max_concurrent_requests: int = attrs.field(default=64, validator=_positive)
    max_queued_requests: int = attrs.field(default=256, validator=_non_negative)
    retry_after_seconds: int = attrs.field(default=1, validator=_positive)
    # Connections hold nothing until their request is in. hypercorn closes a connection that is
    # idle between requests, or whose request headers are not all in, after
    # `keep_alive_timeout_seconds`; a generation request is admitted only once its whole body
    # is in, and a body not in within `body_timeout_seconds` gets 408 (0 = no limit).
    # `read_timeout_seconds` is hypercorn's per-read timeout: off (0) by default because it
    # also counts a client's silence while it reads a long streamed answer; a half-open socket
    # is instead caught by the two limits above (idle or mid-request) or, mid-answer, by the
    # stall limits below.
    keep_alive_timeout_seconds: float = attrs.field(default=5.0, validator=_positive)
    body_timeout_seconds: float = attrs.field(default=30.0, validator=_non_negative)
    read_timeout_seconds: float = attrs.field(default=0.0, validator=_non_negative)
    # SO_SNDBUF of each connection (0 = the kernel's autotuned default, up to megabytes): a
    # smaller one bounds the kernel memory a non-reading client pins, and makes its stall
    # reach the scheduler sooner.
    socket_send_buffer_bytes: int = attrs.field(default=0, validator=_non_negative)
    # A sequence whose reply channel has been full (its client not reading) for
    # `stall_seconds` leaves the batch: its KV goes to the prefix cache, its running slot and
    # live memory are freed, and it resumes when its client drains. One stalled for
    # `stall_limit_seconds` in all is ended with an in-stream error.
    stall_seconds: float = attrs.field(default=20.0, validator=_positive)
    stall_limit_seconds: float = attrs.field(default=600.0, validator=_positive)
    # Request bodies over this get 413.
    max_body_bytes: int = attrs.field(default=16 * MiB, validator=_positive)
    # Cap on num_predict / max_tokens: larger explicit values get 400 naming the field; a
    # request that asks for "until the context limit" stops here with done_reason "length".
    max_predict_tokens: int = attrs.field(default=32768, validator=_positive)
    # The prefix cache: on by default. Its device tier gets `device_cache_bytes` (0 = half of
    # what the device budget leaves after the weights), live caches the rest of that
    # (`device_split`); host and disk tiers get their budgets.
    prefix_cache: bool = True
    # A cached prefix shorter than this is not restored (its lock is let go and the prompt
    # prefills in full, beside other fresh prompts), and a prompt waits for another's prefill
    # only to gain at least this many tokens; 0 = restore and wait for any. A restored prompt
    # prefills in a pass of its own after a pager round trip (a follower after a wait and a
    # second match): on the H200 trace such a pass costs 20-35 ms, while 16 more tokens in a
    # batched prefill cost well under 1 ms there. On this CPU (SmolLM2-135M, 16 prompts of
    # k + 40 tokens, benchmarks/min_prefix.py) the two are within the noise up to k = 16
    # (restore / recompute wave time 0.81-1.23x) and restoring wins beyond (0.61x at 32,
    # 0.42x at 64). 16 is also vLLM's block: it reuses whole 16-token blocks only.
    min_prefix_tokens: int = attrs.field(default=16, validator=_non_negative)
    # A prompt's KV is stored as it prefills (for requests with its prefix that come meanwhile,
    # which may wait for it) only if it computes at least this many tokens; a shorter prompt
    # is stored when it finishes, and nobody waits for its prefill. -1 = auto: 64 with a GPU,
    # else 0 (every prompt). Storing costs every sequence of the batch the same time whatever
    # the prompt's length: on the H200 (8B bf16) 62 prompts stored after their prefill took
    # 98 ms (two copies per layer each), ~1.6 ms a prompt, while the batched prefill computed
    # a token in ~0.04 ms (3,224 tokens in 134 ms): a prompt under ~40 tokens costs less to
    # compute again than to store, even for a request that reuses it. On a CPU a token costs
    # milliseconds (`share_prefill_min_tokens_for`).
    share_prefill_min_tokens: int = attrs.field(default=-1, validator=_auto_or_non_negative)
    # New prompts that arrive together prefill in one left-padded forward pass (plain-attention
    # models); off = one forward per prompt.
    batch_prefill: bool = True
    # The batched decode launches step N+1 from step N's still-lazy tokens before N's tokens go
    # up (plain-attention models), for a step the scheduler expects rows of to decode next
    # (`Step.ahead`): "on", "off", or "auto" = on with a GPU. Run ahead of every step it lost on
    # the H200 (8B bf16: 534 vs 673 tok/s at 64 rows): each join undid the step run ahead. Now
    # nothing runs ahead of a step that a join follows. Off on a CPU, where the host and the
    # model share the cores (benchmarks/overlap.py).
    decode_overlap: str = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "on", "off"))
    )
    # A plain decode step is followed by its continuation (each row fed the token it sampled)
    # without waiting for the scheduler, while the scheduler sees no change coming: the device
    # does not wait for the tokens to reach the clients. Off = wait for each step's plan.
    decode_follow: bool = True
    # A continuation is queued on the MLX thread while the step before it runs, so it starts the
    # moment that one ends (`kvgrove.actors.executor`); off = it goes when trio hands it over.
    queued_continuations: bool = True
    # Python's GIL switch interval (sys.setswitchinterval) while serving; 0 = auto: 1 ms with a
    # GPU, else Python's own (5 ms). The MLX thread gives up the GIL at every evaluation and
    # waits for it again while the trio thread streams tokens, up to one interval each time: on
    # the H200 (8B bf16, 64 rows) a decode step waited 3.4 ms for it, and 1 ms took a 64-row
    # wave from 2,510 to 3,115 tok/s and one stream from 166 to 194; 0.2 ms lost (2,264, 133).
    switch_interval_seconds: float = attrs.field(default=0.0, validator=_non_negative)
    # With no row decoding, the scheduler waits up to this long for the prefix lookups of the
    # prompts already submitted before it plans a step, so a burst that arrives at once starts
    # in one prefill step rather than its first prompt alone, then the rest behind it (the
    # lookups run on the MLX thread, behind any step). 0 = plan at once.
    admission_wait_seconds: float = attrs.field(default=0.02, validator=_non_negative)
    device_cache_bytes: int = attrs.field(default=0, validator=_non_negative)
    kv_cache_dir: str | None = None  # None = <kvgrove cache dir>/kv
    # Other models on demand, besides `model` (which stays loaded): a request naming one loads
    # it; at most this many stay loaded (0 = serve `model` only), the least recently used idle
    # one unloading first; an idle one unloads after `keep_alive_seconds` (a request's
    # keep_alive overrides it; < 0 = never). Requests for a loading model wait while the load
    # progresses, failing once `model_load_timeout_seconds` pass without progress.
    max_loaded_models: int = attrs.field(default=2, validator=_non_negative)
    keep_alive_seconds: float = 300.0
    model_load_timeout_seconds: float = attrs.field(default=600.0, validator=_positive)
    # Tensor parallel (kvgrove.distributed): split the model across this many ranks over
    # mx.distributed; `serve` starts them (on this machine, or through mlx.launch on the hosts
    # of `hostfile`). Rank 0 serves HTTP; the others follow its steps.
    tensor_parallel: int = attrs.field(default=1, validator=_positive)
    hostfile: str | None = None
    # A step (or any collective) that takes longer means a rank is hung or stopped: rank 0
    # fails the in-flight requests and exits non-zero; a follower exits.
    tp_timeout_seconds: float = attrs.field(default=60.0, validator=_positive)
    # Before it says ready, the server runs a few tiny generations through its engine so MLX
    # compiles the kernels serving uses (kvgrove.actors.warmup). `kvgrove serve` turns it on
    # (--no-warm-up / KVGROVE_WARM_UP=0 to skip); servers built from Settings in code skip it.
    warm_up: bool = False
    # On CUDA, MLX's cuDNN attention builds a graph for every new (batch, query, key) shape:
    # a stall of seconds on the first request of each prompt length. Off by default (MLX's own
    # kernels then, no per-shape compile); --cudnn-attention turns it back on.
    cudnn_attention: bool = False
    # On CUDA, a batch whose rows differ in length decodes its attention with kvgrove's kernel
    # (kvgrove.models.attention): MLX's fused attention takes no array mask there, and its
    # masked fallback cost a 64-row decode of an 8B model on the H200 about half its speed.
    ragged_attention: bool = True
    # On a CPU, a prefill's attention softmax and SwiGLU run in numpy (kvgrove.models.host_exp):
    # MLX's Linux CPU exp is scalar, and it was most of a short prompt's prefill over a long
    # context.
    host_exp: bool = True
    # On a GPU, quantized layers also keep a dequantized copy when it fits in half the device's
    # memory, used for inputs of at least this many rows: on an H200 the dense copy is faster
    # than MLX's quantized matmul at every batch size, one row included (kvgrove.models.quant),
    # so by default every input takes it. 0 = never.
    quantized_dense_rows: int = attrs.field(default=1, validator=_non_negative)
    # Record a timeline of the server's work (kvgrove.timeline) and write it here (JSON lines)
    # when the server stops. None = off.
    timeline_file: str | None = None

    def prefill_step_tokens_for(self, gpu: bool) -> int:
        """`prefill_step_tokens`, auto resolved for a GPU (`gpu`) or a CPU."""
        if self.prefill_step_tokens:
            return self.prefill_step_tokens
        return self.prefill_chunk_tokens * (GPU_PREFILL_STEP_CHUNKS if gpu else 1)

    def share_prefill_min_tokens_for(self, gpu: bool) -> int:
        """`share_prefill_min_tokens`, auto resolved for a GPU (`gpu`) or a CPU."""
        if self.share_prefill_min_tokens >= 0:
            return self.share_prefill_min_tokens
        return GPU_SHARE_PREFILL_MIN_TOKENS if gpu else 0

    def device_split(self, weights_bytes: int) -> DeviceSplit:
        """How the one device budget is shared: the weights, then what they leave split between
        live caches and the prefix cache's device tier (`device_cache_bytes`, capped at what is
        left; 0 = half of it). weights + live + prefix <= device budget whenever the weights
        fit at all."""
        room = max(0, self.device_budget_bytes - weights_bytes)
        prefix = min(self.device_cache_bytes, room) if self.device_cache_bytes else room // 2
        return DeviceSplit(weights_bytes, room - prefix, prefix)

    def prefix_device_budget_bytes(self, weights_bytes: int) -> int:
        return self.device_split(weights_bytes).prefix_bytes

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from KVGROVE_<FIELD> variables (e.g. KVGROVE_PORT), then `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            raw = environ.get(f"KVGROVE_{field.name.upper()}")
            if raw is not None:
                values[field.name] = _parse(field, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _kind(field: attrs.Attribute) -> type:
    """The Python type of a field's values (fields with a factory default name it as a string)."""
    if isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
        return {"int": int, "float": float, "str": str, "bool": bool}[str(field.type)]
    return type(field.default)


def _parse(field: attrs.Attribute, raw: str) -> Any:
    kind = _kind(field)
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"KVGROVE_{field.name.upper()}: not a boolean: {raw!r}")
    if kind is tuple:  # KVGROVE_API_KEYS: several keys, separated by commas or whitespace
        return tuple(k for k in raw.replace(",", " ").split() if k)
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"KVGROVE_{field.name.upper()}: not a number: {raw!r}") from None
    optional = ("model", "kv_cache_dir", "hostfile", "timeline_file")
    return raw or None if field.name in optional else raw


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_HELP = {
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to bind (default 11434; 0 = any free port)",
    "model": "model name, GGUF file or model folder (default: the bundled model)",
    "prefill_chunk_tokens": "prompt tokens of one prompt per prefill step",
    "prefill_step_tokens": "prompt tokens per prefill step over all prompts (0 = 4x "
    "--prefill-chunk-tokens with a GPU, else --prefill-chunk-tokens)",
    "share_prefill_min_tokens": "store a prompt as it prefills only if it computes this many "
    "tokens, else when it finishes (-1 = 64 with a GPU, else 0)",
    "default_context_tokens": "context window when a request gives no num_ctx",
    "max_context_tokens": "cap on any request's context (0 = the model's maximum)",
    "max_running_sequences": "sequences decoded concurrently; more requests wait",
    "shutdown_grace_seconds": "how long in-flight streams may finish on shutdown",
    "device_budget_bytes": "byte budget of the accelerator tier",
    "host_budget_bytes": "byte budget of the host-memory tier",
    "disk_budget_bytes": "byte budget of the disk tier",
    "max_concurrent_requests": "generation requests served at once; more queue",
    "max_queued_requests": "generation requests that may queue; more get 429",
    "retry_after_seconds": "Retry-After sent with 429",
    "keep_alive_timeout_seconds": "close idle keep-alive connections (and unfinished headers)",
    "body_timeout_seconds": "408 for a request body not all in by then (0 = no limit)",
    "read_timeout_seconds": "hypercorn's per-read timeout (0 = off; it counts silent readers)",
    "socket_send_buffer_bytes": "SO_SNDBUF of each connection (0 = the kernel's default)",
    "stall_seconds": "a sequence whose client stopped reading leaves the batch after this",
    "stall_limit_seconds": "a client stalled this long in all gets an in-stream error",
    "max_body_bytes": "largest request body; larger get 413",
    "max_predict_tokens": "largest num_predict / max_tokens; also caps 'until the limit'",
    "min_prefix_tokens": "a cached or shared prefix shorter than this is recomputed, not "
    "restored or waited for (0 = any)",
    "device_cache_bytes": "device-tier budget of the prefix cache (0 = half what weights leave)",
    "kv_cache_dir": "folder of the prefix cache's disk tier (default ~/.cache/kvgrove/kv)",
    "max_loaded_models": "other models loaded on demand at once (0 = serve --model only)",
    "keep_alive_seconds": "how long an idle on-demand model stays loaded (< 0 = forever)",
    "model_load_timeout_seconds": "how long a request waits for a load making no progress",
    "tensor_parallel": "ranks to split the model across (mx.distributed ring; 1 = off)",
    "hostfile": "mlx.launch hostfile: run the --tensor-parallel ranks on these machines",
    "decode_overlap": "run a followed batched decode one step ahead: on, off or auto (= on "
    "with a GPU)",
    "tp_timeout_seconds": "a tensor-parallel step taking longer means a rank is hung: stop",
    "quantized_dense_rows": "GPU: quantized layers keep a dense copy for inputs of this many "
    "rows or more, where it fits (0 = never)",
    "switch_interval_seconds": "Python's GIL switch interval while serving (0 = 1 ms with a "
    "GPU, else Python's 5 ms)",
    "admission_wait_seconds": "with nothing decoding, wait up to this long for the prefix "
    "lookups of prompts already submitted before planning (0 = plan at once)",
    "timeline_file": "record a timeline of the server's work, written here (JSON lines) at "
    "stop: benchmarks/timeline.py reads it",
}


# Flags that set a setting to one value: flag -> (setting, value, help).
_SWITCHES = {
    "--no-prefix-cache": (
        "prefix_cache",
        False,
        "recompute every prompt in full [env KVGROVE_PREFIX_CACHE=0]",
    ),
    "--no-warm-up": (
        "warm_up",
        False,
        "say ready without warming up the engine [env KVGROVE_WARM_UP=0]",
    ),
    "--no-ragged-attention": (
        "ragged_attention",
        False,
        "on CUDA, a ragged batch's decode attention takes MLX's masked fallback, not kvgrove's "
        "kernel [env KVGROVE_RAGGED_ATTENTION=0]",
    ),
    "--no-host-exp": (
        "host_exp",
        False,
        "on a CPU, a prefill's attention softmax and SwiGLU stay MLX's, not numpy's "
        "[env KVGROVE_HOST_EXP=0]",
    ),
    "--no-queued-continuations": (
        "queued_continuations",
        False,
        "a continuation goes to the MLX thread when trio hands it over, not queued behind the "
        "step before it [env KVGROVE_QUEUED_CONTINUATIONS=0]",
    ),
    "--cudnn-attention": (
        "cudnn_attention",
        True,
        "on CUDA, use MLX's cuDNN attention (compiles per shape) [env KVGROVE_CUDNN_ATTENTION=1]",
    ),
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `kvgrove serve`'s flags; each defaults to its KVGROVE_* variable, then the default."""
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        metavar="KEY",
        help="accept this bearer key (repeatable; none = no authentication) "
        "[env KVGROVE_API_KEYS, comma-separated]",
    )
    for flag, (dest, value, text) in _SWITCHES.items():
        parser.add_argument(
            flag, dest=dest, action="store_const", const=value, default=None, help=text
        )
    for field in attrs.fields(Settings):
        if field.name not in _HELP:
            continue
        kind = _kind(field) if field.default is not None else str
        parser.add_argument(
            _flag(field.name),
            dest=field.name,
            type=kind,
            default=None,
            metavar=field.name.upper().split("_")[-1] if kind is not str else None,
            help=f"{_HELP[field.name]} [env KVGROVE_{field.name.upper()}]",
        )


def settings_from_args(namespace: argparse.Namespace) -> Settings:
    """Settings from parsed flags (None = not given) over the environment."""
    given = {f.name: getattr(namespace, f.name, None) for f in attrs.fields(Settings)}
    if given["warm_up"] is None and "KVGROVE_WARM_UP" not in os.environ:
        given["warm_up"] = True  # `kvgrove serve` warms up unless told not to
    return Settings.from_env(**given)
