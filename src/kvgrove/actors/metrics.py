"""Prometheus counters and histograms, rendered as text exposition format. No trio here."""

from __future__ import annotations

import bisect
import math

LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS_SECONDS):
        self.name, self.help = name, help
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, math.inf), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == math.inf else repr(float(bound))
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """The server's counters; the request handlers update them, /metrics renders them."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.help: dict[str, str] = {
            "kvgrove_requests_total": "Generation requests by API and outcome.",
            "kvgrove_prompt_tokens_total": "Prompt tokens, computed or reused from the cache.",
            "kvgrove_generated_tokens_total": "Tokens generated.",
        }
        self.ttft = Histogram(
            "kvgrove_time_to_first_token_seconds", "From request arrival to the first token."
        )
        self.inter_token = Histogram(
            "kvgrove_inter_token_seconds", "Between consecutive tokens of one stream."
        )

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0) + value

    def render(self, gauges: dict[str, tuple] | None = None) -> str:
        """Text format. gauges: name -> (help, {label value: value}[, label name, "tier" if
        not given])."""
        lines: list[str] = []
        for name in sorted({n for n, _ in self.counters}):
            lines += [f"# HELP {name} {self.help.get(name, name)}", f"# TYPE {name} counter"]
            for (n, labels), value in sorted(self.counters.items()):
                if n == name:
                    lbl = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines.append(f"{name}{{{lbl}}} {value}" if lbl else f"{name} {value}")
        lines += self.ttft.render() + self.inter_token.render()
        for name, (help_text, values, *label) in (gauges or {}).items():
            key = label[0] if label else "tier"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines += [f'{name}{{{key}="{k}"}} {v}' for k, v in values.items()]
        return "\n".join(lines) + "\n"
