"""`duplexline data synth`: the dialogues hold the timing they claim, measured on the audio.

Every timing claim of the manifest is checked against the written audio's short-time
energy (10 ms frames; without noise a silent channel is exact zeros, and every clip is
trimmed where it falls 40 dB below its loudest, so 55 dB below the channel's loudest frame
separates speech from silence with room both ways): each channel is silent outside its claimed
segments, speech starts and ends at the claimed edges, and the channels relate as the
pattern says. The SNR is re-measured from the pre-G.711 mix with this file's own
transcription of the documented definition. G.711 itself is tested against the ITU
reference in test_media_g711.py; here the line is checked by its band limit.
espeak-ng is a real dependency (scripts/system-packages.txt): without it these tests fail.
"""

from __future__ import annotations

import argparse
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from bridge import data_render
from bridge.data_dialogues import load_dialogues, parse_dialogue
from bridge.data_errors import DataError
from bridge.data_layout import Timing
from bridge.data_manifest import read_manifest, validate
from bridge.data_render import SynthConfig, synthesize
from bridge.data_speech import require_espeak
from bridge.data_synth import add_arguments, run_synth, synth
from bridge.data_templates import TEMPLATES, template_dialogue

RATE = 16_000
FRAME = RATE // 100  # 10 ms
SILENT_DB = 55.0  # below the channel's loudest frame
TOL = 0.03  # seconds: three frames of slack on a measured edge
CLEAN = SynthConfig(snr=None, backchannel=0.0)  # no noise: silence is silent
TIMING = Timing()


@pytest.fixture(scope="module", autouse=True)
def espeak():
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed: `apt-get install espeak-ng` (scripts/system-packages.txt "
                    "lists it; scripts/setup.sh installs it as root)")


# -- measuring the audio --------------------------------------------------------------------

def active(x: np.ndarray) -> np.ndarray:
    """Per 10 ms frame: within SILENT_DB of the loudest frame."""
    n = len(x) // FRAME
    energy = np.mean(x[: n * FRAME].astype(np.float64).reshape(n, FRAME) ** 2, axis=1)
    return energy > energy.max() * 10 ** (-SILENT_DB / 10)


def frames(t0: float, t1: float) -> slice:
    # 1e-6: a time measured as (frame + 1) / 100 must map back to that frame boundary
    return slice(max(int(np.floor(t0 * 100 + 1e-6)), 0), max(int(np.ceil(t1 * 100 - 1e-6)), 0))


def first_active(act: np.ndarray, t0: float, t1: float) -> float:
    s = frames(t0, t1)
    hits = np.flatnonzero(act[s])
    assert hits.size, f"no speech between {t0:.3f} and {t1:.3f} s"
    return (s.start + hits[0]) / 100


def last_active(act: np.ndarray, t0: float, t1: float) -> float:
    s = frames(t0, t1)
    hits = np.flatnonzero(act[s])
    assert hits.size, f"no speech between {t0:.3f} and {t1:.3f} s"
    return (s.start + hits[-1] + 1) / 100


def segments_of(record: dict, speaker: str) -> list[tuple[float, float]]:
    return [(s["start"], s["end"]) for t in record["turns"] if t["speaker"] == speaker for s in t["segments"]]


def check_claims(act: np.ndarray, segments: list[tuple[float, float]]) -> None:
    """Silent outside the segments; speech starts and ends at each segment's edges."""
    claimed = np.zeros(act.size, bool)
    for s, e in segments:
        claimed[frames(s - TOL, e + TOL)] = True
        assert abs(first_active(act, s - TOL, e) - s) <= TOL, f"speech of segment {s}-{e} starts elsewhere"
        assert abs(last_active(act, s, e + TOL) - e) <= TOL, f"speech of segment {s}-{e} ends elsewhere"
    loud = np.flatnonzero(act & ~claimed)
    assert loud.size == 0, f"speech at {loud[:5] / 100} s where no turn is claimed"


def main_turns(record: dict) -> list[dict]:
    return [t for t in record["turns"] if not t.get("backchannel")]


def synth_checked(index: int, pattern: str, config: SynthConfig = CLEAN):
    """Synthesise, then check the generic claims on both channels of the int16 audio."""
    result = synthesize(index, config, pattern=pattern)
    rec = validate({**result.record, "audio": "x.wav"})
    user, assistant = active(result.stereo[:, 0]), active(result.stereo[:, 1])
    check_claims(user, segments_of(rec, "user"))
    check_claims(assistant, segments_of(rec, "assistant"))
    return rec, user, assistant


