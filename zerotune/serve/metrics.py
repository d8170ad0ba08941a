"""The server's counters and histograms, written in the Prometheus text format (version 0.0.4).

    zerotune_requests_total{endpoint, status}      requests answered, by endpoint and HTTP status
    zerotune_sequences_total{reason}               sequences ended: stop, length, cancelled (client gone), error
    zerotune_prompt_tokens_total                   prompt tokens prefilled
    zerotune_generation_tokens_total               tokens generated
    zerotune_queue_length                          sequences waiting for a row of the batch
    zerotune_running_sequences                     sequences in the batch now
    zerotune_batch_rows                            histogram: rows in each decode step (batch occupancy)
    zerotune_time_to_first_token_seconds           histogram: from the request to its first token
    zerotune_time_per_output_token_seconds         histogram: per token after the first, per sequence
    zerotune_request_duration_seconds              histogram: from the request to its last token
"""

from __future__ import annotations

import threading
from collections.abc import Callable

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * len(buckets)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.total += value
        self.n += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        out += [f'{self.name}_bucket{{le="{edge:g}"}} {c}' for edge, c in zip(self.buckets, self.counts, strict=True)]
        out += [f'{self.name}_bucket{{le="+Inf"}} {self.n}', f"{self.name}_sum {self.total:.6f}",
                f"{self.name}_count {self.n}"]
        return out


class Metrics:
    """Thread-safe: the engine's thread and the server's event loop both record here."""

    def __init__(self, max_batch: int) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.ended: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.batch_rows = Histogram("zerotune_batch_rows", "rows in each decode step",
                                    tuple(float(b) for b in range(1, max_batch + 1)))
        self.ttft = Histogram("zerotune_time_to_first_token_seconds", "request to first token", SECONDS)
        self.tpot = Histogram("zerotune_time_per_output_token_seconds", "per token after the first", SECONDS)
        self.duration = Histogram("zerotune_request_duration_seconds", "request to last token", SECONDS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1

    def step(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)

    def sequence(self, reason: str, prompt_tokens: int, tokens: int, queued: float, first: float | None,
                 last: float) -> None:
        with self._lock:
            self.ended[reason] = self.ended.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += tokens
            if first is not None:
                self.ttft.observe(first - queued)
                if tokens > 1:
                    self.tpot.observe((last - first) / (tokens - 1))
            self.duration.observe(last - queued)

    def text(self, gauges: Callable[[], dict[str, int]]) -> str:
        with self._lock:
            out = ["# HELP zerotune_requests_total requests answered", "# TYPE zerotune_requests_total counter"]
            out += [f'zerotune_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP zerotune_sequences_total sequences ended, by reason",
                    "# TYPE zerotune_sequences_total counter"]
            out += [f'zerotune_sequences_total{{reason="{r}"}} {n}' for r, n in sorted(self.ended.items())]
            for name, value in (("prompt_tokens", self.prompt_tokens), ("generation_tokens", self.generation_tokens)):
                out += [f"# TYPE zerotune_{name}_total counter", f"zerotune_{name}_total {value}"]
            for name, value in gauges().items():
                out += [f"# TYPE zerotune_{name} gauge", f"zerotune_{name} {value}"]
            for h in (self.batch_rows, self.ttft, self.tpot, self.duration):
                out += h.lines()
        return "\n".join(out) + "\n"
