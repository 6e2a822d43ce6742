"""CosyVoice's flow-matching decoder: speech tokens -> 80-bin log-mel, both official
families, in plain torch (our own code; upstream FunAudioLLM/CosyVoice was read for the
checkpoint layout and the arithmetic only).

    v1 (CosyVoice-300M, `MaskedDiffWithXvec`): 50 Hz tokens (4096 codes), 22 050 Hz mel
       with hop 256, non-causal.
    v2 (CosyVoice2-0.5B, `CausalMaskedDiffWithXvec`): 25 Hz tokens (6561 codes), 24 kHz
       mel with hop 480 (2 frames per token), chunk-causal, streamable.

    [prompt tokens, tokens] -> input_embedding -> encoder (cosyvoice_encoder)
    -> encoder_proj (-> 80) -> [v1] length regulator to mel frames          = mu
    x-vector -> L2-normalise -> spk_embed_affine_layer                       = spks
    prompt mel in the first prompt frames, zeros after                       = cond
    noise z -> 10 Euler steps of dx/dt = 1.7 v(x|mu,spks,cond) - 0.7 v(x|0,0,0)
    -> drop the prompt frames                                                 = mel

Invariants:

- `CosyVoiceFlow.state_dict()` has exactly the names, shapes, dtypes and order of the
  official `flow.pt` (`input_embedding`, `spk_embed_affine_layer`, `encoder.*`,
  `encoder_proj`, `decoder.estimator.*`, v1 `length_regulator.*`); `load_flow` refuses a
  file with any key missing, extra or misshapen, naming the file and the keys.
- The solver reproduces upstream's rounding: t_k = 1 - cos(k/10 * pi/2) in float32, and
  the t fed to the estimator is the float32 running sum t += dt with dt = t_{k+1} - t,
  not t_k itself. Guidance runs the estimator once on a batch of two (row 1 with mu,
  spks and cond zero) and takes (1 + 0.7) row0 - 0.7 row1.
- v2's initial noise is fixed: the first T frames of randn(1, 80, 15000) drawn right after
  seeding 0 (upstream draws it in a constructor; we draw it once, lazily, from a private
  generator, so the global RNG is never touched). v1 draws fresh noise per call unless
  `noise` is given.
- v2 streaming (`streaming=True`, `finalize=False`) as upstream's `tts(stream=True)` calls
  it: the last `pre_lookahead_len` tokens are look-ahead context only, the encoder and the
  estimator attend in chunks (25 tokens, 50 frames) from the first prompt token. The
  returned mel covers the tokens before the look-ahead; a later call with more tokens
  recomputes from the start (no cache), as upstream does. `streaming` may also be any
  token `ChunkGrid`; `FlowStream` (cosyvoice_flow_stream.py) computes one chunk of such a
  grid at a time with caches and equals this whole-utterance call on the same grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cosyvoice_encoder import ChunkGrid, ConformerEncoder, EncoderConfig, LengthRegulator
from .cosyvoice_estimator import EstimatorConfig, FlowEstimator
from .errors import ConfigInvalid
from .state_dicts import check_state, read_state_file
from .stream_cache import StreamCache

__all__ = ["FlowConfig", "FlowInputs", "FlowMatching", "CosyVoiceFlow", "euler_schedule", "load_flow"]

V1 = "v1"
V2 = "v2"
_UPSTREAM_CLASSES = {"MaskedDiffWithXvec": V1, "CausalMaskedDiffWithXvec": V2}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FlowConfig:
    """Everything that shapes the flow decoder. Build with `official_v1()`,
    `official_v2()` or `from_upstream(flow_section)` (the constructor arguments of an
    upstream recipe or of the small reference builds)."""

    version: str = V1
    vocab_size: int = 4096
    input_size: int = 512  # token embedding width (= encoder input)
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    input_frame_rate: int = 50  # tokens per second
    mel_sample_rate: int = 22050  # v1's token -> frame rule: int(n / rate * sample_rate / hop)
    mel_hop: int = 256
    regulator_stages: int = 4  # v1: conv + GroupNorm + Mish stages in the length regulator
    regulator_edge_tokens: int = 20  # v1: head and tail interpolated apart (upstream's overlap)
    n_timesteps: int = 10
    inference_cfg_rate: float = 0.7
    noise_frames: int = 15000  # v2: length of the fixed noise (300 s of mel at 50 Hz)
    noise_seed: int = 0
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)

    def __post_init__(self) -> None:
        if self.version not in (V1, V2):
            raise ConfigInvalid("version", f"must be {V1!r} or {V2!r}, got {self.version!r}")
        for name in ("vocab_size", "input_size", "output_size", "spk_embed_dim", "input_frame_rate",
                     "mel_sample_rate", "mel_hop", "n_timesteps", "noise_frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigInvalid(name, f"must be a positive int, got {value!r}")
        if not isinstance(self.inference_cfg_rate, (int, float)) or self.inference_cfg_rate < 0:
            raise ConfigInvalid("inference_cfg_rate", f"must be >= 0, got {self.inference_cfg_rate!r}")
        if self.encoder.input_size != self.input_size:
            raise ConfigInvalid("encoder.input_size", f"{self.encoder.input_size} != input_size {self.input_size}")
        if self.estimator.in_channels != 4 * self.output_size:
            raise ConfigInvalid("estimator.in_channels", f"must be 4 x output_size = {4 * self.output_size} "
                                f"(x, mu, spks, cond), got {self.estimator.in_channels}")
        if self.estimator.out_channels != self.output_size:
            raise ConfigInvalid("estimator.out_channels", f"must equal output_size {self.output_size}, "
                                f"got {self.estimator.out_channels}")
        v2 = self.version == V2
        if v2 != self.encoder.upsamples or v2 != bool(self.encoder.pre_lookahead_len):
            raise ConfigInvalid("encoder", f"{self.version} needs {'a' if v2 else 'no'} pre-lookahead layer and "
                                f"{'an' if v2 else 'no'} up-sampling stage")
        if v2 != self.estimator.causal:
            raise ConfigInvalid("estimator.causal", f"{self.version} needs causal={v2}")
        if not v2 and (self.regulator_stages < 0 or self.regulator_edge_tokens < 1):
            raise ConfigInvalid("regulator_stages", "v1 needs regulator_stages >= 0 and regulator_edge_tokens >= 1")

    @property
    def causal(self) -> bool:
        return self.version == V2

    @property
    def pre_lookahead_len(self) -> int:
        return self.encoder.pre_lookahead_len

    @property
    def token_mel_ratio(self) -> int:
        """v2: mel frames per token (exact). v1 interpolates, see `v1_frames`."""
        return self.encoder.out_frames_per_token

    def v1_frames(self, tokens: int) -> int:
        """v1: mel frames for `tokens` new tokens, in upstream's float order."""
        return int(tokens / self.input_frame_rate * self.mel_sample_rate / self.mel_hop)

    @classmethod
    def official_v1(cls) -> FlowConfig:
        """CosyVoice-300M's `flow.pt` (104.9 M parameters)."""
        return cls()

    @classmethod
    def official_v2(cls) -> FlowConfig:
        """CosyVoice2-0.5B's `flow.pt` (112.5 M parameters)."""
        return cls(version=V2, vocab_size=6561, input_frame_rate=25, mel_sample_rate=24000, mel_hop=480,
                   regulator_stages=0, encoder=EncoderConfig.official_v2(), estimator=EstimatorConfig.official_v2())

    @classmethod
    def from_upstream(cls, flow: Mapping[str, Any], source: str | None = None) -> FlowConfig:
        """From an upstream-style `flow` section: the constructor arguments of
        `MaskedDiffWithXvec` / `CausalMaskedDiffWithXvec` with nested `encoder`,
        `length_regulator` (v1), `decoder.cfm_params`, `decoder.estimator` and, for v2,
        `encoder_hardcoded` (the widths upstream hardcodes). Settings we do not implement
        (another attention type, a convolution module, ...) are refused by name."""
        return _parse_upstream(flow, source)


