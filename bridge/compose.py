"""Building the agent the settings ask for (the composition root's one model-facing part).

`omniflatten` with `--engine local` loads the model folder given by --model, or, with
none, builds a tiny random model at start-up and says loudly that it is untrained; with a
remote engine it loads nothing and places each call on an engine worker (the worker
command builds its engine here too). `echo` needs nothing.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from agent.agents import Agent, EchoAgent, OmniFlattenAgent
from agent.metrics import AgentMetrics

from .errors import ConfigError
from .settings import Settings

__all__ = ["build_agent"]

log = logging.getLogger(__name__)


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", choice, "torch sees no CUDA device (check nvidia-smi and that "
                          "torch is a CUDA build), use --device cpu")
    return choice


def build_voice_engine(settings: Settings, registry: CollectorRegistry):
    """The model, its tokenizer and decoder, and the engine in this process (serve with
    --engine local, and the worker). Raises CheckpointError/ConfigInvalid (model files),
    ConfigError (device, model folder)."""
    from model.checkpoint import build_model, load_model, serving_dtype, tiny_config
    from model.decoder_standin import StandInToneDecoder
    from model.engine import Engine
    from model.s3_tokenizer import S3Tokenizer, tiny_config_for
    from model.voice import LocalVoiceEngine

    device = _device(settings.device)
    if settings.model is not None:
        loaded = load_model(settings.model, device=device)
        model, tokenizer, decoder = loaded.model, loaded.tokenizer, loaded.decoder
        if tokenizer is None:
            raise ConfigError("model", str(settings.model), "the folder has no tokenizer/: the model "
                              "cannot hear the caller")
        log.info("model loaded from %s", settings.model)
    else:
        config = serving_dtype(tiny_config(), device)
        model = build_model(config, seed=0, device=device)
        # The tiny tokenizer of the model's speech codes (v2 architecture for 6561 codes).
        tokenizer = S3Tokenizer.random(tiny_config_for(config.speech_token_rate, config.speech_codebook_size),
                                       seed=0, device=device)
        decoder = StandInToneDecoder(config.decoder_sample_rate, config.speech_token_rate,
                                     config.speech_codebook_size)
        log.warning("no --model given: using a TINY RANDOM, UNTRAINED OmniFlatten model; callers "
                    "will hear stand-in tones, not speech (write one with `duplexline model init --tiny DIR`)")
    engine = Engine(model, settings.slots, tokenizer=tokenizer, registry=registry)
    return LocalVoiceEngine(engine, tokenizer, decoder)


def build_agent(settings: Settings, registry: CollectorRegistry, metrics: AgentMetrics,
                bridge_id: str = "bridge") -> Agent:
    """Raises CheckpointError/ConfigInvalid (model files), ConfigError (device, model folder)."""
    if settings.agent == "echo":
        return EchoAgent()
    if settings.engine == "local":
        voice = build_voice_engine(settings, registry)
        if settings.voice is not None:
            try:
                voice.check_voice(settings.voice)
            except ValueError as exc:
                raise ConfigError("voice", settings.voice, str(exc)) from None
        return OmniFlattenAgent(voice, metrics, default_voice=settings.voice)
    from model.worker_client import RemoteVoiceEngine
    from model.worker_registry import WorkerRegistry

    placement = WorkerRegistry(settings.redis) if settings.engine == "redis" else None  # type: ignore[arg-type]
    voice = RemoteVoiceEngine(registry, bridge_id=bridge_id, urls=settings.worker_urls, placement=placement,
                              model_id=settings.resolved_model_id if placement is not None else None)
    log.info("engine: remote, %s", "workers of the registry at " + str(settings.redis) if placement
             else "workers " + settings.engine)
    return OmniFlattenAgent(voice, metrics, default_voice=settings.voice)
