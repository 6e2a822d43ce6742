"""The engine's tick tokenizer: a batch of calls' chunks gives each call exactly the codes
it gets pushed alone, one stream may not appear twice in a batch, and the warm-up times
full streaming windows."""

import numpy as np
import pytest

from model.codec_batcher import TickTokenizer
from model.s3_tokenizer import S3Config, S3Tokenizer


def tokenizer():
    return S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=64), seed=1)


def test_a_batch_gives_each_stream_its_solo_codes():
    tok = tokenizer()
    ticks = TickTokenizer(tok)
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(16000).astype(np.float32) * 0.2 for _ in range(6)]
    solo = []
    for a in audio:
        s = tok.new_stream()
        solo.append(np.concatenate([s.push(a[i:i + 3200]) for i in range(0, len(a), 3200)]))
    streams = [ticks.new_stream() for _ in audio]
    got = [[] for _ in audio]
    for i in range(0, 16000, 3200):
        codes, seconds = ticks.push(streams, [a[i:i + 3200] for a in audio])
        assert seconds > 0
        for out, c in zip(got, codes):
            out.append(c)
    assert ticks.batches == 5
    for g, want in zip(got, solo):
        assert np.array_equal(np.concatenate(g), want)
        assert 0 < len(want) <= 50 and want.min() >= 0 and want.max() < 64  # 50 Hz, less any look-ahead


def test_a_stream_twice_in_one_batch_is_refused():
    ticks = TickTokenizer(tokenizer())
    s = ticks.new_stream()
    with pytest.raises(ValueError, match="twice"):
        ticks.push([s, s], [np.zeros(3200, np.float32)] * 2)


def test_warm_up_times_each_size_on_a_growing_pool():
    ticks = TickTokenizer(tokenizer())
    assert ticks.warm_up(1, 3200, prefill_seconds=0.4) > 0
    assert ticks.warm_up(3, 3200, prefill_seconds=0.4) > 0
    assert len(ticks._pool) == 3
    ticks.end_warm_up()
    assert ticks._pool == []
