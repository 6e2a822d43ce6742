"""The streaming CosyVoice decoder (model/cosyvoice_decoder.py) on tiny random v1 and v2
builds: what each push returns, no click at chunk edges, the streamed audio against the
flow and HiFT modules called directly, determinism, and its files (save/load, corrupt
files refused by name, a decoder that disagrees with the model's config.json refused).

Random weights make noise-like audio: a click does not stand out of it by eye or by its
sample-to-sample jumps. So the seam is measured against a seamless reference instead: with
HiFT's noise switched off, HiFT run once over the whole utterance's mel has no chunk edge
at all; the streamed audio's departure from it, in a short window around each chunk edge,
relative to the audio there, is the seam. The cross-fade keeps it at the level of the
cross-fade's own gain ripple (np.hamming halves sum to 1.0..1.08, as upstream's); without
the cross-fade (overlap_frames=0) the edges show HiFT's zero-padded borders: the measure
fails, which the last test of that block shows.

"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from model.checkpoint import load_model, write_tiny_model
from model.cosyvoice_decoder import CosyVoiceDecoder, DecoderSettings, Voice, tiny_flow_config, tiny_hift_config
from model.cosyvoice_flow import CosyVoiceFlow
from model.cosyvoice_hift import HiFTGenerator
from model.errors import CheckpointError

FAMILIES = ("v1", "v2")
CHUNK = 10  # codes per push: one model chunk
FAST = DecoderSettings(steps=2)  # fewer Euler steps where the test is not about the solver


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chunks(decoder: CosyVoiceDecoder, n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, decoder.codebook_size, CHUNK).astype(np.int64) for _ in range(n)]


def hop(decoder: CosyVoiceDecoder) -> int:
    return decoder.hift.config.samples_per_frame


def with_prompt(decoder: CosyVoiceDecoder, codes: int = 6, seed: int = 7) -> CosyVoiceDecoder:
    """The decoder's voice given a prompt: `codes` codes and their mel (random, log-mel-ish)."""
    rng = np.random.default_rng(seed)
    frames = decoder.mel_frames(codes)
    decoder.voice = Voice(decoder.voice.embedding, rng.integers(0, decoder.codebook_size, codes).astype(np.int64),
                          (rng.standard_normal((frames, 80)) - 5.0).astype(np.float32))
    return decoder


