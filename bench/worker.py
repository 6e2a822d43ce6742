"""The remote engine's hop (docs/worker.md): what a bridge pays for running its calls'
sessions on an engine worker over the network instead of in its own process. Two parts,
one table, every baseline measured in the same run:

1. Round trip with the model, on loopback: a real worker (`duplexline worker --device cpu`,
   the tiny random model, a second process) against a `LocalVoiceEngine` (the same tiny
   model, admission by slots alone) in this process, on the same arrivals. N calls start
   within one second and send 20 ms frames on the real clock; chunks are aligned to the
   engine's clock as the agent does it (the first one `lead_frames` longer; a remote
   align answers after a round trip, frames are held meanwhile). Per chunk, submit to
   result; p50/p99 over the steady state (every call started), and what the hop adds
   (worker minus here). With few chunks (N=1: ~20) the p99 is their max. On a small
   machine the engine in this process also competes with this event loop (one GIL):
   the "added" can come out negative; the stand-in rows are the hop alone.
   Goal: the hop adds at most 5 ms at p99.

2. The protocol alone: `InstantVoiceStandIn` (below: a bench-only stand-in for the engine
   that answers every chunk at once with a fixed result of a real chunk's size) served by
   the real `WorkerServer` in a second process, and `RemoteVoiceEngine` in this one: N
   sessions (256) over one connection, each sending a chunk of 16 kHz audio every chunk
   period (200 ms). CPU per side, in % of one core per 100 sessions: this process's
   event-loop thread (`time.thread_time`) net of the same loop with the stand-in in this
   process (the "here" row: making and submitting chunks, futures), and the worker
   process's utime + stime from /proc (all of it: aiohttp, the protocol, WorkerServer,
   the stand-in's next to nothing). Goal: at most 5% each side.
   `aligned`: every session's chunk completes in the same moment (one batch a tick each
   way when coalescing works, cut into messages of at most PIECE_BYTES of audio, ~128 kB:
   about 13 up and 18 down for 256 sessions); `spread over 20 ms`: each session's chunks
   complete at its own phase within a frame, as real calls' frames arrive (coalescing per
   pass of the event loop then joins only what lands in the same pass). An aligned batch
   shares one round trip: its p99 is about its worst tick.

Messages and bytes per second each way are counted in this process (audio messages
packed, result messages unpacked; pings, 10 a second each way, not counted).

    python bench/worker.py [--sessions 1,16] [--seconds 5] [--protocol-sessions 16,256]
                           [--protocol-seconds 4] [--arrivals aligned,spread]
                           [--event-loop asyncio|uvloop] [--gc-freeze]

(`--sessions ''`: the protocol part alone; `--protocol-sessions ''`: the model part alone.)

It exits 1 (after the table) when a chunk failed, with both sides' logs. The default run
takes about a minute. (`python bench/worker.py --serve-stand-in PORT` is the stand-in
worker's process.)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import heapq
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench._common import pct, table  # noqa: E402
from bench._procs import cpu_seconds  # noqa: E402
from bridge.process import loop_factory  # noqa: E402
from model.errors import EngineFull, StaleSession  # noqa: E402
from model.voice import VoiceChunk, VoiceEngine, VoiceSession  # noqa: E402

FRAME = 0.02
SAMPLES = 320  # 20 ms at 16 kHz
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the engine stand-in (bench only) ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _StandInStats:
    slots: int
    open_sessions: int


class _StandInEngine:
    """The part of `Engine` that WorkerServer reads through `voice.engine`."""

    def __init__(self, slots: int, period: float, lead: int, silent_text: int) -> None:
        self.slots = slots
        self.period = period
        self.open = 0
        self._lead = lead
        self.model = SimpleNamespace(vocab=SimpleNamespace(silent_text=silent_text))

    def stats(self) -> _StandInStats:
        return _StandInStats(self.slots, self.open)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        return self._lead

    def tick_p99(self, last: int = 500) -> float:
        return 0.0

    def drain(self) -> None:
        pass


class InstantVoiceStandIn(VoiceEngine):
    """BENCH ONLY, NOT AN ENGINE: a stand-in for `LocalVoiceEngine` that answers every
    chunk at once (the future is resolved before `submit_audio` returns) with the same
    fixed result, the tiny model's shape: 2 text ids, 10 speech codes and the decoder's
    audio for one chunk (4410 float32 samples at 22050 Hz, a fixed array). It looks at no
    audio and runs no model, so that a `WorkerServer` serving it costs only the protocol
    and its own plumbing. Its `engine` and `decoder` attributes are the few things
    WorkerServer reads from a LocalVoiceEngine's."""

    def __init__(self, slots: int = 4096) -> None:
        from model.checkpoint import tiny_config
        from model.s3_tokenizer import S3Config
        from model.vocab import Vocabulary

        config = tiny_config()
        layout = config.layout
        vocab = Vocabulary(config.text_size, config.speech_codebook_size)
        lookahead = S3Config(width=64, heads=4, layers=2).lookahead_samples  # the tiny tokenizer's
        lead = math.ceil(lookahead / (FRAME * 16000) - 1e-9)
        self.engine = _StandInEngine(slots, config.chunk_seconds, lead, vocab.silent_text)
        self.decoder = SimpleNamespace(sample_rate=config.decoder_sample_rate)
        samples = layout.speech * config.decoder_sample_rate // config.speech_token_rate
        pcm = (0.3 * np.sin(np.arange(samples) * (2 * np.pi * 440 / config.decoder_sample_rate))).astype(np.float32)
        self.chunk = VoiceChunk((vocab.silent_text,) * layout.text, tuple(range(layout.speech)), pcm)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def drain(self) -> None:
        pass

    async def open_session(self, voice: str | None = None) -> "_InstantSession":
        if self.engine.open >= self.engine.slots:
            raise EngineFull("no_slot", f"all {self.engine.slots} slots are in use")
        self.engine.open += 1
        return _InstantSession(self)

    def describe(self) -> dict:
        return {"engine": "instant-stand-in", "slots": self.engine.slots, "sessions": self.engine.open}


