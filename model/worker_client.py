"""`RemoteVoiceEngine`: a bridge's calls on shared engine workers (docs/worker.md), behind
the same `VoiceEngine` interface as the engine in this process.

- Placement: the workers of the registry (`--engine redis`: live, serving this model, not
  draining, most free slots first; a slot is reserved atomically before the worker is
  asked) or a fixed list (`--engine URL,URL`). The worker has the last word: when it
  refuses, the next is asked; when none has room the call is refused before it is
  answered (`EngineFull`: no_slot, or draining when every worker said so).
- One WebSocket per worker, shared by all this bridge's sessions there; a ping every
  `ping_every` (100 ms) measures the round trip (`duplexline_engine_remote_rtt_seconds`).
- A worker that closes the connection, or sends nothing for `dead_after` (500 ms), is
  lost: each of its sessions is placed again elsewhere at once (`on_rehome`: the agent
  aligns afresh; the caller hears a short silence) or, with no room anywhere, ended
  (`on_lost`). A session the worker itself ends (drain) moves the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time

import aiohttp
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from .errors import EngineFull, StaleSession
from .futures import fail, resolve
from .voice import Rehomed, VoiceEngine, VoiceSession
from .worker_protocol import (VERSION, PerPass, ProtocolError, audio_bytes, control, pack_audio, parse_control,
                              pieces, unpack_results)
from .worker_registry import RegistryUnavailable, WorkerRegistry

__all__ = ["RemoteVoiceEngine", "RemoteVoiceSession"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 8 << 20  # bytes: a worker's messages are ~128 KB (PIECE_BYTES), one session's results at least


class RemoteMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.rtt = Histogram("duplexline_engine_remote_rtt_seconds",
                             "Round trip to an engine worker (ping to pong on the session connection)",
                             buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25), registry=registry)
        self.workers_lost = Counter("duplexline_engine_workers_lost_total",
                                    "Worker connections lost, by reason (worker-lost, heartbeat)", ["reason"],
                                    registry=registry)
        self.placements = Counter("duplexline_engine_placements_total",
                                  "Session placements on workers, by outcome (placed, refused, unreachable)",
                                  ["outcome"], registry=registry)


class RemoteVoiceEngine(VoiceEngine):
    def __init__(self, registry: CollectorRegistry, *, bridge_id: str, urls: list[str] | None = None,
                 placement: WorkerRegistry | None = None, model_id: str | None = None,
                 ping_every: float = 0.1, dead_after: float = 0.5, open_timeout: float = 1.0) -> None:
        if not urls and placement is None:
            raise ValueError("a remote engine needs worker addresses or a registry")
        self.bridge_id = bridge_id
        self.urls = list(urls or [])
        self.placement = placement
        self.model_id = model_id
        self.ping_every = ping_every
        self.dead_after = dead_after
        self.open_timeout = open_timeout
        self.metrics = RemoteMetrics(registry)
        self._links: dict[str, _Link] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self._http: aiohttp.ClientSession | None = None
        self._draining = False
        self._workers_known = 0
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession()
        if self.placement is not None:
            await self.placement.connect()
        self._watch = asyncio.get_running_loop().create_task(self._watch_workers(), name="worker-watch")

    @property
    def ready(self) -> bool:
        """/readyz: some worker could take a call (the registry lists one serving this
        model, not draining; or a fixed worker answers), as of the last second."""
        return self._workers_known > 0

    async def _watch_workers(self) -> None:
        while True:
            if self.placement is not None:
                try:
                    self._workers_known = len(await self.placement.workers(self.model_id))
                except RegistryUnavailable:
                    self._workers_known = 0
            else:
                known = 0
                for url in self.urls:
                    try:
                        await self._link(url)
                        known += 1
                    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ProtocolError):
                        pass
                self._workers_known = known
            await asyncio.sleep(1.0)  # the view's refresh period, not a wait for an event

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        for link in list(self._links.values()):
            await link.close()
        if self._http is not None:
            await self._http.close()
        if self.placement is not None:
            await self.placement.close()

    def drain(self) -> None:
        self._draining = True

    def describe(self) -> dict:
        return {"engine": "remote", "workers_available": self._workers_known, "workers": {a: {"worker_id": link.worker_id, "sessions": len(link.sessions),
                                                    "rtt_ms": round(link.rtt * 1000, 2)}
                                                for a, link in self._links.items()}}

    async def open_session(self, voice: str | None = None) -> RemoteVoiceSession:
        if self._draining:
            raise EngineFull("draining", "this bridge is draining")
        session = RemoteVoiceSession(self, voice)
        await self._place(session, exclude=set())
        return session

    # ---- placement -------------------------------------------------------------------------

    async def _candidates(self, exclude: set[str]) -> list[tuple[str, str | None]]:
        """(address, worker id in the registry or None), best first."""
        if self.placement is None:
            # No shared view of free slots: the worker we hold fewest sessions on first.
            urls = [u for u in self.urls if u not in exclude]
            return [(u, None) for u in sorted(urls, key=lambda u: len(self._links[u].sessions) if u in self._links else 0)]
        try:
            workers = await self.placement.workers(self.model_id)
        except RegistryUnavailable as exc:
            log.warning("no placement: %s", exc)
            return []
        return [(w.address, w.worker_id) for w in workers if w.address not in exclude and w.free > 0]

    async def _place(self, session: RemoteVoiceSession, exclude: set[str]) -> None:
        reasons = []
        for address, worker_id in await self._candidates(exclude):
            if worker_id is not None and not await self._reserve(worker_id):
                continue
            try:
                link = await self._link(address)
                await link.open(session)
            except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ProtocolError) as exc:
                self.metrics.placements.labels(outcome="unreachable").inc()
                log.warning("worker %s unreachable: %s", address, exc)
                reasons.append("unreachable")
                await self._release(worker_id)
                continue
            except EngineFull as exc:
                self.metrics.placements.labels(outcome="refused").inc()
                reasons.append(exc.reason)
                await self._release(worker_id)
                continue
            except ValueError:  # a voice the model's decoder lacks: no worker of this model has it
                self.metrics.placements.labels(outcome="refused").inc()
                await self._release(worker_id)
                raise
            self.metrics.placements.labels(outcome="placed").inc()
            return
        reason = "draining" if reasons and all(r == "draining" for r in reasons) else "no_slot"
        raise EngineFull(reason, f"no engine worker has room ({', '.join(reasons) or 'none known'})")

    async def _reserve(self, worker_id: str) -> bool:
        try:
            return await self.placement.reserve(worker_id)  # type: ignore[union-attr]
        except RegistryUnavailable:
            return False

    async def _release(self, worker_id: str | None) -> None:
        if worker_id is not None and self.placement is not None:
            try:
                await self.placement.release(worker_id)
            except RegistryUnavailable:
                pass  # the worker's next publish sets its free count anyway

    async def _link(self, address: str) -> _Link:
        link = self._links.get(address)
        if link is not None and not link.dead:
            return link
        pending = self._connecting.get(address)
        if pending is None:
            pending = self._connecting[address] = asyncio.ensure_future(self._connect(address))
        try:
            return await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting.pop(address, None)

    async def _connect(self, address: str) -> _Link:
        assert self._http is not None, "start() first"
        ws = await self._http.ws_connect(f"http://{address}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=1.0),
                                         max_msg_size=MAX_MESSAGE, autoping=False, compress=0)
        link = _Link(self, address, ws)
        try:
            await link.greet()
        except BaseException:
            await ws.close()  # a worker of another version, or silent: not left open
            raise
        self._links[address] = link
        return link

    def _lost(self, link: _Link, reason: str) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]
        self.metrics.workers_lost.labels(reason=reason).inc()
        log.warning("engine worker %s (%s) lost (%s): moving its %d sessions", link.address, link.worker_id,
                    reason, len(link.sessions))
        for session in list(link.sessions.values()):
            self.rehome(session, reason, {link.address})

    def rehome(self, session: RemoteVoiceSession, reason: str, exclude: set[str]) -> None:
        session._detach(reason)
        asyncio.get_running_loop().create_task(self._rehome(session, reason, exclude))

    async def _rehome(self, session: RemoteVoiceSession, reason: str, exclude: set[str]) -> None:
        try:
            await self._place(session, exclude)
        except EngineFull as exc:
            log.warning("no engine worker can take a session over (%s): ending its call", exc)
            if session.on_lost is not None and not session.closed:
                session.on_lost("worker-lost")
            return
        if session.closed:
            session._release()
        elif session.on_rehome is not None:
            session.on_rehome(reason)


class _Link:
    """One worker's connection: its sessions, replies awaited, audio batched per moment."""

    def __init__(self, engine: RemoteVoiceEngine, address: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.engine = engine
        self.address = address
        self.ws = ws
        self.worker_id = "?"
        self.hello: dict = {}
        self.sessions: dict[int, RemoteVoiceSession] = {}
        self.rtt = 0.0
        self.dead = False
        self._ids = itertools.count(1)
        self._replies: dict[int, asyncio.Future] = {}
        self._last_seen = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._sending = asyncio.Lock()  # one batch's messages at a time: a session's chunks stay in order
        self._audio: PerPass[tuple[int, int, np.ndarray]] = PerPass(self._loop, self._send_audio)
        self._tasks: list[asyncio.Task] = []

    async def greet(self) -> None:
        msg = await self.ws.receive(timeout=self.engine.open_timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ProtocolError("the worker did not greet")
        hello = parse_control(msg.data)
        if hello.get("t") != "hello" or hello.get("version") != VERSION:
            raise ProtocolError(f"the worker speaks {hello.get('version')!r}, this bridge {VERSION}")
        self.hello = hello
        self.worker_id = str(hello.get("worker_id"))
        await self.ws.send_str(control("hello", version=VERSION, bridge_id=self.engine.bridge_id))
        self._tasks = [self._loop.create_task(self._read(), name=f"worker-read-{self.address}"),
                       self._loop.create_task(self._ping(), name=f"worker-ping-{self.address}")]

    # ---- requests ----------------------------------------------------------------------------

    async def open(self, session: RemoteVoiceSession) -> None:
        if self.hello.get("draining"):
            raise EngineFull("draining", f"worker {self.worker_id} is draining")
        sid = next(self._ids)
        reply = self._replies[sid] = self._loop.create_future()
        try:
            voice = {} if session.voice is None else {"voice": session.voice}
            await self.ws.send_str(control("open", sid=sid, **voice))
            m = await asyncio.wait_for(reply, self.engine.open_timeout)
        finally:
            self._replies.pop(sid, None)
        if m["t"] == "refused" and m.get("reason") == "voice":
            raise ValueError(str(m.get("detail", "")))
        if m["t"] == "refused":
            raise EngineFull(str(m.get("reason", "no_slot")), str(m.get("detail", "")))
        if self.dead:
            # Lost between the answer and now: its sessions were moved already, and this
            # one would never be; the caller places it elsewhere.
            raise ConnectionError(f"worker {self.address} lost")
        self.sessions[sid] = session
        session._attach(self, sid)

    def align(self, sid: int, first_frame: float, frame_seconds: float) -> asyncio.Future:
        fut = self._replies[sid] = self._loop.create_future()
        # The worker's clock is its own: send the first frame's age, plus the one-way trip.
        age = time.monotonic() - first_frame + self.rtt / 2
        self.send(control("align", sid=sid, age=age, frame=frame_seconds))
        out = self._loop.create_future()

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                out.cancel()
            elif f.exception() is not None:
                fail(out, f.exception())
            else:
                resolve(out, int(f.result()["pad"]))
        fut.add_done_callback(done)
        return out

    def send(self, text: str) -> None:
        if not self.dead:
            self._loop.create_task(self._send(self.ws.send_str(text)))

    async def _send(self, coro) -> None:
        try:
            await coro
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            pass  # the reader sees the connection go

    def queue_audio(self, sid: int, seq: int, pcm: np.ndarray) -> None:
        self._audio.add((sid, seq, pcm))

    def _send_audio(self, items: list[tuple[int, int, np.ndarray]]) -> None:
        if not self.dead:
            self._loop.create_task(self._send(self._write_audio(items)))

    async def _write_audio(self, items: list[tuple[int, int, np.ndarray]]) -> None:
        # Piece by piece (PIECE_BYTES): the worker unpacks the first while this packs the next.
        async with self._sending:
            for piece in pieces(items, audio_bytes):
                await self.ws.send_bytes(pack_audio(piece))

    # ---- the connection's tasks ------------------------------------------------------------

    async def _read(self) -> None:
        reason = "worker-lost"
        try:
            async for msg in self.ws:
                self._last_seen = time.monotonic()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    message = parse_control(msg.data)
                    try:
                        self._control(message)
                    except (KeyError, TypeError, ValueError) as exc:
                        if isinstance(exc, ProtocolError):
                            raise
                        raise ProtocolError(f"a malformed {message['t']!r} message ({type(exc).__name__}: "
                                            f"{exc})") from None
                elif msg.type == aiohttp.WSMsgType.BINARY:
                    for sid, seq, chunks in unpack_results(msg.data):
                        session = self.sessions.get(sid)
                        if session is not None:
                            session._result(seq, chunks)
                else:
                    break
        except ProtocolError as exc:
            log.warning("worker %s broke the protocol: %s", self.address, exc)
        except asyncio.CancelledError:
            reason = "closed"
            raise
        finally:
            if reason != "closed":
                self._die(reason)

    def _control(self, m: dict) -> None:
        kind = m["t"]
        if kind == "pong":
            self.rtt = max(0.0, time.monotonic() - float(m.get("n") or 0.0))
            self.engine.metrics.rtt.observe(self.rtt)
        elif kind in ("opened", "refused", "aligned"):
            sid = int(m["sid"])
            reply = self._replies.pop(sid, None)
            if reply is not None and not reply.done():
                resolve(reply, m)
            elif kind == "opened" and sid not in self.sessions:
                # Opened after this bridge gave up waiting (open_timeout): nobody will use
                # it, so give its slot back rather than hold it until the connection ends.
                self.send(control("close", sid=sid))
        elif kind == "closed":
            session = self.sessions.pop(int(m["sid"]), None)
            if session is not None and not session.closed:
                self.engine.rehome(session, str(m.get("reason", "worker-lost")), {self.address})
        elif kind == "draining":
            self.hello["draining"] = True

    async def _ping(self) -> None:
        while not self.dead:
            if time.monotonic() - self._last_seen > self.engine.dead_after:
                # This loop may have been busy meanwhile: what arrived is read first (a few
                # passes of the loop), so that silence means the worker sent nothing.
                for _ in range(3):
                    await asyncio.sleep(0)
                if self.dead:
                    return
                if time.monotonic() - self._last_seen > self.engine.dead_after:
                    self._die("heartbeat")
                    return
            self.send(control("ping", n=time.monotonic()))
            await asyncio.sleep(self.engine.ping_every)  # the heartbeat's period, not a wait for an event

    def _die(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        for reply in self._replies.values():
            fail(reply, ConnectionError(f"worker {self.address} lost"))
        self._replies.clear()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._loop.create_task(self.ws.close())
        self.engine._lost(self, reason)

    async def close(self) -> None:
        self.dead = True
        for task in self._tasks:
            task.cancel()
        await self.ws.close()


class RemoteVoiceSession(VoiceSession):
    def __init__(self, engine: RemoteVoiceEngine, voice: str | None = None) -> None:
        self._engine = engine
        self.voice = voice  # the decoder's voice, asked of every worker it is placed on
        self._link: _Link | None = None
        self._sid = 0
        self._seq = 0
        self._futures: dict[int, asyncio.Future] = {}
        self._lead_seconds = 0.0
        self.closed = False

    @property
    def worker(self) -> str | None:
        return self._link.worker_id if self._link is not None else None

    def _attach(self, link: _Link, sid: int) -> None:
        self._link, self._sid = link, sid
        h = link.hello
        self.chunk_seconds = float(h["chunk_seconds"])
        self.decoder_rate = int(h["decoder_rate"])
        self.silent_text = int(h["silent_text"])
        self._lead_seconds = float(h.get("lead_seconds", 0.0))

    def _detach(self, reason: str) -> None:
        if self._link is not None:
            self._link.sessions.pop(self._sid, None)
        self._link = None
        futures, self._futures = self._futures, {}
        for fut in futures.values():
            fail(fut, Rehomed(reason))

    def _release(self) -> None:
        """Closed while being moved: give back the slot just taken."""
        if self._link is not None:
            self._link.send(control("close", sid=self._sid))
            self._detach("closed")

    def _result(self, seq: int, chunks: list) -> None:
        fut = self._futures.pop(seq, None)
        if fut is not None:
            resolve(fut, chunks)

    def align(self, first_frame: float, frame_seconds: float = 0.02) -> asyncio.Future:
        if self._link is None:
            raise StaleSession("the session is between workers")
        return self._link.align(self._sid, first_frame, frame_seconds)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        return math.ceil(self._lead_seconds / frame_seconds - 1e-9)

    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        if self._link is None:
            fail(fut, Rehomed("between workers"))
            return fut
        self._seq += 1
        self._futures[self._seq] = fut
        self._link.queue_audio(self._sid, self._seq, pcm16k)
        return fut

    def pause(self) -> None:
        if self._link is not None:
            self._link.send(control("pause", sid=self._sid))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()