def hamming_fade(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Upstream's cross-fade: the new chunk's head fades in over the previous one's tail."""
    n = len(old)
    window = np.hamming(2 * n).astype(np.float32)
    return new[:n] * window[:n] + old * window[n:]


# --------------------------------------------------------------------------- what a push returns


@pytest.mark.parametrize("family", FAMILIES)
def test_each_push_returns_exactly_its_codes_duration(family):
    d = CosyVoiceDecoder.random(family)
    n_hop, overlap = hop(d), d.settings.overlap_frames
    lead = (overlap + d.delay_frames) * n_hop  # the held-back tail and v2's 3 look-ahead codes
    s = d.new_stream()
    total, sizes, out = 0, set(), np.zeros(0, np.float32)
    for k, codes in enumerate(chunks(d, 6), start=1):
        out = s.push(codes)
        assert out.dtype == np.float32 and out.ndim == 1
        frames = d.mel_frames(k * CHUNK) - d.mel_frames((k - 1) * CHUNK)
        sizes.add(frames)
        # The first push of an utterance holds back its last overlap frames (and v2 its last
        # 3 codes, waiting for their look-ahead) and starts with as much silence; every later
        # push gives out what the previous held and holds back its own: each exactly its
        # codes' mel frames.
        assert len(out) == frames * n_hop, k
        if k == 1:
            assert not out[:lead].any() and np.abs(out[lead:]).max() > 1e-3
        total += len(out)
        assert total == d.mel_frames(k * CHUNK) * n_hop, k
        assert np.abs(out).max() > 1e-3  # the random decoder makes sound, not silence
    codes_duration = 6 * CHUNK * d.samples_per_code
    if family == "v1":  # 1.72 frames per code: 17 or 18 frames a chunk, the total stays within a frame
        assert sizes == {17, 18}
        assert abs(d.mel_frames(6 * CHUNK) * n_hop - codes_duration) < n_hop
    else:
        assert sizes == {20} and d.mel_frames(6 * CHUNK) * n_hop == codes_duration

    # An all-silent chunk ends the utterance: v2's waiting codes, the held tail faded out,
    # then silence.
    n_samples = round(CHUNK * d.samples_per_code)
    if family == "v1":
        tail = s._speech_tail.copy()
        assert len(tail) == overlap * n_hop
        end = s.push(np.full(CHUNK, -1))
        np.testing.assert_allclose(end[:len(tail)], tail * np.linspace(1.0, 0.0, len(tail)), atol=1e-7)
    else:
        end = s.push(np.full(CHUNK, -1))
        assert np.abs(end[:d.delay_frames * n_hop]).max() > 1e-3  # the last 3 codes' audio
        fade = end[d.delay_frames * n_hop:lead]
        assert np.all(np.abs(fade[-n_hop:]) <= np.abs(fade[:n_hop]).max())  # fading out
    assert len(end) == max(n_samples, lead)
    assert not end[lead:].any()
    # The faded tail continues the last push's audio: no jump larger than the audio's own.
    assert abs(end[0] - out[-1]) <= np.abs(np.diff(out)).max()

    # Silence while not speaking is exactly the chunk's duration of zeros.
    quiet = s.push(np.full(CHUNK, -1))
    assert len(quiet) == n_samples and not quiet.any()

    # The next utterance starts afresh: as a new stream's first push, sample for sample.
    again = chunks(d, 1, seed=5)[0]
    first = s.push(again)
    np.testing.assert_array_equal(first, d.new_stream().push(again))
    assert not first[:lead].any()
    assert len(first) == d.mel_frames(CHUNK) * n_hop


@pytest.mark.parametrize("family", FAMILIES)
def test_silent_codes_inside_a_spoken_chunk_keep_the_chunk_length(family):
    d = CosyVoiceDecoder.random(family, settings=FAST)
    s = d.new_stream()
    a, b = chunks(d, 2)
    b[3:6] = -1
    first = s.push(a)
    second = s.push(b)
    assert len(first) + len(second) == d.mel_frames(2 * CHUNK) * hop(d)
    assert np.isfinite(second).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_silent_codes_inside_a_spoken_chunk_are_muted_where_they_are(family):
    """Codes 0..14 spoken, 15..19 silent, then an all-silent chunk. In the concatenated
    audio, code k occupies [mel_frames(k), mel_frames(k + 1)) frames after the leading
    overlap: the silent codes' span must be silent (past the 5 ms ramp), the spoken ones'
    must not be."""
    d = CosyVoiceDecoder.random(family, settings=FAST)
    s = d.new_stream()
    a, b = chunks(d, 2)
    b[5:] = -1
    y = np.concatenate([s.push(a), s.push(b), s.push(np.full(CHUNK, -1))])
    n_hop, ramp = hop(d), int(0.005 * d.sample_rate)
    lead = (d.settings.overlap_frames + d.delay_frames) * n_hop
    at = lambda code: lead + d.mel_frames(code) * n_hop  # noqa: E731 - first sample of a code's audio
    spoken = y[at(CHUNK) + 2 * ramp:at(CHUNK + 5) - 2 * ramp]
    silent = y[at(CHUNK + 5) + 2 * ramp:at(2 * CHUNK)]
    reference = np.sqrt(np.mean(y[at(0):at(CHUNK)] ** 2))
    assert np.sqrt(np.mean(spoken ** 2)) > 0.5 * reference, "spoken codes were muted"
    assert np.abs(silent).max() < 1e-6, "silent codes were heard"


# --------------------------------------------------------------------------- no click at chunk edges


def seam_errors(family: str, overlap: int, pushes: int = 8, push: int = CHUNK) -> tuple[list[float], float]:
    """Relative RMS departure of the streamed audio from HiFT run once over the whole mel
    (noise off), in +-64 samples around each chunk edge; and the same away from the edges."""
    d = CosyVoiceDecoder.random(family, settings=dataclasses.replace(FAST, overlap_frames=overlap))
    hift_forward, hift_decode, hift_source = d.hift.forward, d.hift.decode, d.hift.source
    new_mels: list[torch.Tensor] = []  # each HiFT call's new frames (after the repeated tail)

    def recording(mel, source):
        new_mels.append(mel[0, :, 0 if not new_mels else overlap:].clone())
        return hift_decode(mel, source)
    d.hift.decode = recording
    d.hift.source = lambda f0, *, stochastic=True, generator=None: hift_source(f0, stochastic=False)  # noise off
    s = d.new_stream()
    rng = np.random.default_rng(1)
    outs = [s.push(rng.integers(0, d.codebook_size, push)) for _ in range(pushes)]
    lead = (overlap + d.delay_frames) * hop(d)  # the silence ahead of the utterance: the held-back delay
    assert not outs[0][:lead].any()
    y = np.concatenate(outs)[lead:]
    d.hift.decode = hift_decode  # the reference's own call is not a chunk
    with torch.inference_mode():
        reference = hift_forward(torch.cat(new_mels, dim=1)[None], stochastic=False)[0][0].numpy()[:len(y)]
    err = y - reference
    w = 64
    near = np.zeros(len(y), bool)
    edges = np.cumsum([m.shape[1] for m in new_mels])[:-1] * hop(d)
    edges = edges[edges + w <= len(y)]  # a long overlap holds the last edges back: not heard yet
    assert len(edges) >= pushes // 2  # HiFT calls: one a push (a reply's first may wait for the next)
    per_edge = []
    for b in edges:
        near[b - w:b + w] = True
        per_edge.append(float(np.sqrt(np.mean(err[b - w:b + w] ** 2) / np.mean(y[b - w:b + w] ** 2))))
    inside = float(np.sqrt(np.mean(err[~near] ** 2) / np.mean(y[~near] ** 2)))
    return per_edge, inside


@pytest.mark.parametrize("family", FAMILIES)
def test_no_seam_at_chunk_edges(family):
    per_edge, inside = seam_errors(family, overlap=8)
    # The cross-fade's gain ripple (up to +8%) is all that is left: about 5% at edges and inside.
    assert max(per_edge) < 0.12, (per_edge, inside)
    assert max(per_edge) < 2.0 * inside + 0.02, (per_edge, inside)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_seam_measure_fails_without_the_cross_fade(family):
    per_edge, inside = seam_errors(family, overlap=0)
    assert max(per_edge) > 0.2 and np.mean(per_edge) > 3 * inside, (per_edge, inside)


# --------------------------------------------------------------------------- against the modules


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_equals_flow_and_hift_called_directly(family):
    """Four pushes against the documented recipe, computed from the modules. The flow:
    v1 on the chunk's codes with the voice prompt plus the last context_tokens codes (and
    their mel) as prompt; v2 once over the whole utterance (voice prompt first) on the
    stream's chunk grid, each push giving the mel of its codes but the last 3 (they wait
    for their look-ahead). HiFT on the held mel tail + the new mel with the held source in
    front; the Hamming cross-fade; one generator (v1's flow noise, then HiFT's) seeded per
    stream."""
    settings = DecoderSettings(steps=3, context_tokens=15, seed=3)
    d = with_prompt(CosyVoiceDecoder.random(family, seed=2, settings=settings))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # HiFT's mel and source, at its waveform stage
    hift_forward, hift_decode = d.hift.forward, d.hift.decode

    def recording(mel, source):
        seen.append((mel.clone(), source.clone()))
        return hift_decode(mel, source)
    d.hift.decode = recording
    codes = chunks(d, 4)
    s = d.new_stream()
    streamed = [s.push(c) for c in codes]

    overlap, n = settings.overlap_frames, settings.overlap_frames * hop(d)
    voice = d.voice
    embedding = torch.from_numpy(voice.embedding)[None]
    generator = torch.Generator().manual_seed(settings.seed)
    context_codes: list[int] = []
    made = torch.zeros(80, 0)  # the mel made so far
    spoken = 0
    mel_tail = source_tail = speech_tail = None
    if family == "v2":
        with torch.inference_mode():
            whole = d.flow.inference(torch.from_numpy(np.concatenate(codes))[None],
                                     torch.from_numpy(voice.prompt_tokens)[None],
                                     torch.from_numpy(voice.prompt_mel)[None], embedding,
                                     streaming=d.flow_stream().grid)[0]
    for k, chunk in enumerate(codes):
        frames = d.mel_frames(spoken + CHUNK) - d.mel_frames(spoken)
        kept = d.mel_frames(spoken) - d.mel_frames(spoken - len(context_codes))  # the context codes' frames
        prompt_tokens = np.concatenate([voice.prompt_tokens, np.asarray(context_codes, np.int64)])
        prompt_mel = torch.cat([torch.from_numpy(voice.prompt_mel), made[:, made.shape[1] - kept:].T])
        if family == "v1":
            with torch.inference_mode():
                mel = d.flow.inference(torch.from_numpy(chunk)[None], torch.from_numpy(prompt_tokens)[None],
                                       prompt_mel[None], embedding, frames=frames, generator=generator)[0]
            assert mel.shape == (80, frames)
        else:
            ready = lambda pushes: max(0, pushes * CHUNK - 3) * 2  # noqa: E731 - mel frames out after `pushes`
            mel = whole[:, ready(k):ready(k + 1)]
        made = torch.cat([made, mel], dim=1)
        x = mel if mel_tail is None else torch.cat([mel_tail, mel], dim=1)
        got_mel, got_source = seen[k]
        torch.testing.assert_close(got_mel[0], x, rtol=0, atol=2e-5, msg=f"HiFT's mel, push {k}")
        if source_tail is not None:
            torch.testing.assert_close(got_source[..., :n], source_tail, rtol=0, atol=0,
                                       msg=f"HiFT's source cache, push {k}")
        with torch.inference_mode():
            speech, source = hift_forward(got_mel, source_tail, stochastic=True, generator=generator)
        speech = speech[0].numpy().copy()
        if speech_tail is not None:
            speech[:n] = hamming_fade(speech, speech_tail)
        expected, speech_tail = speech[:-n], speech[-n:]
        if k == 0:  # the utterance's first push: the held tail's (and look-ahead's) length of silence ahead
            expected = np.concatenate([np.zeros(n + d.delay_frames * hop(d), np.float32), expected])
        mel_tail, source_tail = got_mel[0][:, -overlap:], source[..., -n:]
        np.testing.assert_allclose(streamed[k], expected, rtol=0, atol=1e-6, err_msg=f"push {k}")
        spoken += CHUNK
        context_codes = (context_codes + chunk.tolist())[-settings.context_tokens:]


# --------------------------------------------------------------------------- batched


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_streams_gives_each_the_audio_it_gets_alone(family):
    """Streams at different points (starting, speaking, ending, muted codes, quiet) pushed
    together give what each gives pushed alone: the batch shares the work, not the noise."""
    d = CosyVoiceDecoder.random(family, settings=FAST)
    quiet = np.full(CHUNK, -1)
    a, b, c, e = chunks(d, 4, seed=8)
    muted = c.copy()
    muted[4:] = -1
    plans = [[a, b, c, e, quiet], [quiet, a, b, quiet, c], [c, muted, quiet, quiet, a], [e, e, e, e, e]]
    alone = []
    for plan in plans:
        stream = d.new_stream()
        alone.append([stream.push(x) for x in plan])
    streams = [d.new_stream() for _ in plans]
    for step in range(len(plans[0])):
        for i, pcm in enumerate(d.push_many(streams, [plan[step] for plan in plans])):
            np.testing.assert_allclose(pcm, alone[i][step], rtol=0, atol=1e-4, err_msg=f"stream {i}, push {step}")
    with pytest.raises(ValueError, match="twice"):
        d.push_many([streams[0], streams[0]], [a, b])


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", FAMILIES)
def test_two_streams_fed_the_same_codes_give_the_same_audio(family):
    d = CosyVoiceDecoder.random(family, settings=FAST)
    codes = chunks(d, 3)
    one, two = d.new_stream(), d.new_stream()
    a, b = [], []
    with torch.random.fork_rng(devices=[]):
        for i, c in enumerate(codes):  # interleaved, the global RNG stirred in between
            torch.manual_seed(100 + i)
            a.append(one.push(c))
            torch.rand(7)
            b.append(two.push(c))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    one.reset()
    np.testing.assert_array_equal(one.push(codes[0]), a[0])
    other = CosyVoiceDecoder.random(family, settings=dataclasses.replace(FAST, seed=1)).new_stream()
    assert not np.array_equal(other.push(codes[0]), a[0])  # the seed is the stream's noise


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_audio(family, tmp_path):
    settings = DecoderSettings(steps=3, guidance=0.5, context_tokens=12, overlap_frames=6, seed=4)
    d = with_prompt(CosyVoiceDecoder.random(family, seed=3, settings=settings))
    d.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.json", "flow.pt", "hift.pt", "voice.npz"]
    loaded = CosyVoiceDecoder.load(tmp_path)
    assert loaded.settings == settings and loaded.family == family
    assert (loaded.sample_rate, loaded.token_rate, loaded.codebook_size) == (d.sample_rate, d.token_rate,
                                                                             d.codebook_size)
    np.testing.assert_array_equal(loaded.voice.prompt_mel, d.voice.prompt_mel)
    codes = chunks(d, 3)
    s, t = d.new_stream(), loaded.new_stream()
    for c in codes:
        np.testing.assert_array_equal(s.push(c), t.push(c))
    override = CosyVoiceDecoder.load(tmp_path, settings=DecoderSettings(steps=5))
    assert override.settings.steps == 5 and override.flow.config.n_timesteps == 5


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _json_edit(change):
    def edit(path):
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))
    return edit


