"""A session on a shared engine worker is the same session as one in the bridge's own
process: the same caller audio through a `LocalVoiceEngine` (built as `serve --engine
local` builds it: the tiny model, seed 0, no --model) and through a `RemoteVoiceEngine`
talking to a real `duplexline worker` process (the same tiny model) gives identical text
ids, speech codes and assistant audio, chunk for chunk (greedy decoding): the worker
sends the 16 bits the bridge's line makes of the decoder's float32 (docs/worker.md), so
the remote audio is the local one so quantised, bit for bit, and the line plays both as
the same samples. The results of two sessions on one connection never cross. A bridge
that breaks the protocol, or speaks another version of it, loses its own connection and
sessions, nobody else's."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from bridge.compose import build_voice_engine
from bridge.line_audio import LineAudio
from bridge.settings import Settings
from model.voice import VoiceChunk, VoiceEngine, VoiceSession
from model.worker_client import RemoteVoiceEngine
from model.worker_protocol import VERSION, line_pcm16
from tests.integration.aio import run
from tests.integration.sip_peers import eventually, metric_value
from tests.integration.worker_process import WorkerProcess

pytestmark = pytest.mark.slow

SLOTS = 2
CHUNKS = 25  # 5 s of caller audio at the tiny model's 200 ms chunk
FRAME = 320  # samples of one 20 ms frame at 16 kHz
RESULT_TIMEOUT = 10.0  # seconds for one chunk's results (a tick is ~30 ms here)


@pytest.fixture(scope="module")
def worker(workdir):
    with WorkerProcess(workdir=workdir, slots=SLOTS, worker_id="equiv") as w:
        yield w
        w.terminate()
        assert w.wait(timeout=30) == 0, w.log()


def caller_audio(seed: int, samples: int) -> np.ndarray:
    """Tones, gaps and noise as a phone line delivers them: int16, then float32 / 32768
    (what the agent hands its session, and what int16 on the wire carries exactly)."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    freq = rng.choice([300.0, 700.0, 1200.0, 2000.0], size=samples // 4000 + 1).repeat(4000)[:samples]
    envelope = (np.sin(2 * np.pi * t * rng.uniform(0.3, 0.8)) > -0.2).astype(np.float64)
    x = 9000 * envelope * np.sin(2 * np.pi * freq * t) + rng.normal(0, 300, samples)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16).astype(np.float32) * np.float32(1 / 32768)


class Caller:
    """One session's chunks: the first led by `lead` frames of silence (what the agent puts
    before the first chunk after align), then a chunk period each."""

    def __init__(self, session: VoiceSession, seed: int) -> None:
        self.session = session
        self.chunk = round(session.chunk_seconds * 16000)
        self.lead = session.lead_frames(FRAME / 16000) * FRAME
        audio = caller_audio(seed, self.chunk * CHUNKS)
        first = np.concatenate([np.zeros(self.lead, np.float32), audio[:self.chunk]])
        self.chunks = [first] + [audio[i * self.chunk:(i + 1) * self.chunk] for i in range(1, CHUNKS)]
        self.results: list[list[VoiceChunk]] = []

    async def align(self) -> int:
        pad = self.session.align(time.monotonic(), FRAME / 16000)
        if isinstance(pad, asyncio.Future):
            pad = await asyncio.wait_for(pad, RESULT_TIMEOUT)
        return pad

    async def step(self, i: int) -> None:
        fut = self.session.submit_audio(self.chunks[i])
        self.results.append(await asyncio.wait_for(fut, RESULT_TIMEOUT))


async def converse(engine: VoiceEngine, seeds: tuple[int, ...]) -> tuple[list[Caller], list]:
    """Sessions opened on `engine`, the first aligned to its clock (alone, so led by no
    padding), the others stepped off the clock (their chunks step as they come, whatever
    the timing); chunk by chunk in turn, each awaited: one session per tick, so the
    batch never changes what a step computes."""
    await engine.start()
    try:
        callers = [Caller(await engine.open_session(), seed) for seed in seeds]
        pads = [await callers[0].align()]
        for i in range(CHUNKS):
            for caller in callers:
                await caller.step(i)
        for caller in callers:
            caller.session.close()
        return callers, pads
    finally:
        await engine.close()


