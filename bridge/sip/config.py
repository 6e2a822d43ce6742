"""The SIP leg's settings and their command-line options (see bridge/settings.py).

`SipSettings` is built once by the settings builder from `--sip-*` flags and their
`DUPLEXLINE_SIP_*` variables; every field is validated in `__post_init__`, naming the field.
The SIP listen address itself is the core setting `--sip-listen`. Files named here (routes,
accounts) are read and checked when the leg starts, not here: this module never does I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .backends import CODECS as BACKEND_CODECS, MAX_CALLS
from ..options import HostPort, Option, existing_path, ip_address, positive_int, redacted_repr, seconds, yes_no

__all__ = ["SipSettings", "SIP_OPTIONS", "CODECS", "parse_codecs", "parse_port_range", "parse_auth",
           "parse_networks", "parse_rate"]

# Codec names as the operator writes them, in the default preference order.
CODECS = BACKEND_CODECS["baresip"]  # every name an operator may write


def parse_codecs(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"expected a comma-separated list of {', '.join(CODECS)}")
    for n in names:
        if n not in CODECS:
            raise ValueError(f"unknown codec {n!r}; known: {', '.join(CODECS)}")
    if len(set(names)) != len(names):
        raise ValueError("a codec is listed twice")
    return names


def parse_port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError("expected LOW-HIGH, e.g. 20000-29999")
    return int(lo), int(hi)


def parse_auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("expected USER:PASSWORD")
    return user, password


def parse_networks(text: str) -> tuple[str, ...]:
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(f"{part!r} is not a network (CIDR such as 10.0.0.0/8)") from None
    if not nets:
        raise ValueError("expected a comma-separated list of CIDR networks")
    return tuple(nets)


def parse_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected INVITEs per second, e.g. 5") from None
    if not value > 0 or value == float("inf"):
        raise ValueError("expected a finite rate > 0")
    return value


@dataclass(frozen=True)
class SipSettings:
    """The SIP leg's part of Settings. Defaults suit one bridge process on loopback."""

    public_address: str | None = None  # advertised in Via/Contact/SDP; default: the listen address
    rtp_ports: tuple[int, int] = (20000, 29999)
    codecs: tuple[str, ...] = ()  # empty: every codec the backend has, in CODECS order
    routes: Path | None = None
    accounts: Path | None = None
    auth: tuple[str, str] | None = None  # a secret: __repr__ shows <set>
    allow: tuple[str, ...] = ()  # empty: every source may call
    invite_rate: float = 20.0  # per-source new requests (INVITE, OPTIONS, REGISTER...) per second
    max_pending: int = 64  # INVITEs not yet answered and ACKed, in total
    max_pending_per_source: int = 16  # ... from one source address
    tcp_max_connections: int = 1024  # SIP TCP connections held open at once
    tcp_idle_timeout: float = 60.0  # seconds a SIP TCP connection may stay silent
    backend: str = "baresip"  # the SIP stack (bridge/sip/backends/)
    max_calls: int = 0  # 0: the backend's own ceiling per process (backends.MAX_CALLS)
    shared_listen: bool = False  # SO_REUSEPORT: several processes behind one SIP address
    ring_timeout: float = 30.0  # outbound: how long a dialled call may ring
    tls_listen: HostPort | None = None  # the front door's TLS address (bridge/sip/tls.py)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # what the stack verifies TLS peers against; None: the system's

    def __post_init__(self) -> None:
        lo, hi = self.rtp_ports
        if not (1024 <= lo < hi <= 65535) or hi - lo < 1:
            raise ValueError(f"rtp_ports: {lo}-{hi} must be a range within 1024-65535, low < high")
        if not self.invite_rate > 0:
            raise ValueError(f"invite_rate: {self.invite_rate!r} must be > 0")
        if not 1 <= self.max_pending_per_source <= self.max_pending <= 10_000:
            raise ValueError(f"max_pending_per_source ({self.max_pending_per_source}) and max_pending "
                             f"({self.max_pending}) must satisfy 1 <= per source <= total <= 10000")
        if not 1 <= self.tcp_max_connections <= 100_000:
            raise ValueError(f"tcp_max_connections: {self.tcp_max_connections} must be 1..100000")
        if not self.tcp_idle_timeout > 0:
            raise ValueError(f"tcp_idle_timeout: {self.tcp_idle_timeout!r} must be > 0 seconds")
        if self.backend not in MAX_CALLS:
            raise ValueError(f"backend: {self.backend!r} must be one of {', '.join(MAX_CALLS)}")
        has = BACKEND_CODECS[self.backend]
        if not self.codecs:
            object.__setattr__(self, "codecs", has)
        elif any(c not in has for c in self.codecs):
            raise ValueError(f"codecs: {self.codecs!r} must name some of {', '.join(has)} (what {self.backend} has)")
        most = MAX_CALLS[self.backend]
        if self.max_calls == 0:
            object.__setattr__(self, "max_calls", most)
        elif not 1 <= self.max_calls <= most:
            raise ValueError(f"max_calls: {self.max_calls} must be 1..{most} ({self.backend}'s limit per process)")
        if not self.ring_timeout > 0:
            raise ValueError(f"ring_timeout: {self.ring_timeout!r} must be > 0 seconds")
        if self.auth is not None and (not self.auth[0] or not self.auth[1]):
            raise ValueError("auth: expected USER:PASSWORD")
        if self.tls_listen is not None and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("tls_listen: --sip-tls-listen needs --sip-tls-cert FILE and --sip-tls-key FILE")
        if self.tls_listen is None and (self.tls_cert is not None or self.tls_key is not None):
            raise ValueError("tls_cert/tls_key: set --sip-tls-listen HOST:PORT too (where TLS callers connect)")

    def __repr__(self) -> str:
        return redacted_repr(self, ("auth",))