def _other_family_hift(path):
    torch.save(HiFTGenerator(tiny_hift_config("v1")).state_dict(), path)


def _bad_embedding(path):
    np.savez(path, embedding=np.zeros(100, np.float32), prompt_tokens=np.zeros(0, np.int64),
             prompt_mel=np.zeros((0, 80), np.float32))


CORRUPTIONS = [  # (the file spoiled, how); the error names that file
    pytest.param("flow.pt", _truncate, id="flow.pt-truncated"),
    pytest.param("flow.pt", lambda p: p.unlink(), id="flow.pt-missing"),
    pytest.param("flow.pt", lambda p: p.write_bytes(b"not a torch file"), id="flow.pt-garbage"),
    pytest.param("hift.pt", _truncate, id="hift.pt-truncated"),
    pytest.param("hift.pt", _other_family_hift, id="hift.pt-other-family"),
    pytest.param("voice.npz", lambda p: p.write_bytes(b"not a voice" * 20), id="voice.npz-garbage"),
    pytest.param("voice.npz", _bad_embedding, id="voice.npz-embedding-shape"),
    pytest.param("voice.npz", lambda p: p.unlink(), id="voice.npz-missing"),
    pytest.param("voice.npz", _truncate, id="voice.npz-truncated"),
    pytest.param("voice.npz", lambda p: p.write_bytes(b""), id="voice.npz-empty"),
    pytest.param("decoder.json", lambda p: p.write_text("{not json"), id="decoder.json-garbage"),
    pytest.param("decoder.json", _json_edit(lambda m: m.update(kind="tone")), id="decoder.json-kind"),
    pytest.param("decoder.json", _json_edit(lambda m: m["settings"].update(steps=0)), id="decoder.json-settings"),
    pytest.param("decoder.json", _json_edit(lambda m: m["flow"].update(colour="blue")), id="decoder.json-unknown"),
    pytest.param("decoder.json", _json_edit(lambda m: m["hift"].update(sample_rate=16000)),
                 id="decoder.json-rates-disagree"),
    # decoder.json and the weights disagree: the weights' file is the one named.
    pytest.param("decoder.json", _json_edit(lambda m: m["flow"].update(vocab_size=100)), "flow.pt",
                 id="flow.pt-vs-config"),
]


