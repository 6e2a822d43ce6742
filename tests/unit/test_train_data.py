"""Training data (model/train): manifest, shards of codes, the paper's samples per stage."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from model.checkpoint import build_model, tiny_config
from model.config import TWO_STREAM
from model.engine import Engine
from model.flatten import unflatten
from model.s3_tokenizer import S3Tokenizer, tiny_config_for
from model.train.manifest import (DialogueEntry, DialogueTurn, ManifestError, PairEntry, read_manifest,
                                  write_manifest)
from model.train.samples import TrainDataset, collate, full_duplex_samples, half_duplex_samples
from model.train.shards import DialogueCodes, PairCodes, ShardError, TurnCodes, build_shards, read_shards
from model.train.text import ByteTextTokenizer, JsonTextTokenizer
from model.vocab import Vocabulary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SR = 16000
CONFIG = tiny_config()  # three-stream 10 + 2 + 10 at 50 Hz: a chunk is 0.2 s
VOCAB = Vocabulary(CONFIG.text_size, CONFIG.speech_codebook_size)


@pytest.fixture(scope="module")
def tokenizer():
    return S3Tokenizer.random(tiny_config_for(CONFIG.speech_token_rate, CONFIG.speech_codebook_size), seed=3)


class CountingTokenizer:
    """The tokenizer, counting the calls that do tokenizer work; `fail_at`: raise on that
    call (an interrupted run)."""

    def __init__(self, inner, fail_at: int | None = None) -> None:
        self._inner, self.calls, self._fail_at = inner, 0, fail_at

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self._fail_at:
            raise KeyboardInterrupt("interrupted")

    def encode(self, pcm):
        self._count()
        return self._inner.encode(pcm)

    def new_stream(self):
        self._count()
        return self._inner.new_stream()

    def push_many(self, streams, pcms):
        self._count()
        return self._inner.push_many(streams, pcms)


def _speech(duration: float, spans: list[tuple[float, float]], freq: float, seed: int) -> np.ndarray:
    """Tone-and-noise bursts ("speech") in `spans`, near-silence elsewhere."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(duration * SR)) / SR
    pcm = 0.001 * rng.standard_normal(len(t))
    for a, b in spans:
        on = (t >= a) & (t < b)
        pcm[on] += 0.3 * np.sin(2 * np.pi * freq * (1 + 0.3 * np.sin(7 * t[on])) * t[on]) + 0.05 * rng.standard_normal(on.sum())
    return pcm.astype(np.float32)


def _wav(path, pcm: np.ndarray, rate: int = SR) -> str:
    wavfile.write(path, rate, (np.clip(pcm, -1, 1) * 32767).astype(np.int16))
    return path.name


def _dialogue(folder, name: str, duration: float, user: list, assistant: list, seed: int = 0) -> DialogueEntry:
    """`user`/`assistant`: [(start, end, text)]."""
    u = _wav(folder / f"{name}.user.wav", _speech(duration, [(a, b) for a, b, _ in user], 220, seed))
    a = _wav(folder / f"{name}.assistant.wav", _speech(duration, [(a, b) for a, b, _ in assistant], 330, seed + 1))
    turns = [DialogueTurn("user", x, s, e) for s, e, x in user] + [DialogueTurn("assistant", x, s, e)
                                                                   for s, e, x in assistant]
    return DialogueEntry(name, u, a, duration, tuple(sorted(turns, key=lambda t: t.start)), pattern="respond")


def _stereo(folder, entry: DialogueEntry) -> DialogueEntry:
    """The same dialogue as one stereo file, assistant left, as a synth might write it."""
    user, assistant = (wavfile.read(folder / p)[1] for p in (entry.user_audio, entry.assistant_audio))
    wavfile.write(folder / f"{entry.id}.wav", SR, np.stack([assistant, user], axis=1))
    return dataclasses.replace(entry, user_audio=f"{entry.id}.wav", assistant_audio=f"{entry.id}.wav",
                               user_channel=1, assistant_channel=0)


