"""Seeded workloads for the cache oracle: conversations that share prefixes, run in waves.

A `Scenario` is plain data (no model, no trio): settings that force tier moves and preemption,
faults to arm, and a list of steps. A `Wave` submits its requests concurrently (some arrive only
once another has streamed a few tokens); a `Restart` stops the actors (they flush the cache to
disk), damages files as told, and composes fresh actors on the same cache folder; `RemoveFolder`
deletes the disk tier's folder under the running server.

A request's prompt is `base + extra`: `base` is another request's whole conversation so far (its
prompt plus its cache-off greedy answer, resolved by the driver) or one of the shared pieces
(system prompts, documents), so turns, branches and shared documents all hit the trie. Shrinking
works on `atoms()`: every request, fault, restart and folder removal can be dropped on its own.
"""

from __future__ import annotations

import random
from typing import Any

import attrs

KINDS = ("llama", "window", "gemma3", "qwen3_next", "glm4_moe_lite")

# What a client does with its stream. Cancellations name the state the request must have reached
# (the driver detects it; if the request already moved past it, it is cancelled where it is).
ACTIONS = (
    "read",
    "read",
    "read",
    "cancel_queued",
    "cancel_prefill",
    "cancel_decode",
    "stall_resume",
    "stall_leave",
)
FAULT_POINTS = (
    "snapshot.take",
    "snapshot.evaluate",
    "tiers.demote",
    "tiers.promote",
    "tiers.stitch",
    "disk.write",
    "disk.read",
)
DAMAGE = ("truncate", "flip_data", "flip_header", "tamper_tokens", "tamper_crc", "delete")


@attrs.frozen
class Request:
    rid: int
    base: tuple[str, Any]  # ("piece", index) | ("turn", rid of an earlier request) | ("none", 0)
    extra: tuple[int, ...]
    max_tokens: int
    action: str = "read"
    after: int = 1  # tokens read before cancel_decode / stalling
    namespace: str = ""
    arrive_after: int | None = None  # rid in the same wave: arrive once it has streamed a token


@attrs.frozen
class Wave:
    requests: tuple[Request, ...]


@attrs.frozen
class Damage:
    how: str  # one of DAMAGE
    pick: int  # which file (index into the sorted file list, modulo its length)


@attrs.frozen
class Restart:
    damage: tuple[Damage, ...] = ()


@attrs.frozen
class RemoveFolder:
    pass


@attrs.frozen
class Fault:
    point: str
    skip: int
    times: int


@attrs.frozen
class Scenario:
    seed: int
    kind: str
    settings: dict[str, Any]
    kv_budget_bytes: int | None
    pieces: tuple[tuple[int, ...], ...]
    faults: tuple[Fault, ...]
    steps: tuple[Wave | Restart | RemoveFolder, ...]

    def requests(self) -> list[Request]:
        return [r for s in self.steps if isinstance(s, Wave) for r in s.requests]

    def atoms(self) -> list[tuple[str, int, int]]:
        """What shrinking may remove: ("fault", i, 0), ("step", i, 0), ("request", step, j)."""
        out = [("fault", i, 0) for i in range(len(self.faults))]
        for i, s in enumerate(self.steps):
            if isinstance(s, Wave):
                out += [("request", i, j) for j in range(len(s.requests))]
            else:
                out.append(("step", i, 0))
        return out

    def keep(self, atoms: set[tuple[str, int, int]]) -> Scenario:
        """The scenario with only `atoms` (requests whose base was removed start from nothing)."""
        faults = tuple(f for i, f in enumerate(self.faults) if ("fault", i, 0) in atoms)
        steps: list[Any] = []
        kept: set[int] = set()
        for i, s in enumerate(self.steps):
            if isinstance(s, Wave):
                reqs = []
                for j, r in enumerate(s.requests):
                    if ("request", i, j) not in atoms:
                        continue
                    if r.base[0] == "turn" and r.base[1] not in kept:
                        r = attrs.evolve(r, base=("none", 0))
                    if r.arrive_after is not None and r.arrive_after not in kept:
                        r = attrs.evolve(r, arrive_after=None)
                    reqs.append(r)
                    kept.add(r.rid)
                if reqs:
                    steps.append(Wave(tuple(reqs)))
            elif ("step", i, 0) in atoms:
                steps.append(s)
        return attrs.evolve(self, faults=faults, steps=tuple(steps))

    def describe(self) -> str:
        lines = [
            f"Scenario(seed={self.seed}, kind={self.kind!r}, settings={self.settings}, "
            f"kv_budget_bytes={self.kv_budget_bytes})",
            f"  pieces: {[len(p) for p in self.pieces]} tokens",
        ]
        lines += [f"  fault {f.point} skip={f.skip} times={f.times}" for f in self.faults]
        for s in self.steps:
            if isinstance(s, Wave):
                lines.append("  wave:")
                for r in s.requests:
                    lines.append(
                        f"    #{r.rid} base={r.base} +{len(r.extra)} tokens, max {r.max_tokens}, "
                        f"{r.action}(after {r.after})"
                        + (f" ns={r.namespace!r}" if r.namespace else "")
                        + (f" arrives after #{r.arrive_after}" if r.arrive_after else "")
                    )
            elif isinstance(s, Restart):
                lines.append(f"  restart, damage {[(d.how, d.pick) for d in s.damage]}")
            else:
                lines.append("  remove the cache folder")
        return "\n".join(lines)


