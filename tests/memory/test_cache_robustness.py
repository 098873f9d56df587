"""The prefix cache under a failing or hostile disk, a second owner, a restart, and many
namespaces: it degrades, repairs and reports; it never fails a request nor serves KV computed
for another prompt."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kvgrove import faults
from kvgrove.memory import snapshots
from kvgrove.memory.ledger import Budgets
from kvgrove.memory.prefix_cache import CacheDirBusy, PrefixCache
from kvgrove.memory.snapshots import layout
from kvgrove.models.caches import cache_tokens, make_cache
from kvgrove.models.generate import generate
from kvgrove.sampling import SamplingParams
from tiny_models import prefilled

GREEDY = SamplingParams(temperature=0.0)
AMPLE = Budgets(1 << 30, 1 << 30, 1 << 30)


def make(model, folder, budgets=AMPLE) -> PrefixCache:
    return PrefixCache(layout(make_cache(model)), budgets, fingerprint="t", cache_dir=folder)


def prompt(seed: int, n: int = 24) -> list[int]:
    return [(7 * i + 31 * seed) % 240 + 10 for i in range(n)]


def per_token(model, tmp_path) -> int:
    probe = PrefixCache(layout(make_cache(model)), AMPLE, fingerprint="p", cache_dir=None)
    probe.store("", prompt(0), prefilled(model, prompt(0)))
    return probe.tier_bytes()["device"] // len(prompt(0))


def answer_with_cache(model, cache: PrefixCache, rid: int, tokens: list[int]) -> list[int]:
    """What a request gets: match, fill, compute the rest, decode greedily."""
    cached = cache.match(rid, "", tokens)
    live = make_cache(model)
    restored = cache.fill(rid, live)
    assert restored <= cached and cache_tokens(live) == restored
    steps = generate(model, tokens, GREEDY, max_tokens=4, cache=live, cached_tokens=restored)
    return [s.token for s in steps]


def reference(model, tokens) -> list[int]:
    return [s.token for s in generate(model, tokens, GREEDY, max_tokens=4)]


def assert_within_budgets(cache: PrefixCache) -> None:
    for tier, nbytes in cache.tier_bytes().items():
        assert nbytes <= cache.budgets.of(tier), (tier, nbytes)


# -- 1. disk write errors degrade the tier, never a request ----------------------------------


@pytest.mark.parametrize("how", ["injected", "folder_replaced_by_a_file"])
def test_disk_write_errors_degrade_the_tier_and_never_fail_a_request(model, tmp_path, how, caplog):
    pt = per_token(model, tmp_path)
    budgets = Budgets(30 * pt, 30 * pt, 1 << 30)
    cache = make(model, tmp_path, budgets)
    now = [0.0]
    cache.health.clock = lambda: now[0]
    folder = tmp_path / "t" / "default"
    if how == "injected":
        faults.arm("disk.write", error=OSError)
    else:  # a real failure: the namespace's folder is gone and a file stands in its place
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.write_text("not a folder")
    try:
        for i in range(6):  # each store pushes older prompts down: host -> (disk fails) dropped
            cache.store("", prompt(i), prefilled(model, prompt(i)))
            assert_within_budgets(cache)
            now[0] += 10  # past the back-off: the next demotion tries the disk again
        stats = cache.statistics()
        assert stats["disk_degraded"] and stats["disk_write_errors"] >= 2
        said = [r for r in caplog.records if "disk tier degraded" in r.getMessage()]
        assert len(said) == 1  # logged once, however many writes failed
        assert stats["disk_dropped_writes"] >= 1 and stats["bytes"]["disk"] == 0
        assert stats["bytes"]["host"] > 0
        # Requests keep working: a hit on device, a miss recomputed.
        for i in (5, 0):
            assert answer_with_cache(model, cache, 10 + i, prompt(i)) == reference(model, prompt(i))
        assert cache.check_integrity().clean
    finally:
        faults.disarm("disk.write")
        if folder.is_file():
            folder.unlink()
    # The disk works again: after the back-off the next write goes through and clears the flag.
    now[0] += 3600
    for i in range(6, 10):
        cache.store("", prompt(i), prefilled(model, prompt(i)))
        assert_within_budgets(cache)
    stats = cache.statistics()
    assert not stats["disk_degraded"] and stats["bytes"]["disk"] > 0
    assert answer_with_cache(model, cache, 30, prompt(6)) == reference(model, prompt(6))
    assert cache.check_integrity().clean


def test_flush_with_a_failing_disk_drops_instead_of_raising(model, tmp_path):
    cache = make(model, tmp_path)
    for i in range(3):
        cache.store("", prompt(i), prefilled(model, prompt(i)))
    with faults.injected("disk.write", error=OSError):
        cache.flush()
    assert cache.statistics()["disk_degraded"]
    assert cache.check_integrity().clean


def test_disk_read_errors_recompute(model, tmp_path):
    cache = make(model, tmp_path)
    cache.store("", prompt(1), prefilled(model, prompt(1)))
    cache.flush()
    assert cache.tier_bytes()["disk"] > 0
    assert cache.match(1, "", prompt(1)) == len(prompt(1)) - 1
    with faults.injected("disk.read", error=OSError):
        assert cache.fill(1, make_cache(model)) == 0
    assert cache.statistics()["disk_read_errors"] == 1
    assert answer_with_cache(model, cache, 2, prompt(1)) == reference(model, prompt(1))
    assert cache.check_integrity().clean


def test_a_failed_demotion_copy_drops_the_node_and_never_fails_the_store(model, tmp_path):
    """Found by the cache oracle: an allocation failure while copying a node to host memory
    (inside a rebalance) escaped the store and took the executor down. It now drops the node."""
    small = per_token(model, tmp_path) * 30  # room for about one prompt on the device
    cache = make(model, tmp_path, Budgets(small, 1 << 30, 1 << 30))
    with faults.injected("tiers.demote"):
        for i in range(4):
            cache.store("", prompt(i), prefilled(model, prompt(i)))
        assert faults.raised("tiers.demote") > 0
    assert cache.tier_bytes()["device"] <= small
    assert cache.tier_bytes()["host"] == 0  # every demotion failed: dropped, not half-moved
    assert cache.check_integrity().clean
    assert answer_with_cache(model, cache, 5, prompt(3)) == reference(model, prompt(3))


@pytest.mark.parametrize("damage", ["renamed field", "no such dtype", "a tensor with no dtype"])
def test_a_header_missing_a_field_is_deleted_at_recovery_not_fatal(model, tmp_path, damage):
    """A damaged header (a flipped byte can rename a key) is a corrupt file at recovery: it is
    deleted and the cache starts, never a KeyError out of the start (seen by the oracle: a flip
    of "1.1" to "1.0" in the dtypes made a duplicate key, and one tensor had no dtype)."""
    from safetensors.numpy import load_file, save_file

    cache = make(model, tmp_path)
    cache.store("", prompt(1), prefilled(model, prompt(1)))
    cache.flush()
    cache.close()
    (path,) = (tmp_path / "t" / "default").glob("*.safetensors")
    arrays = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    if damage == "renamed field":
        meta["restore_poinT"] = meta.pop("restore_point")
    elif damage == "no such dtype":  # a flipped byte in a dtype name
        meta["dtypes"] = meta["dtypes"].replace("float32", "flnat32", 1)
    else:  # a flipped byte in a tensor's name, in the dtypes only: a duplicate JSON key
        assert '"1.1"' in meta["dtypes"]
        meta["dtypes"] = meta["dtypes"].replace('"1.1"', '"1.0"', 1)
    save_file(arrays, str(path), metadata=meta)
    again = make(model, tmp_path)  # starts
    assert again.statistics()["nodes"] == 0 and not path.exists()
    assert answer_with_cache(model, again, 2, prompt(1)) == reference(model, prompt(1))
    assert again.check_integrity().clean


# -- 2. the integrity check reports and repairs -----------------------------------------------


def test_check_integrity_reports_and_repairs_instead_of_raising(model, tmp_path):
    cache = make(model, tmp_path)
    for i in range(3):
        cache.store("", prompt(i), prefilled(model, prompt(i)))
    cache.flush()
    folder = tmp_path / "t" / "default"
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 3
    files[0].unlink()  # a file vanished behind the cache's back
    (folder / "0123abcd-0.safetensors").write_bytes(b"stray")
    cache._totals["host"] += 5  # and the incremental total drifted
    report = cache.check_integrity()
    assert not report.clean and not report.unrepaired
    text = " ".join(report.problems)
    assert "vanished" in text and "stray file" in text and "tier totals" in text
    assert len(report.repaired) == 3
    assert cache.check_integrity().clean  # repaired for good
    assert sorted(folder.glob("*.safetensors")) == files[1:]
    assert cache.statistics()["nodes"] == 2


# -- 3. a file's checksum covers its header, and the file must match its key -----------------


def _tamper_tokens(path, old: list[int], new: list[int]) -> None:
    raw = path.read_bytes()
    a, b = str(old)[:-1].encode(), str(new)[:-1].encode()
    assert len(a) == len(b) and raw.count(a) == 1
    path.write_bytes(raw.replace(a, b))


def test_a_one_byte_change_in_the_header_tokens_never_serves_another_prompt(model, tmp_path):
    a = prompt(3)
    cache = make(model, tmp_path)
    cache.store("", a, prefilled(model, a))
    cache.flush()
    cache.close()
    (path,) = (tmp_path / "t" / "default").glob("*.safetensors")
    b = [a[0] + 1, *a[1:]]  # one digit differs: "[31," -> "[32,"
    _tamper_tokens(path, a[:3], b[:3])
    again = make(model, tmp_path)
    assert again.match(1, "", b) == 0  # main served a's KV for b here
    assert again.match(2, "", a) == 0
    assert not path.exists()
    assert again.check_integrity().clean


def test_tampered_header_is_rejected_at_read(model, tmp_path):
    a = prompt(4)
    cache = make(model, tmp_path)
    cache.store("", a, prefilled(model, a))
    cache.flush()
    (path,) = (tmp_path / "t" / "default").glob("*.safetensors")
    _tamper_tokens(path, a[:3], [a[0] + 1, *a[1:3]])
    assert cache.match(1, "", a) == len(a) - 1
    assert cache.fill(1, make_cache(model)) == 0  # failed verification: recompute
    assert cache.statistics()["corrupt_entries"] == 1 and not path.exists()
    assert answer_with_cache(model, cache, 2, a) == reference(model, a)
    assert cache.check_integrity().clean


@pytest.mark.parametrize("damage", ["renamed", "truncated"])
def test_renamed_or_truncated_files_are_rejected_at_recovery(model, tmp_path, damage):
    a, b = prompt(5), prompt(6)
    cache = make(model, tmp_path)
    cache.store("", a, prefilled(model, a))
    cache.store("", b, prefilled(model, b))
    cache.flush()
    cache.close()
    first, second = sorted((tmp_path / "t" / "default").glob("*.safetensors"))
    if damage == "renamed":  # one file under the other's name
        os.replace(first, second)
    else:
        second.write_bytes(second.read_bytes()[:-100])
    again = make(model, tmp_path)
    # Whatever survived is exactly right; the damaged one is gone.
    for rid, p in enumerate((a, b)):
        assert answer_with_cache(model, again, rid, p) == reference(model, p)
    assert again.recovered_nodes == 1 if damage == "truncated" else again.recovered_nodes == 0
    assert again.check_integrity().clean


# -- 4. one owner per cache folder ------------------------------------------------------------


def test_a_second_prefix_cache_on_the_same_folder_is_refused(model, tmp_path):
    first = make(model, tmp_path)
    with pytest.raises(CacheDirBusy, match=str(tmp_path / "t")):
        make(model, tmp_path)
    first.close()
    second = make(model, tmp_path)  # released on close
    second.close()


def test_a_second_process_on_the_same_folder_is_refused(model, tmp_path):
    first = make(model, tmp_path)
    code = textwrap.dedent(
        f"""
        from kvgrove.memory.ledger import Budgets
        from kvgrove.memory.prefix_cache import CacheDirBusy, PrefixCache
        try:
            PrefixCache(("span",), Budgets(1, 1, 1), fingerprint="t", cache_dir={str(tmp_path)!r})
        except CacheDirBusy as e:
            print("busy:", e)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.stdout.startswith("busy:") and str(tmp_path / "t") in out.stdout, out
    assert str(os.getpid()) in out.stdout
    first.close()


