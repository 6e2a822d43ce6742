"""Call sessions with the echo agent and the tiny OmniFlatten model, through the call
manager and the in-memory store: frames in, frames out, barge-in, events, counts."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.agents import EchoAgent, OmniFlattenAgent
from agent.call import CallInfo, CallRefused
from agent.calls import CallManager
from agent.metrics import AgentMetrics
from agent.store import CallState, Transport
from agent.store_memory import MemoryStore
from bridge.line_audio import LineAudio
from model.checkpoint import build_model, tiny_config
from model.decoder_standin import StandInToneDecoder
from model.engine import Engine
from model.omniflatten import ChunkResult
from model.s3_tokenizer import S3Config, S3Tokenizer
from model.voice import LocalVoiceEngine


def tone(freq, seconds, rate=16000, amp=0.3):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def dominant_hz(x, rate):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spec) * rate / len(x)


async def paced(frames, on_frame):
    """Feed frames on the real 20 ms clock, as a transport does (pacing, not synchronisation)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, frame in enumerate(frames):
        await asyncio.sleep(max(0.0, start + n * 0.02 - loop.time()))
        on_frame(frame)


async def until(predicate, timeout=10.0):
    async def poll():
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


def omni_agent(registry, metrics, slots=4):
    config = tiny_config()
    model = build_model(config, seed=0)
    tok = S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=4096), seed=0)
    dec = StandInToneDecoder(config.decoder_sample_rate, config.speech_token_rate)
    return OmniFlattenAgent(LocalVoiceEngine(Engine(model, slots, registry=registry), tok, dec), metrics)


def make_manager(agent_kind="echo", slots=4):
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    agent = EchoAgent() if agent_kind == "echo" else omni_agent(registry, metrics, slots)
    return CallManager(agent, MemoryStore(), metrics), registry


def info(n):
    return CallInfo(f"call-{n}", Transport.SIP, f"sip:caller{n}@127.0.0.1", "bot")


def test_echo_frames_come_back_at_the_line_rate():
    async def main():
        manager, registry = make_manager()
        await manager.start()
        line = LineAudio(8000)
        session = await manager.admit(info(1), line)
        await session.answered()
        signal = tone(1000, 0.6)
        out = []
        for i in range(0, len(signal), 320):
            session.feed(signal[i:i + 320])
            out.append(line.next_frame())
            session.frame_sent()
        assert all(len(f) == 160 for f in out)  # 20 ms at 8 kHz, every tick
        heard = np.concatenate(out)[800:]  # past the resampler's start-up
        assert abs(dominant_hz(heard, 8000) - 1000) < 20
        assert np.abs(heard).max() > 0.2 * 32767
        record = await manager.store.get("call-1")
        assert record.state is CallState.ACTIVE
        await session.end("remote-hangup")
        record = await manager.store.get("call-1")
        assert record.state is CallState.ENDED and record.end_reason == "remote-hangup"
        assert record.frames_in == 30 and record.frames_out == 30
        assert registry.get_sample_value("duplexline_calls_total", {"transport": "sip", "outcome": "completed"}) == 1
        assert registry.get_sample_value("duplexline_calls_active", {"transport": "sip"}) == 0
        await manager.close()

    asyncio.run(main())