class _InstantSession(VoiceSession):
    def __init__(self, voice: InstantVoiceStandIn) -> None:
        self._voice = voice
        self.closed = False
        self.chunk_seconds = voice.engine.period
        self.decoder_rate = voice.decoder.sample_rate
        self.silent_text = voice.engine.model.vocab.silent_text

    def align(self, first_frame: float, frame_seconds: float = 0.02) -> int:
        if self.closed:
            raise StaleSession("closed")
        return self._voice.engine.lead_frames(frame_seconds)

    def lead_frames(self, frame_seconds: float = 0.02) -> int:
        return self._voice.engine.lead_frames(frame_seconds)

    def submit_audio(self, pcm16k: np.ndarray) -> asyncio.Future:
        if self.closed:
            raise StaleSession("closed")
        fut = asyncio.get_running_loop().create_future()
        fut.set_result([self._voice.chunk])
        return fut

    def pause(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._voice.engine.open -= 1


def serve_stand_in(port: int, event_loop: str, freeze: bool) -> int:
    """The stand-in worker's process: WorkerServer + InstantVoiceStandIn until SIGTERM."""
    from aiohttp import web

    from model.worker_server import WorkerServer

    async def run() -> None:
        server = WorkerServer(InstantVoiceStandIn(), CollectorRegistry(), worker_id="stand-in",
                              model_id="stand-in", advertise=f"127.0.0.1:{port}", gc_freeze=freeze)
        await server.start()
        runner = web.AppRunner(server.app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        if freeze:
            gc.freeze()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print(f"stand-in worker serving on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        await server.close()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        runner.run(run())
    return 0


# ---- the bench process's side --------------------------------------------------------------

class Counts:
    """Binary messages through this process's RemoteVoiceEngine (counted where the client
    packs audio and unpacks results: one call per WebSocket message)."""

    audio = audio_bytes = results = results_bytes = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        import model.worker_client as wc

        pack, unpack = getattr(wc, "pack_audio", None), getattr(wc, "unpack_results", None)
        if pack is None or unpack is None:
            return  # the client packs elsewhere now: no counts ("?" in the table)

        def counted_pack(items):
            data = pack(items)
            cls.audio += 1
            cls.audio_bytes += len(data)
            return data

        def counted_unpack(data):
            cls.results += 1
            cls.results_bytes += len(data)
            return unpack(data)

        wc.pack_audio, wc.unpack_results = counted_pack, counted_unpack
        cls.installed = True

    @classmethod
    def snap(cls) -> tuple[int, int, int, int]:
        return cls.audio, cls.audio_bytes, cls.results, cls.results_bytes


class Caller:
    """One call's side: 20 ms frames into chunks on the engine's clock, as the agent does
    (agent/agents.py): the first chunk after aligning carries the look-ahead; a remote
    engine's align answers after a round trip, the frames meanwhile are held."""

    def __init__(self, session: VoiceSession, rng: random.Random) -> None:
        self.session = session
        self.frames_per_chunk = round(session.chunk_seconds / FRAME)
        self.buf = np.zeros((self.frames_per_chunk + session.lead_frames(FRAME)) * SAMPLES, np.float32)
        self.target = len(self.buf) // SAMPLES
        self.fill = -1  # not aligned yet
        self.held: list[np.ndarray] | None = None  # frames while a remote align is on its way
        self.noise = (0.05 * np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
            50 * SAMPLES)).astype(np.float32)
        self.n = 0
        self.sent: list[tuple[float, float]] = []  # (submitted at, seconds to its result)
        self.failed = 0
        self.pending: set[asyncio.Future] = set()  # only the pending: a done one's audio is not kept

    def frame(self, now: float) -> None:
        i = self.n % 50
        self.n += 1
        frame = self.noise[i * SAMPLES:(i + 1) * SAMPLES]
        if self.held is not None:
            self.held.append(frame)
            return
        if self.fill < 0:
            pad = self.session.align(now, FRAME)
            if isinstance(pad, asyncio.Future):
                self.held = [frame]
                pad.add_done_callback(self._aligned)
                return
            self._start(pad)
        self._add(frame)

    def _aligned(self, fut: asyncio.Future) -> None:
        held, self.held = self.held or [], None
        if fut.cancelled() or fut.exception() is not None:
            self.failed += 1
            return  # the next frame aligns again
        self._start(fut.result())
        for frame in held:
            self._add(frame)

    def _start(self, pad: int) -> None:
        self.buf[:pad * SAMPLES] = 0.0
        self.fill = pad
        self.target = len(self.buf) // SAMPLES

    def _add(self, frame: np.ndarray) -> None:
        self.buf[self.fill * SAMPLES:(self.fill + 1) * SAMPLES] = frame
        self.fill += 1
        if self.fill < self.target:
            return
        chunk = self.buf[:self.target * SAMPLES].copy()
        self.fill, self.target = 0, self.frames_per_chunk
        sent = time.monotonic()
        fut = self.session.submit_audio(chunk)
        fut.add_done_callback(lambda f, sent=sent: self._done(f, sent))
        self.pending.add(fut)

    def _done(self, fut: asyncio.Future, sent: float) -> None:
        self.pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None or any(c.dropped for c in fut.result()):
            self.failed += 1
            return
        self.sent.append((sent, time.monotonic() - sent))


async def round_trip(voice: VoiceEngine, n: int, seconds: float, jitter: float, seed: int) -> dict:
    """N calls started within one second, frames on the real clock; chunk latencies of
    the steady state (every call started, none ending)."""
    rng = random.Random(seed)
    sessions: list[VoiceSession] = []
    try:
        for _ in range(n):
            sessions.append(await voice.open_session())
    except EngineFull as exc:  # the worker admits by its own measured ticks
        for s in sessions:
            s.close()
        return {"refused": exc}
    callers = [Caller(s, rng) for s in sessions]
    starts = sorted(rng.uniform(0, 1.0) for _ in range(n))
    begin = time.monotonic() + 0.1
    events: list[tuple[float, int]] = []
    for c, start in enumerate(starts):
        t = 0.0
        for i in range(int(seconds / FRAME)):
            t = max(t, begin + start + i * FRAME + rng.uniform(0, jitter))
            events.append((t, c))
    heapq.heapify(events)
    steady = (begin + starts[-1] + 0.5, begin + starts[0] + seconds - 0.3)
    snaps: list[tuple[float, tuple]] = []
    while events:
        now = time.monotonic()
        if len(snaps) < 2 and now >= steady[len(snaps)]:
            snaps.append((now, Counts.snap()))
        t, c = events[0]
        if t > now:
            await asyncio.sleep(t - now)
            continue
        heapq.heappop(events)
        callers[c].frame(now)
    await asyncio.wait_for(asyncio.gather(*(f for c in callers for f in c.pending), return_exceptions=True), 30)
    for s in sessions:
        s.close()
    while len(snaps) < 2:
        snaps.append((time.monotonic(), Counts.snap()))
    (t0, a), (t1, b) = snaps
    delays = [d for c in callers for sent, d in c.sent if steady[0] <= sent < steady[1]]
    return {"delays": delays, "failed": sum(c.failed for c in callers),
            "up": (b[0] - a[0]) / (t1 - t0), "down": (b[2] - a[2]) / (t1 - t0),
            "up_bytes": (b[1] - a[1]) / (t1 - t0), "down_bytes": (b[3] - a[3]) / (t1 - t0)}


async def protocol_load(voice: VoiceEngine, n: int, seconds: float, spread: bool, seed: int,
                        server_pid: int | None, warm: float = 1.0) -> dict:
    """N sessions, a chunk each every period, for `seconds` after `warm`: latencies, this
    thread's CPU, the worker process's CPU, messages."""
    sessions = [await voice.open_session() for _ in range(n)]
    pads = [s.align(time.monotonic(), FRAME) for s in sessions]
    await asyncio.gather(*(p for p in pads if isinstance(p, asyncio.Future)))
    period = sessions[0].chunk_seconds
    rng = np.random.default_rng(seed)
    audio = (0.05 * rng.standard_normal((n, round(period * 16000)))).astype(np.float32)
    order = sorted((float(rng.uniform(0, FRAME)) if spread else 0.0, i) for i in range(n))
    warm_ticks, ticks = round(warm / period), round(warm / period) + round(seconds / period)
    sent: list[tuple[float, float]] = []
    failed = [0]
    pending: set[asyncio.Future] = set()  # a done one's audio is not kept (the garbage collector's work)

    def done(f: asyncio.Future, at: float) -> None:
        pending.discard(f)
        if f.cancelled() or f.exception() is not None:
            failed[0] += 1
        else:
            sent.append((at, time.monotonic() - at))

    def snap() -> tuple:
        return (time.monotonic(), time.thread_time(), cpu_seconds(server_pid) if server_pid else 0.0,
                Counts.snap())

    t0 = time.monotonic() + 0.05
    a = b = None
    for k in range(ticks + 1):
        tick = t0 + k * period
        if k == warm_ticks or k == ticks:
            await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if k == ticks:
                b = snap()
                break
            a = snap()
        for phase, i in order:
            wait = tick + phase - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            chunk = audio[i].copy()
            at = time.monotonic()
            fut = sessions[i].submit_audio(chunk)
            fut.add_done_callback(lambda f, at=at: done(f, at))
            pending.add(fut)
    await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
    for s in sessions:
        s.close()
    wall = b[0] - a[0]
    return {"delays": [d for at, d in sent if a[0] <= at < b[0]], "failed": failed[0], "wall": wall,
            "client": (b[1] - a[1]) / wall, "server": (b[2] - a[2]) / wall if server_pid else None,
            "up": (b[3][0] - a[3][0]) / wall, "down": (b[3][2] - a[3][2]) / wall,
            "up_bytes": (b[3][1] - a[3][1]) / wall, "down_bytes": (b[3][3] - a[3][3]) / wall}


# ---- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()[-4000:]

    async def ready(self, address: str, timeout: float = 90.0) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.output()}")
                with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                    async with http.get(f"http://{address}/healthz",
                                        timeout=aiohttp.ClientTimeout(total=1.0)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ClientLog(logging.Handler):
    """The remote engine's warnings (a worker lost, sessions moved or ended), counted for
    the notes under the table instead of one line per session on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()
        log = logging.getLogger("model.worker_client")
        log.addHandler(self)
        log.propagate = False

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.getMessage()] += 1

    def take(self) -> list[str]:
        lines = [f"{n} x {m}" if n > 1 else m for m, n in self.counts.items()]
        self.counts.clear()
        return lines


# ---- the run -----------------------------------------------------------------------------------

def ms(v: float) -> str:
    return f"{v * 1000:.1f}"


def p50_p99(delays: list[float]) -> tuple[float, float]:
    return (pct(delays, 50), pct(delays, 99)) if delays else (float("nan"), float("nan"))


def traffic(r: dict) -> tuple[str, str]:
    if not Counts.installed:
        return "?", "?"
    return f"{r['up']:.1f} / {r['down']:.1f}", f"{r['up_bytes'] / 1e6:.2f} / {r['down_bytes'] / 1e6:.2f}"


def row(engine: str, n: int, arrivals: str, r: dict, base: dict | None, cpu_bridge: str = "-",
        cpu_worker: str = "-") -> list[object]:
    """One line of the table; `base` None: this row is a baseline."""
    if "refused" in r:
        return [engine, n, arrivals, f"refused: {r['refused']}", "-", "-", "-", "-", "-", "-"]
    p50, p99 = p50_p99(r["delays"])
    if base is None:
        added, msgs, mbs = "baseline", "-", "-"
    else:
        b50, b99 = p50_p99(base.get("delays", []))
        added = f"{ms(p50 - b50)} / {ms(p99 - b99)}"
        msgs, mbs = traffic(r)
    return [engine, n, arrivals, f"{ms(p50)} / {ms(p99)}", added, msgs, mbs, cpu_bridge, cpu_worker,
            f"{len(r['delays'])} ({r['failed']})"]


async def run(args: argparse.Namespace, sizes: list[int], loads: list[int]) -> tuple[list[list[object]], list[str]]:
    Counts.install()
    client_log = ClientLog()
    rows: list[list[object]] = []
    notes: list[str] = []
    if sizes:
        await model_part(args, sizes, client_log, rows, notes)
    if loads:  # after the model's worker has gone: the machine to itself and the stand-in
        await protocol_part(args, loads, client_log, rows, notes)
    return rows, notes


async def model_part(args: argparse.Namespace, sizes: list[int], client_log: ClientLog, rows: list,
                     notes: list) -> None:
    """1. The round trip with the tiny model: in this process (baseline), then on the worker."""
    from bridge.compose import build_voice_engine
    from bridge.settings import Settings
    from model.worker_client import RemoteVoiceEngine

    worker_addr = f"127.0.0.1:{free_port()}"
    worker = Proc("worker", [sys.executable, "-m", "bridge.cli", "worker", "--listen", worker_addr,
                             "--slots", str(max(sizes)), "--device", "cpu", "--event-loop", args.event_loop,
                             "--log-level", "WARNING", "--drain-timeout", "0"])
    try:
        loop = asyncio.get_running_loop()
        local = await loop.run_in_executor(None, build_voice_engine, Settings(
            slots=max(sizes), device="cpu", log_level="WARNING"), CollectorRegistry())
        local.engine.headroom = None  # admission by slots alone: every N is measured (the worker's is its own)
        await local.start()
        await worker.ready(worker_addr)
        if args.gc_freeze:
            gc.freeze()
        remote = RemoteVoiceEngine(CollectorRegistry(), bridge_id="bench", urls=[worker_addr])
        await remote.start()
        try:
            for n in sizes:
                base = await round_trip(local, n, args.seconds, args.jitter, args.seed + n)
                got = await round_trip(remote, n, args.seconds, args.jitter, args.seed + n)
                rows.append(row("tiny model, here", n, "calls", base, None))
                rows.append(row("tiny model, worker", n, "calls", got, base))
                if got.get("failed") or base.get("failed"):
                    notes.append(f"failed chunks at N={n} (tiny model); this side's log:\n"
                                 + "\n".join(client_log.take()) + f"\nthe worker's log:\n{worker.output()}")
                client_log.take()
        finally:
            await remote.close()
            await local.close()
    finally:
        worker.stop()


async def protocol_part(args: argparse.Namespace, loads: list[int], client_log: ClientLog, rows: list,
                        notes: list) -> None:
    """2. The protocol alone: the instant stand-in here (baseline), then over one connection."""
    from model.worker_client import RemoteVoiceEngine

    stand_in_addr = f"127.0.0.1:{free_port()}"
    stand_in = Proc("stand-in worker", [sys.executable, os.path.abspath(__file__), "--serve-stand-in",
                                        stand_in_addr.rsplit(":", 1)[1], "--event-loop", args.event_loop]
                    + (["--gc-freeze"] if args.gc_freeze else []))
    try:
        await stand_in.ready(stand_in_addr)
        if args.gc_freeze:
            gc.freeze()
        for n in loads:
            per100 = 100.0 / n
            for spread in [a == "spread" for a in args.arrivals.split(",")]:
                arrivals = "spread over 20 ms" if spread else "aligned"
                # The baseline's cost is steady and small: 2 s measure it well enough.
                base = await protocol_load(InstantVoiceStandIn(), n, min(2.0, args.protocol_seconds), spread,
                                           args.seed, None)
                remote = RemoteVoiceEngine(CollectorRegistry(), bridge_id="bench", urls=[stand_in_addr])
                await remote.start()
                try:
                    got = await protocol_load(remote, n, args.protocol_seconds, spread, args.seed, stand_in.pid)
                finally:
                    await remote.close()
                rows.append(row("instant stand-in, here", n, arrivals, base, None,
                                f"({base['client'] * per100:.2%})"))
                rows.append(row("instant stand-in, worker", n, arrivals, got, base,
                                f"{(got['client'] - base['client']) * per100:.2%}",
                                f"{got['server'] * per100:.2%}"))
                if got["failed"]:
                    notes.append(f"failed chunks at N={n} ({arrivals}, stand-in); this side's log:\n"
                                 + "\n".join(client_log.take()) + f"\nthe stand-in worker's log:\n{stand_in.output()}")
                client_log.take()
    finally:
        stand_in.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,16",
                    help="round trip: calls at once, each size in turn ('': no tiny model part)")
    ap.add_argument("--seconds", type=float, default=5.0, help="round trip: each call's length")
    ap.add_argument("--jitter", type=float, default=0.0, help="round trip: frames arrive up to this late")
    ap.add_argument("--protocol-sessions", default="256", help="CPU: sessions over one connection, each in turn")
    ap.add_argument("--protocol-seconds", type=float, default=4.0, help="CPU: seconds measured (after 1 s)")
    ap.add_argument("--arrivals", default="aligned,spread", help="CPU: aligned, spread (over 20 ms), or both")
    ap.add_argument("--event-loop", default="asyncio", choices=["asyncio", "uvloop"],
                    help="every process's event loop (the worker's default is uvloop)")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="gc.freeze() after start-up in this process and the stand-in worker's (the tiny "
                    "model's worker always freezes, as `duplexline worker` does): full collections then skip "
                    "the ~190k objects of the imports")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--serve-stand-in", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_stand_in is not None:
        return serve_stand_in(args.serve_stand_in, args.event_loop, args.gc_freeze)
    sizes = [int(s) for s in args.sessions.split(",") if s]
    loads = [int(s) for s in args.protocol_sessions.split(",") if s]
    started, load_before = time.monotonic(), os.getloadavg()[0]
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        rows, notes = runner.run(run(args, sizes, loads))
    print(f"the remote engine's hop on loopback, {os.cpu_count()} CPUs (load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after: a shared machine is noisy), {args.event_loop} event loops"
          f"{', gc frozen after start-up' if args.gc_freeze else ''}, "
          f"{time.monotonic() - started:.0f} s. Tiny model: a worker process (--device cpu) against the "
          f"engine in this process, the same arrivals, {args.seconds:g} s calls, steady state. Instant stand-in "
          f"(the protocol alone): N sessions over one connection, a chunk each per 200 ms, {args.protocol_seconds:g} "
          f"s. Round trip: submit to result per chunk (an aligned batch shares one: its p99 is about its worst "
          f"tick). CPU: % of one core per 100 sessions, the bridge side net of the here row's (in brackets). "
          f"msgs/s, MB/s: binary messages bridge to worker / back (pings, 10/s each way, not counted). Baselines "
          f"from this run. Goals: added p99 <= 5 ms; CPU <= 5% each side.")
    print(table(["engine", "sessions", "arrivals", "round trip p50 / p99 ms", "added p50 / p99 ms",
                 "msgs/s up / down", "MB/s up / down", "CPU bridge side", "CPU worker side",
                 "chunks (failed)"], rows))
    for note in notes:
        print(note, file=sys.stderr)
    return 1 if notes else 0


if __name__ == "__main__":
    sys.exit(main())