# -- the three patterns ---------------------------------------------------------------------

@pytest.mark.parametrize("index", range(3))
def test_respond_assistant_answers_after_the_user(index):
    rec, user, assistant = synth_checked(index, "respond")
    assert rec["pattern"] == "respond"
    assert not (user & assistant).any(), "the channels overlap in a respond dialogue"
    turns = main_turns(rec)
    for prev, nxt in zip(turns, turns[1:]):
        if prev["speaker"] == nxt["speaker"]:
            continue
        mine, theirs = (user, assistant) if prev["speaker"] == "user" else (assistant, user)
        ended = last_active(mine, prev["start"], prev["end"] + TOL)
        began = first_active(theirs, ended, nxt["end"])
        assert TIMING.gap[0] - TOL <= began - ended <= TIMING.gap[1] + TOL, (prev["text"], began - ended)
        assert not theirs[frames(prev["start"], ended)].any()


@pytest.mark.parametrize("index", range(3))
def test_interrupt_both_speak_briefly_then_the_assistant_stops(index):
    rec, user, assistant = synth_checked(index, "interrupt")
    assert rec["pattern"] == "interrupt"
    turns = main_turns(rec)
    cut_turns = [i for i, t in enumerate(turns) if "planned_end" in t]
    assert cut_turns, "an interrupt dialogue with no interrupted turn"
    for i in cut_turns:
        a, u = turns[i], turns[i + 1]
        assert a["speaker"] == "assistant" and u["speaker"] == "user"
        assert a["start"] < u["start"] < a["end"] < a["planned_end"]
        onset = first_active(user, a["start"], a["end"])  # the user's voice, measured
        assert abs(onset - u["start"]) <= TOL
        stopped = last_active(assistant, a["start"], a["end"] + TOL)
        # both talk at once for the cut time, then the assistant is silent until its next turn
        assert TIMING.cut[0] - TOL <= stopped - onset <= TIMING.cut[1] + TOL, stopped - onset
        assert (user & assistant)[frames(onset, stopped)].any(), "no overlap of the two voices"
        assert last_active(user, u["start"], u["end"] + TOL) > stopped, "the user stopped first"
        later = [t["start"] for t in turns[i + 1 :] if t["speaker"] == "assistant"]
        assert not assistant[frames(stopped + TOL, later[0] - TOL if later else len(assistant) / 100)].any()
        # the speech that was cut was real: the uncut turn was at least 0.1 s longer
        assert a["planned_end"] - a["end"] >= 0.1


@pytest.mark.parametrize("index", range(3))
def test_wait_the_user_pauses_and_the_assistant_waits(index):
    rec, user, assistant = synth_checked(index, "wait")
    assert rec["pattern"] == "wait"
    turns = main_turns(rec)
    split = [i for i, t in enumerate(turns) if len(t["segments"]) == 2]
    assert split, "a wait dialogue with no paused user turn"
    for i in split:
        t = turns[i]
        (s1, e1), (s2, e2) = [(s["start"], s["end"]) for s in t["segments"]]
        assert t["speaker"] == "user" and TIMING.pause[0] - 1e-3 <= s2 - e1 <= TIMING.pause[1] + 1e-3
        paused_at = last_active(user, s1, e1 + TOL)
        resumed = first_active(user, paused_at, e2)
        assert abs((resumed - paused_at) - (s2 - e1)) <= 2 * TOL, (resumed - paused_at, s2 - e1)
        ended = last_active(user, s2, e2 + TOL)
        answer = next((n for n in turns[i + 1 :] if n["speaker"] == "assistant"), None)
        until = answer["end"] if answer else len(assistant) / 100
        assert not assistant[frames(s1, ended)].any(), "the assistant spoke during the user's pause"
        if answer:
            assert first_active(assistant, ended, until) - ended >= TIMING.gap[0] - TOL


def test_backchannels_sit_inside_the_other_speakers_turn():
    config = SynthConfig(snr=None, backchannel=1.0)
    seen = 0
    for index in range(3):
        rec, user, assistant = synth_checked(index, "respond", config)
        for b in (t for t in rec["turns"] if t.get("backchannel")):
            seen += 1
            host = [s for t in main_turns(rec) if t["speaker"] != b["speaker"] for s in t["segments"]]
            assert any(s["start"] + 0.3 <= b["start"] and b["end"] + 0.3 <= s["end"] for s in host)
            own = [(s, e) for s, e in segments_of(rec, b["speaker"]) if (s, e) != (b["start"], b["end"])]
            assert all(b["end"] + 0.3 <= s or b["start"] - 0.3 >= e for s, e in own)
    assert seen, "backchannel=1.0 placed no backchannel in three dialogues"


