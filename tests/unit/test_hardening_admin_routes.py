"""Call records are admin data: `GET /calls` and `GET /calls/{id}` hold caller URIs and
the DTMF digits callers typed (PINs), so they answer only the admin token when one is set,
and only this host when none is. The routes are the real ones (agent/control.py), over a
real call manager, echo agent and in-memory store, holding one call that dialled a PIN."""

import asyncio
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from agent.agents import EchoAgent
from agent.call import CallInfo
from agent.calls import CallManager
from agent.control import add_control_routes
from agent.metrics import AgentMetrics
from agent.store import Transport
from agent.store_memory import MemoryStore
from bridge.line_audio import LineAudio

TOKEN = "s3cret"
CALLER = "sip:+15551234567@198.51.100.7"
PIN = "4711"
ROUTES = ["/calls", "/calls?live=1", "/calls/call-1"]


async def _get(app: web.Application, path: str, address: str, authorization: str | None) -> web.Response:
    """One GET through the app's router, from `address` (a mocked peer)."""
    transport = mock.Mock()
    transport.get_extra_info.side_effect = (
        lambda name, default=None: (address, 40000) if name == "peername" else default)
    headers = {"Authorization": authorization} if authorization else {}
    probe = make_mocked_request("GET", path, headers=headers, app=app, transport=transport)
    match = await app.router.resolve(probe)
    request = make_mocked_request("GET", path, headers=headers, app=app, transport=transport,
                                  match_info=dict(match))
    try:
        return await match.handler(request)
    except web.HTTPException as exc:
        return exc


def _ask(token: str | None, path: str, address: str, authorization: str | None = None) -> tuple[int, str]:
    async def main() -> tuple[int, str]:
        manager = CallManager(EchoAgent(), MemoryStore(), AgentMetrics(CollectorRegistry()))
        await manager.start()
        try:
            session = await manager.admit(CallInfo("call-1", Transport.SIP, CALLER, "bot"), LineAudio(8000))
            await session.answered()
            for digit in PIN:
                session.dtmf(digit)
            for _ in range(200):  # the events are written in the background: bounded polling
                if len(await manager.store.events("call-1", limit=100)) >= len(PIN):
                    break
                await asyncio.sleep(0.005)
            app = web.Application()
            add_control_routes(app, manager, CollectorRegistry(), token, start_drain=mock.AsyncMock())
            response = await _get(app, path, address, authorization)
            return response.status, response.text or ""
        finally:
            await manager.close()

    return asyncio.run(main())


@pytest.mark.parametrize("path", ROUTES)
def test_with_a_token_call_records_need_it(path):
    for authorization in (None, "Bearer wrong", f"Basic {TOKEN}"):
        status, body = _ask(TOKEN, path, "127.0.0.1", authorization)
        assert status == 401, (authorization, status)
        assert CALLER not in body and PIN not in body
    status, body = _ask(TOKEN, path, "192.0.2.1", f"Bearer {TOKEN}")
    assert status == 200 and CALLER in body, body


@pytest.mark.parametrize("path", ROUTES)
def test_without_a_token_only_this_host_sees_call_records(path):
    for address in ("10.0.0.7", "192.0.2.1", "2001:db8::1"):
        status, body = _ask(None, path, address)
        assert status == 403 and "--admin-token" in body, (address, status)
        assert CALLER not in body and PIN not in body
    status, body = _ask(None, path, "127.0.0.1")
    assert status == 200 and CALLER in body, body


def test_the_admin_sees_the_digits_the_caller_typed():
    status, body = _ask(TOKEN, "/calls/call-1", "192.0.2.1", f"Bearer {TOKEN}")
    assert status == 200
    assert all(f'"digits": "{d}"' in body for d in PIN), body


def test_health_readiness_and_metrics_stay_open():
    for path in ("/healthz", "/readyz", "/metrics"):
        status, body = _ask(TOKEN, path, "192.0.2.1")
        assert status == 200, (path, status)
        assert CALLER not in body and PIN not in body