def _tokens(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.randrange(3, 320) for _ in range(n))  # 0..2 are the tokenizer's specials


def generate(
    seed: int, kind: str, *, faults: bool | None = None, waves: int | None = None
) -> Scenario:
    """One random scenario for `kind`; the same (seed, kind) always gives the same scenario."""
    rng = random.Random(f"{kind}:{seed}")
    chunk = rng.choice([8, 16, 32, 2048])
    settings: dict[str, Any] = {
        "prefill_chunk_tokens": chunk,
        "max_running_sequences": rng.choice([1, 2, 4, 8]),
        "batch_prefill": rng.random() < 0.7,
        # The decode overlap (off by default on a CPU) runs ahead of every followed step here,
        # so the oracle checks it against what the prefix cache promises.
        "decode_overlap": "on",
    }
    # Tiny tier budgets force every move: device -> host -> disk -> dropped.
    tiering = rng.choice(["device", "host", "disk", "tight", "drop"])
    if tiering == "host":
        settings["device_cache_bytes"] = 1
    elif tiering == "disk":
        settings.update(device_cache_bytes=1, host_budget_bytes=1)
    elif tiering == "tight":
        settings.update(
            device_cache_bytes=rng.choice([20_000, 60_000]),
            host_budget_bytes=rng.choice([20_000, 60_000]),
            disk_budget_bytes=rng.choice([100_000, 400_000]),
        )
    elif tiering == "drop":
        settings.update(
            device_cache_bytes=rng.choice([1, 30_000]),
            host_budget_bytes=rng.choice([1, 30_000]),
            disk_budget_bytes=rng.choice([1, 50_000]),
        )
    kv_budget = rng.choice([None, None, 300_000, 600_000])
    pieces = tuple(_tokens(rng, rng.randint(12, 70)) for _ in range(rng.randint(1, 3)))
    with_faults = rng.random() < 0.5 if faults is None else faults
    armed = ()
    if with_faults:
        armed = tuple(
            Fault(p, rng.randint(0, 6), rng.randint(1, 3))
            for p in rng.sample(FAULT_POINTS, rng.randint(1, 3))
        )
    n_waves = waves if waves is not None else rng.randint(2, 4)
    steps: list[Any] = []
    rid = 0
    done: list[int] = []  # rids of earlier waves (their conversations can continue)
    namespaces = ["", "", "", "tenant-b"]
    for w in range(n_waves):
        if w and rng.random() < 0.3:
            damage = ()
            if rng.random() < 0.6:
                damage = tuple(
                    Damage(rng.choice(DAMAGE), rng.randrange(1000))
                    for _ in range(rng.randint(1, 2))
                )
            steps.append(Restart(damage))
        elif w and rng.random() < 0.08:
            steps.append(RemoveFolder())
        reqs = []
        for _ in range(rng.randint(1, 5)):
            rid += 1
            r = rng.random()
            if done and r < 0.45:
                base = ("turn", rng.choice(done))
            elif r < 0.9:
                base = ("piece", rng.randrange(len(pieces)))
            else:
                base = ("none", 0)
            action = rng.choice(ACTIONS)
            arrive = None
            if reqs and rng.random() < 0.25:
                arrive = rng.choice(reqs).rid
            reqs.append(
                Request(
                    rid,
                    base,
                    _tokens(rng, rng.randint(1, 24)),
                    rng.randint(1, 10),
                    action,
                    rng.randint(1, 3),
                    rng.choice(namespaces),
                    arrive,
                )
            )
        steps.append(Wave(tuple(reqs)))
        done += [r.rid for r in reqs if r.action in ("read", "stall_resume")]
    # Drawn last, so the rest of a seed's scenario is what it was before the setting: half the
    # scenarios restore any cached prefix, half leave those under 16 tokens to be recomputed.
    settings["min_prefix_tokens"] = rng.choice([0, 16])
    # Then (as the GPU's auto values do) prompts computing fewer tokens are stored only when
    # they finish, not as they prefill, and a step prefills up to 4 chunks over its prompts.
    settings["share_prefill_min_tokens"] = rng.choice([0, 0, 32, 64])
    settings["prefill_step_tokens"] = rng.choice([0, 4 * chunk])
    return Scenario(seed, kind, settings, kv_budget, pieces, armed, tuple(steps))
