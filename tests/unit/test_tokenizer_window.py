"""The S3 tokenizer's streaming window (docs/tokenizer.md): the look-ahead adds exactly its
latency; utterance positions make a stream exact for an encoder whose context fits the
window, across long-audio segments; the cached encoder equals a plain per-step loop
written here; the chosen window keeps its measured agreement on a seeded input.

Tiny random models (width 64, 2 layers) keep this fast; the full-size measurement is
`bench/tokenizer_window.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.s3_tokenizer import LEGACY_STREAMING, S3Config, S3Tokenizer

from .test_s3_tokenizer import SR, speechlike, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def stream_codes(tok: S3Tokenizer, x: np.ndarray, frame: int = 320) -> np.ndarray:
    stream = tok.new_stream()
    return np.concatenate([stream.push(x[i:i + frame]) for i in range(0, len(x), frame)] + [stream.flush()])


# --------------------------------------------------------------------------- latency


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
@pytest.mark.parametrize("rate,lookahead", [(50, 0.0), (50, 0.0125), (50, 0.04), (50, 0.12), (25, 0.04)])
def test_lookahead_adds_exactly_its_latency(rate, lookahead, encoder):
    """Step i's codes come out at the sample its audio ends plus the look-ahead: one
    sample earlier nothing, at that sample exactly the step's codes."""
    tok = S3Tokenizer.random(tiny(token_rate=rate, lookahead_seconds=lookahead, stream_encoder=encoder), seed=0)
    c = tok.config
    stream = tok.new_stream()
    assert stream.latency_samples == round(lookahead * SR)
    x = speechlike(2.5, seed=1)
    step_samples = c.step_tokens * c.samples_per_token
    pushed = 0
    for i in range(int((len(x) - stream.latency_samples) // step_samples)):
        due = (i + 1) * step_samples + stream.latency_samples
        assert len(stream.push(x[pushed:due - 1])) == 0, f"step {i} came early"
        codes = stream.push(x[due - 1:due])
        pushed = due
        assert len(codes) == c.step_tokens, f"step {i} did not come at its audio + look-ahead"
        assert stream.emitted == (i + 1) * c.step_tokens


# --------------------------------------------------------------------------- exactness


def _local(config: S3Config) -> S3Tokenizer:
    """Attention outputs zeroed, positions kept: every code depends on its own few
    frames and its position only, so a stream whose look-back and look-ahead cover the
    convolutions must give exactly `encode`'s codes."""
    t = S3Tokenizer.random(config, seed=3)
    with torch.no_grad():
        for block in t.model.encoder.blocks:
            block.attn.out.weight.zero_()
            block.attn.out.bias.zero_()
    return t


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
@pytest.mark.parametrize("rate,lookback", [(50, 0.4), (25, 0.4), (50, 3.0)])
def test_utterance_positions_are_exact_across_long_audio_segments(rate, lookback, encoder):
    """61 s: `encode` cuts it into 30 s segments (positions restart at 26 s and 52 s; a
    segment's codes start 2 s in, so a 3 s look-back must stop at the segment's start).
    The noise keeps every mel bin within 8 decades of the peak, so the log-mel floor (the
    window's maximum in a stream, the utterance's in `encode`) never binds."""
    cfg = tiny(token_rate=rate, codebook_size=1024, lookback_seconds=lookback, lookahead_seconds=0.02,
               stream_encoder=encoder)
    t = _local(cfg)
    x = speechlike(61.0, seed=5) + 0.03 * np.random.default_rng(1).standard_normal(61 * SR).astype(np.float32)
    codes = stream_codes(t, x)
    assert np.array_equal(codes, t.encode(x))
    # The same model under the legacy window positions: far off.
    legacy = t.with_streaming(**{**LEGACY_STREAMING, "lookback_seconds": lookback, "lookahead_seconds": 0.02})
    assert np.mean(stream_codes(legacy, x) == t.encode(x)) < 0.2


def test_features_of_new_frames_alone_equal_the_whole_windows():
    """A cached stream computes only its new frames' log-mel: the same values as those
    frames have in the whole window (the STFT reflect-pads the window, not the tail)."""
    tok = S3Tokenizer.random(tiny(), seed=0)
    x = torch.from_numpy(np.stack([speechlike(2.22, seed=s) for s in (1, 2)]))
    whole = tok.front_end.log_power_batch(x)
    for first in (0, 1, 37, 180, whole.shape[2] - 1):
        torch.testing.assert_close(tok.front_end.log_power_batch(x, first), whole[..., first:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rate", [50, 25])
def test_the_floor_counts_the_look_backs_peak(rate):
    """A loud ramp ending at 0.9 s, then 1.8 s of near-silence 10 decades below it: from
    the ramp's end every window holds its loudest frame, so the floor binds at the same
    level as `encode`'s (the utterance's maximum; before that a stream cannot know what
    is coming). A cached stream computes only its new frames' features, so the look-back's
    loudness must come from the peaks it kept; ignoring them floors the quiet codes
    8 decades below the quiet instead."""
    cfg = tiny(token_rate=rate, codebook_size=1024, lookback_seconds=2.0, lookahead_seconds=0.02)
    t = _local(cfg)
    quiet = lambda seconds, seed: 1e-6 * np.random.default_rng(seed).standard_normal(int(seconds * SR))
    ramp = np.linspace(0, 0.5, int(0.6 * SR)) * np.sin(2 * np.pi * 440 * np.arange(int(0.6 * SR)) / SR)
    x = np.concatenate([quiet(0.3, 1), ramp, quiet(1.8, 2)]).astype(np.float32)
    after = int(0.9 * rate)
    assert np.array_equal(stream_codes(t, x)[after:], t.encode(x)[after:])


def _per_step_reference(tok: S3Tokenizer, x: np.ndarray) -> np.ndarray:
    """The cached encoder as a plain loop, independent of the stream's code (buffer,
    ring, batching). Per step: the log-mel of the window (look-back, at least the two
    codes the convolutions need, clipped at the segment's start; step; look-ahead), conv
    features of the step's and look-ahead's frames; each layer attends over the last
    `lookback` codes' keys and values (kept from their own step) and those frames; the
    step's keys and values are kept. The first step of each long-audio segment instead
    encodes its whole window with the segment's positions and keeps its keys and values."""
    c = tok.config
    enc = tok.model.encoder
    gelu = torch.nn.functional.gelu
    step, per, ahead, back = c.step_tokens, c.samples_per_token, c.lookahead_samples, c.lookback_tokens
    heads, hd = c.heads, c.width // c.heads

    def features(first_code: int, end: int, position: int) -> torch.Tensor:
        # The batched front end, as the stream's: the float32 mel must round alike.
        mel = tok.front_end.batch(torch.from_numpy(x[None, first_code * per:end]))[0].to(enc.conv1.weight.dtype)
        f = gelu(enc.conv2(gelu(enc.conv1(mel[None]))))[0].T
        return f + enc.positional_embedding[position:position + len(f)]

    def attend(block, h, keys, values):
        a = block.attn
        y = block.attn_ln(h)
        q, k, v = a.query(y), a.key(y), a.value(y)
        k_all, v_all = torch.cat(keys + [k]), torch.cat(values + [v])
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q.view(-1, heads, hd), k_all.view(-1, heads, hd))
                          / hd ** 0.5, dim=-1)
        h = h + a.out(torch.einsum("hqk,khd->qhd", w, v_all.view(-1, heads, hd)).reshape(-1, c.width))
        return h + block.mlp(block.mlp_ln(h)), k, v

    out, segment = [], -1
    kept: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    with torch.no_grad():
        for i in range((len(x) - ahead) // (step * per)):
            first, end = i * step, (i + 1) * step * per + ahead
            if c.segment_start(first) != segment:  # the whole window, bidirectionally
                segment = c.segment_start(first)
                w0 = max(segment, first - max(back, 2))
                h = features(w0, end, w0 - segment)
                kept = []
                for block in enc.blocks:
                    h, k, v = attend(block, h, [], [])
                    upto = first - w0 + step
                    kept.append((list(k[:upto].split(1))[max(0, upto - back):] if back else [],
                                 list(v[:upto].split(1))[max(0, upto - back):] if back else []))
                out.append(tok.model.quantizer(h[first - w0:first - w0 + step]))
                continue
            w0 = max(segment, first - max(back, 2))  # the window's audio: its log-mel, its floor
            h = features(w0, end, w0 - segment)[first - w0:]
            for (keys, values), block in zip(kept, enc.blocks):
                h, k, v = attend(block, h, keys, values)  # at most `back` of each, trimmed below
                keys.extend(k[:step].split(1))
                values.extend(v[:step].split(1))
                del keys[:max(0, len(keys) - back)], values[:max(0, len(values) - back)]
            out.append(tok.model.quantizer(h[:step]))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("rate,lookback,lookahead,seconds", [
    (50, 0.4, 0.04, 4.0), (50, 2.0, 0.02, 4.0), (25, 0.8, 0.12, 4.0), (50, 0.0, 0.02, 4.0),
    (50, 0.08, 0.02, 4.0),  # a look-back shorter than the step
    (50, 0.4, 0.02, 61.0), (25, 2.0, 0.04, 61.0),  # across long-audio segments (26 s, 52 s)
    (50, 3.0, 0.02, 61.0),  # a look-back reaching before the segment's start
])
def test_cached_stream_equals_a_plain_per_step_loop(rate, lookback, lookahead, seconds):
    """Full attention this time; 1024 codes in 64 dimensions make the codes sensitive, and
    float64 keeps them from flipping on rounding (the two sides multiply matrices of other
    shapes). The noise keeps the log-mel floor from binding (the stream's floor is its
    window's maximum, this loop's that of the audio it encodes)."""
    tok = S3Tokenizer.random(tiny(token_rate=rate, codebook_size=1024, lookback_seconds=lookback,
                                  lookahead_seconds=lookahead), seed=0, dtype=torch.float64)
    n = int(seconds * SR)
    x = speechlike(seconds, seed=3) + 0.03 * np.random.default_rng(2).standard_normal(n).astype(np.float32)
    stream = tok.new_stream()
    got = np.concatenate([stream.push(x[i:i + 320]) for i in range(0, len(x), 320)])
    ref = _per_step_reference(tok, x)
    assert len(got) == len(ref) > 0
    assert np.array_equal(got, ref)


# --------------------------------------------------------------------------- agreement


def _content(tok: S3Tokenizer) -> S3Tokenizer:
    """As bench/tokenizer_window.py's `--init content`: He-normal convolutions x4, so
    the codes follow the audio rather than the positions."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in (tok.model.encoder.conv1, tok.model.encoder.conv2):
            fan_in = conv.weight.shape[1] * conv.weight.shape[2]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5 * 4)
            conv.bias.zero_()
    return tok


# Measured with this test's tiny models and input (docs/tokenizer.md has the full-size
# table): the share of streamed codes equal to whole-utterance codes, for the chosen
# window and the legacy one (a 2.2 s window re-encoded with window positions).
MEASURED = {"default": (0.722, 0.172), "content": (0.982, 0.738)}


@pytest.mark.parametrize("init", ["default", "content"])
def test_chosen_window_keeps_its_measured_agreement(init):
    x = speechlike(8.0, seed=11)
    tok = S3Tokenizer.random(tiny(), seed=0)
    if init == "content":
        _content(tok)
    whole = tok.encode(x)
    chosen = float(np.mean(stream_codes(tok, x) == whole))
    legacy = float(np.mean(stream_codes(tok.with_streaming(**LEGACY_STREAMING), x) == whole))
    print(f"tiny {init} model, 8 s seeded speech-like input: chosen window {chosen:.1%}, legacy {legacy:.1%}")
    assert (chosen, legacy) == pytest.approx(MEASURED[init], abs=0.01)
