"""S3 tokenizer v2 (CosyVoice2's speech_tokenizer_v2): the published layout, FSQ codes,
rotary positions and the FSMN block against independent references, streaming against
whole-utterance `encode` (mirroring the v1 checks), checkpoints and the tiny model.

Tiny random models (width 64, 4 heads, 2 layers) keep the suite fast; the full-size
module is only built on the meta device (no memory, no init)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from model.errors import CheckpointError, ConfigInvalid
from model.s3_tokenizer import (CONFIG_FILE, WEIGHTS_FILE, S3Config, S3Model, S3Tokenizer, build_s3_model,
                                tiny_config_for)
from model.s3_tokenizer_v2 import FSQ_SCALE, fsq_codes, rotate

from .onnx_graph import OnnxGraph
from .test_s3_tokenizer import SR, speechlike, tiny_v2
from .test_tokenizer_window import _local

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(width=64, heads=4, layers=2)
tiny = tiny_v2


@pytest.fixture(scope="module")
def tok() -> S3Tokenizer:
    return S3Tokenizer.random(tiny(), seed=0)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    return speechlike(4.0)


def stream_codes(tok: S3Tokenizer, x: np.ndarray, frame: int = 320) -> np.ndarray:
    stream = tok.new_stream()
    return np.concatenate([stream.push(x[i:i + frame]) for i in range(0, len(x), frame)] + [stream.flush()])


# --------------------------------------------------------------------------- layout and config


def _published_layout() -> dict[str, tuple[int, ...]]:
    """The state dict of `s3tokenizer.model_v2.S3TokenizerV2("speech_tokenizer_v2_25hz")`,
    i.e. what `s3tokenizer.utils.onnx2torch` gives for speech_tokenizer_v2.onnx
    (github.com/xingchensong/S3Tokenizer, s3tokenizer/model_v2.py and utils.py):
    ModelConfig n_mels 128, n_audio_state 1280, n_audio_head 20, n_audio_layer 6;
    conv1 k3 stride 2, conv2 k3 stride 2; per block FSMNMultiHeadAttention (query, key
    without bias, value, out, fsmn_block = depthwise Conv1d kernel 31 without bias),
    attn_ln, mlp (Linear 1280->5120, GELU, Linear 5120->1280), mlp_ln; FSQCodebook
    project_down = Linear(1280, 8). No positional embedding (rotary tables are not state)."""
    w, m = 1280, 5120
    layout = {"encoder.conv1.weight": (w, 128, 3), "encoder.conv1.bias": (w,),
              "encoder.conv2.weight": (w, w, 3), "encoder.conv2.bias": (w,),
              "quantizer._codebook.project_down.weight": (8, w), "quantizer._codebook.project_down.bias": (8,)}
    for i in range(6):
        p = f"encoder.blocks.{i}."
        layout.update({
            p + "attn.query.weight": (w, w), p + "attn.query.bias": (w,), p + "attn.key.weight": (w, w),
            p + "attn.value.weight": (w, w), p + "attn.value.bias": (w,),
            p + "attn.out.weight": (w, w), p + "attn.out.bias": (w,), p + "attn.fsmn_block.weight": (w, 1, 31),
            p + "attn_ln.weight": (w,), p + "attn_ln.bias": (w,), p + "mlp_ln.weight": (w,), p + "mlp_ln.bias": (w,),
            p + "mlp.0.weight": (m, w), p + "mlp.0.bias": (m,), p + "mlp.2.weight": (w, m), p + "mlp.2.bias": (w,)})
    return layout


def test_full_size_module_has_the_published_layout():
    with torch.device("meta"):
        model = build_s3_model(S3Config.v2())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _published_layout()
    assert sum(math.prod(s) for s in ours.values()) == 123_714_568  # 494.9 MB in float32


def test_config_v2_fields_and_errors():
    c = S3Config.v2()
    assert (c.version, c.n_mels, c.width, c.heads, c.layers, c.codebook_size, c.token_rate, c.stride) == \
        ("v2", 128, 1280, 20, 6, 6561, 25, 2)
    assert S3Config().version == "v1"
    for kw, field in [(dict(version="v3"), "version"), (dict(version="v2", codebook_size=6561), "token_rate"),
                      (dict(version="v2", token_rate=25), "codebook_size"),
                      (dict(version="v2", token_rate=25, codebook_size=6561, width=60, heads=4), "heads")]:
        with pytest.raises(ConfigInvalid) as err:
            S3Config(**kw)
        assert err.value.field == field
    with pytest.raises(ConfigInvalid) as err:
        S3Model(S3Config.v2(**TINY))
    assert err.value.field == "version"


def test_config_round_trip_and_files_without_a_version_are_v1():
    c = tiny(lookahead_seconds=0.12)
    assert S3Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    old = S3Config(**TINY).to_dict()
    del old["version"]
    assert S3Config.from_dict(old).version == "v1"
    with pytest.raises(ConfigInvalid) as err:
        S3Config.from_dict({**c.to_dict(), "version": "v9"}, source="x.json")
    assert err.value.field == "version" and "x.json" in str(err.value)


def test_tiny_config_follows_the_speech_codes():
    assert tiny_config_for(25, 6561) == S3Config.v2(**TINY)
    assert tiny_config_for(50, 4096) == S3Config(**TINY)


# --------------------------------------------------------------------------- FSQ


def _fsq_reference(h: np.ndarray) -> np.ndarray:
    """Upstream's FSQCodebook.encode in numpy: tanh, times float32(0.999), round half to
    even, + 1; the code is the base-3 number whose least significant digit is dimension 0
    (written as Horner's rule from the most significant digit)."""
    digits = np.round(np.tanh(h.astype(np.float32)) * np.float32(0.999)).astype(np.int64) + 1
    code = np.zeros(h.shape[:-1], np.int64)
    for i in reversed(range(h.shape[-1])):
        code = code * 3 + digits[..., i]
    return code


def test_fsq_codes_match_a_numpy_hand_computation():
    h = torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(0)) * 1.5
    assert np.array_equal(fsq_codes(h).numpy(), _fsq_reference(h.numpy()))
    assert FSQ_SCALE == float(np.float32(0.999))
    # The package's own test (S3Tokenizer test/test_fsq_codebook.py): pre-tanh +20 / 0 / -20
    # give digits 2 / 1 / 0; digits [2,0,0,0,0,2,0,0] -> 488, [1,0,0,0,0,2,0,0] -> 487.
    pre = torch.tensor([[20., -20, -20, -20, -20, 20, -20, -20], [0., -20, -20, -20, -20, 20, -20, -20]])
    assert fsq_codes(pre).tolist() == [488, 487]
    assert fsq_codes(torch.full((8,), 20.0)).item() == 6560 and fsq_codes(torch.full((8,), -20.0)).item() == 0
    # The 0.999 factor moves the rounding boundary: tanh 0.50025 (digit 2 unscaled) is digit 1.
    edge = torch.full((8,), -20.0)
    edge[3] = math.atanh(0.50025)
    assert fsq_codes(edge).item() == 1 * 27 == _fsq_reference(edge.numpy())


