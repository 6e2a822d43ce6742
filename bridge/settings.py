"""The one typed settings object, built once from flags and `DUPLEXLINE_*` variables.

Every option is declared once in `OPTIONS`: its flag, its environment variable, its
parser and its help. A flag beats the variable, the variable beats the default. Values
are validated here, naming the bad field, so nothing the operator set is silently
ignored. Secrets are redacted in `repr`.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .options import (ENV_PREFIX, HostPort, Option, choice, existing_path, positive_int, redacted_repr, redis_url,
                      seconds)
from .records_config import RECORD_OPTIONS, RecordSettings
from .sip.config import SIP_OPTIONS, SipSettings
from .webrtc.config import WEBRTC_OPTIONS, WebRtcSettings
from .worker_config import WORKER_OPTIONS, WorkerSettings

__all__ = ["Settings", "OPTIONS", "add_serve_arguments", "add_worker_arguments", "settings_from"]

AGENTS = ("omniflatten", "echo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICES = ("auto", "cpu", "cuda")
EVENT_LOOPS = ("uvloop", "asyncio")
MIN_MEDIA_TIMEOUT = 1.0  # shorter would reap live calls over ordinary network jitter
MAX_MEDIA_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Settings:
    """Everything the serve command needs. Built by `settings_from`, never by hand in code
    that reads the environment."""

    sip_listen: HostPort = HostPort("127.0.0.1", 5060)
    http_listen: HostPort = HostPort("127.0.0.1", 8080)
    agent: str = "omniflatten"
    model: Path | None = None
    redis: str | None = None
    admin_token: str | None = None  # a secret: __repr__ shows <set>
    log_level: str = "INFO"
    slots: int = 16
    device: str = "auto"
    drain_timeout: float = 60.0
    event_loop: str = "uvloop"
    media_timeout: float = 30.0  # 0: off
    dead_air_seconds: float = 10.0  # 0: off (agent/quality.py)
    engine: str = "local"  # local | redis | HOST:PORT[,HOST:PORT...] (docs/worker.md)
    model_id: str | None = None
    voice: str | None = None  # the decoder's voice for calls whose route names none
    sip: SipSettings = field(default_factory=SipSettings)
    webrtc: WebRtcSettings = field(default_factory=WebRtcSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    records: RecordSettings = field(default_factory=RecordSettings)

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ConfigError("agent", self.agent, f"must be one of {', '.join(AGENTS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", self.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
        if not 1 <= self.slots <= 4096:
            raise ConfigError("slots", self.slots, "must be 1..4096")
        if self.device not in DEVICES:
            raise ConfigError("device", self.device, f"must be one of {', '.join(DEVICES)}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError("event_loop", self.event_loop, f"must be one of {', '.join(EVENT_LOOPS)}")
        if not self.drain_timeout >= 0:
            raise ConfigError("drain_timeout", self.drain_timeout, "must be >= 0 seconds")
        try:
            _check_media_timeout(self.media_timeout)
        except ValueError as exc:
            raise ConfigError("media_timeout", self.media_timeout, str(exc)) from None
        try:
            _check_media_timeout(self.dead_air_seconds)
        except ValueError as exc:
            raise ConfigError("dead_air_seconds", self.dead_air_seconds, str(exc)) from None
        if self.engine == "redis" and not self.redis:
            raise ConfigError("engine", self.engine, "needs --redis URL: the registry workers publish themselves in")
        if self.engine != "local" and self.agent != "omniflatten":
            raise ConfigError("engine", self.engine, f"the {self.agent} agent runs no model: use --engine local")
        if self.sip_listen == self.http_listen:
            raise ConfigError("http_listen", str(self.http_listen), "same address as --sip-listen")
        if self.sip.tls_listen in (self.sip_listen, self.http_listen):
            raise ConfigError("sip_tls_listen", str(self.sip.tls_listen), "same address as --sip-listen or "
                              "--http-listen (TLS needs its own TCP port, usually 5061)")

    @property
    def worker_urls(self) -> list[str]:
        """--engine HOST:PORT,...: the fixed list of workers; [] for local and redis."""
        return [] if self.engine in ("local", "redis") else self.engine.split(",")

    @property
    def resolved_model_id(self) -> str:
        """What a worker serves (and a bridge places by): --model-id, else the model
        folder's name, else the built-in tiny model's."""
        if self.model_id:
            return self.model_id
        return self.model.resolve().name if self.model is not None else "tiny-random"

    @property
    def store_name(self) -> str:
        return "redis" if self.redis else "memory"

    def __repr__(self) -> str:
        return redacted_repr(self, ("admin_token",))


def _check_media_timeout(value: float) -> float:
    if value != 0 and not MIN_MEDIA_TIMEOUT <= value <= MAX_MEDIA_TIMEOUT:
        raise ValueError(f"must be 0 (off) or {MIN_MEDIA_TIMEOUT:g}..{MAX_MEDIA_TIMEOUT:g} seconds")
    return value


def _media_timeout(text: str) -> float:
    return _check_media_timeout(seconds(text))


def _engine(text: str) -> str:
    value = text.strip()
    if value in ("local", "redis"):
        return value
    try:
        return ",".join(str(HostPort.parse(part.strip())) for part in value.split(","))
    except ValueError as exc:
        raise ValueError(f"expected local, redis or HOST:PORT[,HOST:PORT...] of workers ({exc})") from None


def _voice(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", text):
        raise ValueError("1-64 letters, digits, '_' or '-' (a voice of the model's decoder)")
    return text


def _model_id(text: str) -> str:
    if not text or len(text) > 128 or any(c.isspace() for c in text):
        raise ValueError("1-128 characters, no spaces")
    return text


CORE_OPTIONS: tuple[Option, ...] = (
    Option("sip_listen", HostPort.parse, "SIP address, UDP and TCP (default 127.0.0.1:5060)", "HOST:PORT"),
    Option("http_listen", HostPort.parse,
           "HTTP address for /metrics, /healthz, /readyz, /calls and the softphone page "
           "(default 127.0.0.1:8080)", "HOST:PORT"),
    Option("agent", choice(AGENTS), "who answers calls: omniflatten (default) or echo", "NAME"),
    Option("model", existing_path,
           "OmniFlatten model folder (default: a tiny random model built at start-up, untrained)",
           "PATH"),
    Option("redis", redis_url, "session store in Redis, e.g. redis://127.0.0.1:6379/0 "
           "(default: in memory)", "URL"),
    Option("admin_token", str, "bearer token required by admin routes (default: none)", "TOKEN"),
    Option("log_level", choice(LOG_LEVELS), "DEBUG, INFO (default), WARNING or ERROR", "LEVEL"),
    Option("slots", positive_int, "engine session slots: calls the model serves at once (default 16)", "N"),
    Option("device", choice(DEVICES), "where the model runs: auto (default: cuda when available), cpu, cuda",
           "DEVICE"),
    Option("drain_timeout", seconds, "on SIGTERM or POST /admin/drain, how long live calls may go on "
           "before they are hung up (default 60)", "SECONDS"),
    Option("event_loop", choice(EVENT_LOOPS), "the asyncio event loop: uvloop (default; measured ~10%% less "
           "CPU per WebRTC call) or asyncio (the standard library's)", "LOOP"),
    Option("engine", _engine, "where calls' model sessions run: local (default: in this process), redis "
           "(engine workers found in the --redis registry) or HOST:PORT[,HOST:PORT...] (fixed workers)", "WHERE"),
    Option("model_id", _model_id, "the model's id for placement: a worker publishes it, a bridge with a remote "
           "engine only uses workers that serve it (default: the --model folder's name, or tiny-random)", "ID"),
    Option("voice", _voice, "the speaker the decoder speaks in for calls whose route names none: a voice "
           "of the model's decoder (decoder/voices/NAME.npz; default: its default voice, decoder/voice.npz)",
           "NAME"),
    Option("media_timeout", _media_timeout, "hang up a call (reason media-timeout) when no caller audio has "
           "arrived for this long; calls on hold are spared (default 30; 0: off)", "SECONDS"),
    Option("dead_air_seconds", _media_timeout, "record a dead-air event (and count it, once per stretch) when "
           "no caller audio has been heard for this long; calls on hold are spared (default 10; 0: off)",
           "SECONDS"),
)
OPTIONS: tuple[Option, ...] = CORE_OPTIONS + SIP_OPTIONS + WEBRTC_OPTIONS + WORKER_OPTIONS + RECORD_OPTIONS
SECTIONS = {"sip": SipSettings, "webrtc": WebRtcSettings, "worker": WorkerSettings, "records": RecordSettings}
# What `duplexline worker` takes: the model and its engine, the registry, and its own section.
WORKER_COMMAND_OPTIONS = ("model", "model_id", "redis", "log_level", "slots", "device", "drain_timeout",
                          "event_loop")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        if opt.section == "worker":
            continue
        # Raw strings: parsing happens in settings_from so flags and variables share it.
        alone = {"nargs": "?", "const": opt.alone} if opt.alone is not None else {}
        parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, default=None,
                            action="append" if opt.repeat else "store", help=f"{opt.help}; env {opt.env}", **alone)


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        if opt.section != "worker" and opt.name not in WORKER_COMMAND_OPTIONS:
            continue
        # --listen and --advertise read better on the worker's own command line.
        short = ["--" + opt.field] if opt.section == "worker" and opt.field != "id" else []
        parser.add_argument(*short, opt.flag, dest=opt.name, metavar=opt.metavar, default=None,
                            help=f"{opt.help.removeprefix('worker: ')}; env {opt.env}")


def settings_from(args: argparse.Namespace | None, environ: Mapping[str, str]) -> Settings:
    """Flags beat `DUPLEXLINE_*` variables, which beat the defaults. Raises ConfigError
    naming the flag or variable that was wrong; an unknown DUPLEXLINE_ variable is an
    error too (a typo must not be silently ignored)."""
    known = {opt.env for opt in OPTIONS}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(unknown[0], environ[unknown[0]],
                          f"unknown variable; known: {', '.join(sorted(known))}")
    values: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for opt in OPTIONS:
        raw = getattr(args, opt.name, None) if args is not None else None
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            continue
        try:
            parsed = sum((opt.parse(r) for r in raw), ()) if isinstance(raw, list) else opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(source, raw, str(exc)) from None
        (sections[opt.section] if opt.section else values)[opt.field or opt.name] = parsed
    for name, cls in SECTIONS.items():
        try:
            values[name] = cls(**sections[name])
        except ValueError as exc:  # a cross-field check of the section failed
            raise ConfigError(name, sections[name], str(exc)) from None
    return Settings(**values)