def test_tiny_model_plays_one_chunk_of_audio_per_user_chunk():
    async def main():
        manager, registry = make_manager("omniflatten")
        await manager.start()
        line = LineAudio(8000)
        session = await manager.admit(info(2), line)
        events = []
        session.on_event(lambda kind, data: events.append((kind, data)))
        await session.answered()
        signal = tone(440, 1.0)  # 5 chunks of 200 ms
        await paced([signal[i:i + 320] for i in range(0, len(signal), 320)], session.feed)
        latencies = lambda: [e for e in events if e[0] == "latency"]
        # The first chunk carries the tokenizer's 20 ms look-ahead (one frame of leading
        # silence on an idle engine), so each of the five chunks' codes are final as it
        # arrives: five steps, not four with the fifth a chunk period behind.
        assert manager.agent.voice.engine.lead_frames(0.02) == 1
        await until(lambda: len(latencies()) >= 5, timeout=20)
        # Each step queues exactly one chunk (200 ms) of audio.
        assert abs(line.depth_ms - 200 * len(latencies())) < 25
        assert all(e[1]["response_ms"] >= 0 for e in latencies())
        assert any(kind == "text" for kind, _ in events)  # three-stream: text tokens
        assert registry.get_sample_value("duplexline_agent_response_seconds_count") == len(latencies())
        assert registry.get_sample_value("duplexline_engine_batch_size_count") >= 4
        await session.end("remote-hangup")
        assert manager.agent.voice.engine.stats().open_sessions == 0  # the slot is free again
        await manager.close()

    asyncio.run(main())


class RecordingSink:
    def __init__(self):
        self.depth = 0.0
        self.flushes = 0

    def play(self, pcm, rate):
        self.depth += 1000 * len(pcm) / rate

    def flush(self):
        self.flushes += 1
        dropped, self.depth = self.depth, 0.0
        return dropped

    @property
    def depth_ms(self):
        return self.depth


def test_barge_in_flushes_at_once_when_speech_stops_abruptly():
    async def main():
        manager, registry = make_manager("omniflatten")
        await manager.start()
        sink = RecordingSink()
        session = await manager.admit(info(3), sink)
        events = []
        session.on_event(lambda kind, data: events.append(kind))
        agent_session = session._agent
        pcm = np.zeros(4410, np.float32)

        def result(codes):
            return ChunkResult((), tuple(codes), (), 10)

        def play(codes):
            agent_session._play(result(codes), np.array(codes), pcm, 0.0)

        play([5] * 10)  # speaking to the end of the chunk
        assert sink.depth == pytest.approx(200, abs=1)
        play([-1] * 10)  # cut off: the user interrupted
        assert sink.flushes == 1 and sink.depth == pytest.approx(200, abs=1)  # only the new chunk
        play([7] * 5 + [-1] * 5)  # speaks, then ends its turn with silence
        play([-1] * 10)  # a natural end of turn is played out, not flushed
        assert sink.flushes == 1
        assert events.count("barge-in") == 1
        assert registry.get_sample_value("duplexline_agent_bargein_flush_seconds_count") == 1
        assert registry.get_sample_value("duplexline_agent_bargein_flush_seconds_sum") < 0.02  # within one frame
        assert events.count("turn") >= 3
        await session.end("remote-hangup")
        await manager.close()

    asyncio.run(main())


def test_time_to_first_audio_runs_from_the_callers_last_speech_to_the_reply_playing():
    async def main():
        manager, registry = make_manager("omniflatten")
        await manager.start()
        sink = RecordingSink()
        session = await manager.admit(info(4), sink)
        await session.answered()
        latencies = []
        session.on_event(lambda kind, data: kind == "latency" and latencies.append(data))
        agent_session = session._agent
        pcm = np.zeros(4410, np.float32)  # 200 ms at the decoder's rate

        def play(codes):
            agent_session._play(ChunkResult((), tuple(codes), (), 10), np.array(codes), pcm, 0.0)

        def first_audio(stat):
            return registry.get_sample_value(f"duplexline_agent_first_audio_seconds_{stat}", {"transport": "sip"})

        assert first_audio("count") == 0  # the series exists before any call spoke
        play([-1] * 10)  # listening: 200 ms of silence queued
        session.feed(tone(440, 0.02))  # the caller speaks
        session.feed(np.zeros(320, np.int16))  # ... and stops: quiet frames do not move the mark
        play([-1] * 5 + [5] * 5)  # the reply: after the 200 ms queued, half-way into its chunk
        assert first_audio("count") == 1
        assert 0.3 <= first_audio("sum") < 0.3 + 0.5
        assert latencies[-1]["first_audio_ms"] == pytest.approx(first_audio("sum") * 1000, abs=0.1)
        session.feed(tone(440, 0.02))  # a backchannel while the assistant talks: no reply awaited
        play([6] * 10)  # still the same reply: not a new first audio
        play([-1] * 10)
        play([7] * 10)  # the assistant speaks again without the caller having had a turn
        assert first_audio("count") == 1
        assert "first_audio_ms" not in latencies[-1]
        await session.end("remote-hangup")
        await manager.close()

    asyncio.run(main())


