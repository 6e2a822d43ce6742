"""The one typed settings object, built once from flags and `DUPLEXLINE_*` variables.

Every option is declared once in `OPTIONS`: its flag, its environment variable, its
parser and its help. A flag beats the variable, the variable beats the default. Values
are validated here, naming the bad field, so nothing the operator set is silently
ignored. Secrets are redacted in `repr`.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import ConfigError

__all__ = ["HostPort", "Settings", "OPTIONS", "add_serve_arguments", "settings_from"]

ENV_PREFIX = "DUPLEXLINE_"
AGENTS = ("omniflatten", "echo")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:5060")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"{host!r} is not an IP address (or localhost)") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"port {port!r} is not in 1..65535")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a URL such as redis://127.0.0.1:6379/0")
    return text


def _existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    return path


@dataclass(frozen=True)
class Settings:
    """Everything the serve command needs. Built by `settings_from`, never by hand in code
    that reads the environment."""

    sip_listen: HostPort = HostPort("127.0.0.1", 5060)
    http_listen: HostPort = HostPort("127.0.0.1", 8080)
    agent: str = "omniflatten"
    model: Path | None = None
    redis: str | None = None
    admin_token: str | None = field(default=None, repr=False)
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ConfigError("agent", self.agent, f"must be one of {', '.join(AGENTS)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", self.log_level, f"must be one of {', '.join(LOG_LEVELS)}")
        if self.sip_listen == self.http_listen:
            raise ConfigError("http_listen", str(self.http_listen), "same address as --sip-listen")

    @property
    def store_name(self) -> str:
        return "redis" if self.redis else "memory"

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.repr}
        shown["admin_token"] = "<set>" if self.admin_token else None
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass(frozen=True)
class Option:
    name: str  # Settings field
    parse: Callable[[str], Any]
    help: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("sip_listen", HostPort.parse, "SIP address, UDP and TCP (default 127.0.0.1:5060)", "HOST:PORT"),
    Option("http_listen", HostPort.parse,
           "HTTP address for /metrics, /healthz, /readyz, /calls and the softphone page "
           "(default 127.0.0.1:8080)", "HOST:PORT"),
    Option("agent", _choice(AGENTS), "who answers calls: omniflatten (default) or echo", "NAME"),
    Option("model", _existing_path,
           "OmniFlatten model folder (default: a tiny random model built at start-up, untrained)",
           "PATH"),
    Option("redis", _redis_url, "session store in Redis, e.g. redis://127.0.0.1:6379/0 "
           "(default: in memory)", "URL"),
    Option("admin_token", str, "bearer token required by admin routes (default: none)", "TOKEN"),
    Option("log_level", _choice(LOG_LEVELS), "DEBUG, INFO (default), WARNING or ERROR", "LEVEL"),
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    for opt in OPTIONS:
        # Raw strings: parsing happens in settings_from so flags and variables share it.
        parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, default=None,
                            help=f"{opt.help}; env {opt.env}")


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
    for opt in OPTIONS:
        raw = getattr(args, opt.name, None) if args is not None else None
        source = opt.flag
        if raw is None and opt.env in environ:
            raw, source = environ[opt.env], opt.env
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError as exc:
            raise ConfigError(source, raw, str(exc)) from None
    return Settings(**values)
