"""Prometheus metrics of one engine, in a registry of their own; every series carries a
`model_name` label, as vLLM's do. The names are listed in README.md ("Metrics").

Engine counters are read at scrape time from `engine.stats` (nothing is pushed from the engine
thread); the server adds request latencies and rejections as they happen. Each `Metrics` owns a
`CollectorRegistry`, so several apps in one process (tests) never clash on metric names.
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


def weight_bytes(head) -> int:
    """Bytes the coordinator holds for the model: the embedding and the lm_head, counted once
    when they share storage (tied embeddings)."""
    if hasattr(head, "nbytes"):
        return int(head.nbytes)
    total, seen = 0, set()
    for t in (getattr(head, "embed_table", None), getattr(head, "lm_head", None)):
        if t is None:
            continue
        key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else id(t)
        if key not in seen:
            seen.add(key)
            total += int(t.nbytes)
    return total


class EngineCollector:
    """Reads the engine's counters when Prometheus scrapes."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name

    def collect(self):
        e, s = self.engine, self.engine.stats
        _counter, _gauge = self._family(CounterMetricFamily), self._family(GaugeMetricFamily)
        yield _counter("tpserve_generation_tokens", "Tokens generated.", s.tokens_generated)
        yield _counter("tpserve_prompt_tokens", "Prompt tokens of started requests.",
                       s.prompt_tokens)
        yield _counter("tpserve_prompt_tokens_shared", "Prompt tokens not prefilled: their KV "
                       "rows copied from another choice (n > 1) of the same request.",
                       s.prompt_tokens_shared)
        yield _counter("tpserve_requests_finished", "Requests finished (stop or length).",
                       s.requests_finished)
        yield _counter("tpserve_requests_failed", "Requests failed by an engine error.",
                       s.requests_failed)
        yield _counter("tpserve_steps", "Engine steps run.", s.steps)
        yield _counter("tpserve_step_seconds", "Seconds spent in engine steps.", s.step_seconds)
        yield _gauge("tpserve_queue_depth", "Requests waiting for a KV slot.", e.queue_depth)
        yield _gauge("tpserve_running_requests", "Requests holding a KV slot.", len(e.running))
        yield _gauge("tpserve_kv_slots_total", "KV-cache slots (--max-num-seqs).", e.num_slots)
        yield _gauge("tpserve_kv_slot_usage_perc", "Fraction of KV-cache slots in use (0 to 1).",
                     len(e.running) / e.num_slots)
        reasons = CounterMetricFamily("tpserve_request_success",
                                      "Requests finished, by finish reason (abort: the client "
                                      "went away).", labels=["model_name", "finished_reason"])
        for reason in ("stop", "length"):
            reasons.add_metric([self.model_name, reason], s.finish_reasons[reason])
        reasons.add_metric([self.model_name, "abort"], s.requests_cancelled)
        yield reasons
        yield _gauge("tpserve_step_seconds_last", "Duration of the last engine step.",
                     s.last_step_seconds)
        yield _gauge("tpserve_step_seconds_mean", "Mean engine step duration.",
                     s.step_seconds / s.steps if s.steps else 0.0)
        # Per second of step time, so idle time does not dilute it; for a windowed wall-clock
        # rate use rate(tpserve_generation_tokens_total[1m]).
        yield _gauge("tpserve_generation_tokens_per_second",
                     "Tokens generated per second of step time over the engine's lifetime.",
                     s.tokens_generated / s.step_seconds if s.step_seconds else 0.0)
        ex = e.executor.stats
        ar_s, ar_n = ex.allreduce_seconds, ex.allreduce_count
        yield _counter("tpserve_allreduce_seconds", "Seconds spent in all-reduces.", ar_s)
        yield _counter("tpserve_allreduce", "All-reduces run.", ar_n)
        yield _gauge("tpserve_allreduce_seconds_mean", "Mean all-reduce duration.",
                     ar_s / ar_n if ar_n else 0.0)
        yield _counter("tpserve_rank_failures", "Rank deaths or stalls detected.",
                       e.executor.failures)
        yield _counter("tpserve_recoveries", "Rank groups rebuilt after a failure.",
                       s.recoveries)
        yield _counter("tpserve_requests_cancelled", "Requests whose client went away.",
                       s.requests_cancelled)
        yield _gauge("tpserve_coordinator_weight_bytes",
                     "Bytes of the coordinator's head (embedding + lm_head), held here or "
                     "placed on rank 0.", weight_bytes(e.head) + e.executor.head_bytes)

    def _family(self, kind):
        def make(name, doc, value):
            m = kind(name, doc, labels=["model_name"])
            m.add_metric([self.model_name], float(value))
            return m
        return make


class Metrics:
    def __init__(self, engine, model_name: str = ""):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine, model_name))

        def histogram(name, doc, buckets):
            return Histogram(name, doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(model_name)
        self.time_to_first_token = histogram(
            "tpserve_time_to_first_token_seconds", "Time from request arrival to its first token.",
            LATENCY_BUCKETS)
        self.inter_token_latency = histogram(
            "tpserve_inter_token_latency_seconds", "Time between two tokens of one request.",
            TOKEN_GAP_BUCKETS)
        self.e2e_latency = histogram(
            "tpserve_e2e_request_latency_seconds", "Time from request arrival to its last token.",
            LATENCY_BUCKETS)
        self._http_errors = Counter(
            "tpserve_http_errors", "HTTP requests answered with an error, by status code.",
            ["model_name", "code"], registry=self.registry)
        self.streams_cut = Counter(
            "tpserve_streams_cut", "Streams cut: their client read them slower than they were "
            "generated (streams.BACKLOG_MAX_BYTES).", ["model_name"],
            registry=self.registry).labels(model_name)
        self.model_name = model_name

    def http_error(self, status: int) -> None:
        self._http_errors.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
