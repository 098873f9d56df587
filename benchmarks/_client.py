"""The benchmarks' raw-socket client: one streamed /v1/completions over HTTP/1.1 that only
counts bytes and reads the usage at the end (no JSON parsing per chunk), so on a small machine
it takes as little CPU from the servers as it can."""

from __future__ import annotations

import json
import re
import time

import trio

USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


def completion_body(model: str, prompt: str, gen_tokens: int) -> dict:
    """The benchmarks' request: a greedy streamed /v1/completions that ends with its usage."""
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": gen_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def streamed_completion(
    port: int, model: str, prompt: str, gen_tokens: int
) -> tuple[float, int]:
    """(TTFT seconds, generated tokens read off the usage chunk) of one greedy streamed
    completion from the server on 127.0.0.1:`port`."""
    body = json.dumps(completion_body(model, prompt, gen_tokens)).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sent = time.perf_counter()
    ttft = None
    # mlx-lm's server (socketserver, listen backlog 5) resets some simultaneous connections
    # before answering: those requests are sent again.
    for attempt in range(8):
        data = bytearray()
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(head + body)
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if ttft is None and b'"text"' in data:
                        ttft = time.perf_counter() - sent
                    if data.endswith(b"0\r\n\r\n") or b"data: [DONE]" in data[-64:]:
                        break
            break
        except (OSError, trio.BrokenResourceError):
            if data or attempt == 7:
                raise
            await trio.sleep(0.05 * (attempt + 1))
    found = USAGE.findall(bytes(data))
    if not found:
        raise RuntimeError(f"no usage in the answer: {bytes(data[:400])!r}")
    return (ttft if ttft is not None else float("nan")), int(found[-1])
