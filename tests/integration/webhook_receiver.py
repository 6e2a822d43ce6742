"""A webhook receiver for tests: an aiohttp server on 127.0.0.1, on its own event loop in
a thread, that keeps every request it gets and checks its signature with its own HMAC
(not the bridge's code). `stop()` closes the port (a receiver that is down: connections
are refused), `start()` opens it again on the same port. Every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from dataclasses import dataclass

from aiohttp import web

from tests.integration.serve_process import free_port

__all__ = ["WebhookReceiver", "Received"]

_TIMEOUT = 10.0


@dataclass(frozen=True)
class Received:
    event: str
    event_id: str
    timestamp: str
    signature_ok: bool
    body: dict
    raw: bytes


class WebhookReceiver:
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_TIMEOUT)

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        ts = request.headers.get("X-Duplexline-Timestamp", "")
        want = hmac.new(self.secret.encode(), ts.encode() + b"." + raw, hashlib.sha256).hexdigest()
        got = request.headers.get("X-Duplexline-Signature", "")
        with self._lock:
            self.received.append(Received(request.headers.get("X-Duplexline-Event", ""),
                                          request.headers.get("X-Duplexline-Event-Id", ""), ts,
                                          hmac.compare_digest(want, got), json.loads(raw), raw))
        return web.Response(status=204)

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    def start(self) -> "WebhookReceiver":
        if not self._thread.is_alive():
            self._thread.start()
        self._call(self._open())
        return self

    def stop(self) -> None:
        self._call(self._close())

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(_TIMEOUT)

    def of(self, call_id: str) -> list[Received]:
        """What came for one call, in arrival order."""
        with self._lock:
            return [r for r in self.received if r.body.get("call_id") == call_id]

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
