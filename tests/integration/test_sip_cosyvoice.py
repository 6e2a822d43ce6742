"""A real SIP call (Debian's baresip) into `duplexline serve --agent omniflatten` with a
model folder whose decoder is CosyVoice (tiny random v2 flow + HiFT, written by
`duplexline model init --tiny DIR --decoder v2`): the serve log says the folder was loaded
and does not fall back to the stand-in tone decoder (it does not name the decoder it took),
the engine steps the call's chunks and the decoder decodes each (its own duration metric),
the decoder's audio (not the stand-in's tones) comes back to the caller at the line's rate,
and it is continuous once the assistant speaks.

A random model speaks at random: nothing here depends on what it says or when. What must
hold whatever it says: each chunk the engine steps becomes a chunk of the decoder's audio
(frames out keep pace with frames in), and the decoded audio reaches the caller. The
continuity bound is loose (no hole over 0.6 s while the assistant's turn lasts): a turn's
audio starts after 280 ms of silence (the held-back overlap and the look-ahead,
docs/decoder.md) and this busy 2-core box adds jitter; a hole of a whole chunk (400 ms) or
more would still fail it. The decoder runs on the engine's tick, after the LLM step: its
share of the tick is printed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.integration.serve_process import REPO, free_port
from tests.integration.sip_peers import BaresipPeer, BridgeProcess, eventually, metric_value, read_wav, tone_sweep_wav

pytestmark = pytest.mark.slow

LINE_RATE = 8000  # PCMU
FRAME = 160  # 20 ms at the line rate
DECODER_METRIC = "duplexline_engine_decoder_duration_seconds"  # one batched decoder pass (per LLM step)
STEP_METRIC = "duplexline_engine_step_duration_seconds"  # one engine tick (tokenizer + LLM + decoder)


@pytest.fixture(scope="module")
def model_dir(workdir):
    out = workdir / "tiny-v2"
    done = subprocess.run([sys.executable, "-m", "bridge.cli", "model", "init", "--tiny", str(out), "--decoder", "v2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CosyVoice v2 decoder" in done.stdout, done.stdout
    assert (out / "decoder" / "decoder.json").is_file() and not (out / "decoder.json").exists()
    # 2 Euler steps instead of 10: the decoder runs on the engine's tick, and admission
    # refuses a call whose projected tick (10 steps: about 300 ms of the 400 ms chunk on a
    # quiet 2-core box) does not fit; a busy CI box must still take the one call.
    meta = json.loads((out / "decoder" / "decoder.json").read_text())
    meta["settings"]["steps"] = 2
    (out / "decoder" / "decoder.json").write_text(json.dumps(meta))
    # A second voice, "anna" (another speaker x-vector), that the calls' route picks.
    with np.load(out / "decoder" / "voice.npz") as z:
        voice = dict(z)
    (out / "decoder" / "voices").mkdir()
    np.savez(out / "decoder" / "voices" / "anna.npz", **{**voice, "embedding": -voice["embedding"]})
    return out


def routes_file(workdir, voice: str):
    path = workdir / f"routes-{voice}.json"
    path.write_text(json.dumps({"routes": [{"match": "*", "name": "all", "settings": {"voice": voice}}]}))
    return path


def test_a_voice_the_decoder_lacks_stops_the_start_naming_it(model_dir, workdir):
    for args, named in ((["--sip-routes", str(routes_file(workdir, "bob"))], "routes[0]"), (["--voice", "bob"], "voice")):
        done = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(model_dir), "--device", "cpu",
                               "--slots", "1", "--sip-listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                               "--http-listen", f"127.0.0.1:{free_port()}", "--rtp-ports", "26000-26999", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, done.stdout + done.stderr
        assert named in done.stderr and "'bob'" in done.stderr and "anna, default" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_call_hears_the_cosyvoice_decoder(model_dir, workdir):
    wav = tone_sweep_wav(workdir / "sweep.wav", LINE_RATE, tail_s=1.5)  # 4.8 s of caller audio
    with BridgeProcess("--model", str(model_dir), "--agent", "omniflatten", "--slots", "1", "--device", "cpu",
                       "--sip-routes", str(routes_file(workdir, "anna")), "--rtp-ports", "26000-26999",
                       workdir=workdir) as bridge:
        log = bridge.log()
        assert f"model loaded from {model_dir}" in log, log
        assert "stand-in" not in log.lower(), log
        before = bridge.metrics()
        with BaresipPeer(workdir, user="caller", wav=wav) as peer:
            peer.dial(f"sip:assistant@127.0.0.1:{bridge.sip_port}")
            call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
            peer.wait_event("CALL_CLOSED", timeout=30)  # its WAV ended
            _, heard_wav = peer.recordings()
        record = eventually(lambda: (r := bridge.get(f"/calls/{call_id}")[1]).get("state") == "ended" and r,
                            timeout=10, what="the call to end")
        after = bridge.metrics()
        log = bridge.log()
    rate, heard = read_wav(heard_wav)
    assert rate == LINE_RATE
    assert "Traceback" not in log and "session failed" not in log, log

    # The decoder ran: the engine stepped the call's chunks, and the call sent its frames.
    def delta(name: str, labels: str = "") -> float:
        return metric_value(after, name, labels) - metric_value(before, name, labels)
    steps = delta("duplexline_engine_batch_size_count")
    codes = delta("duplexline_engine_tokens_generated_total", 'stream="speech"')
    assert steps >= 5 and codes >= 10 * steps, (steps, codes)
    assert record["frames_in"] > 150 and record["frames_out"] >= record["frames_in"] - 10, record
    assert abs(len(heard) / rate - record["frames_out"] * 0.02) < 1.0, (len(heard) / rate, record)

    # What came back is the decoder's: audible, and not the stand-in's tones. Spectral
    # flatness of the audible 20 ms frames (geometric over arithmetic mean of the power
    # spectrum): the stand-in's pure tones measure about 0.0002, this random decoder's
    # noise-like audio about 0.02 (both at 8 kHz, through PCMU).
    frames = heard[: len(heard) // FRAME * FRAME].reshape(-1, FRAME)
    loud = np.sqrt((frames ** 2).mean(axis=1)) > 0.003
    assert loud.mean() > 0.1, f"only {loud.mean():.0%} of 20 ms frames carried audio"
    first = int(np.argmax(loud))
    last = len(loud) - int(np.argmax(loud[::-1]))
    power = np.abs(np.fft.rfft(frames[loud] * np.hanning(FRAME), axis=1)) ** 2 + 1e-12
    flatness = float(np.median(np.exp(np.log(power).mean(axis=1)) / power.mean(axis=1)))
    assert flatness > 0.002, f"spectral flatness {flatness:.4f}: tones, not the decoder's audio"

    # Continuous once the assistant speaks: while it never went back to listening, no hole
    # longer than 0.6 s (the first chunk's held-back 160 ms and this busy box's jitter fit).
    turns = [e["data"].get("assistant") for e in record.get("events", []) if e["kind"] == "turn"]
    assert [e["data"] for e in record.get("events", []) if e["kind"] == "voice"] == [{"name": "anna"}], record
    holes, run = [], 0
    for is_loud in loud[first:last]:
        run = 0 if is_loud else run + 1
        if run == 1:
            holes.append(1)
        elif run:
            holes[-1] = run
    longest = max(holes, default=0) * 0.02
    decoded = delta(f"{DECODER_METRIC}_count")
    tick = delta(f"{STEP_METRIC}_sum") / max(1.0, delta(f"{STEP_METRIC}_count"))
    share = (f"decoder {delta(f'{DECODER_METRIC}_sum') / decoded * 1000:.0f} ms per chunk over {decoded:.0f} "
             f"chunks, of an engine tick of {tick * 1000:.0f} ms" if decoded else f"no {DECODER_METRIC} samples")
    print(f"heard {len(heard) / rate:.2f} s at {rate} Hz: first audio at {first * 0.02:.2f} s, "
          f"{loud[first:last].mean():.0%} of the frames audible after it, holes (20 ms frames) {holes}, "
          f"flatness {flatness:.4f}; turns {turns}; {steps:.0f} engine steps, {codes:.0f} speech codes; "
          f"frames in/out {record['frames_in']}/{record['frames_out']}; {share}")
    if turns == ["speaking"]:
        assert longest <= 0.6 and loud[first:last].mean() > 0.75, (holes, turns)
    # The decoder's share of each chunk is measured: one sample per chunk the engine stepped.
    assert f"{DECODER_METRIC}_count" in after, f"no {DECODER_METRIC} in /metrics"
    assert decoded >= steps - 1, (decoded, steps)
