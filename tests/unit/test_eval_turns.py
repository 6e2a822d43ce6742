"""`duplexline eval turns` (model/train/eval_turns.py, eval_metrics.py): the metric
arithmetic on hand-made speaking sequences (expected values worked out by hand, below
each case), the events a manifest gives, and a run of the tiny random model over two
synthetic dialogues: table, JSON, WAV and PNG, and the same codes a call's agent gets."""

import argparse
import asyncio
import json
import struct
import zlib

import numpy as np
import pytest
from scipy.io import wavfile

from model.train.eval_metrics import interrupt_onsets, interruption, summarize, turn_events, turn_taking
from model.train.eval_turns import add_eval_parser, evaluate
from model.train.manifest import DialogueEntry, DialogueTurn, write_manifest

P = 0.2  # a chunk of the 50 Hz model


def chunks(n, on):
    """n chunks, speaking in the chunk indices `on`."""
    x = np.zeros(n, bool)
    x[list(on)] = True
    return x


# ---- turn-taking ------------------------------------------------------------------------

def test_response_in_the_chunk_after_the_users_end():
    # User 0.3..1.0 s; the assistant first speaks in the chunk starting 1.2 s: 200 ms,
    # one chunk after the chunk starting at the end (1.0 s): not within 1, within 5.
    o = turn_taking(chunks(20, range(6, 12)), P, 0.3, 1.0)
    assert (o.seconds, o.steps, o.success, o.over_talk) == (pytest.approx(0.2), 1, True, False)
    s = summarize([o], P)
    assert s["acc"] == {"1": 0.0, "5": 1.0, "10": 1.0, "25": 1.0}
    assert s["mean_ms"] == 200.0


def test_response_in_the_chunk_holding_a_mid_chunk_end():
    # End 1.05 s falls in chunk 5 (1.0..1.2): speaking there is an answer at once (0 ms,
    # Acc@1); speaking first in chunk 6 (1.2 s) is 150 ms, one chunk late.
    o = turn_taking(chunks(20, [5, 6]), P, 0.3, 1.05)
    assert (o.seconds, o.steps, o.success) == (0.0, 0, True)
    o = turn_taking(chunks(20, [6, 7]), P, 0.3, 1.05)
    assert (o.seconds, o.steps, o.success) == (pytest.approx(0.15), 1, True)


def test_slower_than_one_and_a_half_seconds_or_none_is_a_failure():
    slow = turn_taking(chunks(30, [15]), P, 0.3, 1.0)  # 3.0 s - 1.0 s = 2 s
    assert (slow.seconds, slow.steps, slow.success) == (pytest.approx(2.0), 10, False)
    edge = turn_taking(chunks(30, [12]), P, 0.3, 1.0)  # 2.4 - 1.0 = 1.4 s: in time
    assert edge.success and edge.steps == 7
    last = turn_taking(chunks(30, [13]), P, 0.3, 1.1)  # 2.6 - 1.1 = exactly 1.5 s: still in time
    assert last.success and last.seconds == pytest.approx(1.5)
    assert not turn_taking(chunks(30, [14]), P, 0.3, 1.1).success  # 1.7 s
    none = turn_taking(chunks(30, []), P, 0.3, 1.0)
    assert (none.seconds, none.steps, none.success) == (None, None, False)
    s = summarize([slow, edge, none], P)
    # Only `edge` succeeds, with 7 chunks: within 10 and 25, not 1 or 5; 1 of 3 events.
    assert s["acc"] == {"1": 0.0, "5": 0.0, "10": pytest.approx(1 / 3), "25": pytest.approx(1 / 3)}
    assert s["mean_ms"] == 1400.0 and s["none_within_limit"] == 2 and s["over_talk"] == 0


def test_speaking_over_the_user_beyond_the_tolerance_fails_the_event():
    # User 0.3..2.0 s (chunks wholly inside: 2..9). A run of 4 chunks inside (0.8 s) is
    # over the 0.6 s tolerance: a failure though the answer at 2.0 s is at once.
    o = turn_taking(chunks(20, [3, 4, 5, 6, 10, 11]), P, 0.3, 2.0)
    assert o.over_talk and not o.success and o.steps == 0
    # A 3-chunk backchannel (0.6 s) is within it.
    o = turn_taking(chunks(20, [3, 4, 5, 10, 11]), P, 0.3, 2.0)
    assert not o.over_talk and o.success
    # A run begun before the turn counts by its part inside: the user starts at 0.5 s,
    # chunks wholly inside from 3 (0.6 s); speaking 0..4 leaves 2 chunks inside, fine;
    # speaking 0..7 leaves 5 (1.0 s): over.
    assert not turn_taking(chunks(20, [0, 1, 2, 3, 4, 16]), P, 0.5, 3.0).over_talk
    o = turn_taking(chunks(20, range(0, 8)), P, 0.5, 3.0)
    assert o.over_talk and not o.success
    s = summarize([o], P)
    assert s["over_talk"] == 1 and s["acc"]["25"] == 0.0 and s["mean_ms"] is None