def local_engine() -> VoiceEngine:
    return build_voice_engine(Settings(device="cpu", slots=SLOTS), CollectorRegistry())


def remote_engine(worker: WorkerProcess) -> RemoteVoiceEngine:
    return RemoteVoiceEngine(CollectorRegistry(), bridge_id="equivalence", urls=[worker.address])


def line_plays(results: list[list[VoiceChunk]], rate: int, line_rate: int) -> np.ndarray:
    """What a caller on a `line_rate` line hears of a session's chunks (bridge/line_audio.py)."""
    line = LineAudio(line_rate, max_playout_ms=60_000)
    for chunks in results:
        for c in chunks:
            line.play(c.pcm, rate)
    frames = round(line.depth_ms / 20)
    assert frames > 0
    return np.concatenate([line.next_frame() for _ in range(frames)])


def assert_same(local: list[list[VoiceChunk]], remote: list[list[VoiceChunk]], who: str, rate: int) -> None:
    assert len(local) == len(remote) == CHUNKS
    for i, (lc, rc) in enumerate(zip(local, remote)):
        assert len(lc) == len(rc), f"{who} chunk {i}: {len(lc)} results locally, {len(rc)} remotely"
        for a, b in zip(lc, rc):
            where = f"{who} chunk {i}"
            assert a.text_ids == b.text_ids, f"{where}: text {a.text_ids} != {b.text_ids}"
            assert a.speech_codes == b.speech_codes, f"{where}: codes {a.speech_codes} != {b.speech_codes}"
            assert a.dropped == b.dropped == False, where  # noqa: E712 (a real bool)
            assert np.asarray(a.pcm).dtype == b.pcm.dtype == np.float32, where
            quantised = line_pcm16(a.pcm) * np.float32(1 / 32768)
            assert a.pcm.shape == b.pcm.shape and quantised.tobytes() == b.pcm.tobytes(), f"{where}: pcm differs"
    # What the caller hears: the same samples, at the line rates the bridge speaks.
    for line_rate in (8000, 16000, 48000):
        assert np.array_equal(line_plays(local, rate, line_rate), line_plays(remote, rate, line_rate)), line_rate