def _get(section: Mapping[str, Any], key: str, path: str, source: str | None) -> Any:
    if not isinstance(section, Mapping) or key not in section:
        raise ConfigInvalid(f"{path}.{key}" if path else key, "missing", source)
    return section[key]


def _require(section: Mapping[str, Any], key: str, wanted: Any, path: str, source: str | None) -> None:
    value = section.get(key, wanted)
    if value != wanted:
        raise ConfigInvalid(f"{path}.{key}", f"only {wanted!r} is implemented, got {value!r}", source)


def _parse_upstream(flow: Mapping[str, Any], source: str | None) -> FlowConfig:
    cls_name = _get(flow, "class", "flow", source)
    if cls_name not in _UPSTREAM_CLASSES:
        raise ConfigInvalid("flow.class", f"must be one of {sorted(_UPSTREAM_CLASSES)}, got {cls_name!r}", source)
    version = _UPSTREAM_CLASSES[cls_name]
    enc = _get(flow, "encoder", "flow", source)
    dec = _get(flow, "decoder", "flow", source)
    cfm = _get(dec, "cfm_params", "flow.decoder", source)
    est = _get(dec, "estimator", "flow.decoder", source)
    for key, wanted in (("input_layer", "linear"), ("pos_enc_layer_type", "rel_pos_espnet"),
                        ("selfattention_layer_type", "rel_selfattn"), ("use_cnn_module", False),
                        ("macaron_style", False), ("activation_type", "swish"), ("normalize_before", True),
                        ("key_bias", True)):
        _require(enc, key, wanted, "flow.encoder", source)
    _require(est, "act_fn", "gelu", "flow.decoder.estimator", source)
    _require(cfm, "solver", "euler", "flow.decoder.cfm_params", source)
    _require(cfm, "t_scheduler", "cosine", "flow.decoder.cfm_params", source)
    width = _get(enc, "output_size", "flow.encoder", source)
    common = dict(input_size=_get(enc, "input_size", "flow.encoder", source), output_size=width,
                  attention_heads=_get(enc, "attention_heads", "flow.encoder", source),
                  linear_units=_get(enc, "linear_units", "flow.encoder", source),
                  num_blocks=_get(enc, "num_blocks", "flow.encoder", source),
                  static_chunk_size=enc.get("static_chunk_size", 0))
    extra: dict[str, Any] = {}
    if version == V2:
        hard = _get(flow, "encoder_hardcoded", "flow", source)
        for key in ("pre_lookahead_layer_in_channels", "pre_lookahead_layer_channels", "up_layer_channels",
                    "up_layer_out_channels"):
            if _get(hard, key, "flow.encoder_hardcoded", source) != width:
                raise ConfigInvalid(f"flow.encoder_hardcoded.{key}", f"must equal the encoder width {width} "
                                    f"(we take these widths from it), got {hard[key]}", source)
        lookahead = _get(hard, "pre_lookahead_layer_len", "flow.encoder_hardcoded", source)
        if flow.get("pre_lookahead_len", lookahead) != lookahead:
            raise ConfigInvalid("flow.pre_lookahead_len", f"{flow['pre_lookahead_len']} != encoder_hardcoded."
                                f"pre_lookahead_layer_len {lookahead}", source)
        encoder = EncoderConfig(**common, pre_lookahead_len=lookahead,
                                up_stride=_get(hard, "up_layer_stride", "flow.encoder_hardcoded", source),
                                num_up_blocks=_get(hard, "num_up_blocks", "flow.encoder_hardcoded", source))
        if flow.get("token_mel_ratio", encoder.up_stride) != encoder.up_stride:
            raise ConfigInvalid("flow.token_mel_ratio", f"must equal the up-sampling stride {encoder.up_stride}",
                                source)
        extra.update(mel_sample_rate=24000, mel_hop=480, regulator_stages=0)
    else:
        encoder = EncoderConfig(**common)
        reg = _get(flow, "length_regulator", "flow", source)
        if _get(reg, "channels", "flow.length_regulator", source) != _get(flow, "output_size", "flow", source):
            raise ConfigInvalid("flow.length_regulator.channels", "must equal flow.output_size", source)
        extra.update(regulator_stages=len(_get(reg, "sampling_ratios", "flow.length_regulator", source)))
    estimator = EstimatorConfig(
        in_channels=_get(est, "in_channels", "flow.decoder.estimator", source),
        out_channels=_get(est, "out_channels", "flow.decoder.estimator", source),
        channels=tuple(_get(est, "channels", "flow.decoder.estimator", source)),
        attention_head_dim=_get(est, "attention_head_dim", "flow.decoder.estimator", source),
        n_blocks=_get(est, "n_blocks", "flow.decoder.estimator", source),
        num_mid_blocks=_get(est, "num_mid_blocks", "flow.decoder.estimator", source),
        num_heads=_get(est, "num_heads", "flow.decoder.estimator", source),
        causal=version == V2,
        static_chunk_size=est.get("static_chunk_size", 0) if version == V2 else 0,
        num_decoding_left_chunks=est.get("num_decoding_left_chunks", -1))
    spk_dim = _get(dec, "spk_emb_dim", "flow.decoder", source)
    output_size = _get(flow, "output_size", "flow", source)
    if spk_dim != output_size:
        raise ConfigInvalid("flow.decoder.spk_emb_dim", f"the projected speaker vector is output_size wide "
                            f"({output_size}), got {spk_dim}", source)
    try:
        return FlowConfig(version=version, vocab_size=_get(flow, "vocab_size", "flow", source),
                          input_size=_get(flow, "input_size", "flow", source), output_size=output_size,
                          spk_embed_dim=_get(flow, "spk_embed_dim", "flow", source),
                          input_frame_rate=_get(flow, "input_frame_rate", "flow", source),
                          inference_cfg_rate=float(cfm.get("inference_cfg_rate", 0.7)),
                          encoder=encoder, estimator=estimator, **extra)
    except ConfigInvalid as exc:
        if source is None:
            raise
        raise ConfigInvalid(exc.field, str(exc).split(": ", 1)[-1], source) from exc