def test_mean_and_acc_over_mixed_events():
    events = [turn_taking(chunks(40, on), P, 0.1, 1.0) for on in ([6], [5], range(1, 9), [12])]
    # 200 ms/1 chunk, 0 ms/0, speaking over the user (chunks 1..4 inside: 0.8 s),
    # 1400 ms/7 chunks.
    s = summarize(events, P)
    assert s["events"] == 4 and s["successes"] == 3
    assert s["acc"] == {"1": 0.25, "5": 0.5, "10": 0.75, "25": 0.75}
    assert s["mean_ms"] == pytest.approx((200 + 0 + 1400) / 3, abs=0.1)


def test_speech_code_resolution():
    # 20 ms steps: the first speech code at 1.06 s after an end at 1.0 s: 60 ms, 3 codes.
    x = np.zeros(200, bool)
    x[53:80] = True
    o = turn_taking(x, 0.02, 0.3, 1.0)
    assert (o.seconds, o.steps) == (pytest.approx(0.06), 3)
    assert summarize([o], 0.02)["acc"] == {"1": 0.0, "5": 1.0, "10": 1.0, "25": 1.0}


# ---- interruption -----------------------------------------------------------------------

def test_stop_after_the_users_onset():
    # Onset 1.0 s; speaking through the chunk 1.2..1.4, silent from 1.4 s: 400 ms, 2 chunks.
    o = interruption(chunks(20, range(0, 7)), P, 1.0, hold=2)
    assert (o.seconds, o.steps, o.success) == (pytest.approx(0.4), 2, True)
    assert summarize([o], P)["acc"] == {"1": 0.0, "5": 1.0, "10": 1.0, "25": 1.0}


def test_a_pause_shorter_than_the_hold_is_not_a_stop():
    x = chunks(20, [0, 1, 2, 3, 4, 5, 7, 8, 9])  # silent at 6 only, then for good from 10
    o = interruption(x, P, 1.0, hold=2)
    assert (o.seconds, o.steps) == (pytest.approx(1.0), 5)
    o = interruption(x, P, 1.0, hold=1)
    assert (o.seconds, o.steps) == (pytest.approx(0.2), 1)


def test_stop_failures_and_non_events():
    assert interruption(chunks(20, range(0, 20)), P, 1.0, hold=2).success is False  # never stops
    late = interruption(chunks(30, range(0, 15)), P, 1.0, hold=2)  # silent from 3.0 s: 2 s
    assert (late.seconds, late.success) == (pytest.approx(2.0), False)
    assert interruption(chunks(20, [0, 1, 2]), P, 1.0, hold=2) is None  # silent at the onset
    # Onset 1.05 s inside chunk 5, which speaks: an event; silent from 1.2 s: 150 ms, 1 chunk.
    o = interruption(chunks(20, range(0, 6)), P, 1.05, hold=2)
    assert (o.seconds, o.steps) == (pytest.approx(0.15), 1)


# ---- events from a manifest -------------------------------------------------------------

def turn(speaker, start, end, **kw):
    return DialogueTurn(speaker, "x", start, end, **kw)


def entry(pattern, turns, duration=10.0):
    return DialogueEntry("d", "a.wav", "a.wav", duration, tuple(turns), pattern=pattern, user_channel=0,
                         assistant_channel=1)


def test_events_a_manifest_gives():
    respond = entry("respond", [turn("assistant", 0.2, 1.0), turn("user", 1.5, 3.0),
                                turn("assistant", 2.0, 2.4, backchannel=True), turn("assistant", 3.4, 5.0),
                                turn("user", 5.5, 6.0), turn("user", 6.5, 7.0, backchannel=True)])
    assert turn_events(respond) == [(1.5, 3.0)]  # the last user turn has no answer in the data
    assert interrupt_onsets(respond) == []
    wait = entry("wait", [turn("user", 0.5, 4.0, extra={"segments": [{"start": 0.5, "end": 1.5},
                                                                   {"start": 2.5, "end": 4.0}]}),
                          turn("assistant", 4.5, 6.0)])
    assert turn_events(wait) == [(0.5, 4.0)]  # the end of the last segment, the pause inside
    cut = entry("interrupt", [turn("user", 0.2, 1.0), turn("assistant", 1.4, 2.5, planned_end=3.5),
                              turn("user", 2.1, 3.0), turn("assistant", 3.5, 5.0), turn("user", 4.0, 4.3,
                                                                                       backchannel=True)])
    assert turn_events(cut) == [] and interrupt_onsets(cut) == [2.1]


