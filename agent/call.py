"""What a transport (the SIP or WebRTC leg) and the agent layer exchange for one call.

The transport owns the wire and the line rate; the agent owns the conversation. The
transport gives the agent 20 ms frames at 16 kHz (int16) through `CallSession.feed`, and
gives it an `AudioSink`: an object of the bridge's that resamples whatever the agent plays
to the line rate and queues it for the transport's 20 ms playout ticker. Barge-in is
`AudioSink.flush()`. Events (assistant text, turns, DTMF, hang-up) go to callbacks the
transport registers, e.g. the WebRTC data channel.

Admission happens before the call is answered: `CallManager.admit` raises `CallRefused`
with the SIP status to answer (486 busy, 503 draining with Retry-After, 404 no route).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from .errors import AgentError
from .store import Transport

__all__ = ["CallInfo", "AudioSink", "CallRefused", "FRAME_RATE", "FRAME_SAMPLES"]

FRAME_RATE = 16000
FRAME_SAMPLES = 320  # 20 ms at 16 kHz: the only frame the agent takes


@dataclass(frozen=True)
class CallInfo:
    call_id: str
    transport: Transport
    remote: str  # SIP From URI, or the browser's address
    local: str = ""  # the called user or number (routing); outbound: our account's user
    settings: Mapping[str, Any] = field(default_factory=dict, hash=False)  # the route's, for the agent
    direction: str = "in"  # "out": we dialled
    wire: str = ""  # what carries it, for records: udp, tcp, webrtc ("": the transport's name)
    webhooks: tuple[str, ...] = ()  # the route's webhook URLs, besides the global ones
    record: bool = False  # the route asks for a recording (besides --record: every call)


class AudioSink(Protocol):
    """The bridge's side of playout (bridge/media: resampler + playout buffer)."""

    def play(self, pcm: np.ndarray, rate: int) -> None:
        """Queue mono samples at `rate` Hz, float32 in [-1, 1] or int16 PCM (what the echo
        agent plays: the caller's own frames, no conversion round trip); never blocks."""

    def flush(self) -> float:
        """Drop everything the caller has not heard yet; return the milliseconds dropped."""

    @property
    def depth_ms(self) -> float:
        """Milliseconds queued and not yet played."""

    def tap(self, listener: Callable[[np.ndarray], None]) -> None:
        """From now on, hand `listener` every frame sent to the caller, at 16 kHz (int16
        [320]), on the tick that sends it: a call's recording (agent/recording.py)."""


class CallRefused(AgentError):
    """The call was not admitted: nothing was opened. Answer the INVITE (or the WebRTC
    offer) with `status` (486 busy, 503 draining: add Retry-After, 404 no route) and
    `reason`; never answer the call and leave it silent."""

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(f"{status} {reason}")
