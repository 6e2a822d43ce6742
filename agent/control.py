"""The HTTP control plane (aiohttp routes), mounted on the bridge's one HTTP server:

    GET  /metrics              Prometheus text format
    GET  /healthz              the process is up
    GET  /readyz               engine loaded, store reachable, not draining (503 otherwise);
                               the legs' details (SIP registrations, live calls) ride along
    GET  /calls[?live=1]       calls from the store (every bridge's, with Redis)  (admin)
    GET  /calls/{id}           one call with its latest events, line quality      (admin)
    GET  /calls/{id}/recording the call's recording, a WAV file; 404 when none     (admin)
    POST /calls/{id}/hangup    hang up a call this bridge holds                   (admin)
    POST /admin/drain          refuse new calls, let live ones finish, exit       (admin)

Admin routes want `Authorization: Bearer <token>` when a token is configured; without one
they answer only requests from this host (loopback), 403 otherwise. Call records are admin
data: they hold caller URIs and the DTMF digits callers typed (PINs), and a call id is
what a WebRTC hang-up needs. A softphone caller gets its own call's events over its data
channel, never from these routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
from typing import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .calls import CallManager
from .errors import CorruptRecord, StoreUnavailable
from .store import CallRecord

__all__ = ["add_control_routes", "bearer_ok", "json_error", "require_admin"]

log = logging.getLogger(__name__)


def _record_json(record: CallRecord) -> dict:
    data = dataclasses.asdict(record)
    data["transport"] = str(record.transport)
    data["state"] = str(record.state)
    return data


def _quality(manager: CallManager, call_id: str, events: list) -> dict | None:
    """Line quality (agent/quality.py): live from the session when this bridge holds the
    call, else the summary stored as its "quality" event when it ended; null otherwise (a
    live call on another bridge, a call that ended before it had a session)."""
    session = manager.get(call_id)
    if session is not None:
        return session.line.summary(session.detail.codec)
    return next((e.data for e in reversed(events) if e.kind == "quality"), None)


def json_error(cls: type[web.HTTPException], message: str, **extra: object) -> web.HTTPException:
    """An HTTP error whose body is `{"error": message, ...}` (raise it)."""
    return cls(text=json.dumps({"error": message, **extra}), content_type="application/json")


def bearer_ok(request: web.Request, token: str) -> bool:
    """The request carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def require_admin(request: web.Request, token: str | None) -> None:
    """Raise 401 unless the request carries the configured bearer token. With no token
    configured, only this host may call admin routes (403 from elsewhere): a bridge whose
    HTTP port is reachable must not let strangers dial out, transfer or drain it."""
    if not token:
        if not _from_this_host(request):
            raise json_error(web.HTTPForbidden, "admin routes from another host need --admin-token "
                             "on the bridge (Authorization: Bearer ...)")
        return
    if not bearer_ok(request, token):
        refused = json_error(web.HTTPUnauthorized, "admin token required (Authorization: Bearer ...)")
        refused.headers["WWW-Authenticate"] = "Bearer"
        raise refused


def _from_this_host(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:  # a Unix socket or no peer address: not a network stranger
        return not request.remote


def add_control_routes(app: web.Application, manager: CallManager, registry: CollectorRegistry,
                       admin_token: str | None, start_drain: Callable[[], Awaitable[None]],
                       details: Callable[[], dict] | None = None) -> None:
    """`details`, when given, adds the transport legs' state to /readyz (informational: a
    registration that is down does not make the bridge unready for direct calls)."""
    async def metrics(_: web.Request) -> web.Response:
        # Rendering every metric takes tens of milliseconds; on the event loop it stalled
        # every live call's audio at each scrape (measured: 60-80 ms, all calls at once).
        body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        body = await manager.readiness()
        if details is not None:
            body["details"] = details()
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def calls(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        live_only = request.query.get("live", "") in ("1", "true", "yes")
        try:
            records = await manager.store.list_calls(live_only=live_only)
        except StoreUnavailable as exc:
            raise json_error(web.HTTPServiceUnavailable, f"store unavailable: {exc}") from None
        return web.json_response({"calls": [_record_json(r) for r in records]})

    async def call(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        call_id = request.match_info["id"]
        try:
            record = await manager.store.get(call_id)
            events = await manager.store.events(call_id, limit=100) if record else []
        except StoreUnavailable as exc:
            raise json_error(web.HTTPServiceUnavailable, f"store unavailable: {exc}") from None
        except CorruptRecord as exc:
            raise json_error(web.HTTPInternalServerError, str(exc)) from None
        if record is None:
            raise json_error(web.HTTPNotFound, f"no call {call_id!r}")
        body = _record_json(record)
        body["events"] = [{"kind": e.kind, "data": e.data, "time": e.time} for e in events]
        body["quality"] = _quality(manager, call_id, events)
        return web.json_response(body)

    async def recording(request: web.Request) -> web.StreamResponse:
        require_admin(request, admin_token)
        call_id = request.match_info["id"]
        recorder = manager.records.recorder
        path = recorder.path_for(call_id) if recorder is not None else None
        # A stat can block on a slow disk: not on the event loop, which carries every call's audio.
        if path is None or not await asyncio.get_running_loop().run_in_executor(None, path.is_file):
            raise json_error(web.HTTPNotFound, f"no recording of call {call_id!r} on this bridge")
        # Streamed from the file (a live call's as far as it is written: a valid WAV up to its last sync).
        return web.FileResponse(path, headers={"Content-Type": "audio/wav",
                                               "Content-Disposition": f'attachment; filename="{path.name}"'})

    async def hangup(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        call_id = request.match_info["id"]
        if not await manager.hangup(call_id, "operator"):
            raise json_error(web.HTTPNotFound, f"no live call {call_id!r} on this bridge")
        return web.json_response({"call_id": call_id, "ended": True})

    async def drain(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        asyncio.get_running_loop().create_task(start_drain())
        return web.json_response({"draining": True, "live_calls": len(list(manager.live()))}, status=202)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/calls", calls)
    app.router.add_get("/calls/{id}", call)
    app.router.add_get("/calls/{id}/recording", recording)
    app.router.add_post("/calls/{id}/hangup", hangup)
    app.router.add_post("/admin/drain", drain)
