"""Call recordings without a network: a WAV cut short is valid up to its last sync, the
stereo pairing (caller left, assistant right, in arrival order), a full queue that drops
and counts frames without blocking (silence in their place), retention by mtime, the
settings and route keys, and one echo call through a real manager into a file, its event
and its CDR field."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import threading
import time
import wave

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from agent.agents import EchoAgent
from agent.call import FRAME_SAMPLES, CallInfo
from agent.call_records import CallRecords
from agent.calls import CallManager
from agent.metrics import AgentMetrics
from agent.record_metrics import RecordMetrics
from agent.recorder import Recorder, file_name
from agent.recording import CallRecording
from agent.recording_retention import sweep
from agent.store import Transport
from agent.store_memory import MemoryStore
from agent.wav_file import WavWriter
from bridge.errors import ConfigError
from bridge.line_audio import LineAudio
from bridge.media import Resampler
from bridge.settings import add_serve_arguments, settings_from
from bridge.sip.routes import RouteTable


def _frames(path) -> tuple:
    with wave.open(str(path)) as w:
        return w.getparams(), np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())


def _ramp(start: int, n: int = FRAME_SAMPLES) -> np.ndarray:
    return (np.arange(start, start + n) % 30000).astype(np.int16)


def test_a_wav_cut_short_is_valid_up_to_its_last_sync(tmp_path):
    path = tmp_path / "r.wav"
    wav = WavWriter(path, 16000, 2)
    first = np.stack([_ramp(0, 3 * FRAME_SAMPLES), -_ramp(0, 3 * FRAME_SAMPLES)], axis=1).astype("<i2")
    wav.write(first.tobytes())
    wav.sync()
    wav.write(bytes(1280 * 2))  # after the last sync: on disk, not yet counted
    wav._file.flush()  # what a crash would leave: the samples written, the header as of the sync
    params, samples = _frames(path)  # read while still open, as after a crash
    assert (params.nchannels, params.framerate, params.sampwidth) == (2, 16000, 2)
    assert params.nframes == 3 * FRAME_SAMPLES and np.array_equal(samples, first)
    assert path.stat().st_size == 44 + first.nbytes + 1280 * 2
    wav.close()
    assert _frames(path)[0].nframes == 5 * FRAME_SAMPLES
    with pytest.raises(FileExistsError):  # never over another recording
        WavWriter(path, 16000, 2)


def test_pairing_puts_the_caller_left_and_what_was_sent_right_in_arrival_order():
    out: list[tuple[int, np.ndarray]] = []
    started = []
    rec = CallRecording("c", None, lambda r, seq, frame: out.append((seq, frame)), lambda: started.append(1))
    rec.sent(_ramp(5000))  # sent before the caller was heard: silence on the left
    rec.heard(_ramp(100))
    rec.heard(_ramp(200))  # two heard before the next send (a burst): both wait their turn
    rec.sent(_ramp(1000))
    rec.sent(_ramp(2000))
    rec.close()
    rec.sent(_ramp(3000))  # after the end: nothing
    assert [seq for seq, _ in out] == [0, 1, 2] and started == [1]
    left = [f[0::2] for _, f in out]
    right = [f[1::2] for _, f in out]
    assert not left[0].any() and np.array_equal(right[0], _ramp(5000))
    assert np.array_equal(left[1], _ramp(100)) and np.array_equal(right[1], _ramp(1000))
    assert np.array_equal(left[2], _ramp(200)) and np.array_equal(right[2], _ramp(2000))


def test_a_full_queue_drops_and_counts_frames_without_blocking_and_silence_keeps_the_timeline(tmp_path):
    registry = CollectorRegistry()
    recorder = Recorder(tmp_path / "rec", RecordMetrics(registry), maxsize=2)  # no writer yet: the queue fills
    rec = CallRecording("c-full", recorder.path_for("c-full"), recorder._offer)

    def send_five() -> None:
        for i in range(5):
            rec.heard(_ramp(i * 1000))
            rec.sent(_ramp(i * 1000 + 500))

    sender = threading.Thread(target=send_five, daemon=True)
    sender.start()
    sender.join(timeout=5)
    assert not sender.is_alive(), "the tick blocked on a full recording queue"
    assert rec.dropped == 3 and rec.offered == 5
    assert registry.get_sample_value("duplexline_recording_frames_dropped_total", {"reason": "queue_full"}) == 3

    async def body():
        await recorder.start()  # the writer takes the two queued frames
        rec.close()
        await recorder.close()

    asyncio.run(asyncio.wait_for(body(), 10))
    params, samples = _frames(rec.path)
    assert params.nframes == 5 * FRAME_SAMPLES  # the dropped frames are there, as silence
    assert np.array_equal(samples[:FRAME_SAMPLES, 0], _ramp(0))
    assert np.array_equal(samples[FRAME_SAMPLES:2 * FRAME_SAMPLES, 1], _ramp(1500))
    assert not samples[2 * FRAME_SAMPLES:].any()


def _until(check, timeout: float = 10.0) -> None:
    """Poll `check()` (a condition another thread makes true) for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)  # polling interval; the check decides


