"""The server's counters, in Prometheus' text format (`GET /metrics`), with no client library needed."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip((*self.buckets, math.inf), self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == math.inf else f"{bound:g}"}"}} {total}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What `GET /metrics` reports; gauges are read when scraped from the callables given."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self.gauges = gauges
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.texts = 0
        self.tokens = 0
        self.batches = 0
        self.adapter_loads = 0
        self.adapter_evictions = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_rows = Histogram(BATCH_BUCKETS)

    def render(self) -> str:
        lines = ["# HELP lora_cli_requests_total HTTP requests by endpoint and status.",
                 "# TYPE lora_cli_requests_total counter"]
        lines += [f'lora_cli_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
        for name, value, what in (("texts", self.texts, "Texts classified."),
                                  ("prompt_tokens", self.tokens, "Tokens classified."),
                                  ("batches", self.batches, "Forward passes of the base."),
                                  ("adapter_loads", self.adapter_loads, "Adapters read into memory."),
                                  ("adapter_evictions", self.adapter_evictions, "Adapters dropped to stay within --max-loaded.")):
            lines += [f"# HELP lora_cli_{name}_total {what}", f"# TYPE lora_cli_{name}_total counter",
                      f"lora_cli_{name}_total {value}"]
        for name, (what, read) in self.gauges.items():
            lines += [f"# HELP lora_cli_{name} {what}", f"# TYPE lora_cli_{name} gauge", f"lora_cli_{name} {read():g}"]
        lines += ["# HELP lora_cli_request_seconds Time from a /classify request's arrival to its answer.",
                  "# TYPE lora_cli_request_seconds histogram", *self.latency.lines("lora_cli_request_seconds"),
                  "# HELP lora_cli_batch_rows Texts per forward pass.", "# TYPE lora_cli_batch_rows histogram",
                  *self.batch_rows.lines("lora_cli_batch_rows")]
        return "\n".join(lines) + "\n"
