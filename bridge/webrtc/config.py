"""The WebRTC leg's settings and their command-line options (see bridge/settings.py).

`WebRtcSettings` is frozen and validated in `__post_init__` (ValueError naming the field);
`WEBRTC_OPTIONS` declares each field's flag, `DUPLEXLINE_WEBRTC_*` variable and parser.
The offer token is a secret: `repr` never shows it.

    --webrtc-ice-servers     STUN/TURN servers for the peer connections; default none, so
                             nothing is asked of the internet (loopback and LAN need none)
    --webrtc-public-address  the address the media is announced on (1:1 NAT, e.g. a cloud
                             VM's public IP); default: the host addresses as gathered
    --webrtc-token           bearer token the offer endpoint wants (default: open)
    --webrtc-max-calls       peer connections this process holds at once (default 100)
    --webrtc-media           fast (default) or stock: aiortc's own media path, kept as the
                             benchmark baseline and a fallback (docs/webrtc.md)
    --webrtc-connect-timeout seconds from the answer to ICE + DTLS connected (default 10)
    --webrtc-max-pending     offers answered but not yet connected, at once (default 4)
    --webrtc-max-pending-per-source   the same, from one remote address (default 2)

An answered offer holds an engine slot before it connects; the pending caps and the connect
timeout keep offers that never connect from locking real callers out (SIP ones included).
Behind a reverse proxy every offer comes from the proxy's address: raise the per-source cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..options import Option, choice, ip_address, positive_int, redacted_repr, seconds

__all__ = ["IceServer", "WebRtcSettings", "WEBRTC_OPTIONS", "MEDIA_PATHS", "parse_ice_servers"]

MEDIA_PATHS = ("fast", "stock")
_ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
_MAX_CALLS_LIMIT = 10000
_CONNECT_TIMEOUT_RANGE = (1.0, 300.0)


@dataclass(frozen=True)
class IceServer:
    """One RTCIceServer: `urls` (stun:/turn: URLs) and, for TURN, its credentials."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an ICE server needs at least one URL")
        for url in self.urls:
            if not url.startswith(_ICE_SCHEMES):
                raise ValueError(f"ICE server URL {url!r} must start with stun:, stuns:, turn: or turns:")
            if url.startswith(("turn:", "turns:")) and (self.username is None or self.credential is None):
                raise ValueError(f"TURN server {url!r} needs a username and a credential")

    def as_json(self) -> dict:
        """The browser's RTCIceServer dictionary (credentials included: the page needs them)."""
        out: dict = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"] = self.username
        if self.credential is not None:
            out["credential"] = self.credential
        return out


def parse_ice_servers(text: str) -> tuple[IceServer, ...]:
    """A JSON list of RTCIceServer dictionaries, or a comma-separated list of stun: URLs.

    `[{"urls": ["turn:turn.example.org:3478"], "username": "u", "credential": "p"}]` or
    `stun:stun.example.org:3478,stun:10.0.0.1:3478`. Empty text: no servers."""
    text = text.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc.msg} at character {exc.pos}") from None
        servers = []
        for item in raw:
            if not isinstance(item, dict) or "urls" not in item:
                raise ValueError('each ICE server must be an object with "urls"')
            urls = item["urls"]
            urls = (urls,) if isinstance(urls, str) else tuple(urls)
            if not all(isinstance(u, str) for u in urls):
                raise ValueError('"urls" must be a string or a list of strings')
            servers.append(IceServer(urls, item.get("username"), item.get("credential")))
        return tuple(servers)
    return tuple(IceServer((url.strip(),)) for url in text.split(",") if url.strip())


def _token(text: str) -> str:
    if len(text) < 16 or any(c.isspace() for c in text):
        raise ValueError("a token must be at least 16 characters, without spaces")
    return text


def _connect_timeout(text: str) -> float:
    value, (low, high) = seconds(text), _CONNECT_TIMEOUT_RANGE
    if not low <= value <= high:
        raise ValueError(f"must be {low:g}..{high:g} seconds")
    return value


@dataclass(frozen=True)
class WebRtcSettings:
    ice_servers: tuple[IceServer, ...] = ()
    public_address: str | None = None
    token: str | None = None  # a secret: __repr__ shows <set>
    max_calls: int = 100
    media: str = "fast"
    connect_timeout: float = 10.0
    max_pending: int = 4
    max_pending_per_source: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.ice_servers, tuple) or not all(isinstance(s, IceServer) for s in self.ice_servers):
            raise ValueError("ice_servers: must be a tuple of IceServer")
        if self.public_address is not None:
            try:
                ip_address(self.public_address)
            except ValueError as exc:
                raise ValueError(f"public_address: {exc}") from None
        if self.token is not None:
            _token(self.token)  # the same rule for code that builds settings by hand
        if not 1 <= self.max_calls <= _MAX_CALLS_LIMIT:
            raise ValueError(f"max_calls: must be 1..{_MAX_CALLS_LIMIT}, got {self.max_calls}")
        if self.media not in MEDIA_PATHS:
            raise ValueError(f"media: must be one of {', '.join(MEDIA_PATHS)}, got {self.media!r}")
        low, high = _CONNECT_TIMEOUT_RANGE
        if not low <= self.connect_timeout <= high:
            raise ValueError(f"connect_timeout: must be {low:g}..{high:g} seconds, got {self.connect_timeout}")
        for name in ("max_pending", "max_pending_per_source"):
            if not 1 <= getattr(self, name) <= _MAX_CALLS_LIMIT:
                raise ValueError(f"{name}: must be 1..{_MAX_CALLS_LIMIT}, got {getattr(self, name)}")

    def __repr__(self) -> str:
        return redacted_repr(self, ("token",))


WEBRTC_OPTIONS: tuple[Option, ...] = (
    Option("webrtc_ice_servers", parse_ice_servers,
           "STUN/TURN servers for WebRTC calls: a JSON list of RTCIceServer objects or a comma list of "
           "stun: URLs (default: none; loopback and LAN calls need none)", "SERVERS",
           section="webrtc", field="ice_servers"),
    Option("webrtc_public_address", ip_address,
           "IP address to announce for WebRTC media instead of the host's own (1:1 NAT; default: none)",
           "IP", section="webrtc", field="public_address"),
    Option("webrtc_token", _token,
           "bearer token POST /webrtc/offer requires; the page takes it from its URL as #token=... "
           "(default: none, the offer endpoint is open)", "TOKEN", section="webrtc", field="token"),
    Option("webrtc_max_calls", positive_int,
           "WebRTC calls this process holds at once; more are refused with 503 (default 100)", "N",
           section="webrtc", field="max_calls"),
    Option("webrtc_media", choice(MEDIA_PATHS),
           "WebRTC media path: fast (default) or stock (aiortc's own, slower; a fallback and the "
           "benchmark baseline)", "PATH", section="webrtc", field="media"),
    Option("webrtc_connect_timeout", _connect_timeout,
           "seconds from the answer to the WebRTC connection being up (ICE + DTLS); a call not "
           "connected by then ends and frees its slot (default 10)", "SECONDS",
           section="webrtc", field="connect_timeout"),
    Option("webrtc_max_pending", positive_int,
           "WebRTC offers answered but not yet connected, at once; more are refused with 503 "
           "(default 4)", "N", section="webrtc", field="max_pending"),
    Option("webrtc_max_pending_per_source", positive_int,
           "the same, from one remote address (default 2; raise it behind a reverse proxy)", "N",
           section="webrtc", field="max_pending_per_source"),
)
