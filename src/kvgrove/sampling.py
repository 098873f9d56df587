"""The sampler: pure functions over logits, batched with per-row parameters.

Order per row (Ollama's): penalties → top_k → temperature → top_p → min_p → draw.
Temperature 0 (or top_k 1) is greedy: argmax of the penalized logits.

Choices worth knowing:

- **Draw.** Each row draws one uniform number from its own sampler's generator (numpy PCG64,
  seeded by ``params.seed``) and takes the inverse CDF of its filtered distribution. One
  scalar per row per step, no device key arrays, and the draw depends only on the row's own
  logits, parameters and seed: a seeded request yields the same tokens alone or in any batch.
- **Paths.** Rows are grouped by their *own* parameters, never by the batch's: greedy
  (argmax), top-k (argpartition to the group's largest k, then a sort of k values), top-p or
  no top-k (a full sort of the vocabulary, the slow path), and unfiltered or min-p only (no
  sort at all). Candidates are ordered by (logit desc, token id asc), a total order, so ties
  (common with bf16 logits) cannot make a row's token depend on its neighbours.
- **Penalties** follow llama.cpp: for each distinct token in the last ``repeat_last_n``
  tokens of the history (prompt included), positive logits are divided by ``repeat_penalty``
  and the others multiplied, then ``count * frequency_penalty + (count > 0) *
  presence_penalty`` is subtracted. All three share the window. The whole batch is done
  with one gather and one scatter over a padded (B, U) matrix of distinct window tokens.
- **Logprobs** are OpenAI's: log-softmax of the raw model logits (before penalties and
  temperature), for the chosen token and the ``top_logprobs`` most likely alternatives.
  ``top_logprobs`` is reported only when ``logprobs`` is on.
- **Constraints.** A sampler may carry a grammar ``constraint`` (``kvgrove.grammar``): its
  row's disallowed logits become -inf after the penalties, before any filter, so every path
  (greedy or drawn) picks an allowed token; free rows in the same batch are untouched. The
  masks are computed on the host after the step's logits are queued with ``mx.async_eval``,
  so they overlap the forward pass. ``accept`` advances the constraint.
- ``sample_batch`` does **not** call ``SequenceSampler.accept``: the caller accepts a token
  once it keeps it (after its stop checks), so a discarded step leaves the history intact.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

MAX_TOP_LOGPROBS = 20

# A uniform draw is clamped below 1 so that u * total < total in float32 (see _inverse_cdf).
_MAX_UNIFORM = 1.0 - 2.0**-23


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


# SamplingParams' numeric knobs by type, in a fixed order (the tensor-parallel codec writes them
# in it; Ollama's options are these plus their own).
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repeat_penalty",
    "presence_penalty",
    "frequency_penalty",
)
INT_FIELDS = ("top_k", "repeat_last_n", "seed")


@attrs.frozen
class SamplingParams:
    """One request's sampling options, with Ollama's defaults.

    Out-of-range values raise ``ValueError`` naming the field (the HTTP layer answers 400).
    ``top_k <= 0``, ``top_p == 1`` and ``min_p == 0`` disable their filters;
    ``repeat_last_n`` is -1 for the whole context, 0 for no penalties; a negative
    ``seed`` (Ollama's -1) asks for a random one.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    repeat_last_n: int = 64
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = -1
    logprobs: bool = False
    top_logprobs: int = 0
    # llguidance's grammar string (kvgrove.grammar builds and checks it); None: unconstrained.
    grammar: str | None = None

    def __attrs_post_init__(self) -> None:
        for name in (*INT_FIELDS, "top_logprobs"):
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a string, got {self.grammar!r}")
        if not isinstance(self.logprobs, bool | np.bool_):
            raise ValueError(f"logprobs must be a boolean, got {self.logprobs!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.repeat_last_n < -1:
            raise ValueError(f"repeat_last_n must be >= -1, got {self.repeat_last_n}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )

    @property
    def greedy(self) -> bool:
        """True when the draw is an argmax: temperature 0, or top_k 1."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalizes(self) -> bool:
        """True when any penalty can change a logit."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
        )


class SequenceSampler:
    """Per-sequence sampling state: the penalty history and the random generator.

    The history starts as the prompt; ``accept`` appends each generated token the caller
    keeps. Counts over the penalty window are kept incrementally, so a step costs O(distinct
    tokens in the window), not O(window). ``context_limit`` bounds the window of
    ``repeat_last_n = -1`` (the whole context); without it the whole history counts.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_tokens: Sequence[int],
        *,
        context_limit: int | None = None,
        constraint: Any = None,
    ) -> None:
        self.params = params
        # A kvgrove.grammar.Constraint restricting the draws to a grammar, or None.
        self.constraint = constraint
        self.context_limit = context_limit
        # The seed actually used, so a random one can be reported and replayed.
        self.seed: int = params.seed if params.seed >= 0 else secrets.randbits(63)
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.draws = 0  # uniforms drawn so far (`rewind` takes some back)
        self._history: list[int] = [int(t) for t in prompt_tokens]
        if not params.penalizes:
            self._window: int | None = 0
        elif params.repeat_last_n == -1:
            self._window = context_limit
        else:
            self._window = params.repeat_last_n
        self._counts: Counter[int] = Counter()
        if self._window != 0:
            start = 0 if self._window is None else max(0, len(self._history) - self._window)
            self._counts.update(self._history[start:])

    @property
    def history(self) -> tuple[int, ...]:
        """Every token seen so far: the prompt, then the accepted tokens."""
        return tuple(self._history)

    def __len__(self) -> int:
        return len(self._history)

    def accept(self, token: int) -> None:
        """Append a generated token to the history (call once the token is kept)."""
        token = int(token)
        self._history.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if self._window == 0:
            return
        self._counts[token] += 1
        if self._window is not None and len(self._history) > self._window:
            leaving = self._history[-self._window - 1]
            self._counts[leaving] -= 1
            if not self._counts[leaving]:
                del self._counts[leaving]

    def window_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct tokens in the penalty window and how often each occurs there."""
        n = len(self._counts)
        tokens = np.fromiter(self._counts.keys(), dtype=np.int32, count=n)
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=n)
        return tokens, counts

    def next_uniform(self) -> float:
        """The next uniform draw in [0, 1) of this sequence's own stream."""
        self.draws += 1
        return min(float(self._rng.random()), _MAX_UNIFORM)

    def rewind_to(self, draws: int) -> None:
        """The stream back as it stood after its first `draws` draws: the next ones repeat
        those taken back (a sample built ahead and not used must not shift the stream)."""
        if draws < self.draws:
            self._rng.bit_generator.advance(draws - self.draws)  # PCG64: one step per double
            self.draws = draws

    @property
    def stateless(self) -> bool:
        """Whether a token's sampling needs nothing the previous token changes on the host
        (no penalty window, no grammar): it can be built before that token is known."""
        return self.constraint is None and not self.params.penalizes


@attrs.frozen
class TokenChoice:
    """One row's outcome: the token, and its logprobs when they were asked for."""

    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None


@attrs.frozen
class SampleResult:
    """One step's outcome for a batch, one entry per row.

    ``logprobs[i]`` is None unless row i asked for logprobs; ``top_logprobs[i]`` is then a
    list of (token, logprob), most likely first, of length ``top_logprobs`` (maybe empty).
    """

    tokens: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]

    def row(self, i: int) -> TokenChoice:
        return TokenChoice(self.tokens[i], self.logprobs[i], self.top_logprobs[i])