def test_quantizer_projects_then_codes(tok):
    x = torch.randn(2, 40, 64, generator=torch.Generator().manual_seed(1))
    w = tok.model.quantizer._codebook.project_down.weight.detach().double().numpy()
    b = tok.model.quantizer._codebook.project_down.bias.detach().double().numpy()
    h = x.double().numpy() @ w.T + b
    near = np.abs(np.abs(np.tanh(h) * 0.999) - 0.5).min(-1) < 1e-5  # float32 may round either way there
    assert near.mean() < 0.01
    ours = tok.model.quantizer(x).numpy()
    assert np.array_equal(ours[~near], _fsq_reference(h)[~near])
    assert ours.min() >= 0 and ours.max() < 6561


# --------------------------------------------------------------------------- rotary and the block


def test_rotary_matches_transformers_qwen2():
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    b, t, heads, hd = 2, 9, 4, 16
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(b, t, heads, hd, generator=gen), torch.randn(b, t, heads, hd, generator=gen)
    positions = torch.tensor([[0], [37]]) + torch.arange(t)[None]
    rope = Qwen2RotaryEmbedding(Qwen2Config(hidden_size=heads * hd, num_attention_heads=heads,
                                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))
    cos, sin = rope(q, positions)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # (B, T, H, D) layout
    torch.testing.assert_close(rotate(q, positions), q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(rotate(k, positions), k_ref, rtol=0, atol=1e-5)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _block_reference(block, x: np.ndarray, length: int) -> np.ndarray:
    """One v2 block over one utterance's valid frames `x[:length]` in float64 numpy, written
    from the published formulas: LayerNorm eps 1e-6 (attn_ln) and 1e-5 (mlp_ln); rotary on
    q and k per head (frequencies 10000**(-2i/d), channel i paired with i + d/2);
    softmax(q k^T / sqrt(d)) v; FSMN memory as an explicit loop over the 31 taps around
    each frame (frames outside the utterance count as zero) plus v."""
    p = {k: v.detach().double().numpy() for k, v in block.state_dict().items()}
    x = x[:length]
    heads = block.attn.heads
    width = x.shape[1]
    d = width // heads
    y = _layer_norm(x, p["attn_ln.weight"], p["attn_ln.bias"], 1e-6)
    q = y @ p["attn.query.weight"].T + p["attn.query.bias"]
    k = y @ p["attn.key.weight"].T
    v = y @ p["attn.value.weight"].T + p["attn.value.bias"]

    def rope(z):
        z = z.reshape(length, heads, d).copy()
        out = z.copy()
        for t in range(length):
            for i in range(d // 2):
                angle = t * 10000.0 ** (-2 * i / d)
                a, b = z[t, :, i], z[t, :, i + d // 2]
                out[t, :, i] = a * math.cos(angle) - b * math.sin(angle)
                out[t, :, i + d // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    qh, kh, vh = rope(q), rope(k), v.reshape(length, heads, d)
    scores = np.einsum("qhd,khd->hqk", qh, kh) / math.sqrt(d)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = np.einsum("hqk,khd->qhd", w, vh).reshape(length, width) @ p["attn.out.weight"].T + p["attn.out.bias"]
    taps = p["attn.fsmn_block.weight"][:, 0, :]  # (width, 31)
    memory = v.copy()
    for t in range(length):
        for j in range(31):
            s = t + j - 15
            if 0 <= s < length:
                memory[t] += taps[:, j] * v[s]
    x = x + attn + memory
    z = _layer_norm(x, p["mlp_ln.weight"], p["mlp_ln.bias"], 1e-5)
    return x + _gelu(z @ p["mlp.0.weight"].T + p["mlp.0.bias"]) @ p["mlp.2.weight"].T + p["mlp.2.bias"]


def test_block_matches_a_numpy_reference_with_padding():
    """A batch of three, the first padded (13 of 40 frames valid), the last quiet (variance
    near attn_ln's epsilon, which then matters): each row's valid frames equal the
    reference over that row alone."""
    model = build_s3_model(tiny(layers=1))
    block = model.encoder.blocks[0]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norms too
        for ln in (block.attn_ln, block.mlp_ln):
            ln.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
            ln.bias.copy_(0.3 * torch.randn(64, generator=gen))
    x = torch.randn(3, 40, 64, generator=gen)
    x[2] *= 0.003
    lengths = torch.tensor([13, 40, 40])
    valid = torch.arange(40)[None] < lengths[:, None]
    with torch.no_grad():
        y = block(x, torch.arange(40)[None], valid[:, None, None, :], valid[..., None].float())[0]
    for row, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(y[row, :n].numpy(), _block_reference(block, x[row].double().numpy(), n),
                                   rtol=0, atol=1e-4)
    assert (y[0, 13:] != 0).any()  # padded rows are computed (then ignored), not required to be zero


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("seconds", [1, 2])
def test_codes_per_second(tok, seconds):
    codes = tok.encode(speechlike(seconds))
    assert codes.dtype == np.int64 and codes.shape == (25 * seconds,)
    assert codes.min() >= 0 and codes.max() < 6561
    assert len(np.unique(codes)) > 5
    for n in (0, 100, 250, 640, 641, 800):
        assert len(tok.encode(speechlike(1.0)[:n])) == tok.config.tokens_for_samples(n)


def test_encode_is_seeded_and_bfloat16_runs(tok, audio):
    a = tok.encode(audio)
    assert np.array_equal(a, S3Tokenizer.random(tiny(), seed=0).encode(audio))
    assert not np.array_equal(a, S3Tokenizer.random(tiny(), seed=5).encode(audio))
    assert S3Tokenizer.random(tiny(), seed=0, dtype=torch.bfloat16).encode(audio).shape == (100,)


# --------------------------------------------------------------------------- streaming (as v1's)


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
def test_stream_gives_25_codes_per_second(encoder):
    t = S3Tokenizer.random(tiny(stream_encoder=encoder, lookahead_seconds=0.04), seed=0)
    stream = t.new_stream()
    x = speechlike(3.04)
    counts = np.cumsum([len(stream.push(x[i:i + 320])) for i in range(0, len(x), 320)])
    assert counts[51::50].tolist() == [25, 50, 75]
    assert counts[50::50].tolist() == [20, 45, 70]  # 20 ms short of the look-ahead: the step waits
    assert len(stream.flush()) == t.config.tokens_for_samples(len(x)) - 75


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
def test_stream_codes_do_not_depend_on_push_sizes(encoder):
    t = S3Tokenizer.random(tiny(stream_encoder=encoder, lookahead_seconds=0.1), seed=0)
    x = speechlike(5.0, seed=4)
    a = stream_codes(t, x)
    rng = np.random.default_rng(0)
    stream, parts, i = t.new_stream(), [], 0
    while i < len(x):
        n = int(rng.integers(1, 9000))
        parts.append(stream.push(x[i:i + n]))
        i += n
    parts.append(stream.flush())
    whole = t.new_stream()
    c = np.concatenate([whole.push(x), whole.flush()])
    assert np.array_equal(a, np.concatenate(parts)) and np.array_equal(a, c) and len(a) == 125


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
def test_stream_flush_completes_and_short_utterances_equal_encode(encoder):
    t = S3Tokenizer.random(tiny(lookahead_seconds=0.1, stream_encoder=encoder), seed=0)
    x = speechlike(2.47)
    stream = t.new_stream()
    live = np.concatenate([stream.push(x[i:i + 480]) for i in range(0, len(x), 480)])
    rest = stream.flush()
    assert len(live) < len(t.encode(x)) and len(live) + len(rest) == len(t.encode(x))
    assert stream.emitted == 0 and stream.buffered == 0
    short = speechlike(0.15)
    assert stream.push(short).size == 0
    assert np.array_equal(stream.flush(), t.encode(short))


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
def test_stream_matches_encode_for_a_local_model(encoder):
    x = speechlike(4.0, seed=5)
    # Attention outputs zeroed, FSMN memory kept: each code depends on the convolutions'
    # few frames and, through the memory, on 15 codes each side per layer (2 layers: 30
    # codes = 1.2 s). A window covering that must reproduce `encode` exactly.
    covering = _local(tiny(lookback_seconds=1.28, lookahead_seconds=1.24, stream_encoder=encoder))
    assert np.array_equal(stream_codes(covering, x), covering.encode(x))
    # The memory's reach is real: half the window is not exact.
    short = covering.with_streaming(lookback_seconds=0.6, lookahead_seconds=0.6)
    assert np.mean(stream_codes(short, x) == covering.encode(x)) < 0.97


def test_utterance_positions_are_exact_across_long_audio_segments():
    """61 s (segments at 26 s and 52 s) with a 3 s look-back that must stop at each
    segment's start; noise keeps the log-mel floor from binding (as the v1 test)."""
    t = _local(tiny(lookback_seconds=3.0, lookahead_seconds=1.24))
    x = speechlike(61.0, seed=5) + 0.03 * np.random.default_rng(1).standard_normal(61 * SR).astype(np.float32)
    assert np.array_equal(stream_codes(t, x), t.encode(x))


def _per_step_reference(tok: S3Tokenizer, x: np.ndarray) -> np.ndarray:
    """The cached v2 encoder as a plain loop, independent of the stream's buffer, cache and
    batching (as test_tokenizer_window's v1 loop). Per step: the window's log-mel (look-back,
    at least the convolutions' two codes, clipped at the segment's start; step; look-ahead),
    the conv features of the step's and look-ahead's frames; each layer attends over the
    last `lookback` codes' rotated keys and values (kept from their own step) and those
    frames', and each frame's FSMN memory sums its 31 taps over the kept values and the new
    ones (none: zero). The first step of a segment encodes its whole window."""
    c = tok.config
    enc = tok.model.encoder
    gelu = torch.nn.functional.gelu
    step, per, ahead, back = c.step_tokens, c.samples_per_token, c.lookahead_samples, c.lookback_tokens
    heads, hd = c.heads, c.width // c.heads

    def features(first_code: int, end: int) -> torch.Tensor:
        mel = tok.front_end.batch(torch.from_numpy(x[None, first_code * per:end]))[0].to(enc.conv1.weight.dtype)
        return gelu(enc.conv2(gelu(enc.conv1(mel[None]))))[0].T

    def rope(z: torch.Tensor, first: int) -> torch.Tensor:
        z = z.view(len(z), heads, hd)
        angle = (first + torch.arange(len(z), dtype=torch.float64))[:, None] * 10000.0 ** (
            -torch.arange(hd // 2, dtype=torch.float64) * 2 / hd)
        cos, sin = angle.cos()[:, None].to(z.dtype), angle.sin()[:, None].to(z.dtype)
        a, b = z[..., :hd // 2], z[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1).reshape(len(z), c.width)

    def layer(block, h, first, keys, values):
        a = block.attn
        y = block.attn_ln(h)
        q, k, v = rope(a.query(y), first), rope(a.key(y), first), a.value(y)
        k_all, v_all = torch.stack(keys + list(k)), torch.stack(values + list(v))
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q.view(-1, heads, hd), k_all.view(-1, heads, hd))
                          / hd ** 0.5, dim=-1)
        att = a.out(torch.einsum("hqk,khd->qhd", w, v_all.view(-1, heads, hd)).reshape(-1, c.width))
        seq = values[-15:] + list(v)
        taps = a.fsmn_block.weight[:, 0]
        memory = []
        for t in range(len(v)):
            centre = len(seq) - len(v) + t
            memory.append(v[t] + sum(taps[:, j] * seq[centre + j - 15] for j in range(31)
                                     if 0 <= centre + j - 15 < len(seq)))
        h = h + att + torch.stack(memory)
        return h + block.mlp(block.mlp_ln(h)), k, v

    out, segment = [], -1
    kept: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    with torch.no_grad():
        for i in range((len(x) - ahead) // (step * per)):
            first, end = i * step, (i + 1) * step * per + ahead
            w0 = max(c.segment_start(first), first - max(back, 2))
            if c.segment_start(first) != segment:
                segment = c.segment_start(first)
                h, kept, upto = features(w0, end), [], first - w0 + step
                for block in enc.blocks:
                    h, k, v = layer(block, h, w0 - segment, [], [])
                    kept.append((list(k[:upto])[max(0, upto - back):] if back else [],
                                 list(v[:upto])[max(0, upto - back):] if back else []))
                out.append(tok.model.quantizer(h[first - w0:first - w0 + step]))
                continue
            h = features(w0, end)[first - w0:]
            for (keys, values), block in zip(kept, enc.blocks):
                h, k, v = layer(block, h, first - segment, keys, values)
                keys.extend(k[:step])
                values.extend(v[:step])
                del keys[:max(0, len(keys) - back)], values[:max(0, len(values) - back)]
            out.append(tok.model.quantizer(h[:step]))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("lookback,lookahead,seconds", [
    (2.0, 0.04, 4.0), (0.4, 0.12, 4.0),  # a look-back shorter than the memory's 15 codes
    (0.0, 0.02, 3.0), (1.0, 0.6, 4.0),
    (2.0, 0.04, 61.0),  # across long-audio segments
])
def test_cached_stream_equals_a_plain_per_step_loop(lookback, lookahead, seconds):
    """Full attention and memory; float64 keeps FSQ's rounding from flipping between the two
    sides' differently shaped matrix products."""
    t = S3Tokenizer.random(tiny(lookback_seconds=lookback, lookahead_seconds=lookahead), seed=0,
                           dtype=torch.float64)
    n = int(seconds * SR)
    x = speechlike(seconds, seed=3) + 0.03 * np.random.default_rng(2).standard_normal(n).astype(np.float32)
    stream = t.new_stream()
    got = np.concatenate([stream.push(x[i:i + 320]) for i in range(0, len(x), 320)])
    ref = _per_step_reference(t, x)
    assert len(got) == len(ref) > 0
    assert np.array_equal(got, ref)


@pytest.mark.parametrize("encoder", ["cache", "reencode"])
def test_push_many_equals_pushing_one_by_one(encoder):
    t = S3Tokenizer.random(tiny(stream_encoder=encoder, lookahead_seconds=0.1), seed=2)
    rng = np.random.default_rng(5)
    audio = [rng.standard_normal(SR * 2).astype(np.float32) * 0.1 * (i + 1) for i in range(3)]
    solo = [stream_codes(t, a, 3200) for a in audio]
    streams = [t.new_stream() for _ in audio]
    got: list[list[np.ndarray]] = [[] for _ in audio]
    for i in range(0, SR * 2, 3200):
        pcms = [a[i:i + 3200] if k < 2 else a[i:i + 1600] for k, a in enumerate(audio)]
        for k, codes in enumerate(t.push_many(streams, pcms)):
            got[k].append(codes)
        got[2].append(t.push_many([streams[2]], [audio[2][i + 1600:i + 3200]])[0])
    for k in range(3):
        assert np.array_equal(np.concatenate(got[k] + [streams[k].flush()]), solo[k])


def test_stream_memory_is_bounded_over_a_long_call():
    t = S3Tokenizer.random(tiny(lookahead_seconds=0.0), seed=0)
    stream = t.new_stream()
    keys = stream._keys
    x = speechlike(40.0, seed=7)
    total = sum(len(stream.push(x[i:i + 320])) for i in range(0, len(x), 320))
    assert total == 40 * 25 and stream.buffered <= stream.capacity == round(2.2 * SR)
    assert stream._keys is keys and tuple(keys.shape) == (2, 50, 64)  # layers x 2 s of codes x width


# --------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip(tok, audio, tmp_path):
    tok.save(tmp_path / "tk")
    assert json.loads((tmp_path / "tk" / CONFIG_FILE).read_text())["config"]["version"] == "v2"
    again = S3Tokenizer.load(tmp_path / "tk")
    assert again.config == tok.config
    assert np.array_equal(again.encode(audio), tok.encode(audio))


def test_folder_saved_before_versions_loads_as_v1(tmp_path, audio):
    v1 = S3Tokenizer.random(S3Config(**TINY, codebook_size=64), seed=0)
    v1.save(tmp_path)
    data = json.loads((tmp_path / CONFIG_FILE).read_text())
    del data["config"]["version"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    again = S3Tokenizer.load(tmp_path)
    assert again.config.version == "v1" and np.array_equal(again.encode(audio), v1.encode(audio))


def _refused(path, fn) -> str:
    with pytest.raises(CheckpointError) as err:
        fn()
    assert str(path) in str(err.value)
    return str(err.value)


def test_mismatched_state_dicts_are_refused_by_name(tok, tmp_path):
    path = tmp_path / "s3.pt"
    torch.save(S3Tokenizer.random(S3Config(**TINY), seed=0).model.state_dict(), path)  # a v1 network
    msg = _refused(path, lambda: S3Tokenizer.from_state_dict_file(path, tiny()))
    assert ("missing 4 key(s): encoder.blocks.0.attn.fsmn_block.weight, encoder.blocks.1.attn.fsmn_block.weight, "
            "quantizer._codebook.project_down.weight, quantizer._codebook.project_down.bias") in msg
    assert "unexpected 2 key(s): encoder.positional_embedding, quantizer._codebook.embed" in msg
    assert "version=v2" in msg
    state = tok.model.state_dict()
    state["encoder.blocks.1.attn.fsmn_block.weight"] = torch.zeros(64, 1, 15)
    torch.save(state, path)
    msg = _refused(path, lambda: S3Tokenizer.from_state_dict_file(path, tiny()))
    assert "encoder.blocks.1.attn.fsmn_block.weight is (64, 1, 15), expected (64, 1, 31)" in msg
    del state["quantizer._codebook.project_down.bias"]
    state["encoder.blocks.1.attn.fsmn_block.weight"] = torch.zeros(64, 1, 31)
    torch.save(state, path)
    msg = _refused(path, lambda: S3Tokenizer.from_state_dict_file(path, tiny()))
    assert "missing 1 key(s): quantizer._codebook.project_down.bias" in msg


def test_corrupt_weights_are_refused(tok, tmp_path):
    tok.save(tmp_path)
    data = (tmp_path / WEIGHTS_FILE).read_bytes()
    (tmp_path / WEIGHTS_FILE).write_bytes(data[:len(data) // 2])
    _refused(tmp_path / WEIGHTS_FILE, lambda: S3Tokenizer.load(tmp_path))


def _write_onnx_v2(path, tok: S3Tokenizer) -> None:
    """An ONNX file named as upstream's converter expects of speech_tokenizer_v2.onnx:
    convs onnx::Conv_2216..2219, block weights named by their consuming node (MatMul
    weights stored (in, out); LayerNormalization nodes; the FSMN's Conv), the FSQ
    projection as onnx::MatMul_2536 (stored (in, out)) and quantizer.project_in.bias.
    Nodes carry the names only; the graph is not meant to run."""
    g = OnnxGraph()
    init, node = g.init, g.node
    sd = {k: v.detach().float().numpy() for k, v in tok.model.state_dict().items()}
    counter = iter(range(3000, 100000))

    for i, conv in enumerate(("conv1", "conv2")):
        w = init(f"onnx::Conv_{2216 + 2 * i}", sd[f"encoder.{conv}.weight"])
        b = init(f"onnx::Conv_{2217 + 2 * i}", sd[f"encoder.{conv}.bias"])
        node("Conv", f"/{conv}/Conv", ["x", w, b], strides=[2], pads=[1, 1], kernel_shape=[3])
    for i in range(tok.config.layers):
        p = f"encoder.blocks.{i}."
        for lin in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/mlp.0", "mlp/mlp.2"):
            key = p + lin.replace("/", ".").replace("mlp.mlp", "mlp")
            weight = init(f"onnx::MatMul_{next(counter)}", sd[key + ".weight"].T)
            node("MatMul", f"/blocks.{i}/{lin}/MatMul", ["x", weight])
            if key + ".bias" in sd:
                node("Add", f"/blocks.{i}/{lin}/Add", [init(key[8:] + ".bias", sd[key + ".bias"]), "x"])
        node("Conv", f"/blocks.{i}/attn/fsmn_block/Conv",
             ["x", init(f"onnx::Conv_{next(counter)}", sd[p + "attn.fsmn_block.weight"])], group=64)
        for ln in ("attn_ln", "mlp_ln"):
            scale = init(f"{p[8:]}{ln}.weight", sd[f"{p}{ln}.weight"])
            shift = init(f"{p[8:]}{ln}.bias", sd[f"{p}{ln}.bias"])
            node("LayerNormalization", f"/blocks.{i}/{ln}/LayerNormalization", ["x", scale, shift])
        node("Reshape", f"/blocks.{i}/attn/Reshape", ["x", init(f"shape_{i}", np.array([0, 0, 4, -1], np.int64))])
    node("MatMul", "/quantizer/project_in/MatMul",
         ["x", init("onnx::MatMul_2536", sd["quantizer._codebook.project_down.weight"].T)])
    bias = init("quantizer.project_in.bias", sd["quantizer._codebook.project_down.bias"])
    node("Add", "/quantizer/project_in/Add", [bias, "x"])
    g.save(path, "s3v2")


def test_onnx_in_upstreams_v2_naming_loads(tok, audio, tmp_path):
    path = tmp_path / "speech_tokenizer_v2.onnx"
    _write_onnx_v2(path, tok)
    loaded = S3Tokenizer.from_onnx(path)
    c = loaded.config
    assert (c.version, c.width, c.heads, c.layers, c.codebook_size, c.token_rate) == ("v2", 64, 4, 2, 6561, 25)
    for key, value in tok.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert np.array_equal(loaded.encode(audio), tok.encode(audio))
    msg = _refused(path, lambda: S3Tokenizer.from_onnx(path, S3Config(**TINY, token_rate=25)))
    assert "version: file has v2, config says v1" in msg


# --------------------------------------------------------------------------- the tiny model


def test_tiny_v2_model_has_a_v2_tokenizer(tmp_path):
    from model.checkpoint import load_model, write_tiny_model

    write_tiny_model(tmp_path / "m", seed=0, decoder="v2")
    loaded = load_model(tmp_path / "m")
    tokenizer = loaded.tokenizer
    assert isinstance(tokenizer, S3Tokenizer) and tokenizer.config == tiny()
    # The published key names, two blocks of them.
    assert set(tokenizer.model.state_dict()) == {k for k in _published_layout() if not re.search(r"blocks\.[2-5]\.", k)}
    codes = tokenizer.encode(speechlike(2.0))
    assert codes.shape == (50,) and codes.min() >= 0 and codes.max() < loaded.decoder.codebook_size == 6561
    assert len(stream_codes(tokenizer, speechlike(2.0))) == 50
