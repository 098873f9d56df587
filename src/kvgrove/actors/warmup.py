"""Warm-up at start: a few tiny generations through the real engine before the server is ready.

MLX compiles kernels the first time it meets them (on CUDA: NVRTC for its elementwise and
reduction kernels; on a CPU: mx.compile'd functions), so without this the first requests after
a start pay for it. The warm-up is a client of the scheduler like any request handler
(`Generation`), so it runs the paths serving uses and no other: one prompt alone (prefill, then
decode in a batch of one), then a wave of prompts of different lengths that arrive together
(prefilled together, decoded as one batch whose rows join and leave). The wave's rows ask for
different numbers of tokens, so they leave one at a time while others stay: that release (the
leaving rows copied out, the last rows moved into their holes) has kernels of its own, and a
wave whose rows all finish together never runs it. On the H200 its first use took 4.4 s, in the
first wave whose rows finished apart (a c=32 wave of the GPU benchmark). Its prompts are cached
under a namespace of their own, which no request can name, and its counts stay out of the
server's metrics.

Shapes: on CUDA, MLX's cuDNN attention builds a graph per (batch, query length, key length),
seconds to tens of seconds each; serve turns it off (`Settings.cudnn_attention`), so after this
warm-up no prompt length or batch size compiles anything new.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from kvgrove.actors.metrics import Metrics
from kvgrove.actors.requests import Generation, GenerationRequest
from kvgrove.sampling import SamplingParams

log = logging.getLogger(__name__)

NAMESPACE = "kvgrove-warm-up"  # requests get "" or a 32-digit hex digest: never this
TEXT = "Warm-up: the quick brown fox jumps over the lazy dog, again and again and again."


async def warm_up(
    scheduler: trio.MemorySendChannel,
    tokenizer: Any,
    *,
    context_tokens: int,
    reply_channel_items: int,
    wave: int = 4,
    max_tokens: int = 3,
) -> float:
    """Run one prompt alone, then `wave` prompts together (the i-th asks for `max_tokens` + i
    tokens); returns the seconds it took."""
    start = time.monotonic()
    ids = list(tokenizer.encode(TEXT, add_special=False)) or [0]
    while len(ids) < 8 * wave:
        ids += ids
    metrics = Metrics()

    async def one(n_tokens: int, extra: int = 0) -> None:
        request = GenerationRequest(
            prompt_tokens=tuple(ids[:n_tokens]),
            params=SamplingParams(temperature=0.0),
            max_tokens=max_tokens + extra,
            context_tokens=context_tokens,
            namespace=NAMESPACE,
        )
        gen = Generation(request, scheduler, tokenizer, metrics, reply_channel_items)
        async for _ in gen.stream():
            pass

    await one(len(ids) // 2)
    async with trio.open_nursery() as nursery:
        for i in range(wave):
            nursery.start_soon(one, 4 + 3 * i, i)
    seconds = time.monotonic() - start
    log.info("warmed up in %.2fs", seconds)
    return seconds
