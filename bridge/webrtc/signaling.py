"""The WebRTC leg's HTTP routes (aiohttp), mounted on the bridge's one HTTP server by
`start(settings, manager, app, registry) -> WebRtcLeg` (builds the leg, bridge/webrtc/leg.py,
and adds its routes; before the app runs):

    GET    /                    the softphone page (bridge/static/index.html)
    GET    /static/{file}       its script, style sheet and audio worklet
    GET    /webrtc/config       {"ice_servers": [...], "token_required": bool}
    POST   /webrtc/offer        {"type": "offer", "sdp": ...} -> {"type": "answer", "sdp", "call_id"}
    DELETE /webrtc/calls/{id}   hang up

Every error is JSON, `{"error": code, "message": text}`, with the status `OfferRejected`
carries (see bridge/webrtc/sdp.py for the list) plus 401 unauthorized (a token is
configured and the request lacks it), 415 bad-content-type (not application/json: a
cross-site form cannot post an offer) and 404 for an unknown call. With `--webrtc-token`,
`/webrtc/config`, the offer and the hang-up want `Authorization: Bearer <token>`; the
page reads the token from its URL fragment (`/#token=...`), which never reaches a server
log. The page itself is public: it holds nothing secret.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from agent.calls import CallManager
from agent.control import bearer_ok

from ..errors import BridgeError
from .config import WebRtcSettings
from .errors import OfferRejected
from .leg import WebRtcLeg
from .metrics import WebRtcMetrics
from .sdp import MAX_BODY_BYTES, parse_offer

__all__ = ["start", "add_signaling_routes", "error_response", "STATIC_DIR"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent.parent / "static"  # bridge/static

_NO_STORE = {"Cache-Control": "no-store"}


def error_response(exc: OfferRejected) -> web.Response:
    headers = dict(_NO_STORE)
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.json_response(exc.as_json(), status=exc.status, headers=headers)


def _authorized(request: web.Request, token: str | None) -> bool:
    return not token or bearer_ok(request, token)


def _unauthorized() -> OfferRejected:
    return OfferRejected(401, "unauthorized", "this line wants a token: open the page as /#token=YOUR-TOKEN")


async def _read_body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise OfferRejected(413, "too-large", f"the offer is {request.content_length} bytes; "
                            f"at most {MAX_BODY_BYTES} are taken")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise OfferRejected(413, "too-large", f"the offer is over {MAX_BODY_BYTES} bytes") from None


def add_signaling_routes(app: web.Application, leg: WebRtcLeg, settings: WebRtcSettings,
                         static_dir: Path) -> None:
    metrics = leg.metrics
    index = static_dir / "index.html"

    async def page(_: web.Request) -> web.FileResponse:
        return web.FileResponse(index, headers=_NO_STORE)

    async def config(request: web.Request) -> web.Response:
        if not _authorized(request, settings.token):
            return error_response(_unauthorized())
        return web.json_response({"ice_servers": [s.as_json() for s in settings.ice_servers],
                                  "token_required": bool(settings.token)}, headers=_NO_STORE)

    async def offer(request: web.Request) -> web.Response:
        try:
            if not _authorized(request, settings.token):
                raise _unauthorized()
            if request.content_type != "application/json":
                raise OfferRejected(415, "bad-content-type", "send the offer as Content-Type: application/json")
            parsed = parse_offer(await _read_body(request))
            call_id, answer = await leg.open_call(parsed, remote=request.remote or "",
                                                  local=request.query.get("to", "")[:64])
        except OfferRejected as exc:
            metrics.offers.labels(outcome=exc.code).inc()
            log.info("webrtc offer from %s refused: %s", request.remote, exc)
            return error_response(exc)
        metrics.offers.labels(outcome="answered").inc()
        return web.json_response({"type": "answer", "sdp": answer, "call_id": call_id}, headers=_NO_STORE)

    async def hangup(request: web.Request) -> web.Response:
        if not _authorized(request, settings.token):
            return error_response(_unauthorized())
        call_id = request.match_info["id"]
        if not await leg.hangup(call_id, "remote-hangup"):
            return web.json_response({"error": "no-such-call", "message": f"no live call {call_id[:64]!r}"},
                                     status=404, headers=_NO_STORE)
        return web.json_response({"call_id": call_id, "ended": True}, headers=_NO_STORE)

    app.router.add_get("/", page)
    app.router.add_get("/webrtc/config", config)
    app.router.add_post("/webrtc/offer", offer)
    app.router.add_delete("/webrtc/calls/{id}", hangup)
    app.router.add_static("/static/", static_dir, show_index=False, follow_symlinks=False)


async def start(settings, manager: CallManager, app: web.Application, registry: CollectorRegistry):
    """Add the routes and return the leg, or None (logged) when aiortc is missing."""
    try:  # imported here so a bridge without aiortc still runs its SIP leg, and says why
        from .peer import WebRtcPeer, aiortc_version
    except ImportError as exc:
        log.error("webrtc leg off: %s (pip install aiortc==1.16.0)", exc)
        return None
    # aioice logs every connectivity check at INFO: traffic, not outcomes (STYLE 11).
    if logging.getLogger("aioice").level == logging.NOTSET:
        logging.getLogger("aioice").setLevel(logging.WARNING)
    codec = "aiortc's"
    if settings.webrtc.media == "fast":
        from . import clock as webrtc_clock
        from ..media.opus import OpusError, libopus_version

        try:  # found now, not at the first offer: a missing library is an error at start
            codec = libopus_version()
        except OpusError as exc:
            raise BridgeError(f"--webrtc-media fast needs libopus: {exc} (or --webrtc-media stock)") from None
        webrtc_clock.install()  # process-wide; the stock path keeps aiortc as shipped
    leg = WebRtcLeg(settings.webrtc, manager, WebRtcMetrics(registry), WebRtcPeer, settings.media_timeout)
    add_signaling_routes(app, leg, settings.webrtc, STATIC_DIR)
    log.info("webrtc leg up: aiortc %s, media path %s (opus: %s), ICE servers %d, public address %s, "
             "offer token %s", aiortc_version(), settings.webrtc.media, codec, len(settings.webrtc.ice_servers),
             settings.webrtc.public_address or "none", "set" if settings.webrtc.token else "none")
    return leg