@attrs.frozen(eq=False)
class PendingSample:
    """A step's sampling graph, not yet evaluated.

    ``arrays()`` can go to ``mx.async_eval`` to overlap with other work; ``result()``
    evaluates and converts to Python values.
    """

    tokens: mx.array  # (B,) uint32
    logprob_rows: list[int]  # rows that asked for logprobs, in order
    logprobs: mx.array | None  # (len(logprob_rows),)
    top_ids: mx.array | None  # (len(logprob_rows), n), most likely first
    top_logprobs: mx.array | None
    top_counts: list[int]  # how many of the n alternatives each logprob row wants

    def arrays(self) -> list[mx.array]:
        arrays = (self.tokens, self.logprobs, self.top_ids, self.top_logprobs)
        return [a for a in arrays if a is not None]

    def result(self) -> SampleResult:
        mx.eval(*self.arrays())
        batch = self.tokens.shape[0]
        logprobs: list[float | None] = [None] * batch
        tops: list[list[tuple[int, float]] | None] = [None] * batch
        if self.logprobs is not None:
            chosen = self.logprobs.tolist()
            ids = self.top_ids.tolist() if self.top_ids is not None else None
            values = self.top_logprobs.tolist() if self.top_logprobs is not None else None
            for j, (row, want) in enumerate(zip(self.logprob_rows, self.top_counts, strict=True)):
                logprobs[row] = chosen[j]
                tops[row] = list(zip(ids[j][:want], values[j][:want], strict=True)) if want else []
        return SampleResult(self.tokens.tolist(), logprobs, tops)


def sample_batch(logits: mx.array, samplers: Sequence[SequenceSampler]) -> SampleResult:
    """Sample one token per row of ``logits`` (B, V), row i with ``samplers[i]``.

    Does not call ``accept``: the caller accepts the tokens it keeps.
    """
    return build_sample(logits, samplers).result()