@pytest.mark.parametrize("spoiled,corrupt,name", [p if len(p.values) == 3 else pytest.param(
    *p.values, p.values[0], id=p.id, marks=p.marks) for p in CORRUPTIONS])
def test_a_corrupt_file_is_refused_by_name(tmp_path, spoiled, corrupt, name):
    CosyVoiceDecoder.random("v2", settings=FAST).save(tmp_path)
    corrupt(tmp_path / spoiled)
    with pytest.raises(CheckpointError) as caught:
        CosyVoiceDecoder.load(tmp_path)
    assert caught.value.path == tmp_path / name, str(caught.value)
    assert name in str(caught.value)


@pytest.fixture(scope="module")
def tiny_v2_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-v2", decoder="v2")


def test_load_model_takes_the_cosyvoice_decoder(tiny_v2_model):
    loaded = load_model(tiny_v2_model)
    d = loaded.decoder
    assert isinstance(d, CosyVoiceDecoder) and d.family == "v2"
    assert (d.sample_rate, d.token_rate, d.codebook_size) == (24000, 25, 6561)


def _v2_with_codebook(size: int) -> CosyVoiceDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        flow = CosyVoiceFlow(dataclasses.replace(tiny_flow_config("v2"), vocab_size=size))
        hift = HiFTGenerator(tiny_hift_config("v2"))
    return CosyVoiceDecoder(flow, hift, Voice(np.ones(192, np.float32)))


