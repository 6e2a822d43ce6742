"""The engine's Prometheus metrics, in base units, registered on a given registry (a
private one in tests, the process's default one in the server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EngineMetrics"]

# Around the 200 ms chunk period (50 Hz) and 400 ms (25 Hz).
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0, 2.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
OCCUPANCY_BUCKETS = (0.25, 0.5, 0.75, 0.85, 0.9, 0.95, 0.99, 1.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.step_seconds = Histogram(
            "duplexline_engine_step_duration_seconds",
            "Time of one engine tick's work: the tokenizer over its audio, then the LLM step(s) and "
            "the speech decoder (all sessions in the batch)", buckets=STEP_BUCKETS, **kw)
        self.tokenizer_seconds = Histogram(
            "duplexline_engine_tokenizer_duration_seconds",
            "Time of one batched speech tokenizer pass (part of a tick)", buckets=STEP_BUCKETS, **kw)
        self.decoder_seconds = Histogram(
            "duplexline_engine_decoder_duration_seconds",
            "Time of one batched speech decoder pass: every stepped session's codes of one LLM step "
            "to audio (part of a tick)", buckets=STEP_BUCKETS, **kw)
        self.batch_size = Histogram(
            "duplexline_engine_batch_size", "Sessions stepped together in one batch",
            buckets=BATCH_BUCKETS, **kw)
        self.occupancy = Histogram(
            "duplexline_engine_batch_occupancy_ratio",
            "Sessions stepped in one LLM step / sessions live (1: every live session in one batch)",
            buckets=OCCUPANCY_BUCKETS, **kw)
        self.rows_computed = Counter(
            "duplexline_engine_rows_computed_total", "Cache rows the LLM steps computed", **kw)
        self.rows_stepped = Counter(
            "duplexline_engine_rows_stepped_total", "Sessions the LLM steps stepped (rows needed)", **kw)
        self.catch_up_steps = Counter(
            "duplexline_engine_catch_up_steps_total",
            "LLM steps outside a tick: chunks that missed their tick, or a second chunk of codes", **kw)
        self.slots_used = Gauge("duplexline_engine_slots_used", "Session slots in use", **kw)
        self.slots_total = Gauge("duplexline_engine_slots_total", "Session slots configured", **kw)
        self.chunk_period = Gauge("duplexline_engine_chunk_period_seconds",
                                  "The chunk period every session steps on", **kw)
        self.missed_deadlines = Counter(
            "duplexline_engine_missed_deadlines_total",
            "Chunk results delivered later than one chunk period after the chunk arrived", **kw)
        self.dropped_chunks = Counter(
            "duplexline_engine_dropped_chunks_total",
            "User chunks dropped because a session's backlog was full (answered with silence)", **kw)
        self.refusals = Counter("duplexline_engine_admission_refusals_total",
                                "Sessions not admitted, by reason", ["reason"], **kw)
        self.tokens = Counter("duplexline_engine_tokens_generated_total",
                              "Assistant tokens decoded, by stream", ["stream"], **kw)
        for reason in ("no_slot", "deadline", "draining"):
            self.refusals.labels(reason=reason)
        for stream in ("text", "speech"):
            self.tokens.labels(stream=stream)