def sample_one(logits_row: mx.array, sampler: SequenceSampler) -> TokenChoice:
    """Sample one token from a (V,) or (1, V) row of logits."""
    return sample_batch(logits_row.reshape(1, -1), [sampler]).row(0)


def build_sample(logits: mx.array, samplers: Sequence[SequenceSampler]) -> PendingSample:
    """Build (lazily) the sampling graph for one step; see ``sample_batch``.

    The rows' random streams advance here, when the graph is built, not when it is evaluated.
    """
    if logits.ndim != 2 or logits.shape[0] != len(samplers):
        raise ValueError(f"logits must be (B, V) with B = {len(samplers)}, got {logits.shape}")
    raw = logits if logits.dtype == mx.float32 else logits.astype(mx.float32)
    batch, vocab = raw.shape
    penalized = apply_masks(apply_penalties(raw, samplers), samplers)

    # Each row's path depends on its own parameters (and V) only.
    groups: dict[str, list[int]] = {"greedy": [], "top_k": [], "sort": [], "full": []}
    for i, sampler in enumerate(samplers):
        params = sampler.params
        if params.greedy:
            groups["greedy"].append(i)
        elif 0 < params.top_k < vocab:
            groups["top_k"].append(i)
        elif params.top_p < 1:
            groups["sort"].append(i)
        else:
            groups["full"].append(i)

    parts: list[tuple[list[int], mx.array]] = []
    for path, rows in groups.items():
        if not rows:
            continue
        sub = penalized if len(rows) == batch else penalized[mx.array(rows)]
        if path == "greedy":
            parts.append((rows, mx.argmax(sub, axis=-1).astype(mx.uint32)))
            continue
        chosen = [samplers[i] for i in rows]
        u = _column([s.next_uniform() for s in chosen])
        temperature = _column([s.params.temperature for s in chosen])
        if path == "full":
            min_p = _column([s.params.min_p for s in chosen])
            parts.append((rows, _draw_unsorted(sub, temperature, min_p, u)))
            continue
        if path == "top_k":
            top_k = [s.params.top_k for s in chosen]
            ids, values = _top_candidates(sub, max(top_k))
        else:
            top_k = [vocab] * len(rows)
            ids = mx.argsort(-sub, axis=-1)
            values = mx.take_along_axis(sub, ids, axis=-1)
        top_p = _column([s.params.top_p for s in chosen])
        min_p = _column([s.params.min_p for s in chosen])
        draw = _draw_sorted(values, _column(top_k), temperature, top_p, min_p, u)
        parts.append((rows, mx.take_along_axis(ids, draw[:, None], axis=-1)[:, 0]))

    if not parts:  # an empty batch
        tokens = mx.zeros((0,), dtype=mx.uint32)
    elif len(parts) == 1:
        tokens = parts[0][1]
    else:
        order = np.argsort(np.concatenate([np.asarray(rows) for rows, _ in parts]))
        tokens = mx.concatenate([t for _, t in parts])[mx.array(order)]
    return _with_logprobs(raw, tokens, samplers)


def _column(values: Sequence[float]) -> mx.array:
    return mx.array(np.asarray(values, dtype=np.float32))[:, None]