# -- noise and the line ---------------------------------------------------------------------

def snr_reference(clean: np.ndarray, noise: np.ndarray) -> float:
    """The documented definition, transcribed: 20 ms frames within 30 dB of the loudest."""
    n = len(clean) // 320
    energy = np.array([np.mean(clean[i * 320 : (i + 1) * 320].astype(np.float64) ** 2) for i in range(n)])
    keep = energy > energy.max() / 1000
    s = sum(np.sum(clean[i * 320 : (i + 1) * 320].astype(np.float64) ** 2) for i in np.flatnonzero(keep))
    v = sum(np.sum(noise[i * 320 : (i + 1) * 320].astype(np.float64) ** 2) for i in np.flatnonzero(keep))
    return 10 * np.log10(s / v)


@pytest.mark.parametrize("index", range(3))
def test_snr_is_as_claimed(index):
    result = synthesize(index, SynthConfig(backchannel=0.0))
    claimed = result.record["snr_db"]
    assert 15 <= claimed <= 30 and result.record["noise"] in ("white", "pink")
    measured = snr_reference(result.user_clean, result.user_noisy - result.user_clean)
    assert abs(measured - claimed) <= 1.0, (measured, claimed)


def band_share_above(x: np.ndarray, hz: float) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    return float(spectrum[f > hz].sum() / spectrum.sum())


def test_caller_channel_is_a_phone_line():
    """Band-limited below 4 kHz by the 8 kHz line; the assistant's channel and a run
    without the line are not, so the check can tell."""
    lined = synthesize(0, SynthConfig(snr=None, law="ulaw"))
    wide = synthesize(0, SynthConfig(snr=None, law=None))
    alaw = synthesize(0, SynthConfig(snr=None, law="alaw"))
    assert band_share_above(lined.stereo[:, 0], 4600) < 1e-6
    assert band_share_above(wide.stereo[:, 0], 4600) > 1e-4
    assert band_share_above(lined.stereo[:, 1], 4600) > 1e-4
    assert not np.array_equal(lined.stereo[:, 0], alaw.stereo[:, 0]), "--law does not reach the line"
    # the line keeps the level and timing: it tracks the uncompressed channel closely
    a, b = lined.stereo[:, 0].astype(np.float64), wide.stereo[:, 0].astype(np.float64)
    low = np.fft.irfft(np.fft.rfft(b) * (np.fft.rfftfreq(len(b), 1 / RATE) < 3300), len(b))
    assert np.sum((a - low) ** 2) < 0.05 * np.sum(low**2)


# -- files: manifest, resume, the command -----------------------------------------------------

def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)