# -- 5. recency survives a restart ------------------------------------------------------------


def test_recency_survives_a_restart(model, tmp_path):
    cache = make(model, tmp_path)
    trees = [prompt(10 + i, 30) for i in range(3)]
    for p in trees:  # two nodes per tree: a restore point at 12, and the whole prompt
        live = prefilled(model, p[:12])
        cache.store("", p[:12], live)
        cache.store("", p, prefilled(model, p))
    assert cache.match(99, "", [*trees[0], 1]) == len(trees[0])  # tree 0 is now the newest
    cache.release(99)
    cache.flush()
    total = cache.tier_bytes()["disk"]
    cache.close()
    again = make(model, tmp_path)
    assert again.recovered_nodes == 6
    again.budgets = Budgets(AMPLE.device_bytes, AMPLE.host_bytes, total - 1)  # free one byte
    moves = again.rebalance()
    assert [m.target for m in moves] == ["dropped"]
    assert again.statistics()["nodes"] == 5  # only tree 1's leaf went, not a whole tree
    assert again.match(1, "", trees[1]) == 12
    assert again.match(2, "", trees[0]) == len(trees[0]) - 1
    assert again.match(3, "", trees[2]) == len(trees[2]) - 1


# -- 6. bookkeeping: namespaces are collected -------------------------------------------------


