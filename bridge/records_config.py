"""Settings of what the bridge records and announces about its calls (see bridge/settings.py):
call detail records (`--cdr-dir`, the Redis stream with `--redis`), webhooks
(`--webhook`, `--webhook-secret`, `--webhook-retry-seconds`, `--webhook-backoff`) and
recordings (`--record`, `--record-dir`, `--record-retention-days`). docs/cdr.md,
docs/webhooks.md and docs/recording.md. No I/O here: the folders are created and checked
when the bridge starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .options import Option, http_url, positive_int, redacted_repr, seconds, yes_no

__all__ = ["RecordSettings", "RECORD_OPTIONS"]

MAX_RETRY_SECONDS = 86400.0
MAX_STREAM_LEN = 10_000_000


def _urls(text: str) -> tuple[str, ...]:
    urls = tuple(http_url(part) for part in text.split(",") if part.strip())
    if not urls:
        raise ValueError("expected a URL such as https://hooks.example.com/duplexline")
    return urls


def _stream_len(text: str) -> int:
    if not text.strip().isdigit() or int(text) > MAX_STREAM_LEN:
        raise ValueError(f"expected 0 (off) .. {MAX_STREAM_LEN} entries")
    return int(text)


@dataclass(frozen=True)
class RecordSettings:
    cdr_dir: Path | None = None  # None: no CDR files
    cdr_stream_maxlen: int = 10_000  # with --redis: entries kept in the CDR stream; 0: no stream
    webhooks: tuple[str, ...] = ()
    secret: str | None = None  # a secret: __repr__ shows <set>
    retry_seconds: float = 60.0
    backoff: float = 1.0  # the first retry's delay; each next one doubles (at most 32x and 30 s)
    record: bool = False  # record every call (a route's record: true records its calls)
    record_dir: Path | None = None  # None: no recordings
    record_retention_days: int | None = None  # None: recordings are kept

    def __post_init__(self) -> None:
        if not 0 < self.retry_seconds <= MAX_RETRY_SECONDS:
            raise ValueError(f"webhook_retry_seconds: {self.retry_seconds!r} must be in (0, {MAX_RETRY_SECONDS:g}]")
        if not 0.01 <= self.backoff <= 60:
            raise ValueError(f"webhook_backoff: {self.backoff!r} must be 0.01..60 seconds")
        if self.secret is not None and not self.secret:
            raise ValueError("webhook_secret: must not be empty")
        if self.record and self.record_dir is None:
            raise ValueError("record: --record needs --record-dir DIR, the folder recordings go to")
        if self.record_retention_days is not None and self.record_dir is None:
            raise ValueError("record_retention_days: needs --record-dir DIR, the folder to prune")

    def __repr__(self) -> str:
        return redacted_repr(self, ("secret",))


RECORD_OPTIONS: tuple[Option, ...] = (
    Option("cdr_dir", lambda text: Path(text).expanduser(),
           "write a call detail record (one JSON line per ended or refused call) to DIR/cdr-YYYY-MM-DD.jsonl, "
           "a file per UTC day (default: none; docs/cdr.md)", "DIR", section="records", field="cdr_dir"),
    Option("cdr_stream_maxlen", _stream_len,
           "with --redis: also XADD each CDR to the stream duplexline:cdr, trimmed to about this many "
           "entries (default 10000; 0: no stream)", "N", section="records", field="cdr_stream_maxlen"),
    Option("webhook", _urls, "POST call events (call.started, call.answered, call.ended, call.dtmf, "
           "call.transferred, call.rehomed) as JSON to this URL; repeat the flag, or separate URLs by commas "
           "(default: none; docs/webhooks.md)", "URL", section="records", field="webhooks", repeat=True),
    Option("webhook_secret", str, "sign webhook requests: X-Duplexline-Signature, hex HMAC-SHA256(secret, "
           "timestamp + '.' + body) (default: unsigned)", "SECRET", section="records", field="secret"),
    Option("webhook_retry_seconds", seconds, "retry a webhook delivery that failed (no connection, 5xx, 408, "
           "429) for this long after the event (default 60)", "SECONDS", section="records", field="retry_seconds"),
    Option("webhook_backoff", seconds, "delay before a webhook's first retry; each next one doubles, up to 32 "
           "times this and at most 30 s (default 1)", "SECONDS", section="records", field="backoff"),
    Option("record", yes_no, "record every call: a stereo WAV per call in --record-dir, caller left, assistant "
           "right (default no; a route's \"record\": true records its calls; docs/recording.md)", "yes|no",
           section="records", field="record", alone="yes"),
    Option("record_dir", lambda text: Path(text).expanduser(),
           "the folder call recordings go to, DIR/<call id>-<hash>.wav; required when anything records; an "
           "unwritable folder stops the start (default: none)", "DIR", section="records", field="record_dir"),
    Option("record_retention_days", positive_int, "delete recordings older than N days from --record-dir, at "
           "start and hourly (default: keep them)", "N", section="records", field="record_retention_days"),
)
