"""Building the call records' parts from Settings: the CDR file and Redis stream, the
webhooks, the recorder (docs/cdr.md, docs/webhooks.md, docs/recording.md). The
`CallManager` starts and closes them."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from agent.call_records import CallRecords, RecordSink
from agent.cdr_file import CdrFile
from agent.cdr_redis import CdrStream
from agent.record_metrics import RecordMetrics
from agent.recorder import Recorder
from agent.webhooks import Webhooks

from .settings import Settings

__all__ = ["build_records"]

log = logging.getLogger(__name__)


def build_records(settings: Settings, registry: CollectorRegistry | None) -> CallRecords:
    """Nothing starts here: no I/O until the manager starts the records."""
    r = settings.records
    metrics = RecordMetrics(registry)
    sinks: list[RecordSink] = []
    if r.cdr_dir is not None:
        sinks.append(CdrFile(r.cdr_dir, metrics))
    if settings.redis and r.cdr_stream_maxlen:
        sinks.append(CdrStream(settings.redis, metrics, maxlen=r.cdr_stream_maxlen))
    if r.secret and not r.webhooks and settings.sip.routes is None:
        log.warning("--webhook-secret is set but no webhook URL is (--webhook, or a route's webhooks)")
    # Route webhooks appear with their calls, so the sender runs whenever a routes file could name some.
    hooks = None
    if r.webhooks or settings.sip.routes is not None:
        hooks = Webhooks(r.webhooks, metrics, secret=r.secret, retry_seconds=r.retry_seconds, backoff=r.backoff)
    recorder = None
    if r.record_dir is not None:
        recorder = Recorder(r.record_dir, metrics, record_all=r.record, retention_days=r.record_retention_days)
    return CallRecords(tuple(sinks), hooks, recorder)