@pytest.mark.parametrize("decoder,says", [
    pytest.param(lambda: CosyVoiceDecoder.random("v1"), "50 Hz -> 22050 Hz", id="rates"),
    pytest.param(lambda: _v2_with_codebook(4096), "4096 speech codes", id="codebook"),
])
def test_load_model_refuses_a_decoder_the_config_disagrees_with(tiny_v2_model, tmp_path, decoder, says):
    folder = tmp_path / "model"
    shutil.copytree(tiny_v2_model, folder)
    shutil.rmtree(folder / "decoder")
    decoder().save(folder / "decoder")
    with pytest.raises(CheckpointError) as caught:
        load_model(folder)
    assert caught.value.path == folder / "decoder"
    assert says in str(caught.value) and "config.json" in str(caught.value)


# --------------------------------------------------------------------------- voices


@pytest.mark.parametrize("family", FAMILIES)
def test_a_named_voice_speaks_with_its_own_speaker(family, tmp_path):
    """A stream in voice "anna" sounds as a decoder whose default voice is anna's, not as
    the default; an unknown voice is refused naming the known ones; voices survive
    save/load as voices/NAME.npz."""
    d = CosyVoiceDecoder.random(family, settings=FAST)
    rng = np.random.default_rng(9)  # anna's speaker and prompt (a voice's prompt weighs most on random weights)
    anna = Voice(rng.standard_normal(192).astype(np.float32), rng.integers(0, d.codebook_size, 6),
                 (rng.standard_normal((d.mel_frames(6), 80)) - 5.0).astype(np.float32))
    d.add_voice("anna", anna)
    assert d.voices == ("default", "anna")
    codes = chunks(d, 2)
    in_anna = [d.new_stream("anna").push(c) for c in codes[:1]]
    only_anna = CosyVoiceDecoder(d.flow, d.hift, anna, FAST)
    np.testing.assert_allclose(in_anna[0], only_anna.new_stream().push(codes[0]), rtol=0, atol=1e-6)
    assert np.abs(in_anna[0] - d.new_stream().push(codes[0])).max() > 1e-3
    with pytest.raises(ValueError, match="'bob'.*anna, default"):
        d.new_stream("bob")
    with pytest.raises(ValueError, match="voice name"):
        d.add_voice("no spaces", anna)

    d.save(tmp_path / "dec")
    assert (tmp_path / "dec" / "voices" / "anna.npz").is_file()
    loaded = CosyVoiceDecoder.load(tmp_path / "dec")
    assert loaded.voices == ("default", "anna")
    np.testing.assert_array_equal(loaded.voice_of("anna").embedding, anna.embedding)
    shutil.copy(tmp_path / "dec" / "voice.npz", tmp_path / "dec" / "voices" / "default.npz")
    with pytest.raises(CheckpointError, match="default.npz"):
        CosyVoiceDecoder.load(tmp_path / "dec")


