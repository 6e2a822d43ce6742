"""HTTP call control for SIP calls (admin routes: `Authorization: Bearer <token>` when a
token is configured), mounted by the server with `add_sip_routes`:

    POST /calls                  {"to": "sip:...", "account": NAME?, "timeout": S?}
                                 place a call; answers when it is answered (201) or not:
                                 409 busy/declined, 504 no answer, 502 failed, 503 refused
    POST /calls/{id}/dtmf        {"digits": "12#"}        send RFC 4733 digits
    POST /calls/{id}/transfer    {"to": "sip:..."}        blind transfer (REFER)
    POST /calls/{id}/hold        {"hold": true|false}     hold / resume (re-INVITE)
    GET  /sip                    listen address, live SIP calls, registration per account

Bodies are JSON objects; a bad body is 400 naming the field. A dial or transfer target
must be `sip:`/`sips:` `user@host[:port]` with optional `;name=value` parameters, at most
`MAX_URI_CHARS` long: the SIP stack is native code, and an unchecked 40,000-character
target corrupted its heap (the process died at exit).

aiohttp freezes the router when the server starts, and the SIP leg starts after that, so
`add_sip_routes` takes a getter (`lambda: leg_or_None`): the routes answer 503 until the
leg is up, and always when SIP is off.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import TYPE_CHECKING, Callable

from aiohttp import web

from agent.control import json_error, require_admin

from .leg import DialRefused
from .stack import DialBusy, DialDeclined, DialFailed, DialNoAnswer, StackError, TransferRefused

if TYPE_CHECKING:
    from .call import SipCall
    from .leg import SipLeg

__all__ = ["add_sip_routes", "sip_uri_problem", "MAX_URI_CHARS"]

_DIGITS = set("0123456789*#ABCDabcd")
MAX_URI_CHARS = 256
# RFC 3261's grammar, narrowed to what a dial or transfer target needs: no password, no
# ?headers, and parameters of token characters only. Escapes (%HH) are allowed in the
# user part and parameter values (phone numbers, display digits); nothing else is.
_USER = r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})+"
_PARAM = r";[A-Za-z0-9\-_.!~*'%]+(?:=(?:[A-Za-z0-9\-_.!~*'()\[\]:&+$]|%[0-9A-Fa-f]{2})+)?"
_URI = re.compile(rf"(?i:sips?):(?P<user>{_USER})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)"
                  rf"(?::(?P<port>[0-9]{{1,5}}))?(?P<params>(?:{_PARAM})*)")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")


async def _body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise json_error(web.HTTPBadRequest, "body must be a JSON object") from None
    if not isinstance(body, dict):
        raise json_error(web.HTTPBadRequest, "body must be a JSON object")
    return body


def sip_uri_problem(uri: str) -> str | None:
    """What is wrong with `uri` as a dial or transfer target, or None when it is fine."""
    if len(uri) > MAX_URI_CHARS:
        return f"it is {len(uri)} characters long; at most {MAX_URI_CHARS} are taken"
    bad = next((c for c in uri if not c.isprintable() or c.isspace()), None)
    if bad is not None:
        return f"it holds the character {bad!r} (no control characters or spaces)"
    match = _URI.fullmatch(uri)
    if match is None:
        return "it is not of the form sip:user@host[:port][;name=value]"
    host, port = match["host"], match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return f"port {port} is not in 1..65535"
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return f"{host} is not an IPv6 address"
    elif host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host} is not an IPv4 address"
    elif len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        return f"{host!r} is not a host name"
    return None


def _sip_uri(body: dict, field: str) -> str:
    uri = body.get(field)
    if not isinstance(uri, str):
        raise json_error(web.HTTPBadRequest, f"{field!r} must be a SIP URI such as sip:1000@pbx.example.com")
    problem = sip_uri_problem(uri)
    if problem is not None:
        raise json_error(web.HTTPBadRequest, f"{field!r} must be a SIP URI such as sip:1000@pbx.example.com: "
                         f"{problem}")
    return uri


def add_sip_routes(app: web.Application, current_leg: Callable[[], "SipLeg | None"],
                   admin_token: str | None) -> None:
    """Mount the routes before the server starts; `current_leg()` gives the SIP leg once it
    runs (None before it started or when SIP is off: those requests get 503)."""
    def the_leg() -> "SipLeg":
        leg = current_leg()
        if leg is None:
            raise json_error(web.HTTPServiceUnavailable, "the SIP leg is not running")
        return leg

    def live_call(request: web.Request) -> "SipCall":
        call_id = request.match_info["id"]
        call = the_leg().get(call_id)
        if call is None:
            raise json_error(web.HTTPNotFound, f"no live SIP call {call_id!r} on this bridge")
        return call

    async def dial(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        body = await _body(request)
        uri = _sip_uri(body, "to")
        account = body.get("account")
        if account is not None and not isinstance(account, str):
            raise json_error(web.HTTPBadRequest, "'account' must be a string")
        timeout = body.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not 0 < timeout <= 300):
            raise json_error(web.HTTPBadRequest, "'timeout' must be seconds in (0, 300]")
        try:
            call = await the_leg().dial(uri, account, timeout)
        except DialRefused as exc:
            status = {404: web.HTTPNotFound, 409: web.HTTPConflict}.get(exc.status, web.HTTPServiceUnavailable)
            raise json_error(status, str(exc), outcome="refused") from None
        except (DialBusy, DialDeclined) as exc:
            raise json_error(web.HTTPConflict, str(exc), outcome=exc.outcome, status=exc.status) from None
        except DialNoAnswer as exc:
            raise json_error(web.HTTPGatewayTimeout, str(exc), outcome=exc.outcome, status=exc.status) from None
        except DialFailed as exc:
            raise json_error(web.HTTPBadGateway, str(exc), outcome=exc.outcome, status=exc.status) from None
        return web.json_response({"call_id": call.call_id, "outcome": "answered", "to": uri}, status=201)

    async def dtmf(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        call = live_call(request)
        digits = (await _body(request)).get("digits")
        if not isinstance(digits, str) or not digits or len(digits) > 64 or set(digits) - _DIGITS:
            raise json_error(web.HTTPBadRequest, "'digits' must be 1-64 of 0-9 * # A-D")
        try:
            await call.send_dtmf(digits)
        except StackError as exc:
            raise json_error(web.HTTPConflict, str(exc)) from None
        return web.json_response({"call_id": call.call_id, "sent": digits.upper()})

    async def transfer(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        call = live_call(request)
        uri = _sip_uri(await _body(request), "to")
        try:
            await call.transfer(uri)
        except TransferRefused as exc:
            the_leg().metrics.transfers.labels(outcome="failed").inc()
            raise json_error(web.HTTPConflict, str(exc), status=exc.status) from None
        except StackError as exc:
            the_leg().metrics.transfers.labels(outcome="failed").inc()
            raise json_error(web.HTTPConflict, str(exc)) from None
        the_leg().metrics.transfers.labels(outcome="transferred").inc()
        return web.json_response({"call_id": call.call_id, "transferred": True, "to": uri})

    async def hold(request: web.Request) -> web.Response:
        require_admin(request, admin_token)
        call = live_call(request)
        on = (await _body(request)).get("hold", True)
        if not isinstance(on, bool):
            raise json_error(web.HTTPBadRequest, "'hold' must be true or false")
        try:
            await call.set_hold(on)
        except StackError as exc:
            raise json_error(web.HTTPConflict, str(exc)) from None
        return web.json_response({"call_id": call.call_id, "hold": on})

    async def describe(_: web.Request) -> web.Response:
        return web.json_response(the_leg().describe()["sip"])

    app.router.add_post("/calls", dial)
    app.router.add_post("/calls/{id}/dtmf", dtmf)
    app.router.add_post("/calls/{id}/transfer", transfer)
    app.router.add_post("/calls/{id}/hold", hold)
    app.router.add_get("/sip", describe)
