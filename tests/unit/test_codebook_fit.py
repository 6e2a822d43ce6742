"""The fitted demo tokenizer: identity blocks, k-means centres, codes that tell a loud
voice-like sound from quiet noise where the random tokenizer's do not."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.s3_tokenizer import S3Tokenizer, tiny_config_for
from model.train.codebook_fit import content_front_end, fit_codebook, frame_features

RATE = 16000


def _talk_and_pause(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Alternating 0.5 s of a loud buzz (harmonics of a wandering pitch) and 0.5 s of quiet
    noise, and which 20 ms codes are the buzz's (codes wholly inside either part)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    buzz = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.3
    loud = (t % 1.0) < 0.5
    pcm = np.where(loud, buzz, 0.0) + rng.normal(0, 0.003, len(t))
    centres = (np.arange(int(seconds * 50)) + 0.5) / 50
    phase_in = centres % 1.0
    label = np.where((phase_in > 0.06) & (phase_in < 0.44), 1, np.where((phase_in > 0.56) & (phase_in < 0.94), 0, -1))
    return pcm.astype(np.float32), label


def _purity(tokenizer, signals) -> float:
    """How well the majority label of each code predicts the label (1.0: codes never mix)."""
    counts = np.zeros((tokenizer.config.codebook_size, 2))
    for pcm, label in signals:
        codes = tokenizer.encode(pcm)[:len(label)]
        keep = label[:len(codes)] >= 0
        np.add.at(counts, (codes[keep], label[:len(codes)][keep]), 1)
    return counts.max(1).sum() / counts.sum()


@pytest.fixture(scope="module")
def signals():
    return [_talk_and_pause(6.0, seed) for seed in range(4)]


def test_blocks_pass_the_convolutions_through():
    tok = content_front_end(S3Tokenizer.random(tiny_config_for(50, 32), seed=1), scale=10.0)
    mel = tok.log_mel(np.random.default_rng(0).normal(0, 0.1, RATE).astype(np.float32))
    encoder = tok.model.encoder
    with torch.inference_mode():
        hidden, _ = encoder(mel[None], torch.tensor([mel.shape[1]]))
        conv, _ = encoder.features(mel[None], torch.tensor([mel.shape[1]]))
        expected = conv + encoder.positional_embedding[None, :conv.shape[1]]
    torch.testing.assert_close(hidden, expected)


def test_codebook_rows_are_the_unit_means_of_their_frames(signals):
    tok = content_front_end(S3Tokenizer.random(tiny_config_for(50, 16), seed=0))
    fit_codebook(tok, [pcm for pcm, _ in signals], iterations=40)
    frames = torch.cat([frame_features(tok, pcm) for pcm, _ in signals])
    embed = tok.model.quantizer._codebook.embed
    assert torch.allclose(embed.norm(dim=1), torch.ones(16), atol=1e-5)
    nearest = (frames @ embed.T).argmax(1)
    # k-means' fixed point: each row is the normalised mean of the frames nearest to it.
    for code in nearest.unique():
        mean = F.normalize(frames[nearest == code].mean(0), dim=0)
        assert torch.allclose(embed[code], mean, atol=1e-3), f"code {int(code)}"
    # The quantiser's own search (Euclidean) picks the same rows as the dot product.
    assert np.array_equal(tok.encode(signals[0][0]), nearest[:len(tok.encode(signals[0][0]))].numpy())


def test_fitted_codes_separate_voice_from_noise_where_random_codes_do_not(signals):
    random_tok = S3Tokenizer.random(tiny_config_for(50, 64), seed=0)
    fitted = content_front_end(S3Tokenizer.random(tiny_config_for(50, 64), seed=0))
    fit_codebook(fitted, [pcm for pcm, _ in signals[:3]])
    held_out = signals[3:]
    assert _purity(fitted, held_out) > 0.97
    assert _purity(random_tok, held_out) < _purity(fitted, held_out) - 0.1


def test_too_little_audio_is_refused():
    tok = content_front_end(S3Tokenizer.random(tiny_config_for(50, 256), seed=0))
    with pytest.raises(ValueError, match="cannot place 256 codes"):
        fit_codebook(tok, [np.zeros(RATE, np.float32)])


def test_model_init_fits_the_tokenizer_to_a_manifest(tmp_path, signals):
    from scipy.io import wavfile

    from bridge.cli import main
    from model.checkpoint import load_model

    (tmp_path / "audio").mkdir()
    lines = []
    for i, (pcm, _) in enumerate(signals[:3]):
        # The assistant's channel is the caller's, delayed: both channels feed the fit.
        stereo = np.stack([pcm, np.roll(pcm, RATE // 4)], axis=1)
        wavfile.write(tmp_path / "audio" / f"d{i}.wav", RATE, np.round(stereo * 32767).astype(np.int16))
        lines.append(json.dumps({"version": 1, "sample_rate": RATE, "id": f"d{i}", "audio": f"audio/d{i}.wav", "channels": {"user": 0, "assistant": 1},
                                 "duration": len(pcm) / RATE,
                                 "turns": [{"speaker": "user", "text": "hello", "start": 0.0, "end": 1.0}]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    assert main(["model", "init", "--tiny", str(out), "--layers", "3", "--width", "96", "--codebook", "64",
                 "--fit-codebook", str(tmp_path / "m.jsonl"), "--fit-entries", "3"]) == 0
    loaded = load_model(out)
    backbone = loaded.model.backbone.config
    assert (backbone.num_hidden_layers, backbone.hidden_size) == (3, 96)
    assert loaded.model.vocab.speech_codes == 64 == loaded.tokenizer.codebook_size
    assert _purity(loaded.tokenizer, signals[3:]) > 0.97  # the saved tokenizer is the fitted one
    assert main(["model", "init", "--tiny", str(tmp_path / "bad"), "--fit-codebook", str(tmp_path / "none.jsonl")]) == 2
    assert not (tmp_path / "bad").exists()