def test_full_engine_refuses_with_486_and_drain_with_503():
    async def main():
        manager, registry = make_manager("omniflatten", slots=1)
        await manager.start()
        first = await manager.admit(info(4), RecordingSink())
        with pytest.raises(CallRefused) as exc:
            await manager.admit(info(5), RecordingSink())
        assert exc.value.status == 486
        drain = asyncio.ensure_future(manager.drain(timeout=30))
        await until(lambda: manager.draining)
        with pytest.raises(CallRefused) as exc:
            await manager.admit(info(6), RecordingSink())
        assert exc.value.status == 503 and exc.value.retry_after
        assert not drain.done()  # the live call holds the drain open
        await first.end("remote-hangup")
        await asyncio.wait_for(drain, 10)
        assert registry.get_sample_value("duplexline_calls_total", {"transport": "sip", "outcome": "refused_486"}) == 1
        await manager.close()

    asyncio.run(main())


def test_drain_timeout_hangs_up_the_rest_through_the_transport():
    async def main():
        manager, _ = make_manager()
        await manager.start()
        session = await manager.admit(info(7), RecordingSink())
        hung = []

        async def hangup(reason):
            hung.append(reason)

        session.on_hangup_request(hangup)
        await manager.drain(timeout=0.05)
        assert hung == ["drain-timeout"]
        assert (await manager.store.get("call-7")).end_reason == "drain-timeout"
        await manager.close()

    asyncio.run(main())


def test_dtmf_and_hold_are_events_and_hold_pauses_audio():
    async def main():
        manager, registry = make_manager()
        await manager.start()
        line = LineAudio(16000)
        session = await manager.admit(info(8), line)
        await session.answered()
        session.dtmf("42#")
        with pytest.raises(ValueError):
            session.dtmf("x")
        await session.set_hold(True)
        session.feed(tone(500, 0.02))
        assert line.depth_ms == 0  # on hold: nothing stepped, nothing played
        await session.set_hold(False)
        session.feed(tone(500, 0.02))
        assert line.depth_ms > 0
        await session.end("remote-hangup")
        kinds = [e.kind for e in await manager.store.events("call-8")]
        assert kinds[:3] == ["dtmf", "hold", "resume"] and kinds[-1] == "ended"
        assert registry.get_sample_value("duplexline_agent_dtmf_digits_total") == 3
        await manager.close()

    asyncio.run(main())


def test_fifty_concurrent_echo_sessions_keep_every_frame():
    async def main():
        manager, registry = make_manager()
        await manager.start()
        lines = [LineAudio(8000) for _ in range(50)]
        sessions = [await manager.admit(info(100 + i), lines[i]) for i in range(50)]
        for s in sessions:
            await s.answered()
        def tick(frame):
            for s, line in zip(sessions, lines):
                s.feed(frame)
                line.next_frame()
                s.frame_sent()

        await paced([tone(800, 0.02)] * 25, tick)  # half a second on the real clock
        assert all(s.frames_in == 25 for s in sessions)
        assert registry.get_sample_value("duplexline_agent_frame_lateness_seconds_count") == 50 * 25
        assert registry.get_sample_value("duplexline_calls_active", {"transport": "sip"}) == 50
        await asyncio.gather(*(s.end("remote-hangup") for s in sessions))
        assert await manager.store.live_count() == 0
        await manager.close()

    asyncio.run(main())
