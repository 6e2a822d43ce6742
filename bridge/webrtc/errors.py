"""Errors of the WebRTC leg. Root: `WebRtcError` (a `BridgeError`).

`OfferRejected` is the one outcome the signaling endpoint turns into an HTTP answer: it
carries the HTTP status, a short machine-readable `code` the page switches on, and a
message for a person. Whenever it is raised, nothing of the call was left behind (no peer
connection, no session, no store record): the caller may fix the offer and try again.
"""

from __future__ import annotations

from ..errors import BridgeError

__all__ = ["WebRtcError", "OfferRejected", "PeerFailed"]


class WebRtcError(BridgeError):
    """Root of the WebRTC leg's errors."""


class OfferRejected(WebRtcError):
    """The offer was refused before a call existed. Answer with `status`, `{"error": code,
    "message": message}` and, when set, a Retry-After header."""

    def __init__(self, status: int, code: str, message: str, *, retry_after: int | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"{status} {code}: {message}")

    def as_json(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class PeerFailed(WebRtcError):
    """aiortc could not take the offer or produce an answer (bad fingerprint, ICE set-up,
    time-out). The peer connection was closed; the call never started."""