# ---- the tiny random model, end to end --------------------------------------------------

def syllables(rate, start, end, hz, n):
    """Stand-in speech: a gliding tone in 4 Hz syllables (edges everywhere, so a shift of
    one frame changes the codes of a tokenizer that hears the sound)."""
    x = np.zeros(n, np.float32)
    a, b = int(start * rate), int(end * rate)
    t = np.arange(b - a) / rate
    pitch = hz + 0.5 * hz * np.sin(2 * np.pi * 1.3 * t)
    x[a:b] = 0.3 * np.sin(2 * np.pi * pitch * t) * np.abs(np.sin(2 * np.pi * 4 * t))
    return x


DIALOGUES = [  # (id, pattern, user turn, assistant turn, planned_end)
    ("d-respond", "respond", (0.3, 1.2), (1.5, 2.5), None),
    ("d-interrupt", "interrupt", (1.0, 2.4), (0.2, 1.4), 2.0),
]
DURATION = 3.0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from model.checkpoint import write_tiny_model

    import torch

    from model.s3_tokenizer import S3Tokenizer

    root = tmp_path_factory.mktemp("eval")
    model = write_tiny_model(root / "model")
    # The random tokenizer's codes follow position more than sound; convolutions x4 make
    # them follow the audio (bench/tokenizer_window.py `content_init`), so codes compared
    # below would show audio fed a frame early or late.
    tok = S3Tokenizer.load(model / "tokenizer")
    with torch.no_grad():
        for conv in (tok.model.encoder.conv1, tok.model.encoder.conv2):
            conv.weight.mul_(4.0)
    tok.save(model / "tokenizer")
    (root / "audio").mkdir()
    n = int(DURATION * 16000)
    entries = []
    for ident, pattern, (us, ue), (as_, ae), planned in DIALOGUES:
        stereo = np.stack([syllables(16000, us, ue, 220, n), syllables(16000, as_, ae, 330, n)], axis=1)
        wavfile.write(root / "audio" / f"{ident}.wav", 16000, np.round(stereo * 32767).astype(np.int16))
        turns = sorted([DialogueTurn("user", "hello there", us, ue),
                        DialogueTurn("assistant", "hi", as_, ae, planned_end=planned)], key=lambda t: t.start)
        entries.append(DialogueEntry(ident, f"audio/{ident}.wav", f"audio/{ident}.wav", DURATION, tuple(turns),
                                     pattern=pattern, user_channel=0, assistant_channel=1))
    manifest = write_manifest(root / "manifest.jsonl", entries)
    return root, model, manifest


