"""`CallRecords`: what the `CallManager` learns about calls, sent out of the bridge: each
ended or refused call's CDR to the CDR sinks (file, Redis stream), and call events to the
webhooks (`call.started`, `call.answered`, `call.dtmf`, `call.transferred`,
`call.rehomed`, and `call.ended` whose body is the CDR); and it holds the `Recorder` of
call audio (agent/recorder.py), which the manager attaches to the calls it records.

Everything here runs on the event loop and only queues: the sinks and the webhooks do
their I/O on their own thread or tasks, so no call waits on a disk or a receiver.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

from .cdr import SCHEMA_VERSION, encode, iso_utc, parties
from .recorder import Recorder
from .webhooks import Webhooks

if TYPE_CHECKING:
    from .session import CallSession

__all__ = ["CallRecords", "RecordSink"]

log = logging.getLogger(__name__)

# A session's event kind -> the webhook event it is.
_SESSION_EVENTS = {"dtmf": "call.dtmf", "transferred": "call.transferred", "rehomed": "call.rehomed"}


class RecordSink(Protocol):
    name: str

    async def start(self) -> None: ...

    def offer(self, line: str) -> None:
        """Queue one CDR (a JSON line); never blocks."""

    async def close(self, timeout: float = 5.0) -> None: ...


class CallRecords:
    def __init__(self, sinks: tuple[RecordSink, ...] = (), webhooks: Webhooks | None = None,
                 recorder: Recorder | None = None) -> None:
        self.sinks = sinks
        self.webhooks = webhooks
        self.recorder = recorder
        self._started: list = []

    @property
    def active(self) -> bool:
        """Whether anything takes records: without, the manager builds none."""
        return bool(self.sinks) or self.webhooks is not None

    async def start(self) -> None:
        """A part that cannot start (a CDR or recording folder not writable) raises; what
        started is closed again."""
        try:
            for part in (*self.sinks, *([self.webhooks] if self.webhooks else []),
                         *([self.recorder] if self.recorder else [])):
                await part.start()
                self._started.append(part)
        except BaseException:
            await self.close()
            raise

    async def close(self, timeout: float = 5.0) -> None:
        """After the last call ended: write and deliver what is queued, within `timeout`."""
        started, self._started = self._started, []
        for part in reversed(started):
            try:
                await part.close(timeout)
            except Exception:
                log.exception("closing %s failed", type(part).__name__)

    # ---- from the manager ----------------------------------------------------------------

    def started(self, session: "CallSession") -> None:
        self._hook(session, "call.started", parties(session.info))

    def answered(self, session: "CallSession") -> None:
        self._hook(session, "call.answered", {"codec": session.detail.codec})

    def event(self, session: "CallSession", kind: str, data: dict) -> None:
        name = _SESSION_EVENTS.get(kind)
        if name is not None:
            self._hook(session, name, dict(data))

    def ended(self, record: dict[str, Any], route_webhooks: tuple[str, ...] = ()) -> None:
        """An ended or refused call's CDR: to every sink, and as `call.ended`."""
        if not self.active:
            return
        line = encode(record)
        for sink in self.sinks:
            sink.offer(line)
        if self.webhooks is not None:
            self.webhooks.send("call.ended", line.encode(), route_webhooks)

    def _hook(self, session: "CallSession", event: str, data: dict) -> None:
        if self.webhooks is None:
            return
        body = {"schema": SCHEMA_VERSION, "event": event, "call_id": session.info.call_id,
                "time": iso_utc(time.time()), **data}
        self.webhooks.send(event, encode(body).encode(), session.info.webhooks)
