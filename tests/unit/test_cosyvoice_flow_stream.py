"""v2's flow chunk by chunk with caches (model/cosyvoice_flow_stream.py) against the
flow run once over the whole utterance on the same chunk grid (`CosyVoiceFlow.inference`
with `streaming=grid`: the masks built from the grid, no cache, the code path the
reference vectors pin in test_cosyvoice_flow.py). Tiny random v2 weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.cosyvoice_decoder import tiny_flow_config
from model.cosyvoice_encoder import ChunkGrid
from model.cosyvoice_flow import CosyVoiceFlow
from model.cosyvoice_flow_stream import FlowStream

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CODES = 47


@pytest.fixture(scope="module")
def flow() -> CosyVoiceFlow:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CosyVoiceFlow(tiny_flow_config("v2")).eval()
    model.config = model.decoder.config = type(model.config)(**{**model.config.__dict__, "n_timesteps": 4})
    return model


def voice(prompt: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(192).astype(np.float32), rng.integers(0, 6561, prompt),
            (rng.standard_normal((2 * prompt, 80)) - 5.0).astype(np.float32))


def whole(flow: CosyVoiceFlow, codes: np.ndarray, prompt: tuple, grid: ChunkGrid) -> torch.Tensor:
    embedding, tokens, mel = prompt
    return flow.inference(torch.from_numpy(codes)[None], torch.from_numpy(tokens).long().reshape(1, -1),
                          torch.from_numpy(mel)[None], torch.from_numpy(embedding)[None], streaming=grid)[0]


def streamed(stream: FlowStream, codes: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    pieces, i, k = [], 0, 0
    while i < len(codes):
        n = sizes[k % len(sizes)]
        pieces.append(stream.push(codes[i:i + n]))
        i, k = i + n, k + 1
    return pieces + [stream.finish()]


@pytest.mark.parametrize("prompt, left, sizes", [
    (0, 2, [10]),  # no voice prompt, the default window
    (13, 2, [10]),  # a prompt that ends inside a chunk
    (30, 1, [3, 10, 7]),  # pushes that do not follow the chunks
    (4, 0, [10]),  # each chunk sees itself only
    (13, -1, [1, 13]),  # every chunk before: the keys grow with the reply
])
def test_streamed_mel_equals_the_whole_utterance_on_the_same_grid(flow, prompt, left, sizes):
    codes = np.random.default_rng(2).integers(0, 6561, CODES)
    p = voice(prompt)
    stream = FlowStream(flow, *p, chunk_tokens=10, left_chunks=left).prime()
    mel = torch.cat(streamed(stream, codes, sizes), dim=1)
    reference = whole(flow, codes, p, stream.grid)
    assert mel.shape == reference.shape == (80, 2 * CODES)
    torch.testing.assert_close(mel, reference, rtol=0, atol=1e-4)


def test_the_grid_is_what_makes_them_equal(flow):
    """The comparison is not vacuous: on upstream's own grid (25-token chunks from the
    first prompt code, every chunk before seen), or with the grid's look-ahead offset
    dropped, the whole utterance differs from the stream."""
    codes = np.random.default_rng(3).integers(0, 6561, CODES)
    p = voice(4)
    stream = FlowStream(flow, *p, chunk_tokens=10, left_chunks=2).prime()
    mel = torch.cat(streamed(stream, codes, [10]), dim=1)
    g = stream.grid
    assert g.offset == 9  # chunks end 3 codes before each push's end: at prompt + 10k - 3
    for other in (ChunkGrid(25), ChunkGrid(g.size, 0, g.left), ChunkGrid(g.size, g.offset, -1)):
        assert (mel - whole(flow, codes, p, other)).abs().max() > 1e-2, other


def test_each_push_of_a_chunk_gives_one_chunk_three_codes_late(flow):
    stream = FlowStream(flow, *voice(0), chunk_tokens=10, left_chunks=2).prime()
    codes = np.random.default_rng(4).integers(0, 6561, 40)
    frames = [stream.push(codes[i:i + 10]).shape[1] for i in range(0, 40, 10)]
    assert frames == [14, 20, 20, 20] and stream.pending == 3
    assert stream.finish().shape[1] == 6 and stream.pending == 0
    with pytest.raises(ValueError, match="finished"):
        stream.push(codes[:10])


def test_the_cache_keeps_left_chunks_and_no_more(flow):
    stream = FlowStream(flow, *voice(0), chunk_tokens=10, left_chunks=2).prime()
    codes = np.random.default_rng(5).integers(0, 6561, 100)
    for i in range(0, 100, 10):
        stream.push(codes[i:i + 10])
    estimator = stream._estimator[0]
    lengths = {k.shape[2] for k, _ in estimator._attention.values()}
    assert lengths == {40}  # 2 chunks of 20 frames: the next chunk's view, whatever the reply's length
    assert {k.shape[2] for k, _ in stream._encoder_tokens._attention.values()} == {20}


def test_many_streams_batched_equal_each_alone(flow):
    """Three streams at different points (one starts a chunk later, one has a prompt):
    `push_many` groups those whose chunk and caches have the same shapes into one batch."""
    rng = np.random.default_rng(6)
    voices = [voice(0, 1), voice(0, 2), voice(13, 3)]
    codes = [rng.integers(0, 6561, 40) for _ in voices]
    alone = []
    for p, c in zip(voices, codes):
        s = FlowStream(flow, *p).prime()
        alone.append(torch.cat([s.push(c[i:i + 10]) for i in range(0, 40, 10)] + [s.finish()], dim=1))
    streams = [FlowStream(flow, *p).prime() for p in voices]
    together: list[list[torch.Tensor]] = [[] for _ in streams]
    for i in range(0, 50, 10):
        late = [c[i - 10:i] if i >= 10 else c[:0] for c in codes]
        pushes = [codes[0][i:i + 10], late[1], codes[2][i:i + 10]]
        for part, mel in zip(together, FlowStream.push_many(streams, pushes)):
            part.append(mel)
    for part, mel in zip(together, FlowStream.push_many(streams, [c[:0] for c in codes], finish=True)):
        part.append(mel)
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.cat(a, dim=1), b, rtol=0, atol=1e-4)


def test_a_v1_flow_is_refused():
    with pytest.raises(ValueError, match="v2"):
        FlowStream(CosyVoiceFlow(tiny_flow_config("v1")), *voice(0))


def test_without_guidance_the_unconditional_row_is_not_run(flow):
    """Guidance 0: (1 + 0) v(x | mu) - 0 v(x | 0) is the conditioned row alone, so the
    estimator runs one row per stream, not two; the mel is what the two-row solver gives."""
    import dataclasses

    codes = np.random.default_rng(7).integers(0, 6561, 20)
    p = voice(0)
    two_rows = dataclasses.replace(flow.config, inference_cfg_rate=1e-30)  # weighs ~0, still runs the row
    saved = flow.config
    try:
        flow.config = flow.decoder.config = two_rows
        with_row = torch.cat(streamed(FlowStream(flow, *p).prime(), codes, [10]), dim=1)
        flow.config = flow.decoder.config = dataclasses.replace(saved, inference_cfg_rate=0.0)
        batches = []
        forward = flow.decoder.estimator.forward
        flow.decoder.estimator.forward = lambda x, *a, **k: batches.append(x.shape[0]) or forward(x, *a, **k)
        without = torch.cat(streamed(FlowStream(flow, *p).prime(), codes, [10]), dim=1)
    finally:
        flow.config = flow.decoder.config = saved
        del flow.decoder.estimator.forward
    assert set(batches) == {1}
    torch.testing.assert_close(without, with_row, rtol=0, atol=1e-4)