@pytest.mark.parametrize("family, push, overlap", [("v1", 10, 18), ("v1", 4, 8), ("v2", 5, 8), ("v2", 10, 15)])
def test_pushes_shorter_than_the_overlap(family, push, overlap):
    """A reply's first push may make fewer mel frames than the overlap HiFT holds back
    (short pushes, a long overlap): its mel waits for the next push's instead of breaking
    the stream, and the reply's audio still all comes out, in order, ending with its end."""
    d = CosyVoiceDecoder.random(family, settings=dataclasses.replace(FAST, overlap_frames=overlap))
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, d.codebook_size, push) for _ in range(6)]
    s = d.new_stream()
    outs = [s.push(c) for c in codes] + [s.push(np.full(push, -1))]
    n_hop = hop(d)
    lead = (overlap + d.delay_frames) * n_hop
    y = np.concatenate(outs)
    frames = d.mel_frames(6 * push)
    assert not y[:lead].any()
    assert np.abs(y[lead:lead + frames * n_hop]).max() > 1e-3
    assert not y[lead + frames * n_hop:].any()  # everything it made, then silence
    assert len(y) >= lead + frames * n_hop
    if family == "v2":  # chunk_tokens 0: the grid follows the pushes, each completing one chunk
        assert all(len(o) == 2 * push * n_hop for o in outs[2:-1])
    per_edge, inside = seam_errors(family, overlap, 6, push)  # and no click where it waited
    assert max(per_edge) < 0.12, (per_edge, inside)