def _corpus(folder) -> list:
    return [
        _dialogue(folder, "d0", 1.3, [(0.0, 0.35, "hi")], [(0.4, 0.8, "hello!")], seed=1),
        PairEntry("p0", _wav(folder / "p0.wav", _speech(0.5, [(0.05, 0.45)], 300, 5)), "ok"),
        _stereo(folder, _dialogue(folder, "d1", 1.0, [(0.1, 0.5, "yes"), (0.6, 0.9, "no")], [(0.5, 0.75, "so")],
                                  seed=2)),
    ]


# ------------------------------------------------------------------------------ manifest


def test_manifest_round_trip_keeps_every_field(tmp_path):
    entries = [
        PairEntry("p1", "pairs/p1.wav", "héllo there", 22050, 1.25, {"speaker": "ljs"}),
        DialogueEntry("d1", "a/d1.user.wav", "/abs/d1.assistant.wav", 9.5,
                      (DialogueTurn("user", "what time is it", 0.3, 1.9),
                       DialogueTurn("assistant", "nine o'clock", 2.25, 3.5, {"segments": []}, planned_end=4.0),
                       DialogueTurn("user", "mhm", 3.0, 3.4, backchannel=True)), pattern="interrupt",
                      extra={"snr_db": 21.5}),
        DialogueEntry("d2", "audio/d2.wav", "audio/d2.wav", 2.0, (DialogueTurn("assistant", "hi", 0.5, 1.0),),
                      user_channel=1, assistant_channel=0),
    ]
    path = write_manifest(tmp_path / "m.jsonl", entries)
    assert read_manifest(path) == entries
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["version"] for x in lines] == [1, 1, 1] and lines[0]["kind"] == "pair"
    assert lines[1]["turns"][1]["planned_end"] == 4.0 and lines[1]["turns"][2]["backchannel"] is True
    assert lines[1]["snr_db"] == 21.5 and lines[1]["turns"][1]["segments"] == []
    assert lines[2]["audio"] == "audio/d2.wav" and lines[2]["channels"] == {"user": 1, "assistant": 0}


def test_manifest_reads_the_synth_line_format(tmp_path):
    """A line as `duplexline data synth` writes it (checked by the synth's own validator)."""
    from bridge.data_manifest import validate

    line = {"version": 1, "id": "s0-000001", "channels": {"user": 0, "assistant": 1}, "sample_rate": 16000,
            "duration": 6.5, "pattern": "interrupt", "snr_db": 20.1, "noise": "white", "line": "ulaw",
            "source": "template:x", "voices": {"user": "en-us", "assistant": "en-gb"},
            "turns": [{"speaker": "assistant", "text": "How can I help?", "start": 0.4, "end": 1.5,
                       "segments": [{"start": 0.4, "end": 1.5, "text": "How can I help?"}], "planned_end": 2.0},
                      {"speaker": "user", "text": "A refund.", "start": 1.2, "end": 2.4,
                       "segments": [{"start": 1.2, "end": 2.4, "text": "A refund."}]},
                      {"speaker": "assistant", "text": "mhm", "start": 1.8, "end": 2.1,
                       "segments": [{"start": 1.8, "end": 2.1, "text": "mhm"}], "backchannel": True}],
            "audio": "audio/s0-000001.wav"}
    validate(line)
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(line) + "\n")
    (entry,) = read_manifest(path)
    assert (entry.user_audio, entry.user_channel, entry.assistant_channel) == ("audio/s0-000001.wav", 0, 1)
    assert [t.interrupted for t in entry.turns] == [True, False, False] and entry.turns[2].backchannel
    assert entry.extra["voices"] == line["voices"]
    assert entry.to_json() == line  # written back, the synth's reader still takes it
    validate(entry.to_json())


GOOD = {"version": 1, "id": "d", "user_audio": "u.wav", "assistant_audio": "a.wav", "sample_rate": 16000,
        "duration": 3.0, "turns": [{"speaker": "user", "text": "a", "start": 0.0, "end": 1.0}]}


