"""Metrics of what leaves the bridge about its calls: CDRs (file, Redis stream),
webhooks and recordings. Labels are bounded: a sink name, an event name, an outcome; never a URL (it may
carry a token) or a call id. Also `Throttled`: a warning at most every few seconds, so a
dead disk or receiver is logged, not flooded."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter

__all__ = ["RecordMetrics", "Throttled", "CDR_SINKS", "CDR_OUTCOMES", "WEBHOOK_EVENTS", "WEBHOOK_OUTCOMES",
           "RECORDING_DROPS"]

CDR_SINKS = ("file", "redis")
CDR_OUTCOMES = ("written", "queue_full", "error")
WEBHOOK_OUTCOMES = ("delivered", "failed", "dropped")
RECORDING_DROPS = ("queue_full", "error")
WEBHOOK_EVENTS = ("call.started", "call.answered", "call.ended", "call.dtmf", "call.transferred", "call.rehomed")


class RecordMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.cdr = Counter("duplexline_cdr_records_total",
                           "Call detail records by sink (file, redis) and outcome: written, queue_full "
                           "(dropped: the writer fell behind), error (the write failed; dropped)",
                           ["sink", "outcome"], **kw)
        self.webhooks = Counter("duplexline_webhook_deliveries_total",
                                "Webhook deliveries by event and outcome: delivered (2xx), failed (refused "
                                "or still failing after --webhook-retry-seconds), dropped (queue full or "
                                "shut down first)", ["event", "outcome"], **kw)
        self.webhook_retries = Counter("duplexline_webhook_retries_total",
                                       "Webhook attempts that failed and were tried again", **kw)
        self.recording_dropped = Counter("duplexline_recording_frames_dropped_total",
                                         "20 ms stereo frames of call recordings not written: queue_full "
                                         "(the writer fell behind; silence in their place), error (the file "
                                         "could not be created or written)", ["reason"], **kw)
        self.recordings_deleted = Counter("duplexline_recording_files_deleted_total",
                                          "Recordings deleted by --record-retention-days", **kw)
        for reason in RECORDING_DROPS:
            self.recording_dropped.labels(reason=reason)
        for sink in CDR_SINKS:  # every series from the start: dashboards show 0, not "no data"
            for outcome in CDR_OUTCOMES:
                self.cdr.labels(sink=sink, outcome=outcome)
        for event in WEBHOOK_EVENTS:
            for outcome in WEBHOOK_OUTCOMES:
                self.webhooks.labels(event=event, outcome=outcome)


class Throttled:
    """`warn(...)` logs at most once per `every` seconds, saying how many were held back."""

    def __init__(self, log: logging.Logger, every: float = 10.0) -> None:
        self._log = log
        self._every = every
        self._last = -every
        self._held = 0

    def warn(self, fmt: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._held += 1
            return
        self._last = now
        held, self._held = self._held, 0
        self._log.warning(fmt + (f" ({held} more since the last warning)" if held else ""), *args)
