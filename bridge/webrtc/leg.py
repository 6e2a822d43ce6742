"""The WebRTC leg: browser calls over aiortc, admitted by the same `CallManager` as SIP.

    signaling.start(settings, manager, app, registry) -> WebRtcLeg   (builds the leg, adds
                     its routes; before the app runs: bridge/webrtc/signaling.py)
    POST /webrtc/offer -> WebRtcLeg.open_call: check -> admit -> peer -> answer
    drain()          refuse new offers (503 + Retry-After); live calls go on
    close()          idempotent: end every call ("shutdown") and close its peer connection

Admission order: the offer text is checked first (nothing exists yet), then this
process's own limit (`--webrtc-max-calls`, 503 server-full), then the pending caps, then
the manager (busy / draining, from the agent or the engine), and only then is a peer
connection built. Any failure after admission ends the session again, so a refused offer
leaves nothing behind.

Pending offers: an offer holds an engine slot from admission until it connects, and one
that never connects would hold it until `--webrtc-connect-timeout`. So at most
`--webrtc-max-pending` offers may be pending at once, and `--webrtc-max-pending-per-source`
from one remote address (503 too-many-pending / too-many-pending-source, with
Retry-After): a burst of offers that never connect cannot lock SIP or browser callers out.

Per-call timers: the connect timer, then a media check about once a second (no audio for
`--media-timeout`: the call ends). Nothing else: the page takes the round trip from its
own getStats, and the agent's latency figures arrive as events (a once-a-second "stats"
event per call cost 4-5% of the process's CPU at 30 calls in SCTP work; see docs/webrtc.md).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import uuid

from agent.call import CallInfo, CallRefused
from agent.calls import CallManager
from agent.once import Once
from agent.store import Transport

from ..line_audio import LineAudio
from .call import WebRtcCall
from .config import WebRtcSettings
from .errors import OfferRejected, PeerFailed
from .metrics import WebRtcMetrics
from .sdp import Offer

__all__ = ["WebRtcLeg"]

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 10.0  # seconds aiortc may take to gather host candidates and answer


def _refusal(exc: CallRefused) -> OfferRejected:
    if exc.status == 503:
        return OfferRejected(503, "draining", "the bridge is shutting down; call again in a moment",
                             retry_after=exc.retry_after or 30)
    if exc.status == 486:
        return OfferRejected(503, "busy", f"every line is busy ({exc.reason}); try again later", retry_after=10)
    if exc.status == 482:
        return OfferRejected(409, "duplicate", exc.reason)
    return OfferRejected(503, "refused", f"the call was refused: {exc.status} {exc.reason}")


class WebRtcLeg:
    def __init__(self, settings: WebRtcSettings, manager: CallManager, metrics: WebRtcMetrics,
                 peer_class: type, media_timeout: float = 0.0) -> None:
        self.settings = settings
        self.media_timeout = media_timeout
        self._peer_class = peer_class
        fast = settings.media == "fast"
        self._receive_rate = peer_class.receive_rate(fast)
        self._make_peer = functools.partial(peer_class, ice_servers=settings.ice_servers,
                                            public_address=settings.public_address, fast=fast)
        self.manager = manager
        self.metrics = metrics
        self.draining = False
        self.calls: dict[str, WebRtcCall] = {}
        self._opening = 0  # offers past the limit check, not yet in `calls`
        # Offers from the limit check until connected or ended, by remote address.
        self._pending: collections.Counter[str] = collections.Counter()
        self._pending_calls: dict[str, str] = {}  # call id -> remote address, while pending
        self._closing = Once()

    # ---- lifecycle ----------------------------------------------------------------------

    def drain(self) -> None:
        if not self.draining:
            log.info("webrtc: draining, refusing new offers; %d calls live", len(self.calls))
        self.draining = True

    async def close(self) -> None:
        await self._closing.run(self._close)

    async def _close(self) -> None:
        self.draining = True
        await asyncio.gather(*(call.end("shutdown") for call in list(self.calls.values())), return_exceptions=True)

    def describe(self) -> dict:
        """For /readyz details."""
        return {"webrtc": {"calls": len(self.calls), "max_calls": self.settings.max_calls,
                           "pending": self.pending, "max_pending": self.settings.max_pending,
                           "draining": self.draining, "media": self.settings.media}}

    @property
    def pending(self) -> int:
        """Offers answered (or being answered) that have not connected yet."""
        return self._pending.total()

    # ---- calls --------------------------------------------------------------------------

    async def open_call(self, offer: Offer, remote: str, local: str = "") -> tuple[str, str]:
        """(call id, answer SDP), or OfferRejected with nothing left behind."""
        if self.draining or self._closing.started:
            raise OfferRejected(503, "draining", "the bridge is shutting down; call again in a moment",
                                retry_after=30)
        if len(self.calls) + self._opening >= self.settings.max_calls:
            raise OfferRejected(503, "server-full",
                                f"the server is full ({self.settings.max_calls} calls); try again later",
                                retry_after=10)
        self._check_pending(remote)
        self._opening += 1
        self._pending[remote] += 1
        call: WebRtcCall | None = None
        try:
            call_id = uuid.uuid4().hex
            inbound = LineAudio(self._receive_rate)
            outbound = LineAudio(self._peer_class.SEND_RATE)  # the session's AudioSink
            try:
                session = await self.manager.admit(CallInfo(call_id, Transport.WEBRTC, remote, local, wire="webrtc"),
                                                   outbound)
            except CallRefused as exc:
                raise _refusal(exc) from None
            session.detail.codec = "opus"  # the only codec the offer check lets through
            try:
                call = WebRtcCall(call_id, session, inbound, outbound, self.metrics, make_peer=self._make_peer,
                                  connect_timeout=self.settings.connect_timeout, media_timeout=self.media_timeout,
                                  on_ended=self._ended, on_connected=self._settle)
            except BaseException:
                await session.end("offer-failed")
                raise
            self.calls[call_id] = call
            self._pending_calls[call_id] = remote
        finally:
            self._opening -= 1
            if call is None:
                self._release(remote)
        try:
            answer = await asyncio.wait_for(call.accept(offer.sdp), ANSWER_TIMEOUT)
        except (PeerFailed, asyncio.TimeoutError) as exc:
            await call.end("offer-failed")
            message = str(exc) if isinstance(exc, PeerFailed) else "no answer could be made in time"
            raise OfferRejected(400, "peer-failed", message) from None
        except BaseException:
            await call.end("offer-failed")
            raise
        return call_id, answer

    async def hangup(self, call_id: str, reason: str = "remote-hangup") -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        await call.end(reason)
        return True

    def _check_pending(self, remote: str) -> None:
        """503 when too many offers are pending, in all or from `remote`. Retry-After: by
        then the pending ones have connected or timed out."""
        retry = math.ceil(self.settings.connect_timeout)
        if self.pending >= self.settings.max_pending:
            raise OfferRejected(503, "too-many-pending",
                                f"{self.pending} calls are still connecting (at most {self.settings.max_pending}); "
                                "try again in a moment", retry_after=retry)
        if self._pending[remote] >= self.settings.max_pending_per_source:
            raise OfferRejected(503, "too-many-pending-source",
                                f"{self._pending[remote]} calls from your address are still connecting (at most "
                                f"{self.settings.max_pending_per_source}); try again in a moment", retry_after=retry)

    def _release(self, remote: str) -> None:
        self._pending[remote] -= 1
        if self._pending[remote] <= 0:
            del self._pending[remote]

    def _settle(self, call: WebRtcCall) -> None:
        """The call connected or ended: it is pending no more."""
        remote = self._pending_calls.pop(call.call_id, None)
        if remote is not None:
            self._release(remote)

    def _ended(self, call: WebRtcCall) -> None:
        self._settle(call)
        self.calls.pop(call.call_id, None)