def test_a_live_recording_is_synced_as_it_goes_after_idle_moments_too(tmp_path):
    """The header counts each frame within a sync period while the call is still up, also
    a frame that comes after the writer sat idle (a call on hold, a stalled line)."""
    recorder = Recorder(tmp_path, RecordMetrics(CollectorRegistry()), sync_every=0.05)
    rec = CallRecording("c-live", recorder.path_for("c-live"), recorder._offer)

    def counted() -> int:
        return _frames(rec.path)[0].nframes // FRAME_SAMPLES if rec.path.exists() else 0

    async def body():
        await recorder.start()
        try:
            for n in (1, 2):
                rec.sent(_ramp(n))
                await asyncio.to_thread(_until, lambda: counted() == n)
                await asyncio.to_thread(_until, lambda: not recorder._queue.qsize() and recorder._thread.is_alive())
                await asyncio.sleep(0.3)  # let the writer sit idle past a round: what is tested, not a sync
        finally:
            rec.close()
            await recorder.close()

    asyncio.run(asyncio.wait_for(body(), 30))
    assert counted() == 2


def test_retention_deletes_old_recordings_and_keeps_new_ones(tmp_path):
    old, new, other = tmp_path / "old.wav", tmp_path / "new.wav", tmp_path / "old.txt"
    for path in (old, new, other):
        path.write_bytes(b"x")
    now = time.time()
    for path in (old, other):
        os.utime(path, (now - 3 * 86400, now - 3 * 86400))
    os.utime(new, (now - 1 * 86400, now - 1 * 86400))
    deleted, failed = sweep(tmp_path, 2, now)
    assert deleted == [old] and failed == 0
    assert not old.exists() and new.exists() and other.exists()  # only recordings go


def test_retention_runs_at_start_and_counts(tmp_path):
    registry = CollectorRegistry()
    folder = tmp_path / "rec"
    folder.mkdir()
    (folder / "a.wav").write_bytes(b"x")
    os.utime(folder / "a.wav", (time.time() - 10 * 86400,) * 2)
    recorder = Recorder(folder, RecordMetrics(registry), retention_days=7)

    async def body():
        await recorder.start()
        await recorder.close()

    asyncio.run(asyncio.wait_for(body(), 10))
    assert not (folder / "a.wav").exists()
    assert registry.get_sample_value("duplexline_recording_files_deleted_total") == 1


def test_an_unwritable_recording_folder_stops_the_start(tmp_path):
    (tmp_path / "file").write_text("")
    recorder = Recorder(tmp_path / "file" / "rec", RecordMetrics(CollectorRegistry()))
    with pytest.raises(OSError, match="--record-dir"):
        asyncio.run(recorder.start())


def test_file_names_are_safe_and_distinct():
    assert re.fullmatch(r"abc@10\.0\.0\.1-[0-9a-f]{10}\.wav", file_name("abc@10.0.0.1"))
    a, b = file_name("../../etc/passwd"), file_name("..__etc_passwd")
    assert "/" not in a and not a.startswith(".") and a != b


def test_the_line_tap_hears_each_sent_frame_at_16k():
    line = LineAudio(8000)
    heard: list[np.ndarray] = []
    line.tap(heard.append)
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(1600) / 8000)).astype(np.int16)
    line.playout.push(tone)
    sent = [line.next_frame() for _ in range(10)]
    assert [len(f) for f in heard] == [FRAME_SAMPLES] * 10
    assert np.array_equal(np.concatenate(heard), Resampler(8000, 16000).process(np.concatenate(sent)))