def _max_calls(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError("expected a whole number 1..255 (1..4 with --sip-backend pjsua2)")
    return int(text)


def _backend(text: str) -> str:
    if text not in MAX_CALLS:
        raise ValueError(f"expected one of {', '.join(MAX_CALLS)}")
    return text


SIP_OPTIONS: tuple[Option, ...] = (
    Option("sip_public_address", ip_address, "address advertised to SIP peers (default: the "
           "--sip-listen address)", "IP", section="sip", field="public_address"),
    Option("rtp_ports", parse_port_range, "RTP port range (default 20000-29999; give each bridge "
           "process on a machine its own range)", "LOW-HIGH", section="sip", field="rtp_ports"),
    Option("sip_codecs", parse_codecs, "audio codecs in preference order (default "
           "pcmu,pcma,g722,opus; pjsua2: pcmu,pcma,g722)", "LIST", section="sip", field="codecs"),
    Option("sip_routes", existing_path, "JSON file: called user or number -> agent; an unmatched "
           "call gets 404 (default: every call goes to --agent)", "FILE", section="sip", field="routes"),
    Option("sip_accounts", existing_path, "JSON file: accounts to register (user, domain, password, "
           "registrar, auth_user, interval) or trunks (register: false)", "FILE", section="sip",
           field="accounts"),
    Option("sip_auth", parse_auth, "require digest authentication on inbound INVITEs "
           "(default: none)", "USER:PASSWORD", section="sip", field="auth"),
    Option("sip_allow", parse_networks, "only these source networks may send INVITEs, "
           "e.g. 10.0.0.0/8,127.0.0.1/32 (default: any)", "CIDRS", section="sip", field="allow"),
    Option("sip_invite_rate", parse_rate, "per-source limit on new SIP requests (INVITE, OPTIONS, REGISTER, "
           "...) per second, with a burst of twice that; an INVITE over it gets 503 + Retry-After, "
           "anything else is dropped (default 20)", "RATE", section="sip", field="invite_rate"),
    Option("sip_max_pending", positive_int, "INVITEs not yet answered and ACKed the process holds at once; "
           "more get 503 + Retry-After (default 64)", "N", section="sip", field="max_pending"),
    Option("sip_max_pending_per_source", positive_int, "the same from one source address (default 16)",
           "N", section="sip", field="max_pending_per_source"),
    Option("sip_tcp_max_connections", positive_int, "SIP TCP connections held open at once; at most 32 per "
           "source address (default 1024)", "N", section="sip", field="tcp_max_connections"),
    Option("sip_tcp_idle_timeout", seconds, "seconds a SIP TCP connection may stay silent before it is "
           "closed (default 60; half a message is given 10)", "SECONDS", section="sip", field="tcp_idle_timeout"),
    Option("sip_backend", _backend, "the SIP stack: baresip (default) or pjsua2 (the optional "
           "duplexline[pjsua2] extra, GPLv2: one media clock for all calls, at most 4 calls per process, "
           "no TLS, SRTP or Opus)", "NAME", section="sip", field="backend"),
    Option("sip_max_calls", _max_calls, "most SIP calls this process holds (default and most: 255 with "
           "baresip, 4 with pjsua2)", "N", section="sip", field="max_calls"),
    Option("sip_shared_listen", yes_no, "let several bridge processes on this machine share one SIP "
           "address; new calls go to the least-loaded (default no)", "yes|no", section="sip", field="shared_listen"),
    Option("sip_ring_timeout", seconds, "outbound calls: seconds to ring before giving up "
           "(default 30)", "SECONDS", section="sip", field="ring_timeout"),
    Option("sip_tls_listen", HostPort.parse, "SIP over TLS: the front door's TLS address (default: "
           "none; needs --sip-tls-cert and --sip-tls-key)", "HOST:PORT", section="sip", field="tls_listen"),
    Option("sip_tls_cert", existing_path, "PEM certificate (chain) the TLS front door presents",
           "FILE", section="sip", field="tls_cert"),
    Option("sip_tls_key", existing_path, "PEM private key of --sip-tls-cert", "FILE", section="sip",
           field="tls_key"),
    Option("sip_tls_ca", existing_path, "PEM CA certificates the SIP stack verifies TLS peers against "
           "(registrars, trunks, callers it sends in-dialog requests to; default: the system's CAs)",
           "FILE", section="sip", field="tls_ca"),
)
