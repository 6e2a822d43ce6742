"""One call's CosyVoice decoding state (`CosyVoiceStream`) and the batched chunk step
over many calls (`decode_many`): what model/cosyvoice_decoder.py's docstring describes,
per push.

`decode_many` runs one push for each of many streams as batches: v2's flows through
`FlowStream.push_many` (streams at the same point of their chunk grid in one batch), then
HiFT over every stream whose mel has the same length and source cache (in the steady
state: all of them), f0 and the waveform batched, each stream's harmonic source drawn
from its own generator (so a stream's audio never depends on its batch). v1's flows run
one by one (their sliding windows differ). A single `push` is `decode_many` of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .codec import DecoderStream
from .cosyvoice_flow_stream import FlowStream

if TYPE_CHECKING:
    from .cosyvoice_decoder import CosyVoiceDecoder

__all__ = ["CosyVoiceStream", "decode_many"]

_RAMP_SECONDS = 0.005


class CosyVoiceStream(DecoderStream):
    """One call's decoder state. Not thread-safe."""

    def __init__(self, decoder: CosyVoiceDecoder, voice: str) -> None:
        self._d = decoder
        self.voice = voice
        self._generator = torch.Generator(device=decoder.device)  # HiFT draws its noise on the model's device
        self.reset()

    def reset(self) -> None:
        d = self._d
        self._generator.manual_seed(d.settings.seed)
        self._codes: list[int] = []  # v1: this utterance's codes, the last context_tokens of them
        self._mel = torch.zeros(d.flow.config.output_size, 0)  # v1: the mel this stream made for _codes
        self._spoken = 0  # codes of this utterance so far (v1's frame count runs on it)
        self._flow_stream: FlowStream | None = None  # v2: the utterance's cached flow
        self._waiting: list[bool] = []  # v2: spoken (or muted) flags of codes whose mel is still to come
        self._mel_tail: torch.Tensor | None = None  # last overlap frames of mel
        self._mel_wait: tuple[torch.Tensor, np.ndarray] | None = None  # a reply's first mel, too short to vocode
        self._source_tail: torch.Tensor | None = None  # the source under them
        self._speech_tail = np.zeros(0, np.float32)  # held back for the next cross-fade
        self._tail_gain = np.zeros(0, np.float32)  # the mute over the held mel tail's samples
        self._started = False

    def push(self, codes: np.ndarray) -> np.ndarray:
        return decode_many(self._d, [self], [codes])[0]

    # ---- the flow ---------------------------------------------------------------------------

    def _flow_v2(self, push_size: int) -> FlowStream:
        if self._flow_stream is None:
            self._flow_stream = self._d.flow_stream(self.voice, push_size)
        return self._flow_stream

    def _take_flags(self, spoken: np.ndarray, mel: torch.Tensor) -> np.ndarray:
        """v2: the spoken flags of the codes whose mel came out (they lag the codes)."""
        self._waiting.extend(bool(x) for x in spoken)
        out = mel.shape[1] // self._d.flow.config.token_mel_ratio
        flags, self._waiting = np.asarray(self._waiting[:out], bool), self._waiting[out:]
        return flags

    def _flow_v1(self, codes: np.ndarray) -> torch.Tensor:
        """(80, frames) mel of the new codes, continuing the context."""
        d = self._d
        voice = d.voice_of(self.voice)
        frames = d.mel_frames(self._spoken + len(codes)) - d.mel_frames(self._spoken)
        prompt_tokens = np.concatenate([voice.prompt_tokens, np.asarray(self._codes, np.int64)])
        prompt_mel = torch.cat([torch.from_numpy(voice.prompt_mel), self._mel.T], dim=0)
        mel = d.flow.inference(torch.from_numpy(codes)[None], torch.from_numpy(prompt_tokens)[None],
                               prompt_mel[None].to(d.device, d.dtype),
                               torch.from_numpy(voice.embedding)[None].to(d.device, d.dtype), frames=frames,
                               generator=self._generator)[0].float().cpu()
        keep = d.settings.context_tokens
        self._codes = (self._codes + [int(c) for c in codes])[-keep:] if keep else []
        self._mel = torch.cat([self._mel, mel], dim=1)
        self._spoken += len(codes)
        # The mel of the kept codes: v1's frames per code vary, so count them from the total.
        if keep:
            held = d.mel_frames(self._spoken) - d.mel_frames(self._spoken - len(self._codes))
            self._mel = self._mel[:, -held:] if held else self._mel[:, :0]
        else:
            self._mel = self._mel[:, :0]
        return mel

    # ---- HiFT ------------------------------------------------------------------------------

    def _hift_input(self, mel: torch.Tensor) -> torch.Tensor:
        """The held mel tail, then the new mel."""
        return mel if self._mel_tail is None else torch.cat([self._mel_tail, mel], dim=1)

    def _after_hift(self, x: torch.Tensor, speech: np.ndarray, source: torch.Tensor,
                    envelope: np.ndarray | None) -> np.ndarray:
        """Mute, cross-fade with the held audio tail, hold back this chunk's tail."""
        d = self._d
        hop = d.hift.config.samples_per_frame
        overlap = d.settings.overlap_frames
        first = self._mel_tail is None
        # The repeated tail frames' samples were muted (or not) in the push that made them.
        gain = np.ones(len(speech), np.float32)
        if not first:
            gain[:overlap * hop] = self._tail_gain
        if envelope is not None:
            gain[len(gain) - len(envelope):] = envelope
        speech = speech * gain
        if not overlap or x.shape[1] <= overlap:  # nothing to hold back: a reply that ends this short
            return speech
        self._tail_gain = gain[len(gain) - overlap * hop:].copy()
        self._mel_tail = x[:, -overlap:]
        self._source_tail = source[..., -overlap * hop:]
        n = overlap * hop
        if not first and len(self._speech_tail):
            window = np.hamming(2 * n).astype(np.float32)
            speech[:n] = speech[:n] * window[:n] + self._speech_tail * window[n:]
        out, self._speech_tail = speech[:-n], speech[-n:].copy()
        return out