def test_one_session_remote_equals_local_bit_for_bit(worker):
    local, local_pads = run(converse(local_engine(), (1,)), timeout=120)
    remote, remote_pads = run(converse(remote_engine(worker), (1,)), timeout=120)
    assert local_pads == remote_pads == [local[0].lead // FRAME]  # alone on the clock: no padding
    assert (local[0].chunk, local[0].lead) == (remote[0].chunk, remote[0].lead)
    assert remote[0].session.decoder_rate == local[0].session.decoder_rate
    assert remote[0].session.silent_text == local[0].session.silent_text
    assert_same(local[0].results, remote[0].results, "session", local[0].session.decoder_rate)
    # Not vacuous: the model spoke (audio with speech codes) and wrote more than silence.
    chunks = [c for r in local[0].results for c in r]
    assert len(chunks) == CHUNKS
    assert any(code >= 0 for c in chunks for code in c.speech_codes)
    assert any(np.abs(c.pcm).max() > 0.01 for c in chunks)
    assert np.abs(line_plays(local[0].results, local[0].session.decoder_rate, 8000)).max() > 300


def test_two_sessions_on_one_connection_each_get_their_own_results(worker):
    local, _ = run(converse(local_engine(), (2, 3)), timeout=120)
    remote, _ = run(converse(remote_engine(worker), (2, 3)), timeout=120)
    for who, lc, rc in zip(("first", "second"), local, remote):
        assert_same(lc.results, rc.results, who, lc.session.decoder_rate)
    # The two callers' sessions differ, so results delivered to the wrong one would show.
    first = [c.speech_codes for r in local[0].results for c in r]
    second = [c.speech_codes for r in local[1].results for c in r]
    assert first != second
    eventually(lambda: worker.readyz()["sessions"] == 0, timeout=5, what="the worker's slots free again")


@pytest.mark.parametrize("bad", ['{"t": "align"}', '{"t": "align", "sid": 1}', '{"t": "open", "sid": "x"}',
                                 '{"t": "teleport", "sid": 1}', "not json"])
def test_a_bridge_breaking_the_protocol_loses_only_its_own_connection(worker, bad):
    async def body() -> None:
        good = remote_engine(worker)
        await good.start()
        try:
            caller = Caller(await good.open_session(), seed=4)
            await caller.align()
            await caller.step(0)
            async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://{worker.address}/ws") as ws:
                hello = await ws.receive_json(timeout=RESULT_TIMEOUT)
                assert hello["t"] == "hello"
                await ws.send_str('{"t": "open", "sid": 1}')
                assert (await ws.receive_json(timeout=RESULT_TIMEOUT))["t"] == "opened"
                assert worker.readyz()["sessions"] == 2
                await ws.send_str(bad)
                closed = await ws.receive(timeout=RESULT_TIMEOUT)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
            eventually(lambda: worker.readyz()["sessions"] == 1, timeout=5, what="the broken bridge's slot free")
            for i in range(1, 4):  # the other bridge's session carries on
                await caller.step(i)
            assert all(len(r) == 1 for r in caller.results)
            caller.session.close()
        finally:
            await good.close()

    before = metric_value(worker.metrics(), "duplexline_worker_bridges_lost_total", 'how="protocol"')
    run(body(), timeout=60)
    assert metric_value(worker.metrics(), "duplexline_worker_bridges_lost_total", 'how="protocol"') == before + 1
    assert "Traceback" not in worker.log()


def test_a_bridge_of_another_protocol_version_is_refused_with_the_reason(worker):
    async def body() -> tuple:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://{worker.address}/ws") as ws:
            hello = await ws.receive_json(timeout=RESULT_TIMEOUT)
            assert hello["t"] == "hello" and hello["version"] == VERSION
            await ws.send_str(f'{{"t": "hello", "version": {VERSION - 1}, "bridge_id": "old"}}')
            await ws.send_str('{"t": "open", "sid": 1}')  # never answered
            closed = await ws.receive(timeout=RESULT_TIMEOUT)
            return closed.type, closed.data, closed.extra, worker.readyz()["sessions"]

    before = metric_value(worker.metrics(), "duplexline_worker_bridges_lost_total", 'how="protocol"')
    kind, code, reason, sessions = run(body(), timeout=60)
    assert kind == aiohttp.WSMsgType.CLOSE and code == aiohttp.WSCloseCode.PROTOCOL_ERROR
    assert f"protocol version {VERSION - 1}" in reason and f"speaks {VERSION}" in reason, reason
    assert sessions == 0
    assert metric_value(worker.metrics(), "duplexline_worker_bridges_lost_total", 'how="protocol"') == before + 1


def test_a_voice_goes_to_the_worker_and_one_it_lacks_is_refused_by_name(worker):
    """The session's voice travels in `open`: the worker's decoder (the tiny model's tones:
    one voice, "default") takes its own and refuses another, naming the voices it has; the
    bridge gives up at once (every worker serves the same model) and frees the slot."""
    async def body() -> tuple:
        engine = remote_engine(worker)
        await engine.start()
        try:
            session = await engine.open_session("default")
            assert session.voice == "default" and session.worker is not None
            session.close()
            with pytest.raises(ValueError, match="'anna'.*default"):
                await engine.open_session("anna")
            return worker.readyz()["sessions"]
        finally:
            await engine.close()

    before = metric_value(worker.metrics(), "duplexline_worker_refused_total", 'reason="voice"')
    assert run(body(), timeout=60) == 0
    assert metric_value(worker.metrics(), "duplexline_worker_refused_total", 'reason="voice"') == before + 1
