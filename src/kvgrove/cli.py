"""kvgrove's command line: `serve`, `run`, `pull`, `show`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

import kvgrove
from kvgrove import config


def _progress_bar(label: str):
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=True)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return update


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (Ollama's defaults)")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repeat-penalty", type=float, default=1.0)
    g.add_argument("--repeat-last-n", type=int, default=64)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=-1)
    g.add_argument("--num-predict", type=int, default=512, help="max tokens to generate")


def cmd_pull(args: argparse.Namespace) -> int:
    from kvgrove.models import bundled, hf_hub, ollama_store

    name = args.model or "default"
    spec = bundled.lookup(name)
    if spec is not None:
        if spec.path.exists():
            print(f"{spec.name}: already in {spec.path}")
            return 0
        path = bundled.pull(spec, progress=_progress_bar(f"pulling {spec.name}"))
        print(f"{spec.name}: {path}")
        return 0
    stored = ollama_store.lookup(name)
    if stored is not None:
        print(f"{stored.name}: already in Ollama's store ({stored.gguf})")
        return 0
    if hf_hub.split(name) is not None:
        cached = hf_hub.lookup(name)
        if cached is not None:
            print(f"{name}: already in the Hugging Face cache ({cached})")
            return 0
        try:
            path = hf_hub.pull(name)  # huggingface_hub draws its own progress bars
        except Exception as e:  # no network, no such repo, a gated repo without a token
            print(f"could not download {name!r} from Hugging Face: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {path}")
        return 0
    print(
        f"kvgrove cannot pull {name!r}: it fetches bundled models ({', '.join(bundled.BUNDLED)}) "
        f"and Hugging Face repos (org/repo, hf.co/org/repo:QUANT); for a model of Ollama's "
        f"registry run `ollama pull {name}`, and kvgrove serves it from Ollama's store",
        file=sys.stderr,
    )
    return 2


def cmd_show(args: argparse.Namespace) -> int:
    from kvgrove.models.loading import describe, load

    lm = load(args.model)
    info = lm.info
    if args.tensor_parallel > 1:  # how `serve --tensor-parallel N` would split it
        import attrs

        from kvgrove.distributed.shard import ShardError, describe_layout, layout

        n = args.tensor_parallel
        try:
            split = describe_layout(layout(lm.model, n, info.architecture), n)
        except ShardError as exc:
            split = f"cannot split: {exc}"
        info = attrs.evolve(info, tensor_parallel=split)
    print(describe(info))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """One generation through the server's engine (the same actors, batching and prefix cache),
    composed in this process without HTTP. The disk tier is off: a one-shot run never contends
    with a server for the cache folder."""
    import trio

    from kvgrove.sampling import FLOAT_FIELDS, INT_FIELDS, SamplingParams

    params = SamplingParams(**{name: getattr(args, name) for name in (*FLOAT_FIELDS, *INT_FIELDS)})
    settings = config.Settings(model=args.model, disk_budget_bytes=0)
    return trio.run(_run_once, settings, args, params)


async def _run_once(settings: config.Settings, args: argparse.Namespace, params: Any) -> int:
    import trio

    from kvgrove.actors.engine import start_engine
    from kvgrove.actors.metrics import Metrics
    from kvgrove.actors.requests import Finished, Generation, GenerationRequest

    async with trio.open_nursery() as nursery:
        engine = await start_engine(nursery, settings)
        try:
            tok = engine.loaded.tokenizer
            if args.raw:
                prompt = tok.encode(args.prompt, add_special=True)
            else:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                messages.append({"role": "user", "content": args.prompt})
                prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
            limit = engine.loaded.info.context_length
            if len(prompt) >= limit:
                print(
                    f"input length ({len(prompt)} tokens) exceeds the model's maximum context "
                    f"length ({limit} tokens)",
                    file=sys.stderr,
                )
                return 2
            max_tokens = min(
                args.num_predict if args.num_predict >= 0 else limit, limit - len(prompt)
            )
            request = GenerationRequest(tuple(prompt), params, max_tokens, limit, api="cli")
            generation = Generation(
                request=request,
                scheduler=engine.scheduler.inbox,
                tokenizer=tok,
                metrics=Metrics(),
                reply_channel_items=settings.reply_channel_items,
            )
            async for event in generation.stream():
                if isinstance(event, Finished):
                    _report(event, args.verbose)
                else:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
            return 0
        finally:
            nursery.cancel_scope.cancel()


def _report(done: Any, verbose: bool) -> None:
    sys.stdout.write("\n")
    if verbose:
        prefill = done.prompt_tokens / done.prefill_seconds if done.prefill_seconds else 0.0
        n = done.generated_tokens - 1  # the first token comes out of the prefill
        decode = n / done.decode_seconds if done.decode_seconds and n > 0 else 0.0
        print(
            f"prompt: {done.prompt_tokens} tokens ({done.cached_tokens} cached), "
            f"{prefill:.1f} tok/s; generated: {done.generated_tokens} tokens, {decode:.1f} tok/s",
            file=sys.stderr,
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from kvgrove import serve

    settings = config.settings_from_args(args)
    if settings.tensor_parallel > 1:
        from kvgrove.distributed import launch

        return launch.main(settings, sys.argv[1:])
    serve.main(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgrove", description=kvgrove.__doc__)
    parser.add_argument("--version", action="version", version=f"kvgrove {kvgrove.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the Ollama and OpenAI HTTP APIs")
    config.add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="chat once with a model, streaming the reply")
    p.add_argument("prompt")
    p.add_argument(
        "--model",
        help="GGUF file, model folder, short name, Ollama store name (llama3.2:3b) or Hugging "
        "Face repo in the local cache (org/repo); default: smollm2",
    )
    p.add_argument("--system", help="system prompt")
    p.add_argument("--raw", action="store_true", help="no chat template")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "pull", help="download a bundled model, or a Hugging Face repo (org/repo[:QUANT])"
    )
    p.add_argument("model", nargs="?", default=None)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("show", help="load a model and print what it is")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="also say how --tensor-parallel N would split the model",
    )
    p.set_defaults(func=cmd_show)
    return parser


def _cache_dir_busy(exc: BaseException) -> BaseException | None:
    """The CacheDirBusy inside `exc` (raised at start, possibly inside exception groups)."""
    from kvgrove.memory.prefix_cache import CacheDirBusy

    if isinstance(exc, CacheDirBusy):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cache_dir_busy(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    start = time.perf_counter()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseException as exc:
        busy = _cache_dir_busy(exc)
        if busy is None:
            raise
        print(f"error: {busy}", file=sys.stderr)  # another server owns the cache folder
        # As serve.main does after a clean stop: skip the interpreter's teardown, where
        # destroying the loaded model's MLX stream threads intermittently aborted the process
        # ("terminate called without an active exception", exit -6) instead of exiting 2.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    finally:
        logging.getLogger(__name__).debug("done in %.2fs", time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
