"""Small helpers shared by the benchmark scripts (tables, prompts, mlx-lm glue)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

FILLER = (
    "The history of the printing press is a story of slow diffusion and sudden change. "
    "Movable type spread from Mainz along trade routes, and each new shop trained apprentices "
    "who founded shops of their own. "
)


def prompt_of(tokenizer, n_tokens: int) -> list[int]:
    """A natural-text prompt of exactly n_tokens tokens."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(FILLER)
    return ids[:n_tokens]


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""

    def fmt(x: object) -> str:
        if isinstance(x, float):
            return f"{x:,.2f}" if abs(x) < 100 else f"{x:,.0f}"
        return str(x)

    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def mlx_lm_tokenizer(tokenizer):
    """kvgrove's tokenizer as the TokenizerWrapper mlx-lm's stream_generate expects."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend.tok)
    return TokenizerWrapper(hf, eos_token_ids=set(tokenizer.eos_ids))