# --------------------------------------------------------------------------- solver


def euler_schedule(n_timesteps: int, device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
    """[(t_k, dt_k)] for k = 0 .. n-1: the t each Euler step feeds the estimator and the
    step it then takes, float32 0-d tensors with upstream's rounding (t a running sum)."""
    grid = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=torch.float32)
    grid = 1 - torch.cos(grid * 0.5 * torch.pi)
    t, dt = grid[0], grid[1] - grid[0]
    steps = []
    for k in range(1, n_timesteps + 1):
        steps.append((t, dt))
        t = t + dt
        if k < n_timesteps:
            dt = grid[k + 1] - t
    return steps


class FlowMatching(nn.Module):
    """`decoder`: the conditional flow-matching solver around `estimator`. It holds no
    parameters of its own (and v2's fixed noise is no buffer: it is not in `flow.pt`)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        self.estimator = FlowEstimator(config.estimator)
        self._noise: Tensor | None = None

    def fixed_noise(self, frames: int) -> Tensor:
        """v2: the first `frames` frames of randn(1, 80, noise_frames) after seeding
        `noise_seed` (CPU float32; the same numbers as upstream's `rand_noise`)."""
        c = self.config
        if frames > c.noise_frames:
            raise ValueError(f"{frames} mel frames exceed the fixed noise ({c.noise_frames} frames)")
        if self._noise is None:
            generator = torch.Generator(device="cpu").manual_seed(c.noise_seed)
            self._noise = torch.randn(1, c.output_size, c.noise_frames, generator=generator)
        return self._noise[:, :, :frames]

    @property
    def rows_per_item(self) -> int:
        """Estimator rows per item: 2 with guidance, 1 without (its row would weigh 0)."""
        return 2 if self.config.inference_cfg_rate else 1

    def velocity_pair(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor,
                      streaming: bool | ChunkGrid = False, cache: StreamCache | None = None) -> Tensor:
        """The estimator on two rows per item: row 2i conditioned on (mu, spks, cond) of
        item i, row 2i+1 with all three zero. x, mu, cond (B, 80, T); mask (B, 1, T);
        spks (B, 80) -> (2B, 80, T). With guidance 0, the conditioned rows only (B, 80, T)."""
        if self.rows_per_item == 1:
            return self.estimator(x, mask, mu, t.reshape(1).expand(x.shape[0]), spks, cond,
                                  streaming=streaming, cache=cache)

        def pair(a: Tensor, zero: bool = True) -> Tensor:
            return torch.stack([a, torch.zeros_like(a) if zero else a], dim=1).flatten(0, 1)

        return self.estimator(pair(x, zero=False), pair(mask, zero=False), pair(mu),
                              t.reshape(1).expand(2 * x.shape[0]), pair(spks), pair(cond),
                              streaming=streaming, cache=cache)

    def guide(self, pair: Tensor) -> Tensor:
        """Classifier-free guidance of a `velocity_pair`: (1 + w) row 2i - w row 2i+1."""
        w = self.config.inference_cfg_rate
        if self.rows_per_item == 1:
            return pair
        return (1.0 + w) * pair[0::2] - w * pair[1::2]

    def solve(self, noise: Tensor, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor,
              streaming: bool | ChunkGrid = False, caches: list[StreamCache] | None = None,
              on_step: Callable[[int, Tensor, Tensor, Tensor], None] | None = None) -> Tensor:
        """Euler-integrate from `noise` (B, 80, T) at t=0 to t=1. `caches`: one per step
        (the estimator sees a different x at each), for one chunk of a stream.
        `on_step(k, t, x, pair)` sees each step's input x and the estimator's rows."""
        x = noise
        for k, (t, dt) in enumerate(euler_schedule(self.config.n_timesteps, device=mu.device)):
            pair = self.velocity_pair(x, mask, mu, t.to(mu.dtype), spks, cond, streaming,
                                      None if caches is None else caches[k])
            if on_step is not None:
                on_step(k, t, x, pair)
            x = x + dt * self.guide(pair)
        return x.float()


# --------------------------------------------------------------------------- the flow


@dataclass
class FlowInputs:
    """What the solver gets for one call; `encoder_out` is before `encoder_proj`."""

    encoder_out: Tensor  # (1, n, encoder width); v2 n = 2 x tokens encoded
    mu: Tensor  # (1, 80, T)
    spks: Tensor  # (1, 80)
    cond: Tensor  # (1, 80, T): prompt mel, then zeros
    mask: Tensor  # (1, 1, T): all ones
    prompt_frames: int

    @property
    def frames(self) -> int:
        return self.mu.shape[-1]


class CosyVoiceFlow(nn.Module):
    """Tokens -> mel. Batch size 1, as upstream's inference. Build on any device
    (`torch.device("meta")` for layout checks: nothing is allocated or drawn)."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        # Registration order = the official state_dict order.
        self.input_embedding = nn.Embedding(c.vocab_size, c.input_size)
        self.spk_embed_affine_layer = nn.Linear(c.spk_embed_dim, c.output_size)
        self.encoder = ConformerEncoder(c.encoder)
        self.encoder_proj = nn.Linear(c.encoder.output_size, c.output_size)
        self.decoder = FlowMatching(c)
        if c.version == V1:
            self.length_regulator = LengthRegulator(c.output_size, c.regulator_stages)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], config: FlowConfig, *, source: object = "<state dict>",
                        device: torch.device | str = "cpu") -> CosyVoiceFlow:
        """Strict: every key present, none extra, every shape equal; else CheckpointError
        naming `source` and the keys."""
        model = cls(config)
        _check_state(model, state, source)
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()

    # ------------------------------------------------------------------ inference

    def speaker(self, embedding: Tensor) -> Tensor:
        """(1, 192) raw x-vector -> (1, 80)."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    @torch.inference_mode()
    def prepare(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                streaming: bool | ChunkGrid = False, finalize: bool = True, frames: int | None = None) -> FlowInputs:
        """Everything before the solver: encoder output, mu, spks, cond, mask. `frames`
        (v1): the new tokens' mel frames, instead of upstream's rule for them alone (a
        stream asks for its running total's share, so that chunks add up to the audio's
        length)."""
        c = self.config
        device = self.spk_embed_affine_layer.weight.device
        dtype = self.spk_embed_affine_layer.weight.dtype
        token, prompt_token = self._tokens(token, "token", device), self._tokens(prompt_token, "prompt_token", device)
        prompt_feat = torch.as_tensor(prompt_feat, device=device).to(dtype)
        embedding = torch.as_tensor(embedding, device=device).to(dtype)
        if prompt_feat.ndim != 3 or prompt_feat.shape[0] != 1 or prompt_feat.shape[2] != c.output_size:
            raise ValueError(f"prompt_feat must be (1, frames, {c.output_size}), got {tuple(prompt_feat.shape)}")
        if embedding.ndim != 2 or embedding.shape != (1, c.spk_embed_dim):
            raise ValueError(f"embedding must be (1, {c.spk_embed_dim}), got {tuple(embedding.shape)}")
        if c.version == V1 and (streaming or not finalize):
            raise ValueError("v1 has no chunk-causal mode: call with streaming=False, finalize=True")

        spks = self.speaker(embedding)
        tokens = torch.cat([prompt_token, token], dim=1)
        x = self.input_embedding(tokens.clamp(min=0))
        prompt_frames = prompt_feat.shape[1]
        if c.version == V1:
            h = self.encoder(x)
            n1 = prompt_token.shape[1]
            proj = self.encoder_proj(h)
            edge = c.regulator_edge_tokens
            new_frames = c.v1_frames(token.shape[1]) if frames is None else frames
            mu = self.length_regulator(proj[:, :n1], proj[:, n1:], prompt_frames, new_frames,
                                       edge_tokens=edge, edge_frames=c.v1_frames(edge))
        else:
            lookahead = c.pre_lookahead_len
            if finalize:
                h = self.encoder(x, streaming=streaming)
            else:
                if x.shape[1] <= lookahead:
                    raise ValueError(f"a non-final call needs more than {lookahead} tokens (the last "
                                     f"{lookahead} are look-ahead), got {x.shape[1]}")
                h = self.encoder(x[:, :-lookahead], context=x[:, -lookahead:], streaming=streaming)
            mu = self.encoder_proj(h)
        frames = mu.shape[1]
        if prompt_frames > frames:
            raise ValueError(f"prompt_feat has {prompt_frames} frames, more than the {frames} the tokens make")
        cond = torch.zeros(1, c.output_size, frames, device=device, dtype=dtype)
        cond[:, :, :prompt_frames] = prompt_feat.transpose(1, 2)
        mask = torch.ones(1, 1, frames, device=device, dtype=dtype)
        return FlowInputs(h, mu.transpose(1, 2).contiguous(), spks, cond, mask, prompt_frames)

    @torch.inference_mode()
    def inference(self, token: Tensor, prompt_token: Tensor, prompt_feat: Tensor, embedding: Tensor,
                  noise: Tensor | None = None, streaming: bool | ChunkGrid = False, finalize: bool = True, *,
                  generator: torch.Generator | None = None, frames: int | None = None) -> Tensor:
        """token (1, n) and prompt_token (1, m) int ids, prompt_feat (1, frames, 80) log-mel,
        embedding (1, 192) raw x-vector -> mel (1, 80, new frames), prompt removed.

        `noise` (1, 80, >= T): the solver's start (its first T frames); default v1 draws
        N(0, 1) (from `generator` if given), v2 uses its fixed noise. v2 streaming: see the
        module docstring; v1 accepts only streaming=False, finalize=True."""
        inputs = self.prepare(token, prompt_token, prompt_feat, embedding, streaming=streaming, finalize=finalize,
                              frames=frames)
        z = self._noise(noise, inputs.mu, generator)
        if isinstance(streaming, ChunkGrid):  # the estimator counts the token grid in frames
            streaming = streaming.scaled(self.config.token_mel_ratio)
        mel = self.decoder.solve(z, inputs.mu, inputs.mask, inputs.spks, inputs.cond, streaming=streaming)
        return mel[:, :, inputs.prompt_frames:]

    def _noise(self, noise: Tensor | None, mu: Tensor, generator: torch.Generator | None) -> Tensor:
        frames = mu.shape[-1]
        if noise is None:
            if self.config.version == V2:
                return self.decoder.fixed_noise(frames).to(mu.device, mu.dtype)
            if generator is not None and generator.device != mu.device:
                return torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)
            return torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        noise = torch.as_tensor(noise)
        if noise.ndim != 3 or noise.shape[0] != 1 or noise.shape[1] != mu.shape[1] or noise.shape[2] < frames:
            raise ValueError(f"noise must be (1, {mu.shape[1]}, >= {frames}), got {tuple(noise.shape)}")
        return noise[:, :, :frames].to(mu.device, mu.dtype)

    def _tokens(self, ids: Tensor, name: str, device: torch.device) -> Tensor:
        ids = torch.as_tensor(ids, device=device)
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be integer ids of shape (1, n), got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"{name} holds id {int(ids.max())}, the vocabulary has {self.config.vocab_size}")
        return ids.long()


# --------------------------------------------------------------------------- files


def load_flow(path: str | os.PathLike, config: FlowConfig, *, device: torch.device | str = "cpu") -> CosyVoiceFlow:
    """Load an upstream `flow.pt` (a plain state dict, read with weights_only) into a
    model built from `config`, strictly. Raises CheckpointError naming the file for a
    missing, unreadable or corrupt file and for any missing, extra or misshapen key."""
    path = Path(path)
    state = read_state_file(path)
    return CosyVoiceFlow.from_state_dict(state, config, source=path, device=device)


def _check_state(model: CosyVoiceFlow, state: Mapping[str, Tensor], source: object) -> None:
    c = model.config
    check_state(model, state, source, f"a {c.version} flow: vocab {c.vocab_size}, encoder width "
                f"{c.encoder.output_size} x {c.encoder.num_blocks} blocks, estimator channels "
                f"{list(c.estimator.channels)}", floats_only=True)
