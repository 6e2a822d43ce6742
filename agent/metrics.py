"""The agent layer's Prometheus metrics (base units, `duplexline_` prefix, bounded labels:
transport, outcome, reason; never a call id)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .quality_metrics import TRANSPORTS, QualityMetrics

__all__ = ["AgentMetrics"]

CALL_OUTCOMES = ("completed", "refused_486", "refused_503", "refused_draining")
FRAME_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
REHOME_REASONS = ("worker-lost", "heartbeat", "draining", "error")  # model/worker_client.py
LATENCY_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 4.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.active_calls = Gauge("duplexline_calls_active", "Calls in progress", ["transport"], **kw)
        self.calls = Counter("duplexline_calls_total", "Calls that ended or were refused, by outcome",
                             ["transport", "outcome"], **kw)
        self.frame_lateness = Histogram(
            "duplexline_agent_frame_lateness_seconds",
            "How late each caller 20 ms frame reached the agent against the call's frame clock",
            buckets=FRAME_BUCKETS, **kw)
        self.late_frames = Counter("duplexline_agent_late_frames_total",
                                   "Caller frames more than one frame period late", **kw)
        self.lost_frames = Counter(
            "duplexline_agent_lost_frames_total",
            "Caller frames that never arrived (skipped upstream, e.g. after a stall): the agent "
            "heard silence in their place; not counted late", **kw)
        self.dropped_frames = Counter("duplexline_agent_dropped_frames_total",
                                      "Caller audio dropped by the agent, by reason", ["reason"], **kw)
        self.playout_depth = Histogram(
            "duplexline_agent_playout_depth_seconds",
            "Assistant audio queued for playout, sampled at each chunk", buckets=LATENCY_BUCKETS, **kw)
        self.response = Histogram(
            "duplexline_agent_response_seconds",
            "From the end of a user chunk to the assistant audio for it queued for playout",
            buckets=LATENCY_BUCKETS, **kw)
        self.first_audio = Histogram(
            "duplexline_agent_first_audio_seconds",
            "Time to first audio: from the end of the caller's speech to the assistant's reply "
            "starting to play (queued playout ahead of it included)",
            ["transport"], buckets=LATENCY_BUCKETS, **kw)
        self.bargein_flush = Histogram(
            "duplexline_agent_bargein_flush_seconds",
            "From the model going silent (user interruption) to playout flushed",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.02, 0.04), **kw)
        self.bargeins = Counter("duplexline_agent_bargeins_total", "Barge-ins (playout flushed)", **kw)
        self.chunk_step = Histogram(
            "duplexline_agent_chunk_step_seconds",
            "Engine chunk step latency as a session sees it (submit to result)",
            buckets=LATENCY_BUCKETS, **kw)
        self.dtmf = Counter("duplexline_agent_dtmf_digits_total", "DTMF digits received", **kw)
        self.session_errors = Counter("duplexline_agent_session_errors_total",
                                      "Sessions ended by an internal error", ["stage"], **kw)
        self.rehomes = Counter("duplexline_agent_rehomes_total",
                               "Sessions moved to another engine worker mid-call, by reason "
                               "(worker-lost, heartbeat, draining)", ["reason"], **kw)
        self.quality = QualityMetrics(registry)
        self._registry = registry
        self._store_collector: _StoreCollector | None = None
        for reason in REHOME_REASONS:
            self.rehomes.labels(reason=reason)
        for t in TRANSPORTS:  # every series exists from the start: dashboards show 0, not "no data"
            self.active_calls.labels(transport=t)
            self.first_audio.labels(transport=t)
            for outcome in CALL_OUTCOMES:
                self.calls.labels(transport=t, outcome=outcome)
        for reason in ("backlog", "on_hold"):
            self.dropped_frames.labels(reason=reason)

    def watch_store(self, store) -> None:
        """Export the store's own error and outage counters (it counts; we only read)."""
        if self._store_collector is None:
            self._store_collector = _StoreCollector(store)
            (self._registry or REGISTRY).register(self._store_collector)
        self._store_collector.store = store


class _StoreCollector:
    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        errors = CounterMetricFamily("duplexline_store_errors", "Failed session store backend operations")
        errors.add_metric([], self.store.errors_total)
        outages = CounterMetricFamily("duplexline_store_outages", "Times the store backend became unreachable")
        outages.add_metric([], self.store.outages_total)
        up = GaugeMetricFamily("duplexline_store_up", "1 when the session store backend was reachable "
                               "at the last contact")
        up.add_metric([], 1.0 if self.store.available else 0.0)
        return [errors, outages, up]