def test_empty_namespaces_and_their_folders_are_collected(model, tmp_path):
    pt = per_token(model, tmp_path)
    cache = make(model, tmp_path, Budgets(30 * pt, 0, 30 * pt))
    for i in range(8):
        cache.store(f"salt-{i}", prompt(i), prefilled(model, prompt(i)))
        assert cache.match(100 + i, f"miss-{i}", prompt(i)) == 0  # a miss leaves nothing
        assert_within_budgets(cache)
    stats = cache.statistics()
    assert stats["namespaces"] <= 3 and stats["collected_namespaces"] >= 8
    folders = {p.name for p in (tmp_path / "t").iterdir() if p.is_dir()}
    live = {t.namespace for t in cache._tiers.values()}
    assert folders <= live
    assert cache.check_integrity().clean
    cache.budgets = Budgets(0, 0, 0)
    cache.rebalance()
    assert cache.statistics()["namespaces"] == 0
    assert not [p for p in (tmp_path / "t").iterdir() if p.is_dir()]
    assert cache.check_integrity().clean


def test_check_integrity_verifies_the_lru_index(model, tmp_path):
    cache = make(model, tmp_path)
    for i in range(3):
        cache.store(f"ns{i}", prompt(i), prefilled(model, prompt(i)))
    node = next(iter(cache.tiers("ns1").trie.nodes()))
    cache._lru.forget(node)  # the index lost a node
    report = cache.check_integrity()
    assert any("LRU" in p for p in report.problems) and "LRU index rebuilt" in report.repaired
    assert cache.check_integrity().clean


