"""`FlowStream`: CosyVoice2's chunk-causal flow (v2) one chunk at a time, each chunk
computed once with caches instead of the whole prefix again (as upstream's streaming
does), and equal to the flow run once over the whole utterance on the same chunk grid
(`CosyVoiceFlow.inference(..., streaming=stream.grid)`), within float32 rounding.

The grid. Chunks of `chunk_tokens` tokens (2x frames after up-sampling), each attending
to itself and `left_chunks` chunks before it, in the encoder's two attention stacks and
in the estimator's. A token's encoding needs the next `pre_lookahead_len` (3) tokens, so
the grid is shifted by 3 against the codes' arrival: with pushes of `chunk_tokens` codes,
each push completes exactly one chunk, the one that ends 3 codes before the push's end
(the first chunk of an utterance is 3 shorter; `finish` computes the last 3 with the
zeros past the end, as the whole-utterance call does). So a code's mel comes 3 codes
(120 ms at 25 Hz) after the code, the least the look-ahead allows.

The voice's prompt (its codes and mel, cut to 2 frames per code as upstream's front end
does) comes first on the same grid; the chunks wholly inside it are computed once per
voice (`prime`), and each stream starts from a copy.

What each chunk keeps (model/stream_cache.py): per attention layer the keys and values of
the chunks its grid lets the next chunk see (encoder: `left_chunks` x chunk tokens and
frames; estimator: the same frames at each Euler step, for both guidance rows), per
causal convolution its last inputs (pre-lookahead 2 tokens; up-sampling 4 frames; the
estimator's k3 convs 2 frames at each step). The fixed noise is indexed by the frame's
place in the utterance (modulo its 15 000 frames).

`push_many` advances many streams at once: streams whose next chunk has the same shape
and the same past lengths run as one batch (every stream past its first `left_chunks`
chunks of a reply, with pushes of one chunk, is in the same group).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .cosyvoice_encoder import ChunkGrid
from .cosyvoice_flow import V2, CosyVoiceFlow
from .stream_cache import StreamCache

__all__ = ["FlowStream"]


@dataclass
class _Chunk:
    start: int  # first token (utterance positions, the prompt first)
    end: int


class FlowStream:
    """One utterance's flow state. Not thread-safe."""

    def __init__(self, flow: CosyVoiceFlow, embedding: np.ndarray, prompt_tokens: np.ndarray,
                 prompt_mel: np.ndarray, chunk_tokens: int = 10, left_chunks: int = 2) -> None:
        c = flow.config
        if c.version != V2:
            raise ValueError("FlowStream is the chunk-causal (v2) flow's")
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.flow = flow
        self._lookahead = c.pre_lookahead_len
        self._ratio = c.token_mel_ratio
        device = flow.spk_embed_affine_layer.weight.device
        dtype = flow.spk_embed_affine_layer.weight.dtype
        # Upstream's front end: as many prompt codes as the mel has code-lengths, and back.
        n = min(len(prompt_tokens), len(prompt_mel) // self._ratio)
        self._prompt_mel = torch.as_tensor(np.asarray(prompt_mel[:n * self._ratio], np.float32).T,
                                           device=device, dtype=dtype)  # (80, frames)
        self.prompt_tokens = n
        self.grid = ChunkGrid(chunk_tokens, (self._lookahead - n) % chunk_tokens, left_chunks)
        with torch.inference_mode():
            self._spks = flow.speaker(torch.as_tensor(np.asarray(embedding, np.float32)[None], device=device)
                                      .to(dtype))
        self._tokens = [int(t) for t in prompt_tokens[:n]]  # every token given, the prompt's first
        self._done = 0  # tokens whose mel is computed
        self._spans: collections.deque[int] = collections.deque(maxlen=max(left_chunks, 1))
        self._encoder_tokens = StreamCache()
        self._encoder_frames = StreamCache()
        self._estimator = [StreamCache() for _ in range(c.n_timesteps)]
        self._finished = False

    # ------------------------------------------------------------------ one stream

    def prime(self) -> FlowStream:
        """Compute the chunks the prompt alone decides (done once per voice; `copy` the
        result for each utterance)."""
        FlowStream.push_many([self], [np.zeros(0, np.int64)])
        return self

    def copy(self) -> FlowStream:
        out = object.__new__(FlowStream)
        out.__dict__.update(self.__dict__)
        out._tokens = list(self._tokens)
        out._spans = collections.deque(self._spans, maxlen=self._spans.maxlen)
        out._encoder_tokens = self._encoder_tokens.clone()
        out._encoder_frames = self._encoder_frames.clone()
        out._estimator = [cache.clone() for cache in self._estimator]
        return out

    def push(self, codes: np.ndarray) -> Tensor:
        """Add codes; return the mel (80, frames) of the codes that became final (the
        prompt's frames never come out)."""
        return FlowStream.push_many([self], [codes])[0]

    def finish(self) -> Tensor:
        """The mel of every code still waiting for its look-ahead (zeros past the end)."""
        return FlowStream.push_many([self], [np.zeros(0, np.int64)], finish=True)[0]

    @property
    def pending(self) -> int:
        """Codes given whose mel has not come out yet."""
        return len(self._tokens) - max(self._done, self.prompt_tokens)

    # ------------------------------------------------------------------ many streams

    @staticmethod
    def push_many(streams: list[FlowStream], codes: list[np.ndarray],
                  finish: bool | Sequence[bool] = False) -> list[Tensor]:
        """`push` (or where `finish`, push then `finish`) on each stream, the chunks of
        streams at the same point of the same grid computed as one batch."""
        if len({id(s) for s in streams}) != len(streams):
            raise ValueError("a stream appears twice in one batch")
        finishes = [finish] * len(streams) if isinstance(finish, bool) else list(finish)
        out: list[list[Tensor]] = [[] for _ in streams]
        for stream, ids, last in zip(streams, codes, finishes):
            if stream._finished:
                raise ValueError("this utterance is finished: start a new stream")
            stream._tokens.extend(int(t) for t in np.asarray(ids).reshape(-1))
            stream._finished = last
        while True:
            groups: dict[tuple, list[tuple[int, _Chunk]]] = {}
            for i, stream in enumerate(streams):
                chunk = stream._next_chunk()
                if chunk is not None:
                    groups.setdefault(stream._shape(chunk), []).append((i, chunk))
            if not groups:
                break
            for members in groups.values():
                mels = FlowStream._compute([streams[i] for i, _ in members], [chunk for _, chunk in members])
                for (i, _), mel in zip(members, mels):
                    out[i].append(mel)
        return [torch.cat(parts, dim=1) if parts else s._empty() for s, parts in zip(streams, out)]

    def _next_chunk(self) -> _Chunk | None:
        start = self._done
        size = self.grid.size
        end = start + size - (start + self.grid.offset) % size
        given = len(self._tokens)
        if end + self._lookahead <= given:
            return _Chunk(start, end)
        if self._finished and start < given:  # the look-ahead runs into the zeros past the end
            return _Chunk(start, min(end, given))
        return None

    def _shape(self, chunk: _Chunk) -> tuple:
        """Streams whose caches and chunk have equal shapes batch together."""
        ahead = min(self._lookahead, len(self._tokens) - chunk.end)
        past = self._done if self.grid.left < 0 else tuple(self._spans)
        return chunk.end - chunk.start, ahead, self._done > 0, past, self.grid

    @staticmethod
    def _compute(streams: list[FlowStream], chunks: list[_Chunk]) -> list[Tensor]:
        first = streams[0]
        flow = first.flow
        device, dtype = first._spks.device, first._spks.dtype
        r = first._ratio
        left = first.grid.left
        for stream, chunk in zip(streams, chunks):
            # The past the next chunk may see: this one and the left_chunks - 1 before it.
            before = list(stream._spans)[len(stream._spans) - left + 1:] if left > 1 else []
            keep = None if left < 0 else (chunk.end - chunk.start + sum(before) if left > 0 else 0)
            stream._encoder_tokens.keep = keep
            stream._encoder_frames.keep = None if keep is None else keep * r
            for cache in stream._estimator:
                cache.keep = None if keep is None else keep * r

        def ids(stream: FlowStream, a: int, b: int) -> list[int]:
            return stream._tokens[a:b]

        span = torch.tensor([ids(s, c.start, c.end) for s, c in zip(streams, chunks)], device=device)
        ahead = torch.tensor([ids(s, c.end, c.end + first._lookahead) for s, c in zip(streams, chunks)],
                             dtype=torch.long, device=device).reshape(len(streams), -1)
        sizes = [1] * len(streams)
        tokens = StreamCache.join([s._encoder_tokens for s in streams])
        frames = StreamCache.join([s._encoder_frames for s in streams])
        steps = [StreamCache.join([s._estimator[k] for s in streams]) for k in range(len(first._estimator))]
        with torch.inference_mode():
            h = flow.encoder.forward_span(flow.input_embedding(span), flow.input_embedding(ahead), tokens, frames)
            mu = flow.encoder_proj(h).transpose(1, 2).contiguous()
            n = mu.shape[2]
            noise = torch.stack([s._noise(c.start * r, n) for s, c in zip(streams, chunks)]).to(device, dtype)
            cond = torch.stack([s._cond(c.start * r, n) for s, c in zip(streams, chunks)])
            spks = torch.cat([s._spks for s in streams])
            mask = torch.ones(len(streams), 1, n, device=device, dtype=dtype)
            x = flow.decoder.solve(noise, mu, mask, spks, cond, caches=steps)
        # Pair rows (guidance) are interleaved per stream: two rows each in the estimator's caches.
        rows = [flow.decoder.rows_per_item] * len(streams)
        for stream, t, f, *per_step in zip(streams, tokens.split(sizes), frames.split(sizes),
                                           *[cache.split(rows) for cache in steps]):
            stream._encoder_tokens, stream._encoder_frames, stream._estimator = t, f, list(per_step)
        out = []
        for i, (stream, chunk) in enumerate(zip(streams, chunks)):
            stream._done = chunk.end
            stream._spans.append(chunk.end - chunk.start)
            prompt = max(0, stream.prompt_tokens - chunk.start) * r  # the prompt's frames never come out
            out.append(x[i, :, min(prompt, n):])
        return out

    def _noise(self, frame: int, n: int) -> Tensor:
        noise = self.flow.decoder.fixed_noise(self.flow.config.noise_frames)[0]
        index = torch.arange(frame, frame + n) % noise.shape[1]
        return noise[:, index]

    def _cond(self, frame: int, n: int) -> Tensor:
        cond = self._spks.new_zeros(self._prompt_mel.shape[0], n)
        known = self._prompt_mel[:, frame:frame + n]
        cond[:, :known.shape[1]] = known
        return cond

    def _empty(self) -> Tensor:
        return self._spks.new_zeros(self._prompt_mel.shape[0], 0, dtype=torch.float32)