@dataclass
class _Push:
    """One stream's push through the batched stages."""

    stream: CosyVoiceStream
    n_samples: int  # the codes' duration
    filled: np.ndarray  # codes, silent ones replaced by the nearest spoken
    spoken: np.ndarray  # bool per code
    ends: bool  # an all-silent chunk: the utterance ends
    lead: int = 0  # samples of silence ahead (an utterance's first push)
    mel: torch.Tensor | None = None  # the mel that became final
    flags: np.ndarray | None = None  # spoken flags of that mel's codes
    speech: np.ndarray | None = None


def decode_many(decoder: CosyVoiceDecoder, streams: list[CosyVoiceStream], codes: list[np.ndarray]) -> list[np.ndarray]:
    """One push for each stream (at most once each), batched; each returns what its own
    `push` returns."""
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("a stream appears twice in one decoder batch")
    d = decoder
    hop = d.hift.config.samples_per_frame
    pushes = []
    for stream, c in zip(streams, codes):
        c = np.asarray(c, dtype=np.int64)
        spoken = c >= 0
        p = _Push(stream, int(round(len(c) * d.samples_per_code)), c, spoken, not spoken.any())
        if not p.ends:
            p.filled = _fill_silent(c)
            if not stream._started:  # the held-back tail's (and v2's look-ahead's) delay, as silence ahead
                stream._started = True
                p.lead = (d.settings.overlap_frames + d.delay_frames) * hop
        pushes.append(p)
    with torch.inference_mode():
        if d.family == "v2":
            todo = [p for p in pushes if not p.ends or (p.stream._flow_stream is not None
                                                        and p.stream._flow_stream.pending)]
            mels = FlowStream.push_many([p.stream._flow_v2(len(p.filled)) for p in todo],
                                        [p.filled[:0] if p.ends else p.filled for p in todo],
                                        finish=[p.ends for p in todo])
            for p, mel in zip(todo, mels):
                p.mel = mel.cpu()
                p.flags = p.stream._take_flags(p.spoken[:0] if p.ends else p.spoken, mel)
        else:
            for p in pushes:
                if not p.ends:
                    p.mel, p.flags = p.stream._flow_v1(p.filled), p.spoken
        for p in pushes:
            _hold_short_first_mel(p, d.settings.overlap_frames)
        _vocode_many(d, [p for p in pushes if p.mel is not None and p.mel.shape[1]])
    return [_assemble(p) for p in pushes]