@pytest.mark.timeout(120)
def test_command_writes_table_json_wav_and_png(data, capsys):
    root, model, manifest = data
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    out = root / "out"
    args = parser.parse_args(["turns", "--model", str(model), "--manifest", str(manifest), "--out", str(out),
                              "--device", "cpu"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    table = (out / "turns.md").read_text()
    for text in (printed, table):
        assert "| this model | chunks of 200 ms" in text and "| this model | speech codes of 20 ms" in text
        assert "| OmniFlatten (paper) | tokens | — | 20.6 % | 53.6 % | 66.3 % | 71.7 % | 193 ms |" in text
        assert "| Moshi (paper) |" in text
    # The manifest's own timing scored the same way, worked out by hand: the user ends at
    # 1.2 s (chunk 6), the recorded assistant starts at 1.5 s, in chunk 7 (1.4 s): 200 ms,
    # 1 chunk. It speaks 0.2..1.4 s over the onset at 1.0 s (chunk 5) and is silent from
    # chunk 7 (1.4 s) on: stopped after 400 ms, 2 chunks.
    assert ("| the data's own assistant | chunks of 200 ms (k = 200, 1000, 2000, 5000 ms) | 1 | 0.0 % | 100.0 % "
            "| 100.0 % | 100.0 % | 200 ms | 1 of 1 onsets | 0.0 % | 100.0 % | 100.0 % | 100.0 % | 400 ms |") in table
    report = json.loads((out / "turns.json").read_text())
    assert report["dialogues"] == 2 and report["chunk_seconds"] == pytest.approx(P)
    assert report["turn_taking"]["chunk"]["events"] == 1  # the respond dialogue's user turn
    assert report["interruption"]["onsets"] == 1  # the interrupt dialogue's onset
    t = report["turn_taking"]["chunk"]
    row = next(line for line in printed.splitlines() if line.startswith("| this model | chunks"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "1" and cells[3:7] == [f"{100 * t['acc'][k]:.1f} %" for k in ("1", "5", "10", "25")]
    assert report["example"]["dialogue"] == "d-respond"

    rate, wav = wavfile.read(out / "example.wav")
    assert rate == 16000 and wav.dtype == np.int16 and wav.shape == (int(DURATION * 16000), 2)
    _, source = wavfile.read(root / "audio" / "d-respond.wav")
    assert np.array_equal(wav[:, 0], source[:, 0])  # the caller, bit for bit
    # The model's audio sits on its chunk: energy in the middle of each speaking chunk.
    eval_run = asyncio.run(evaluate(model, manifest, limit=1, device="cpu"))
    speaking = eval_run.runs[0].speaking()
    mid = [np.abs(wav[int((k + 0.25) * 3200):int((k + 0.75) * 3200), 1]).max() for k in range(15)]
    assert all((m > 1000) == bool(s) for m, s in zip(mid, speaking[:15]))

    png = (out / "example.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    w, h = struct.unpack(">II", png[16:24])
    idat = png.index(b"IDAT")
    (size,) = struct.unpack(">I", png[idat - 4:idat])
    assert len(zlib.decompress(png[idat + 4:idat + 4 + size])) == h * (1 + 3 * w) and w > 300 and h > 100


class _Recorder:
    """The agent's VoiceEngine, recording every VoiceChunk its session hands back."""

    def __init__(self, inner):
        self.inner, self.chunks = inner, []

    async def open_session(self, voice=None):
        session = await self.inner.open_session(voice)
        submit = session.submit_audio

        def recorded(pcm):
            fut = submit(pcm)
            fut.add_done_callback(lambda f: f.cancelled() or f.exception() or self.chunks.extend(f.result()))
            return fut

        session.submit_audio = recorded
        return session

    def __getattr__(self, name):
        return getattr(self.inner, name)


class _Sink:
    depth_ms = 0.0

    def play(self, pcm, rate):
        pass

    def flush(self):
        return 0.0


@pytest.mark.timeout(120)
def test_eval_codes_equal_an_agent_sessions(data):
    """The eval's codes for a dialogue are the codes the agent's session gets for the same
    caller audio, frame by frame (its alignment, lead and chunking)."""
    from prometheus_client import CollectorRegistry

    from agent.agents import OmniFlattenAgent
    from agent.call import CallInfo
    from agent.metrics import AgentMetrics
    from agent.store import Transport
    from model.checkpoint import load_model
    from model.engine import Engine
    from model.voice import LocalVoiceEngine

    root, model, manifest = data
    mine = asyncio.run(evaluate(model, manifest, limit=1, device="cpu")).runs[0]
    n = len(mine.speech)
    _, source = wavfile.read(root / "audio" / "d-respond.wav")
    caller = np.zeros(n * 3200, np.int16)
    caller[:len(source)] = source[:, 0]

    async def agent_codes():
        loaded = load_model(model)
        registry = CollectorRegistry()
        voice = _Recorder(LocalVoiceEngine(Engine(loaded.model, 1, registry=registry, warmup=False),
                                           loaded.tokenizer, loaded.decoder))
        await voice.inner.start()
        agent = OmniFlattenAgent(voice, AgentMetrics(registry))

        async def hangup(reason):
            pass

        session = await agent.open(CallInfo("c", Transport.SIP, "sip:a@127.0.0.1"), _Sink(), lambda *a: None, hangup)
        try:
            for k in range(n):
                for f in range(10):  # a chunk's ten 20 ms frames
                    session.feed(caller[(k * 10 + f) * 320:(k * 10 + f + 1) * 320])
                for _ in range(2000):  # wait for its step (bounded: 10 s)
                    if len(voice.chunks) > k:
                        break
                    await asyncio.sleep(0.005)
            assert len(voice.chunks) == n
        finally:
            await session.close()
            await voice.inner.close()
        return voice.chunks

    theirs = asyncio.run(agent_codes())
    speech, text = mine.speech, mine.text  # (not the whole run in a failure's message)
    assert np.array_equal(speech, np.array([c.speech_codes for c in theirs]))
    assert np.array_equal(text, np.array([c.text_ids for c in theirs]))
    assert len(set(speech.reshape(-1).tolist())) > 10  # codes that can tell a shift apart
