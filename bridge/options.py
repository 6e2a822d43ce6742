"""Declaring command-line options once: flag, `DUPLEXLINE_*` variable, parser, help.
Shared by bridge/settings.py and each leg's own config module; parsers raise ValueError
with a message the settings builder turns into a ConfigError naming the flag."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["ENV_PREFIX", "HostPort", "Option", "choice", "redis_url", "existing_path", "positive_int", "seconds",
           "json_entries", "ip_address", "redacted_repr", "http_url", "yes_no"]

ENV_PREFIX = "DUPLEXLINE_"


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


def choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError("expected a whole number >= 1")
    return int(text)


def yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no")


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError("expected a finite number of seconds >= 0")
    return value


def redis_url(text: str) -> str:
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a URL such as redis://127.0.0.1:6379/0")
    return text


def http_url(text: str) -> str:
    """An absolute http:// or https:// URL with a host (a webhook receiver)."""
    url = text.strip()
    if not url or len(url) > 2048 or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{url[:80]!r} is not a URL (1-2048 printable characters, no spaces)")
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"{url[:80]!r} is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url[:80]!r}: expected http://HOST[:PORT]/PATH or https://...")
    return url


def existing_path(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist")
    return path


def ip_address(text: str) -> str:
    """An IPv4 or IPv6 address, in its canonical text form."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def redacted_repr(obj: Any, secrets: tuple[str, ...]) -> str:
    """A settings dataclass's repr with each secret field shown as <set> (or None)."""
    shown = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name in secrets:
        shown[name] = "<set>" if shown[name] else None
    return f"{type(obj).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


def json_entries(option: str, path: Path, key: str, shape: str, bare_list: bool = False) -> list:
    """The list under `key` of a JSON settings file (or the file's whole list, when
    `bare_list`). ConfigError names the option, the file and what was expected (`shape`)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(option, str(path), f"cannot read JSON: {exc}") from None
    items = data.get(key) if isinstance(data, dict) else (data if bare_list else None)
    if not isinstance(items, list):
        raise ConfigError(option, str(path), f"expected {shape}")
    return items


@dataclass(frozen=True)
class Option:
    name: str  # field of the section's settings dataclass
    parse: Callable[[str], Any]
    help: str
    metavar: str
    section: str = ""  # "" = Settings itself; "sip", "webrtc": the leg's own dataclass
    field: str = ""  # the dataclass field; default: name
    repeat: bool = False  # the flag may be given again; `parse` returns a tuple, which add up
    alone: str | None = None  # what the flag means without a value (`--record`: "yes"); None: it needs one

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