def apply_masks(logits: mx.array, samplers: Sequence[SequenceSampler]) -> mx.array:
    """``logits`` (B, V) with each constrained row's disallowed tokens at -inf.

    The masks are computed on the host while the device computes ``logits`` (queued first).
    """
    rows = [i for i, s in enumerate(samplers) if s.constraint is not None]
    if not rows:
        return logits
    mx.async_eval(logits)
    batch, vocab = logits.shape
    words = (vocab + 31) // 32
    # Packed 32 tokens to a word on the host (free rows: all bits set), unpacked on the device.
    packed = np.full((batch, words), 0xFFFFFFFF, dtype=np.uint32)
    for i in rows:
        packed[i] = samplers[i].constraint.bitmask(words)
    ids = mx.arange(vocab, dtype=mx.uint32)
    bits = mx.right_shift(mx.array(packed)[:, ids // 32], ids % 32) & 1
    return mx.where(bits.astype(mx.bool_), logits, -mx.inf)


def apply_penalties(logits: mx.array, samplers: Sequence[SequenceSampler]) -> mx.array:
    """``logits`` (B, V) float32 with each row's penalties applied: one gather, one scatter."""
    vocab = logits.shape[-1]
    windows = [
        _in_vocab(s.window_counts(), vocab) if s.params.penalizes else None for s in samplers
    ]
    width = max((len(w[0]) for w in windows if w is not None), default=0)
    if width == 0:
        return logits
    batch = len(samplers)
    # Padding repeats a row's first entry (same token, same count, so it writes the same
    # value); rows without penalties point at token 0 with count 0 and neutral parameters.
    tokens = np.zeros((batch, width), dtype=np.int32)
    counts = np.zeros((batch, width), dtype=np.float32)
    neutral = (1.0, 0.0, 0.0)
    factors = np.tile(np.asarray(neutral, dtype=np.float32), (batch, 1))
    for i, (sampler, window) in enumerate(zip(samplers, windows, strict=True)):
        if window is None or not len(window[0]):
            continue
        row_tokens, row_counts = window
        tokens[i, :] = row_tokens[0]
        counts[i, :] = row_counts[0]
        tokens[i, : len(row_tokens)] = row_tokens
        counts[i, : len(row_counts)] = row_counts
        p = sampler.params
        factors[i] = (p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
    idx = mx.array(tokens)
    count = mx.array(counts)
    repeat, frequency, presence = (mx.array(factors[:, j : j + 1]) for j in range(3))
    values = mx.take_along_axis(logits, idx, axis=-1)
    values = mx.where(values <= 0, values * repeat, values / repeat)
    values = values - count * frequency - (count > 0) * presence
    return mx.put_along_axis(logits, idx, values, axis=-1)


def _in_vocab(window: tuple[np.ndarray, np.ndarray], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Drops ids outside [0, vocab): MLX does not bounds-check gathers and scatters."""
    tokens, counts = window
    inside = (tokens >= 0) & (tokens < vocab)
    return (tokens, counts) if inside.all() else (tokens[inside], counts[inside])


def _top_candidates(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The k largest logits per row as (ids, values), ordered by (value desc, id asc)."""
    # argpartition picks the top-k set under MLX's index tie-break; sorting the ids first
    # makes the stable value sort break ties by token id, as the full argsort does.
    ids = mx.sort(mx.argpartition(-logits, k - 1, axis=-1)[:, :k], axis=-1)
    values = mx.take_along_axis(logits, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(values, order, axis=-1)


def _draw_sorted(
    values: mx.array,
    top_k: mx.array,
    temperature: mx.array,
    top_p: mx.array,
    min_p: mx.array,
    u: mx.array,
) -> mx.array:
    """Positions drawn from candidates sorted by descending logit (all args (g, 1) but values)."""
    rank = mx.arange(values.shape[-1])
    # Weights relative to the top candidate (weight 1 exactly), so min_p compares to 1.
    weights = mx.exp((values - values[:, :1]) / temperature)
    weights = mx.where(rank < top_k, weights, 0)
    # top_p keeps the smallest prefix whose mass reaches p: a token stays if the mass before
    # it is still below p. The first candidate always stays.
    before = mx.cumsum(weights, axis=-1, inclusive=False)
    total = mx.sum(weights, axis=-1, keepdims=True)
    keep = (before < top_p * total) | (rank == 0) | (top_p >= 1)
    keep = keep & (weights >= min_p)
    return _inverse_cdf(mx.where(keep, weights, 0), u)


def _draw_unsorted(
    logits: mx.array, temperature: mx.array, min_p: mx.array, u: mx.array
) -> mx.array:
    """Token ids drawn over the whole vocabulary, in token order, with min_p only."""
    weights = mx.exp((logits - mx.max(logits, axis=-1, keepdims=True)) / temperature)
    return _inverse_cdf(mx.where(weights >= min_p, weights, 0), u)


def _inverse_cdf(weights: mx.array, u: mx.array) -> mx.array:
    """The first position whose cumulative weight exceeds u * total, per row.

    With u <= 1 - 2**-23 the target is strictly below the total, so that position exists
    and has nonzero weight.
    """
    cumulative = mx.cumsum(weights, axis=-1)
    target = u * cumulative[:, -1:]
    return mx.sum(cumulative <= target, axis=-1).astype(mx.uint32)


def _with_logprobs(
    raw: mx.array, tokens: mx.array, samplers: Sequence[SequenceSampler]
) -> PendingSample:
    rows = [i for i, s in enumerate(samplers) if s.params.logprobs]
    if not rows:
        return PendingSample(tokens, [], None, None, None, [])
    batch = raw.shape[0]
    sub = raw if len(rows) == batch else raw[mx.array(rows)]
    chosen_ids = tokens if len(rows) == batch else tokens[mx.array(rows)]
    normalizer = mx.logsumexp(sub, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(sub, chosen_ids[:, None], axis=-1)[:, 0] - normalizer[:, 0]
    wants = [samplers[i].params.top_logprobs for i in rows]
    top_ids = top_values = None
    if max(wants) > 0:
        top_ids, top_raw = _top_candidates(sub, min(max(wants), sub.shape[-1]))
        top_values = top_raw - normalizer
    return PendingSample(tokens, rows, chosen, top_ids, top_values, wants)