def test_manifest_round_trip_and_corrupt_lines(tmp_path):
    written, skipped = run_synth(tmp_path, 3, CLEAN, progress=False, jobs=2)
    assert (written, skipped) == (3, 0)
    manifest = tmp_path / "manifest.jsonl"
    records = read_manifest(manifest)
    assert [r["id"] for r in records] == ["s0-000000", "s0-000001", "s0-000002"]
    for i, r in enumerate(records):
        expected = synthesize(i, CLEAN)
        assert r == {**expected.record, "audio": f"audio/{r['id']}.wav"}
        audio = read_wav(tmp_path / r["audio"])
        assert np.array_equal(audio, expected.stereo)
        assert abs(len(audio) / RATE - r["duration"]) < 1e-3
    lines = manifest.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["turns"][0]["end"] = bad["turns"][0]["start"] - 0.1
    manifest.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"manifest\.jsonl:2: turns\[0\]: needs 0 <= start < end"):
        read_manifest(manifest)
    manifest.write_text("\n".join([lines[0], lines[1][:-7], lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"manifest\.jsonl:2: not valid JSON"):
        read_manifest(manifest)
    del bad["version"]
    with pytest.raises(ValueError, match="version"):
        validate(bad)


def test_resume_skips_finished_dialogues_and_matches_an_unbroken_run(tmp_path, monkeypatch):
    calls = []
    real = data_render.synthesize
    monkeypatch.setattr(data_render, "synthesize", lambda i, *a: calls.append(i) or real(i, *a))
    resumed, unbroken = tmp_path / "resumed", tmp_path / "unbroken"
    run_synth(resumed, 2, CLEAN, progress=False)
    with open(resumed / "manifest.jsonl", "a") as f:
        f.write('{"version": 1, "id": "s0-0000')  # a run killed mid-line
    calls.clear()
    assert run_synth(resumed, 3, CLEAN, progress=False) == (1, 2)
    assert calls == [2]
    run_synth(unbroken, 3, CLEAN, progress=False)
    assert (resumed / "manifest.jsonl").read_bytes() == (unbroken / "manifest.jsonl").read_bytes()
    with pytest.raises(DataError, match="other settings.*law"):
        run_synth(resumed, 3, SynthConfig(snr=None, backchannel=0.0, law="alaw"), progress=False)


# -- text dialogues -------------------------------------------------------------------------

def test_templates_are_valid_and_varied():
    assert len(TEMPLATES) >= 30
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        d = template_dialogue(rng)
        parse_dialogue({"turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]}, d.source)
        assert "{" not in "".join(t.text for t in d.turns)
        seen.add(tuple(t.text for t in d.turns))
    assert len(seen) > 150


def test_dialogue_file_errors_name_the_line(tmp_path):
    good = {"turns": [{"speaker": "user", "text": "Hi there, is it raining?"},
                      {"speaker": "assistant", "text": "No, it is sunny today."}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    assert [d.source for d in load_dialogues(path)] == [f"{path}:1", f"{path}:3"]
    cases = [
        ('{"turns": [', "not valid JSON"),
        (json.dumps({"turns": [{"speaker": "caller", "text": "hi"}]}), "turn 0: speaker 'caller'"),
        (json.dumps({"turns": [{"speaker": "user", "text": "hi"}]}), "one user and one assistant"),
        (json.dumps({"turns": [{"speaker": "user", "text": " "}, good["turns"][1]]}), "non-empty"),
        (json.dumps({"dialog": []}), "unknown key"),
    ]
    for line, why in cases:
        path.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(DataError, match=f"d.jsonl:2: .*{why}"):
            load_dialogues(path)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_command_with_a_dialogue_file(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    turns = [{"speaker": "user", "text": "Hello, can you tell me the time of the last bus tonight?"},
             {"speaker": "assistant", "text": "The last bus tonight leaves the main square at eleven forty."}]
    path.write_text(json.dumps({"turns": turns}) + "\n" + json.dumps({"turns": turns[::-1]}) + "\n")
    out = tmp_path / "out"
    args = parse(["--out", str(out), "--dialogues", str(path), "--patterns", "wait=1", "--law", "alaw",
                  "--snr", "off", "--jobs", "1", "--pause", "0.9,0.9", "--gap", "0.3,0.3"])
    assert synth(args) == 0
    records = read_manifest(out / "manifest.jsonl")
    user, assistant = records[0]["turns"][:2]
    (_, first_end), (second_start, _) = [(g["start"], g["end"]) for g in user["segments"]]
    assert second_start - first_end == pytest.approx(0.9, abs=1e-3)  # --pause reached the layout
    assert assistant["start"] - user["end"] == pytest.approx(0.3, abs=1e-3)  # and --gap
    assert [r["source"] for r in records] == [f"{path}:1", f"{path}:2"]
    assert records[0]["pattern"] == "wait" and records[0]["line"] == "alaw" and records[0]["snr_db"] is None
    assert "wrote 2 dialogues" in capsys.readouterr().out
    path.write_text(json.dumps({"turns": turns[:1]}) + "\n")
    assert synth(parse(["--out", str(tmp_path / "o2"), "--dialogues", str(path)])) == 2
    assert f"{path}:1" in capsys.readouterr().err


def test_command_defaults_are_the_config_defaults():
    args, config = parse(["--out", "x"]), SynthConfig()
    assert (args.patterns, args.snr, args.noise, args.law, args.backchannel) == (
        config.patterns, config.snr, config.noises, config.law, config.backchannel)
    assert (args.gap, args.pause, args.cut) == (config.timing.gap, config.timing.pause, config.timing.cut)


def test_bad_options_are_refused():
    for argv in (["--patterns", "respond=1,shout=2"], ["--patterns", "wait=0"], ["--snr", "30"],
                 ["--backchannel", "2"], ["--law", "g722"], ["--count", "0"], ["--gap", "0.8,0.2"],
                 ["--pause", "1"], ["--cut", "-1,0.5"]):
        with pytest.raises(SystemExit):
            parse(["--out", "x", *argv])
    assert parse(["--out", "x", "--patterns", "interrupt=2,respond=1"]).patterns == (("respond", 1.0),
                                                                                     ("interrupt", 2.0))


def test_missing_espeak_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install espeak-ng"):
        require_espeak()
    assert synth(parse(["--out", str(tmp_path / "o")])) == 2
    assert "espeak-ng is not installed" in capsys.readouterr().err
