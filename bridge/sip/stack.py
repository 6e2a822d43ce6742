"""The SIP stack's interface: the values, events and errors every SIP backend speaks.

The rest of the SIP leg sees a stack through these types only; a backend (one module per
SIP stack under bridge/sip/backends/: baresip.py and pjsua2.py) implements `Stack`,
`StackAccount` and `StackCall` (the protocols below) on top of its binding and turns the
binding's objects into these values at the boundary; both raise the same errors and emit
the same events:

    errors         `StackError` root; `MediaInactive`, `MediaRestarted`; outbound outcomes
                   `DialBusy`, `DialDeclined`, `DialNoAnswer`, `DialFailed`; `RegisterFailed`;
                   `TransferRefused`
    values         `CallEvent` (a `CallEventKind` and its text), `AudioFormat`, `RtpStats`,
                   `AccountSpec` (one SIP identity), `INBOUND_USER` (the catch-all identity)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import BridgeError

__all__ = ["CallEvent", "CallEventKind", "AudioFormat", "RtpStats", "AccountSpec", "StackError", "MediaInactive",
           "MediaRestarted", "DialFailed", "DialBusy", "DialDeclined", "DialNoAnswer", "RegisterFailed",
           "TransferRefused", "INBOUND_USER", "Stack", "StackAccount", "StackCall"]

INBOUND_USER = "duplexline"


# ---- errors ------------------------------------------------------------------------------------


class StackError(BridgeError):
    """The SIP stack refused or failed an operation; the call (if any) is unchanged unless
    the subclass says otherwise."""


class MediaInactive(StackError):
    """The call has no audio (not yet up, or gone): skip this tick."""


class MediaRestarted(StackError):
    """A re-INVITE replaced the call's audio streams: probe the format again."""


class DialFailed(StackError):
    """An outbound call ended without being answered. Nothing is left to clean up."""

    outcome = "failed"

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class DialBusy(DialFailed):
    outcome = "busy"


class DialDeclined(DialFailed):
    outcome = "declined"


class DialNoAnswer(DialFailed):
    outcome = "no_answer"


class RegisterFailed(StackError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TransferRefused(StackError):
    """The far end did not complete the transfer; the call goes on."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---- values ------------------------------------------------------------------------------------


class CallEventKind(enum.Enum):
    ESTABLISHED = "established"
    CLOSED = "closed"
    REMOTE_HOLD = "remote-hold"
    REMOTE_RESUME = "remote-resume"
    DTMF = "dtmf"
    AUDIO_WARNING = "audio-warning"


@dataclass(frozen=True)
class CallEvent:
    kind: CallEventKind
    text: str = ""  # close reason, digit, warning direction


@dataclass(frozen=True)
class AudioFormat:
    rx_rate: int
    rx_channels: int
    tx_rate: int
    tx_channels: int
    tx_buffered: int  # bytes queued for transmission


@dataclass(frozen=True)
class RtpStats:
    rx_packets: int = 0
    rx_lost: int = 0
    jbuf_late: int = 0
    jbuf_lost: int = 0
    rx_jitter_ms: float = 0.0
    mos: float = 0.0
    rtt_ms: float = 0.0  # 0 until an RTCP round trip was measured
    jbuf_jitter_ms: int = 0


@dataclass(frozen=True)
class AccountSpec:
    """One SIP identity. `reg_interval` 0: no REGISTER (a trunk, or the inbound identity)."""

    user: str
    domain: str
    password: str = ""
    registrar: str | None = None
    auth_user: str | None = None
    reg_interval: int = 600
    transport: str = "udp"
    codecs: tuple[str, ...] = ("pcmu", "pcma", "g722", "opus")
    catch_all: bool = False
    mediaenc: str | None = None  # the stack's media encryption: "srtp" (best effort), "srtp-mand"

    def __repr__(self) -> str:
        return (f"AccountSpec(user={self.user!r}, domain={self.domain!r}, password={'***' if self.password else ''!r}, "
                f"registrar={self.registrar!r}, reg_interval={self.reg_interval})")


# ---- the backend's objects ---------------------------------------------------------------------


class StackCall(Protocol):
    """One call. Listeners run on the event loop; audio is PCM16 at `audio_format()`'s rates."""

    stats: RtpStats | None  # the final statistics, once the call closed

    @property
    def call_id(self) -> str: ...
    @property
    def peer(self) -> str: ...
    @property
    def headers(self) -> dict[str, str]: ...
    def on_event(self, listener: Callable[[CallEvent], None]) -> None: ...
    def on_rtcp(self, listener: Callable[[RtpStats], None]) -> None: ...
    async def answer(self) -> None: ...
    async def reject(self) -> None: ...
    async def hangup(self) -> None: ...
    async def wait_established(self, timeout: float) -> None: ...
    async def set_hold(self, on: bool) -> None: ...
    async def transfer(self, uri: str, timeout: float = 30.0) -> None: ...
    async def send_dtmf(self, digits: str) -> None: ...
    def audio_format(self) -> AudioFormat: ...
    def read(self, max_bytes: int) -> bytes: ...
    def write(self, pcm) -> int: ...


class StackAccount(Protocol):
    spec: AccountSpec

    def on_incoming(self, callback: Callable[[StackCall], None]) -> None: ...
    def on_registration(self, callback: Callable[[bool, str], None]) -> None: ...
    async def register(self, timeout: float = 10.0) -> None: ...
    async def unregister(self, timeout: float = 5.0) -> None: ...
    async def dial(self, uri: str) -> StackCall: ...


class Stack(Protocol):
    async def start(self, *, host: str, port: int, rtp_ports: tuple[int, int], max_calls: int,
                    log_level: str = "warning", tls_ca: Path | None = None) -> None: ...
    async def close(self) -> None: ...
    async def add_account(self, spec: AccountSpec) -> StackAccount: ...