def _settings(argv, env=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_record_settings_flag_alone_variables_and_what_they_need(tmp_path):
    s = _settings(["--record", "--record-dir", str(tmp_path), "--record-retention-days", "30"])
    assert s.records.record and s.records.record_dir == tmp_path and s.records.record_retention_days == 30
    s = _settings([], {"DUPLEXLINE_RECORD": "no", "DUPLEXLINE_RECORD_DIR": str(tmp_path)})
    assert not s.records.record and s.records.record_dir == tmp_path
    for argv, named in [(["--record"], "--record-dir"), (["--record-retention-days", "3"], "--record-dir"),
                        (["--record-dir", "x", "--record-retention-days", "0"], "--record-retention-days"),
                        (["--record", "maybe", "--record-dir", "x"], "--record")]:
        with pytest.raises(ConfigError, match=re.escape(named)):
            _settings(argv)


def test_routes_take_record_only_with_a_recording_folder(tmp_path):
    path = tmp_path / "routes.json"
    path.write_text('{"routes": [{"match": "bot", "record": true}, {"match": "x", "record": false}]}')
    table = RouteTable.load(path, "echo", can_record=True)
    assert table.lookup("bot").record and not table.lookup("x").record
    with pytest.raises(ConfigError, match="--record-dir"):
        RouteTable.load(path, "echo")
    path.write_text('{"routes": [{"match": "bot", "record": "yes"}]}')
    with pytest.raises(ConfigError, match="true or false"):
        RouteTable.load(path, "echo", can_record=True)


def test_an_echo_call_through_the_manager_is_recorded_with_its_event_and_cdr(tmp_path):
    """In this process, the transport's part played by hand: caller frames into the
    session, one frame sent per tick. The right channel is the left one through the two
    resamplers of the echo's round trip (16 -> 8 kHz out, 8 -> 16 kHz in the tap),
    computed here on the whole signal: a frame off, or the channels swapped, would not match."""
    registry = CollectorRegistry()
    recorder = Recorder(tmp_path / "rec", RecordMetrics(registry))
    store = MemoryStore()
    cdrs: list[dict] = []

    class ListSink:
        name = "list"

        async def start(self) -> None: ...

        def offer(self, line: str) -> None:
            cdrs.append(json.loads(line))

        async def close(self, timeout: float = 5.0) -> None: ...

    caller = (np.random.default_rng(7).normal(0, 3000, 50 * FRAME_SAMPLES)).astype(np.int16)

    async def body():
        manager = CallManager(EchoAgent(), store, AgentMetrics(registry),
                              records=CallRecords((ListSink(),), None, recorder))
        await manager.start()
        line = LineAudio(8000)
        session = await manager.admit(CallInfo("c-echo", Transport.SIP, "sip:a@127.0.0.1", "bot", record=True), line)
        plain = await manager.admit(CallInfo("c-plain", Transport.SIP, "sip:b@127.0.0.1", "bot"), LineAudio(8000))
        await session.answered()
        for frame in caller.reshape(-1, FRAME_SAMPLES):
            session.feed(frame.copy())
            line.next_frame()  # what the SIP leg does each tick
            session.frame_sent()
            await asyncio.sleep(0)  # the deferred event lands, as between real ticks
        events = await store.events("c-echo")
        await manager.hangup("c-echo")
        await manager.hangup("c-plain")
        await manager.close()
        return events, plain

    events, plain = asyncio.run(asyncio.wait_for(body(), 20))
    path = recorder.path_for("c-echo")
    assert [e.data for e in events if e.kind == "recording"] == [{"file": path.name}]
    by_id = {c["call_id"]: c for c in cdrs}
    assert by_id["c-echo"]["recording"] == str(path) and by_id["c-plain"]["recording"] is None
    assert plain.recording is None and not recorder.path_for("c-plain").exists()
    params, samples = _frames(path)
    assert (params.nchannels, params.framerate, params.sampwidth) == (2, 16000, 2)
    assert params.nframes == by_id["c-echo"]["frames"]["out"] * FRAME_SAMPLES == len(caller)
    assert np.array_equal(samples[:, 0], caller)
    echo = Resampler(8000, 16000).process(Resampler(16000, 8000).process(caller)).astype(int)
    # Streamed in frames, each resampler matches the whole signal to within one LSB.
    assert np.abs(samples[:, 1].astype(int) - echo).max() <= 2
