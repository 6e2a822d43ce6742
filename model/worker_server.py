"""The shared engine worker's network side (`duplexline worker`, docs/worker.md): bridges
connect over one WebSocket each and run their calls' sessions on this process's engine.

- `GET /ws`: the protocol (model/worker_protocol.py). The worker greets with `hello`
  (what a session needs: chunk period, decoder rate, look-ahead, silent text id), then
  answers `open` (the engine's admission has the last word: `refused` with its reason),
  `align`, `pause`, `close` and `ping`; audio in, results out, each one message per
  moment for all sessions of the connection.
- A bridge that goes away (connection closed, or nothing received for `idle_timeout`)
  frees its sessions' slots at once.
- `GET /metrics` (the engine's metrics, the same names as in a bridge, plus connections
  and sessions per bridge), `/healthz`, `/readyz`.
- Placement: with a registry, the worker publishes itself (address, model, slots, free,
  tick p99, draining) every `lease_refresh` seconds and whenever its sessions change.
- Drain (SIGTERM): no new sessions, the registry says draining at once; sessions still
  live after `drain_timeout` are closed with reason `draining` (bridges move them).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from .errors import EngineFull, StaleSession
from .voice import LocalVoiceEngine, LocalVoiceSession, VoiceChunk
from .worker_protocol import (VERSION, PerPass, ProtocolError, control, pack_results, parse_control, pieces,
                              result_bytes, unpack_audio)
from .worker_registry import RegistryUnavailable, WorkerInfo, WorkerRegistry

__all__ = ["WorkerServer"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 8 << 20  # bytes: a bridge's messages are ~128 KB (PIECE_BYTES), one session's chunk at least
LEASE_STOP_TIMEOUT = 3.0  # seconds for a publish in flight to finish at close (a Redis round trip is 2 s at most)


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.connections = Gauge("duplexline_worker_connections", "Bridges connected", registry=registry)
        self.sessions = Gauge("duplexline_worker_sessions", "Sessions open, by bridge", ["bridge"], registry=registry)
        self.refused = Counter("duplexline_worker_refused_total", "Session opens refused, by reason", ["reason"],
                               registry=registry)
        self.bridges_lost = Counter("duplexline_worker_bridges_lost_total",
                                    "Bridge connections that ended, by how (closed, idle, protocol)", ["how"],
                                    registry=registry)


class WorkerServer:
    def __init__(self, voice: LocalVoiceEngine, registry: CollectorRegistry, *, worker_id: str, model_id: str,
                 advertise: str, placement: WorkerRegistry | None = None, idle_timeout: float = 1.5,
                 lease_refresh: float = 1.0, drain_timeout: float = 60.0, gc_freeze: bool = True) -> None:
        self.voice = voice
        self.engine = voice.engine
        self.registry = registry
        self.worker_id = worker_id
        self.model_id = model_id
        self.advertise = advertise
        self.placement = placement
        self.idle_timeout = idle_timeout
        self.lease_refresh = lease_refresh
        self.drain_timeout = drain_timeout
        self.gc_freeze = gc_freeze
        self.metrics = WorkerMetrics(registry)
        self.draining = False
        self._links: set[_Link] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self._tasks: list[asyncio.Task] = []
        self.app = web.Application()
        self.app.add_routes([web.get("/ws", self._ws), web.get("/metrics", self._metrics),
                             web.get("/healthz", self._healthz), web.get("/readyz", self._readyz)])

    # ---- life ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.voice.start()
        # The start-up heap (torch, the model: ~400k objects) out of the garbage collector's
        # view, as the bridge does (agent/agents.py): a full collection walks every tracked
        # object holding the GIL, stalling the engine's tick and this event loop together
        # (measured here: 0.2 s idle, up to 1 s on a busy machine); a stall past the
        # bridges' heartbeat (0.5 s) has every bridge move every session away.
        if self.gc_freeze:
            gc.collect()
            gc.freeze()
        if self.placement is not None:
            await self.placement.connect()
            await self._publish()
            self._tasks.append(asyncio.get_running_loop().create_task(self._lease(), name="worker-lease"))

    async def drain(self) -> None:
        """SIGTERM: no new sessions; after `drain_timeout` close what is still live."""
        if self.draining:
            return
        self.draining = True
        self.voice.drain()
        for link in list(self._links):
            link.send_text(control("draining"))
        self._changed.set()
        log.info("worker %s draining: %d sessions live, closed after %g s at the latest", self.worker_id,
                 self.open_sessions, self.drain_timeout)
        deadline = time.monotonic() + self.drain_timeout
        while self.open_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling a count, bounded by the deadline
        for link in list(self._links):
            link.close_sessions("draining")

    async def close(self) -> None:
        # The lease loop ends after its publish in flight, not in the middle of it: a
        # publish cancelled after its command was written can still reach Redis after the
        # withdraw below (another connection), and bring this worker back for a lease.
        self._closing = True
        self._changed.set()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=LEASE_STOP_TIMEOUT)
            for task in late:
                task.cancel()
        for link in list(self._links):
            await link.close()
        if self.placement is not None:
            try:
                await self.placement.withdraw(self.worker_id)
            except RegistryUnavailable as exc:
                log.warning("could not withdraw from the registry: %s", exc)
            await self.placement.close()
        await self.voice.close()

    @property
    def open_sessions(self) -> int:
        return sum(len(link.sessions) for link in self._links)

    def info(self) -> WorkerInfo:
        stats = self.engine.stats()
        return WorkerInfo(self.worker_id, self.advertise, self.model_id, stats.slots,
                          max(0, stats.slots - stats.open_sessions), self.engine.tick_p99(), self.draining, time.time())

    async def _publish(self) -> None:
        assert self.placement is not None
        await self.placement.publish(self.info())

    async def _lease(self) -> None:
        while not self._closing:
            try:
                await asyncio.wait_for(self._changed.wait(), self.lease_refresh)
            except asyncio.TimeoutError:
                pass
            if self._closing:
                return
            self._changed.clear()
            try:
                await self._publish()
            except RegistryUnavailable as exc:
                log.warning("registry unreachable, bridges will stop placing calls here: %s", exc)

    def changed(self) -> None:
        self._changed.set()

    # ---- HTTP ------------------------------------------------------------------------------

    async def _metrics(self, _: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        stats = self.engine.stats()
        body = {"ready": not self.draining, "draining": self.draining, "worker_id": self.worker_id,
                "model_id": self.model_id, "slots": stats.slots, "sessions": stats.open_sessions,
                "bridges": len(self._links)}
        return web.json_response(body, status=200 if not self.draining else 503)

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        # No compression: the messages are audio (deflate would cost CPU on both sides for
        # little) and the bridge never asks for it; pings are the protocol's own.
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=None, compress=False)
        await ws.prepare(request)
        link = _Link(self, ws, request.remote or "?")
        self._links.add(link)
        self.metrics.connections.inc()
        try:
            await link.serve()
        finally:
            self._links.discard(link)
            self.metrics.connections.dec()
            link.close_sessions(None)
            self.changed()
        return ws


class _Link:
    """One bridge's connection: its sessions, and the batching of results to it."""

    def __init__(self, server: WorkerServer, ws: web.WebSocketResponse, peer: str) -> None:
        self.server = server
        self.ws = ws
        self.peer = peer
        self.bridge = peer  # until its hello names it
        self.sessions: dict[int, LocalVoiceSession] = {}
        self._loop = asyncio.get_running_loop()
        self._sending = asyncio.Lock()  # one batch's messages at a time: a session's results stay in order
        self._results: PerPass[tuple[int, int, list[VoiceChunk]]] = PerPass(self._loop, self._send_results)

    def send_text(self, text: str) -> None:
        if not self.ws.closed:
            self._loop.create_task(self._send(self.ws.send_str(text)))

    async def _send(self, coro) -> None:
        try:
            await coro
        except (ConnectionError, RuntimeError):
            pass  # the connection is going away; serve() notices

    async def serve(self) -> None:
        s = self.server
        lookahead = self.server.engine.lead_frames(0.02) * 0.02
        stats = s.engine.stats()
        await self.ws.send_str(control("hello", version=VERSION, worker_id=s.worker_id, model_id=s.model_id,
                                       slots=stats.slots, chunk_seconds=s.engine.period,
                                       decoder_rate=s.voice.decoder.sample_rate,
                                       silent_text=s.engine.model.vocab.silent_text,
                                       lead_seconds=lookahead, draining=s.draining))
        how, code, reason = "closed", WSCloseCode.OK, b""
        try:
            while True:
                try:
                    msg = await self.ws.receive(timeout=s.idle_timeout)
                except asyncio.TimeoutError:
                    how = "idle"
                    log.warning("bridge %s sent nothing for %g s: closing its %d sessions", self.bridge,
                                s.idle_timeout, len(self.sessions))
                    break
                if msg.type == WSMsgType.TEXT:
                    message = parse_control(msg.data)
                    try:
                        await self._control(message)
                    except (KeyError, TypeError, ValueError) as exc:
                        if isinstance(exc, ProtocolError):
                            raise
                        raise ProtocolError(f"a malformed {message['t']!r} message ({type(exc).__name__}: "
                                            f"{exc})") from None
                elif msg.type == WSMsgType.BINARY:
                    self._audio(msg.data)
                else:
                    break  # closed, closing or an error
        except ProtocolError as exc:
            # The close frame says why (a WebSocket close reason holds 123 bytes at most).
            how, code, reason = "protocol", WSCloseCode.PROTOCOL_ERROR, str(exc).encode()[:123]
            log.warning("bridge %s broke the protocol (%s): closing its connection", self.bridge, exc)
        finally:
            s.metrics.bridges_lost.labels(how=how).inc()
            await self.ws.close(code=code, message=reason)

    async def _control(self, m: dict) -> None:
        kind, sid = m["t"], m.get("sid")
        if kind == "ping":
            await self.ws.send_str(control("pong", n=m.get("n")))
        elif kind == "hello":
            if m.get("version") != VERSION:
                raise ProtocolError(f"protocol version {m.get('version')!r}: this worker speaks {VERSION} only "
                                    "(update the bridge)")
            self.bridge = str(m.get("bridge_id") or self.peer)[:64]
        elif kind == "open":
            voice = m.get("voice")
            if voice is not None and not isinstance(voice, str):
                raise ProtocolError(f"open: 'voice' must be a string, got {voice!r}")
            await self._open(int(sid), voice)
        elif kind == "align":
            session = self.sessions.get(int(sid))
            if session is None:
                return
            first = time.monotonic() - float(m["age"])
            try:
                pad = session.align(first, float(m.get("frame", 0.02)))
            except StaleSession:
                return self._closed(int(sid), "stale")
            await self.ws.send_str(control("aligned", sid=sid, pad=pad))
        elif kind == "pause":
            if (session := self.sessions.get(int(sid))) is not None:
                session.pause()
        elif kind == "close":
            self._drop(int(sid))
        else:
            raise ProtocolError(f"unknown control message {kind!r}")

    async def _open(self, sid: int, voice: str | None) -> None:
        s = self.server
        if sid in self.sessions:
            raise ProtocolError(f"session {sid} is open already")
        try:
            session = await s.voice.open_session(voice)
        except EngineFull as exc:
            s.metrics.refused.labels(reason=exc.reason).inc()
            await self.ws.send_str(control("refused", sid=sid, reason=exc.reason, detail=str(exc)))
            return
        except ValueError as exc:  # the decoder has no such voice
            s.metrics.refused.labels(reason="voice").inc()
            await self.ws.send_str(control("refused", sid=sid, reason="voice", detail=str(exc)))
            return
        self.sessions[sid] = session
        s.metrics.sessions.labels(bridge=self.bridge).set(len(self.sessions))
        s.changed()
        await self.ws.send_str(control("opened", sid=sid))

    def _audio(self, data: bytes) -> None:
        for sid, seq, pcm in unpack_audio(data):
            session = self.sessions.get(sid)
            if session is None:
                continue  # closed meanwhile
            try:
                fut = session.submit_audio(pcm)
            except StaleSession:
                self._closed(sid, "stale")
                continue
            fut.add_done_callback(functools.partial(self._result, sid, seq))  # C: no Python frame of its own

    def _result(self, sid: int, seq: int, fut: asyncio.Future) -> None:
        if fut.cancelled() or sid not in self.sessions:
            return
        if fut.exception() is not None:
            if not isinstance(fut.exception(), StaleSession):
                log.error("session %s of bridge %s failed", sid, self.bridge, exc_info=fut.exception())
            return self._closed(sid, "error")
        self._results.add((sid, seq, fut.result()))

    def _send_results(self, items: list[tuple[int, int, list[VoiceChunk]]]) -> None:
        if not self.ws.closed:
            self._loop.create_task(self._send(self._write_results(items)))

    async def _write_results(self, items: list[tuple[int, int, list[VoiceChunk]]]) -> None:
        # Packed piece by piece, each written as soon as it is packed: the bridge unpacks
        # the first while this packs the next (send_bytes only waits when the socket is full).
        async with self._sending:
            for piece in pieces(items, result_bytes):
                await self.ws.send_bytes(pack_results(piece))

    def _drop(self, sid: int) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            session.close()
            self.server.metrics.sessions.labels(bridge=self.bridge).set(len(self.sessions))
            self.server.changed()

    def _closed(self, sid: int, reason: str) -> None:
        """The worker ends a session: the bridge moves it elsewhere or ends the call."""
        self._drop(sid)
        self.send_text(control("closed", sid=sid, reason=reason))

    def close_sessions(self, reason: str | None) -> None:
        for sid in list(self.sessions):
            if reason is None:
                self._drop(sid)
            else:
                self._closed(sid, reason)

    async def close(self) -> None:
        self.close_sessions(None)
        await self.ws.close()
