"""The server's Prometheus metrics, named as vLLM names them so its dashboards and autoscalers read them.

Each server has its own `CollectorRegistry` (several servers, e.g. in tests, never share counters).
Every series carries the label `model_name`. Two sources:
  - the scheduler, read from `Scheduler.stats()` at each scrape (`SchedulerCollector`), so the
    counters are the engine's own account (the `serve` job's warm-up request included):
    vllm:num_requests_running, vllm:num_requests_waiting, vllm:kv_cache_usage_perc (the fraction of
    slots in use), lmops:slots_used, lmops:slots_total (gauges); vllm:prompt_tokens_total,
    vllm:generation_tokens_total, vllm:request_success_total{finished_reason} (stop, length, abort for
    a cancelled request, timeout, error), vllm:prefix_cache_queries_total, vllm:prefix_cache_hits_total
    (in tokens), vllm:num_preemptions_total, vllm:spec_decode_num_drafts_total,
    vllm:spec_decode_num_draft_tokens_total, vllm:spec_decode_num_accepted_tokens_total (counters).
  - the HTTP layer, per request as its events reach it (`RequestTimer`, `ServerMetrics.finish`):
    vllm:time_to_first_token_seconds, vllm:time_per_output_token_seconds,
    vllm:e2e_request_latency_seconds, vllm:request_prompt_tokens, vllm:request_generation_tokens
    (histograms, over requests that ran to their end); lmops:requests_rejected_total{reason}
    (429 queue_full, 400 invalid, 503 unhealthy; vLLM has no such metric).
With several models (`serving.model_cache`), each resident model's scheduler series carry its name, and
each request's histograms the name it asked for (a model or an adapter). A request with `n` choices
counts as n requests, one per choice, as the scheduler runs them. TTFT is
measured from the request's arrival at the server, so it includes queueing, as vLLM's does.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LABEL = "model_name"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so histograms line up on shared dashboards.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
REJECT_REASONS = ("queue_full", "invalid", "unhealthy")
# the scheduler's finish reasons as vLLM's finished_reason label says them
FINISHED_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "timeout", "error": "error"}

# (metric, SchedulerStats field, help) read at each scrape
GAUGES = (
    ("vllm:num_requests_running", "running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
    ("lmops:slots_used", "slots_used", "Decode slots holding a request."),
    ("lmops:slots_total", "max_slots", "Decode slots of the engine."),
    ("lmops:kv_blocks_used", "kv_blocks_used", "KV blocks referenced or cached (paged pool, or dense prefix pool)."),
    ("lmops:kv_blocks_total", "kv_blocks_total", "KV blocks of the block pool."),
)
COUNTERS = (
    ("vllm:prompt_tokens", "prompt_tokens", "Number of prefill tokens processed."),
    ("vllm:generation_tokens", "generated_tokens", "Number of generation tokens processed."),
    ("vllm:prefix_cache_queries", "prefix_cache_queries", "Prefix cache queries, in queried tokens."),
    ("vllm:prefix_cache_hits", "prefix_cache_hits", "Prefix cache hits, in cached tokens."),
    ("vllm:num_preemptions", "preemptions", "Cumulative number of preemptions from the engine."),
    ("vllm:spec_decode_num_drafts", "spec_drafts", "Number of spec decoding drafts."),
    ("vllm:spec_decode_num_draft_tokens", "spec_draft_tokens", "Number of draft tokens."),
    ("vllm:spec_decode_num_accepted_tokens", "spec_accepted_tokens", "Number of accepted tokens."),
)


def _1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


class SchedulerCollector(Collector):
    """Gauges and counters read from `stats_by_model()` ({model name: SchedulerStats} of the resident
    models) when Prometheus scrapes."""

    def __init__(self, stats_by_model: Callable[[], Mapping[str, Any]]):
        self._stats = stats_by_model

    def _families(self, by_model: Mapping[str, Any]) -> Iterator[Metric]:
        for family_cls, table in ((GaugeMetricFamily, GAUGES), (CounterMetricFamily, COUNTERS)):
            for name, field, doc in table:
                family = family_cls(name, doc, labels=[LABEL])
                for model_name, stats in by_model.items():
                    family.add_metric([model_name], float(getattr(stats, field)))
                yield family
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=[LABEL, "finished_reason"])
        for model_name, stats in by_model.items():
            for reason, label in FINISHED_REASONS.items():
                success.add_metric([model_name, label], float(stats.finished.get(reason, 0)))
        yield success

    def describe(self) -> Iterator[Metric]:
        return self._families({})

    def collect(self) -> Iterator[Metric]:
        return self._families(self._stats())


@dataclasses.dataclass
class RequestTimer:
    """One scheduler request's timings as the HTTP layer sees its events (time.monotonic seconds)."""
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    first_token: float | None = None
    tokens: int = 0

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.tokens += 1


class ServerMetrics:
    """The metrics of one server (module docstring); `exposition()` is the /metrics body."""

    def __init__(self, model_name: str, stats_by_model: Callable[[], Mapping[str, Any]], max_length: int):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        common = dict(labelnames=[LABEL], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              buckets=TTFT_BUCKETS, **common)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              buckets=TPOT_BUCKETS, **common)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             buckets=LATENCY_BUCKETS, **common)
        token_buckets = _1_2_5_buckets(max_length)
        self.prompt_hist = Histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                     buckets=token_buckets, **common)
        self.generation_hist = Histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                                         buckets=token_buckets, **common)
        for histogram in (self.ttft, self.tpot, self.e2e, self.prompt_hist, self.generation_hist):
            histogram.labels(model_name)  # the default model's series exist from the start
        self._rejected = Counter("lmops:requests_rejected", "Requests refused: queue_full (429), invalid (400), "
                                 "unhealthy (503).", labelnames=[LABEL, "reason"], registry=self.registry)
        for reason in REJECT_REASONS:
            self._rejected.labels(model_name, reason)
        self.registry.register(SchedulerCollector(stats_by_model))

    def reject(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def finish(self, timer: RequestTimer, prompt_tokens: int, generated_tokens: int,
               model_name: str | None = None) -> None:
        """Records a request that ran to its end (for `model_name`, a model or adapter; None: the default
        model): its latencies and token counts."""
        label = model_name or self.model_name
        now = time.monotonic()
        self.e2e.labels(label).observe(now - timer.arrival)
        if timer.first_token is not None:
            self.ttft.labels(label).observe(timer.first_token - timer.arrival)
            if timer.tokens > 1:
                self.tpot.labels(label).observe((now - timer.first_token) / (timer.tokens - 1))
        self.prompt_hist.labels(label).observe(prompt_tokens)
        self.generation_hist.labels(label).observe(generated_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