@pytest.mark.parametrize("bad, why", [
    ('{"version": 1, "id": "x", "audio": "a.wav", "text": "t"', "not valid JSON"),
    (json.dumps({**GOOD, "version": 2}), "'version' 2 is not supported"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "version"}), "missing 'version'"),
    (json.dumps({**GOOD, "sample_rate": 8000}), "'sample_rate' must be 16000"),
    (json.dumps({**GOOD, "turns": [{"speaker": "user", "text": "a", "start": 2.0, "end": 3.5}]}),
     "turns[0]: needs 0 <= start < end <= duration"),
    (json.dumps({**GOOD, "turns": [{"speaker": "caller", "text": "a", "start": 0, "end": 1}]}), "'speaker'"),
    (json.dumps({**GOOD, "turns": [{"speaker": "user", "text": "a", "start": 0, "end": 1},
                                   {"speaker": "user", "text": "b", "start": 0.5, "end": 2}]}), "overlap"),
    (json.dumps({**GOOD, "id": "p0"}), "id 'p0' already used on line 1"),
    (json.dumps({**GOOD, "duration": "3"}), "'duration' must be a number"),
    (json.dumps({**GOOD, "turns": [{"speaker": "user", "text": "a", "start": 0, "end": 1, "planned_end": 2}]}),
     "'planned_end' belongs to an interrupted assistant turn"),
    (json.dumps({**{k: v for k, v in GOOD.items() if not k.endswith("_audio")}, "audio": "d.wav",
                 "channels": {"user": 0, "assistant": 0}}), "each its own column"),
])
def test_a_corrupt_line_is_refused_by_its_number(tmp_path, bad, why):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join([json.dumps({"version": 1, "kind": "pair", "id": "p0", "audio": "p.wav", "text": "t"}),
                               json.dumps({**GOOD, "id": "d0"}), bad, json.dumps({**GOOD, "id": "d9"})]) + "\n")
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert err.value.line == 3 and f"{path}:3: " in str(err.value) and why in str(err.value)


# ------------------------------------------------------------------------------ shards


def test_shards_resume_skipping_finished_work_and_redoing_an_interrupted_shard(tmp_path, tokenizer):
    manifest = write_manifest(tmp_path / "m.jsonl", _corpus(tmp_path))
    out = tmp_path / "shards"
    # Interrupted during the second shard (shard_size 2: d0+p0, then d1).
    first = CountingTokenizer(tokenizer, fail_at=13)  # shard 0 took 1 + 1 + 1 + 7 calls
    with pytest.raises(KeyboardInterrupt):
        build_shards(manifest, out, CONFIG, first, shard_size=2, progress=False)
    with pytest.raises(ShardError, match="2 of 3 entries"):
        list(read_shards(out))
    # The rerun does only the second shard: d1's assistant encode and its user stream
    # (one new_stream, one push_many per chunk: 5 chunks and no more).
    second = CountingTokenizer(tokenizer)
    build_shards(manifest, out, CONFIG, second, shard_size=2, progress=False)
    assert second.calls == 1 + 1 + 5
    third = CountingTokenizer(tokenizer)
    index = build_shards(manifest, out, CONFIG, third, shard_size=2, progress=False)
    assert third.calls == 0 and index["entries"] == 3 and len(index["shards"]) == 2
    records = list(read_shards(out))
    assert [r.id for r in records] == ["d0", "p0", "d1"]
    # Another tokenizer's codes are never mixed in.
    other = S3Tokenizer.random(tiny_config_for(50, CONFIG.speech_codebook_size), seed=4)
    with pytest.raises(ShardError, match="another tokenizer"):
        build_shards(manifest, out, CONFIG, other, shard_size=2, progress=False)


def _channel(path, column) -> np.ndarray:
    data = wavfile.read(path)[1]
    return (data if column is None else data[:, column]).astype(np.float32) / 32768.0


