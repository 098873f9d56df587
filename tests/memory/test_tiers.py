"""Snapshots and tiers on tiny random-weight models: restores are exact, budgets hold, the disk
tier survives a restart and a corrupted file degrades to recomputation."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from kvgrove.memory import snapshots
from kvgrove.memory.ledger import Budgets, Ledger
from kvgrove.memory.tiers import Tiers
from kvgrove.models.caches import make_cache
from kvgrove.models.generate import generate, prefill_chunks
from kvgrove.models.loading import load
from kvgrove.sampling import SamplingParams
from tiny_models import write_tiny_model

ARCHS = ("llama", "qwen3_next", "glm4_moe_lite")
AMPLE = Budgets(1 << 30, 1 << 30, 1 << 30)
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {a: load(write_tiny_model(root / a, a)).model for a in ARCHS}


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def greedy(model, prompt, cache=None, cached=0, n=6) -> list[int]:
    steps = generate(model, prompt, GREEDY, max_tokens=n, cache=cache, cached_tokens=cached)
    return [s.token for s in steps]


def prefill(model, cache, toks, start, end):
    for _ in prefill_chunks(model, cache, toks[start:end], chunk_tokens=64):
        pass


def fill(tiers: Tiers, model, toks, points) -> list:
    """Prefill toks[:points[-1]], pausing at each point to insert a snapshot there."""
    cache, done = make_cache(model), 0
    for p in points:
        prefill(model, cache, toks, done, p)
        tiers.insert(toks[:p], cache, restore_point=True)
        done = p
    return cache


def next_logits(model, cache, token: int) -> mx.array:
    out = model(mx.array([[token]], dtype=mx.uint32), cache=cache)
    mx.eval(out)
    return out


def make_tiers(model, tmp_path, budgets=AMPLE, ledger=None) -> Tiers:
    kinds = snapshots.layout(make_cache(model))
    return Tiers(kinds, budgets, fingerprint="tiny", cache_dir=tmp_path, ledger=ledger)


def restored(tiers: Tiers, model, prompt, max_tokens):
    cache = make_cache(model)
    with tiers.use(prompt, max_tokens=max_tokens) as hit:
        assert all(n.tier == "device" for n in tiers.trie.path(hit.node))
        tiers.stitch(cache, hit)
    return cache, hit


@pytest.mark.parametrize("arch", ARCHS)
def test_restore_is_exact_through_every_tier_and_a_restart(models, arch, tmp_path):
    model = models[arch]
    prompt = tokens(41, seed=1)
    ledger = Ledger(AMPLE)
    tiers = make_tiers(model, tmp_path, ledger=ledger)
    live = fill(tiers, model, prompt, [16, 40])
    want_logits = next_logits(model, live, prompt[40])
    want = greedy(model, prompt)

    def check(t: Tiers) -> None:
        cache, hit = restored(t, model, prompt, 40)
        assert hit.usable_tokens == 40
        assert mx.array_equal(next_logits(model, cache, prompt[40]), want_logits).item()
        cache, _ = restored(t, model, prompt, 40)
        assert greedy(model, prompt, cache, 40) == want
        assert t.check_integrity().clean

    check(tiers)
    for target in ("host", "disk"):
        for node in tiers.trie.lru_nodes():
            tiers.demote(node, target)
        assert tiers.tier_bytes(target) == tiers.trie.size_info().bytes_by_tier[target] > 0
        assert tiers.check_integrity().clean
        ledger.check_integrity()
        check(tiers)
    tiers.flush()
    assert tiers.tier_bytes("disk") > 0 and tiers.tier_bytes("device") == 0
    again = make_tiers(model, tmp_path)  # a restart: a new object on the same directory
    assert again.recovered == tiers.trie.size_info().nodes == 2
    check(again)


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prefix_reuse_and_fork_point_snapshot(models, arch, tmp_path):
    model = models[arch]
    a = tokens(40, seed=2)
    b = a[:20] + tokens(15, seed=3)
    tiers = make_tiers(model, tmp_path)
    fill(tiers, model, a, [16, 40])
    hit = tiers.lookup(b, max_tokens=len(b) - 1)
    sliceable = "whole" not in tiers.kinds
    assert hit.matched_tokens == 20
    assert hit.usable_tokens == (20 if sliceable else 16)
    cache = make_cache(model)
    tiers.stitch(cache, hit)
    tiers.release(hit)
    # Split the prefill at the fork point so hybrid models get whole state there too.
    prefill(model, cache, b, hit.usable_tokens, hit.matched_tokens)
    tiers.insert(b[: hit.matched_tokens], cache)
    assert greedy(model, b, cache, hit.matched_tokens) == greedy(model, b)
    assert tiers.lookup(b, max_tokens=34).usable_tokens == 20
    assert tiers.check_integrity().clean


def test_budgets_rebalance_lru_and_ledger_returns_to_baseline(models, tmp_path):
    model = models["llama"]
    ledger = Ledger(AMPLE)
    probe = make_tiers(model, tmp_path / "probe")
    fill(probe, model, tokens(32, seed=9), [32])
    per_token = probe.tier_bytes("device") // 32
    budgets = Budgets(40 * per_token, 40 * per_token, 60 * per_token)
    tiers = make_tiers(model, tmp_path / "c", budgets, ledger)
    prompts = [tokens(32, seed=10 + i) for i in range(5)]
    for p in prompts:
        fill(tiers, model, p, [32])
        tiers.rebalance()
        for tier in ("device", "host", "disk"):
            assert tiers.tier_bytes(tier) <= budgets.of(tier)
            assert ledger.total(tier) == tiers.tier_bytes(tier)
        assert tiers.check_integrity().clean
        ledger.check_integrity()
    # LRU: the newest is on device, the oldest were dropped.
    for prompt, usable in ((prompts[-1], 32), (prompts[0], 0)):
        with tiers.use(prompt) as hit:
            assert hit.usable_tokens == usable
    with tiers.use(prompts[-1]) as hit:  # a locked path never moves
        for node in tiers.trie.lru_nodes():
            tiers.demote(node, "dropped")
        assert tiers.trie.path(hit.node)[0].tier == "device"
    tiers.trie.evict(1 << 40)
    assert tiers.trie.size_info().nodes == 0
    assert {t: ledger.total(t) for t in ("device", "host", "disk")} == dict.fromkeys(
        ("device", "host", "disk"), 0
    )
    assert tiers.disk.stored_keys() == []
    ledger.check_integrity()


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("where", ["data", "header"])
def test_corrupted_file_is_dropped_and_recomputed(models, tmp_path, where, restart):
    model = models["llama"]
    prompt = tokens(41, seed=4)
    tiers = make_tiers(model, tmp_path)
    fill(tiers, model, prompt, [16, 40])
    tiers.flush()
    deep = max(tiers.trie.nodes(), key=lambda n: n.start)
    path = tiers.disk.path(deep.payload.key)
    raw = bytearray(path.read_bytes())
    raw[len(raw) - 7 if where == "data" else 12] ^= 0xFF
    path.write_bytes(bytes(raw))
    if restart:  # found by the restart's scan (header) or on load (data)
        tiers = make_tiers(model, tmp_path)
    hit = tiers.lookup(prompt, max_tokens=40)
    assert hit.usable_tokens == 16
    assert not path.exists()
    cache = make_cache(model)
    tiers.stitch(cache, hit)
    tiers.release(hit)
    prefill(model, cache, prompt, 16, 40)
    assert greedy(model, prompt, cache, 40) == greedy(model, prompt)
    assert tiers.check_integrity().clean


def test_bfloat16_round_trips_bitwise_through_host_and_disk(tmp_path):
    folder = write_tiny_model(tmp_path / "m", "llama")
    model = load(folder, dtype="bfloat16").model
    prompt = tokens(24, seed=5)
    tiers = make_tiers(model, tmp_path / "c")
    fill(tiers, model, prompt, [24])
    (node,) = tiers.trie.nodes()
    assert set(node.payload.dtypes.values()) == {"bfloat16"}
    before = {k: np.array(a.astype(mx.float32)) for k, a in node.payload.arrays.items()}
    tiers.demote(node, "host")
    assert {a.dtype for a in node.payload.arrays.values()} == {np.dtype(np.uint16)}
    tiers.demote(node, "disk")
    tiers.promote(node)
    after = {k: np.array(a.astype(mx.float32)) for k, a in node.payload.arrays.items()}
    assert {a.dtype for a in node.payload.arrays.values()} == {mx.bfloat16}
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_decode_after_restore_never_touches_the_stored_snapshot(models, tmp_path):
    model = models["llama"]
    prompt = tokens(30, seed=6)
    tiers = make_tiers(model, tmp_path)
    fill(tiers, model, prompt, [29])
    (node,) = tiers.trie.nodes()
    before = {k: np.array(a) for k, a in node.payload.arrays.items()}
    cache, _ = restored(tiers, model, prompt, 29)
    greedy(model, prompt, cache, 29, n=8)
    for c in cache:  # trim back and write in place over the restored range
        c.trim(4)
    prefill(model, cache, tokens(6, seed=7), 0, 6)
    assert all(np.array_equal(before[k], np.array(a)) for k, a in node.payload.arrays.items())