# -- restore: any failure releases the request's lock ----------------------------------------


@pytest.mark.parametrize("where", ["promote", "stitch"])
def test_a_failed_restore_releases_the_lock_and_propagates(model, tmp_path, where):
    cache = make(model, tmp_path)
    p = prompt(7)
    cache.store("", p, prefilled(model, p))
    (node,) = cache.tiers("").trie.nodes()
    live = make_cache(model)
    if where == "promote":  # a host copy that cannot come back to the device
        cache.tiers("").demote(node, "host")
        key = next(iter(node.payload.dtypes))
        node.payload.dtypes[key] = "float16"  # recorded dtype no longer matches the bytes
    else:
        live = live[:-1] if len(live) > 1 else []  # a live cache of another layout
    assert cache.match(1, "", p) == len(p) - 1
    with pytest.raises(ValueError):
        cache.fill(1, live)
    assert cache.statistics()["locked_requests"] == 0
    assert node.lock_count == 0
    cache.budgets = Budgets(0, 0, 0)
    cache.rebalance()  # nothing is pinned: everything can go
    assert cache.statistics()["nodes"] == 0
    assert cache.check_integrity().clean


def test_an_unusable_cache_folder_at_start_serves_without_the_disk_tier(model, tmp_path):
    (tmp_path / "t").write_text("a file where the folder should be")
    pt = per_token(model, tmp_path)
    cache = make(model, tmp_path, Budgets(30 * pt, 30 * pt, 1 << 30))
    for i in range(4):
        cache.store("", prompt(i), prefilled(model, prompt(i)))
        assert_within_budgets(cache)
    assert cache.tier_bytes()["disk"] == 0
    assert answer_with_cache(model, cache, 1, prompt(3)) == reference(model, prompt(3))
    assert cache.check_integrity().clean


# -- a store's snapshots evaluated together ---------------------------------------------------


def test_snapshots_taken_together_hold_what_the_caches_held_when_taken(model, tmp_path):
    """A store of many sequences evaluates their snapshots at once (`snapshots.deferred`, then
    `settle`): a live cache that moves on (written in place) before that changes nothing."""
    cache = make(model, tmp_path)
    lives = [prefilled(model, prompt(i)) for i in range(3)]
    with snapshots.deferred() as taken:
        for i, live in enumerate(lives):
            cache.store("", prompt(i), live)
    assert len(taken) == 3
    for live in lives:  # the live caches go on before the snapshots are evaluated
        generate(model, [5, 6, 7], GREEDY, max_tokens=2, cache=live, cached_tokens=0)
    assert cache.settle(taken) == 0
    for i in range(3):
        assert answer_with_cache(model, cache, 10 + i, prompt(i)) == reference(model, prompt(i))
    assert cache.check_integrity().clean


def test_a_store_whose_snapshots_fail_to_evaluate_drops_only_what_fails(model, tmp_path):
    """Evaluating the store's snapshots together fails (an allocation), then one node's alone:
    that node is dropped and recomputed when asked for; the others are served from the cache."""
    cache = make(model, tmp_path)
    with snapshots.deferred() as taken:
        for i in range(3):
            cache.store("", prompt(i), prefilled(model, prompt(i)))
    with faults.injected("snapshot.evaluate", times=2):
        assert cache.settle(taken) == 1
    assert cache.statistics()["nodes"] == 2
    assert cache.check_integrity().clean
    hits = [cache.match(20 + i, "", prompt(i)) for i in range(3)]
    assert sorted(hits) == [0, len(prompt(0)) - 1, len(prompt(0)) - 1]
    for i in range(3):
        cache.release(20 + i)
        assert answer_with_cache(model, cache, 30 + i, prompt(i)) == reference(model, prompt(i))
    assert cache.check_integrity().clean
