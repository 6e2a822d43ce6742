"""Webhooks: each call event POSTed as JSON to the operator's URLs (`--webhook`, and a
SIP route's `webhooks`). docs/webhooks.md is the receiver's side.

Each request carries `X-Duplexline-Event` (call.started, ...), `X-Duplexline-Event-Id`
(the same on every retry of one delivery: receivers deduplicate by it),
`X-Duplexline-Timestamp` (Unix seconds, per attempt) and, with a secret,
`X-Duplexline-Signature`: hex HMAC-SHA256(secret, timestamp + "." + body).

Delivery never touches the call: `send()` puts the event on the URL's bounded queue and
returns. Each URL has its own queue and one delivery task, so events reach a receiver in
the order they happened, and a receiver that is down holds up only its own events. A
failed attempt (no connection, timeout, 5xx, 408, 429) is retried with exponential
backoff (doubling from `backoff`, at most 32 times it and 30 s) until `retry_seconds`
after the event; any other answer is final. Delivered,
failed and dropped (queue full, or still queued at shutdown) events are counted in
`duplexline_webhook_deliveries_total` and failures logged, throttled.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass

import aiohttp

from .record_metrics import WEBHOOK_EVENTS, RecordMetrics, Throttled

__all__ = ["Webhooks", "sign", "EVENTS"]

log = logging.getLogger(__name__)

EVENTS = WEBHOOK_EVENTS
_RETRY_STATUSES = frozenset({408, 429})
_MAX_BACKOFF = 30.0
_MAX_DOUBLINGS = 32  # the longest delay is 32 times the first (and at most _MAX_BACKOFF)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of `timestamp + "." + body` under `secret`: the signature header."""
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class _Delivery:
    event: str
    event_id: str
    body: bytes
    deadline: float  # monotonic: no attempt starts after it


class _Target:
    def __init__(self, url: str, maxsize: int) -> None:
        self.url = url
        self.queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize)
        self.task: asyncio.Task | None = None
        self.current: _Delivery | None = None
        self.warn = Throttled(log)


class Webhooks:
    def __init__(self, urls: tuple[str, ...], metrics: RecordMetrics, *, secret: str | None = None,
                 retry_seconds: float = 60.0, backoff: float = 1.0, timeout: float = 5.0,
                 maxsize: int = 1000) -> None:
        self.urls = tuple(dict.fromkeys(urls))
        self._metrics = metrics
        self._secret = secret
        self._retry_seconds = retry_seconds
        self._backoff = backoff
        self._timeout = timeout
        self._maxsize = maxsize
        self._targets: dict[str, _Target] = {}
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        for url in self.urls:
            self._target(url)
        if self.urls:
            log.info("webhooks to %d URLs%s", len(self.urls), ", signed" if self._secret else ", unsigned")

    def send(self, event: str, body: bytes, extra_urls: tuple[str, ...] = ()) -> None:
        """Queue `body` (JSON) as `event` for every URL (the global ones and `extra_urls`,
        a route's). Never blocks; does nothing before start or after close."""
        if self._session is None or self._closed:
            return
        deadline = time.monotonic() + self._retry_seconds
        delivery = _Delivery(event, uuid.uuid4().hex, body, deadline)
        for url in dict.fromkeys(self.urls + extra_urls):
            target = self._target(url)
            try:
                target.queue.put_nowait(delivery)
            except asyncio.QueueFull:
                self._metrics.webhooks.labels(event=event, outcome="dropped").inc()
                target.warn.warn("webhook queue for %s full (%d): %s dropped", url, self._maxsize, event)

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for at most `timeout` seconds; drop (and count) the rest."""
        session = self._session
        if session is None or self._closed:
            return
        self._closed = True
        targets = list(self._targets.values())
        try:
            await asyncio.wait_for(asyncio.gather(*(t.queue.join() for t in targets)), timeout)
        except asyncio.TimeoutError:
            pass
        for target in targets:
            if target.task is not None:
                target.task.cancel()
        await asyncio.gather(*(t.task for t in targets if t.task is not None), return_exceptions=True)
        dropped = 0
        for target in targets:
            left = ([target.current] if target.current is not None else [])
            while not target.queue.empty():
                left.append(target.queue.get_nowait())
            for delivery in left:
                self._metrics.webhooks.labels(event=delivery.event, outcome="dropped").inc()
            dropped += len(left)
        if dropped:
            log.warning("webhooks: %d events not delivered by shutdown (dropped)", dropped)
        await session.close()
        self._session = None

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = _Target(url, self._maxsize)
            target.task = asyncio.get_running_loop().create_task(self._run(target), name="webhook")
        return target

    async def _run(self, target: _Target) -> None:
        while True:
            delivery = await target.queue.get()
            target.current = delivery
            try:
                await self._deliver(target, delivery)
            finally:
                target.current = None
                target.queue.task_done()

    async def _deliver(self, target: _Target, d: _Delivery) -> None:
        delay = self._backoff
        while True:
            problem = await self._attempt(target.url, d)
            if problem is None:
                self._metrics.webhooks.labels(event=d.event, outcome="delivered").inc()
                return
            final, why = problem
            left = d.deadline - time.monotonic()
            if final or left <= 0:
                self._metrics.webhooks.labels(event=d.event, outcome="failed").inc()
                target.warn.warn("webhook %s to %s failed%s: %s", d.event, target.url,
                                 "" if final else f" for {self._retry_seconds:g} s", why)
                return
            self._metrics.webhook_retries.inc()
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, self._backoff * _MAX_DOUBLINGS, _MAX_BACKOFF)

    async def _attempt(self, url: str, d: _Delivery) -> tuple[bool, str] | None:
        """None when delivered; else (final, why)."""
        assert self._session is not None
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Duplexline-Event": d.event,
                   "X-Duplexline-Event-Id": d.event_id, "X-Duplexline-Timestamp": timestamp}
        if self._secret:
            headers["X-Duplexline-Signature"] = sign(self._secret, timestamp, d.body)
        try:
            async with self._session.post(url, data=d.body, headers=headers, allow_redirects=False) as resp:
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        return not (status >= 500 or status in _RETRY_STATUSES), f"HTTP {status}"