def _engine_push_schedule(tok, pcm: np.ndarray, chunk: int) -> np.ndarray:
    """What a call's stream hears (agent/agents.py): the first chunk led by the engine's
    `lead_frames` of silence, then one chunk period per push; a fresh stream, no batching."""
    frames = Engine.lead_frames(SimpleNamespace(_tokenizer=SimpleNamespace(tokenizer=tok)), 0.02)
    n = -(-len(pcm) // chunk)
    pcm = np.concatenate([pcm, np.zeros(n * chunk - len(pcm), np.float32)])
    stream = tok.new_stream()
    codes = [stream.push(np.concatenate([np.zeros(frames * 320, np.float32), pcm[:chunk]]))]
    codes += [stream.push(pcm[k * chunk:(k + 1) * chunk]) for k in range(1, n)]
    return np.concatenate(codes)


def test_user_channel_codes_are_the_live_streams_and_the_assistant_is_encoded_whole(tmp_path, tokenizer):
    assert tokenizer.lookahead_samples == 320  # one 20 ms frame: the lead matters below
    entries = _corpus(tmp_path)
    manifest = write_manifest(tmp_path / "m.jsonl", entries)
    build_shards(manifest, tmp_path / "s", CONFIG, tokenizer, progress=False)
    chunk = round(CONFIG.chunk_seconds * SR)
    for record, entry in zip(read_shards(tmp_path / "s"), entries):
        if isinstance(entry, PairEntry):
            speech = wavfile.read(tmp_path / entry.audio)[1] / 32768.0
            assert record.speech.tolist() == tokenizer.encode(speech.astype(np.float32)).tolist()
            assert bytes(record.text.tolist()) == entry.text.encode()
            continue
        user = _channel(tmp_path / entry.user_audio, entry.user_channel)
        live = _engine_push_schedule(tokenizer, user, chunk)
        assert len(record.user) == len(live) == 10 * -(-len(user) // chunk)
        assert record.user.tolist() == live.tolist()
        # Without the lead the codes differ: the comparison can fail.
        unled = tokenizer.new_stream()
        plain = np.concatenate([unled.push(user[k:k + chunk]) for k in range(0, len(user), chunk)])
        assert plain[:len(live) - 10].tolist() != live[:len(live) - 10].tolist()
        assistant = _channel(tmp_path / entry.assistant_audio, entry.assistant_channel)
        padded = np.pad(assistant, (0, len(record.user) * 320 - len(assistant)))
        assert record.assistant.tolist() == tokenizer.encode(padded).tolist()
        assert [bytes(t.text.tolist()).decode() for t in record.turns] == [t.text for t in entry.turns]


# ------------------------------------------------------------------------------ samples

# A hand-made dialogue: chunks of 2 user + 1 text + 2 speech tokens at 50 Hz (40 ms), 4
# chunks; user codes 1..8, assistant codes 11..18; the stream lags by one code (lead 320).
SMALL = tiny_config(user_chunk=2, text_chunk=1, speech_chunk=2, context_length=64)
SMALL2 = tiny_config(mode=TWO_STREAM, user_chunk=2, speech_chunk=2, context_length=64)
HAND = DialogueCodes("hand", 0.16, np.arange(1, 9), np.arange(11, 19),
                     (TurnCodes("user", 0.0, 0.06, np.array([97])),
                      TurnCodes("assistant", 0.08, 0.14, np.array([98, 99, 100]))), 50, 320)


def _u(code: int) -> int:
    return VOCAB.speech_id(code)


SOS, EOS, SOT, EOT, ASR, TTS = (VOCAB.special(n) for n in ("[SOS]", "[EOS]", "[SOT]", "[EOT]", "[ASR]", "[TTS]"))
ST, SS = VOCAB.silent_text, VOCAB.silent_speech


def _sample(dataset, i):
    item = dataset[i]
    assert item["input_ids"].dtype == torch.long and item["loss_mask"].dtype == torch.bool
    return item["input_ids"].tolist(), item["loss_mask"].tolist()


def test_stage_3_three_stream_token_by_token():
    data = TrainDataset([HAND], SMALL, 3)
    ids, mask = _sample(data, 0)
    F, T = False, True
    assert ids == [_u(1), _u(2), ST, SS, SS,
                   _u(3), _u(4), ST, SS, SS,
                   _u(5), _u(6), 98, _u(15), _u(16),  # assistant speaks 0.08-0.14 s: codes 4..6
                   _u(7), _u(8), 99, _u(17), SS]
    assert mask == [F, F, T, T, T] * 4
    assert data.text_cut == 1  # "d" did not fit the two chunks the turn speaks in


def test_stage_3_two_stream_token_by_token():
    ids, mask = _sample(TrainDataset([HAND], SMALL2, 3), 0)
    assert ids == [_u(1), _u(2), SS, SS, _u(3), _u(4), SS, SS, _u(5), _u(6), _u(15), _u(16), _u(7), _u(8), _u(17), SS]
    assert mask == [False, False, True, True] * 4


def test_stage_2_half_duplex_token_by_token():
    ids, mask = _sample(TrainDataset([HAND], SMALL, 2), 0)
    # The user's 0-60 ms are stream indices 1..3 (the stream lags one code: codes 2, 3, 4);
    # the assistant's 80-140 ms are its indices 4..6 (codes 15, 16, 17).
    assert ids == [SOS, _u(2), _u(3), _u(4), EOS, SOT, 97, EOT,
                   SOT, 98, 99, 100, EOT, SOS, _u(15), _u(16), _u(17), EOS]
    assert mask == [False] * 8 + [True] * 10


def test_stage_1_asr_and_tts_token_by_token():
    data = TrainDataset([PairCodes("p", np.array([5, 6]), np.array([104, 105])), HAND], SMALL, 1)
    assert len(data) == 2 + 4  # the pair, then each dialogue turn, as ASR and TTS
    ids, mask = _sample(data, 0)
    assert ids == [ASR, SOS, _u(5), _u(6), EOS, SOT, 104, 105, EOT] and mask == [False] * 6 + [True] * 3
    ids, mask = _sample(data, 1)
    assert ids == [TTS, SOT, 104, 105, EOT, SOS, _u(5), _u(6), EOS] and mask == [False] * 6 + [True] * 3
    ids, _ = _sample(data, 4)
    assert ids == [ASR, SOS, _u(15), _u(16), _u(17), EOS, SOT, 98, 99, 100, EOT]
    assert len(TrainDataset([HAND], SMALL, 1, turn_pairs=False)) == 0


def test_backchannels_and_interrupted_turns():
    d = DialogueCodes("bc", 0.16, np.arange(1, 9), np.arange(11, 19),
                      (TurnCodes("user", 0.0, 0.04, np.array([97])),
                       TurnCodes("assistant", 0.04, 0.12, np.array([98]), interrupted=True),
                       TurnCodes("user", 0.08, 0.1, np.array([109]), backchannel=True)), 50, 320)
    ids, _ = _sample(TrainDataset([d], SMALL, 2), 0)
    assert 98 in ids and 109 not in ids and ids.count(SOS) == 2  # half duplex: no overlap, no backchannel
    pairs = TrainDataset([d], SMALL, 1)
    texts = [[x for x in pairs[i]["input_ids"].tolist() if x < 256] for i in range(len(pairs))]
    assert texts == [[97], [97], [109], [109]]  # an interrupted turn's text outruns its speech: no pair
    ids, _ = _sample(TrainDataset([d], SMALL, 3), 0)
    assert [c.text for c in unflatten(ids, SMALL.layout)] == [(ST,), (98,), (ST,), (ST,)]


def test_long_dialogues_split_into_whole_chunks_and_whole_turns():
    long = DialogueCodes("long", 0.8, np.arange(40) % 30, np.arange(40) % 30,
                         tuple(TurnCodes(sp, 0.1 * i, 0.1 * i + 0.08, np.array([65 + i]))
                               for i, sp in enumerate(["user", "assistant"] * 4)), 50, 320)
    samples, _ = full_duplex_samples(long, SMALL.layout, VOCAB, max_length=23, prefix=[7, 8])
    assert [len(s.ids) for s in samples] == [2 + 20] * 5  # 4 chunks of 5 after the prefix
    whole, _ = full_duplex_samples(long, SMALL.layout, VOCAB, max_length=1000)
    assert sum((s.ids[2:] for s in samples), []) == whole[0].ids
    packed, skipped = half_duplex_samples(long, VOCAB, max_length=30)
    assert skipped == 0 and len(packed) == 3 and all(len(s.ids) <= 30 for s in packed)
    assert sum(s.ids.count(SOS) for s in packed) == 8


def test_assistant_speaking_in_chunks_2_and_3_is_silent_elsewhere(tmp_path, tokenizer):
    entry = _dialogue(tmp_path, "d", 1.2, [(0.0, 0.35, "hi")], [(0.4, 0.8, "hey")], seed=7)
    manifest = write_manifest(tmp_path / "m.jsonl", [entry])
    build_shards(manifest, tmp_path / "s", CONFIG, tokenizer, progress=False)
    (record,) = read_shards(tmp_path / "s")
    data = TrainDataset(tmp_path / "s", CONFIG, 3)
    ids, mask = _sample(data, 0)
    chunks = unflatten(ids, CONFIG.layout)
    assert len(chunks) == 6
    for k, c in enumerate(chunks):
        if k in (2, 3):
            assert list(c.speech) == [_u(int(x)) for x in record.assistant[10 * k:10 * k + 10]]
            assert SS not in c.speech
        else:
            assert set(c.speech) == {SS} and set(c.text) == {ST}
        assert list(c.user) == [_u(int(x)) for x in record.user[10 * k:10 * k + 10]]
    assert list(chunks[2].text + chunks[3].text) == list(b"hey") + [ST]
    assert mask == ([False] * 10 + [True] * 12) * 6


def test_collate_pads_and_the_batch_trains_the_tiny_model(tokenizer, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", _corpus(tmp_path))
    build_shards(manifest, tmp_path / "s", CONFIG, tokenizer, progress=False)
    for stage in (1, 2, 3):
        data = TrainDataset(tmp_path / "s", CONFIG, stage)
        assert len(data) > 1
        batch = collate([data[i] for i in range(len(data))], pad_id=VOCAB.silent_text)
        lengths = data.lengths
        for row, n in enumerate(lengths):
            assert batch["input_ids"][row, n:].eq(VOCAB.silent_text).all()
            assert not batch["loss_mask"][row, n:].any() and batch["attention_mask"][row, :n].all()
            assert not batch["attention_mask"][row, n:].any()
            assert batch["loss_mask"][row].tolist()[:n] == data[row]["loss_mask"].tolist()
    model = build_model(CONFIG).backbone
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
    target = batch["loss_mask"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][target], batch["input_ids"][:, 1:][target])
    assert torch.isfinite(loss) and logits.shape[-1] == VOCAB.size


def test_text_tokenizers(tmp_path):
    assert ByteTextTokenizer(256).encode("hé") == [104, 195, 169]
    with pytest.raises(ValueError, match="at least 256"):
        ByteTextTokenizer(100)
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"hello": 0, "world": 1, "[UNK]": 300}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = JsonTextTokenizer(tmp_path / "tokenizer.json", 256)
    assert text.encode("hello world") == [0, 1] and text.name.startswith("tokenizer.json/")
    with pytest.raises(ValueError, match="outside the model's text vocabulary"):
        text.encode("hello there")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the synth speaks with Debian's espeak-ng")
def test_the_synths_own_output_makes_every_stage(tmp_path, tokenizer):
    from bridge.data_render import SynthConfig
    from bridge.data_synth import run_synth

    run_synth(tmp_path, 2, SynthConfig(seed=5, backchannel=1.0), progress=False)
    manifest = tmp_path / "manifest.jsonl"
    entries = read_manifest(manifest)
    build_shards(manifest, tmp_path / "s", CONFIG, tokenizer, progress=False)
    records = list(read_shards(tmp_path / "s"))
    assert [r.id for r in records] == [e.id for e in entries]
    for stage in (1, 2, 3):
        assert len(TrainDataset(tmp_path / "s", CONFIG, stage)) > 0
    for record in records:
        data = TrainDataset([record], CONFIG, 3)
        chunks = [c for i in range(len(data)) for c in unflatten(data[i]["input_ids"].tolist(), CONFIG.layout)]
        speech = [x for c in chunks for x in c.speech]
        # Speech exactly inside the assistant's turns, to the code (20 ms at 50 Hz).
        spans = [record.assistant_span(t.start, t.end) for t in record.turns if t.speaker == "assistant"]
        inside = np.zeros(len(speech), bool)
        for a, b in spans:
            inside[a:b] = True
        assert [x != SS for x in speech] == inside.tolist()