def _hold_short_first_mel(p: _Push, overlap: int) -> None:
    """A reply's first HiFT call must have more than `overlap` frames (it holds that many
    back): fewer wait for the next push's, unless the reply ends."""
    stream = p.stream
    if stream._mel_wait is not None:
        mel, flags = stream._mel_wait
        stream._mel_wait = None
        if p.mel is not None:
            mel, flags = torch.cat([mel, p.mel], dim=1), np.concatenate([flags, p.flags])
        p.mel, p.flags = mel, flags
    if (p.mel is not None and stream._mel_tail is None and 0 < p.mel.shape[1] <= overlap
            and not p.ends):
        stream._mel_wait, p.mel = (p.mel, p.flags), None


def _vocode_many(d: CosyVoiceDecoder, pushes: list[_Push]) -> None:
    """HiFT for every push, batched by equal input length and source cache."""
    hop = d.hift.config.samples_per_frame
    groups: dict[tuple[int, int], list[tuple[_Push, torch.Tensor]]] = {}
    for p in pushes:
        x = p.stream._hift_input(p.mel)
        cache = p.stream._source_tail
        groups.setdefault((x.shape[1], 0 if cache is None else cache.shape[-1]), []).append((p, x))
    for (_, cached), members in groups.items():
        mel = torch.stack([x for _, x in members]).to(d.device, next(d.hift.parameters()).dtype)  # HiFT's own dtype
        f0 = d.hift.f0(mel)
        source = torch.cat([d.hift.source(f0[i:i + 1], stochastic=True, generator=p.stream._generator)
                            for i, (p, _) in enumerate(members)])
        if cached:  # the previous chunk's source under the repeated frames: the harmonics' phase runs on
            source[:, :, :cached] = torch.cat([p.stream._source_tail for p, _ in members])
        speech = d.hift.decode(mel, source).float().cpu().numpy()
        for i, (p, x) in enumerate(members):
            envelope = None if p.flags.all() else _mute_envelope(p.flags, p.mel.shape[1] * hop, d.sample_rate)
            p.speech = p.stream._after_hift(x, speech[i].astype(np.float32), source[i:i + 1], envelope)


def _assemble(p: _Push) -> np.ndarray:
    speech = p.speech if p.speech is not None else np.zeros(0, np.float32)
    if not p.ends:
        return np.concatenate([np.zeros(p.lead, np.float32), speech]) if p.lead else speech
    # The utterance ends: the last codes' audio, the held-back tail faded out, then silence.
    stream = p.stream
    tail = stream._speech_tail
    if len(tail):
        tail = tail * np.linspace(1.0, 0.0, len(tail), dtype=np.float32)
    stream.reset()
    out = np.zeros(max(p.n_samples, len(speech) + len(tail)), np.float32)
    out[:len(speech)] = speech
    out[len(speech):len(speech) + len(tail)] = tail
    return out


def _fill_silent(codes: np.ndarray) -> np.ndarray:
    """Silent codes take the nearest spoken code before them (after, at the start)."""
    out = codes.copy()
    spoken = np.flatnonzero(codes >= 0)
    idx = np.maximum.accumulate(np.where(codes >= 0, np.arange(len(codes)), -1))
    idx[idx < 0] = spoken[0]
    return out[idx]


def _mute_envelope(spoken: np.ndarray, n_samples: int, rate: int) -> np.ndarray:
    """1 under spoken codes, 0 under silent ones, with short linear ramps between."""
    per = n_samples / len(spoken)
    env = np.repeat(spoken.astype(np.float32), int(np.ceil(per)))[:n_samples]
    if len(env) < n_samples:
        env = np.pad(env, (0, n_samples - len(env)), mode="edge")
    ramp = max(1, int(_RAMP_SECONDS * rate))
    kernel = np.ones(ramp, np.float32) / ramp
    return np.convolve(env, kernel, mode="same").astype(np.float32)
