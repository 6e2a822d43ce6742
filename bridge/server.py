"""The serve process: builds the parts from Settings, runs them, and unwinds them in
reverse on SIGINT/SIGTERM.

    store + agent -> CallManager -> HTTP (control plane, softphone) -> SIP leg, WebRTC leg

SIGTERM (or POST /admin/drain) drains: new calls are refused (SIP 503 with Retry-After),
live calls may finish within --drain-timeout, then the process exits. A second signal
stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry, ProcessCollector, PlatformCollector
from prometheus_client.core import GaugeMetricFamily

from agent.calls import CallManager
from agent.control import add_control_routes
from agent.metrics import AgentMetrics
from agent.store_factory import create_store

from .compose import build_agent
from .records import build_records
from .process import run_until_signalled
from .settings import Settings
from .sip import leg as sip_leg
from .sip.http import add_sip_routes
from .webrtc import signaling as webrtc_signaling

__all__ = ["run_server", "serve"]

log = logging.getLogger(__name__)


class _NoBadRequestTracebacks(logging.Filter):
    """aiohttp logs a whole traceback at ERROR for every request its parser rejects
    (`Content-Length: -1`, a bad header byte), after answering it 400. That is the client's
    error, not ours, and one per request is a log flood: drop those lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


class _TaskCount:
    """`duplexline_bridge_asyncio_tasks`: tasks alive on the event loop. A task left behind
    per call or per hostile request shows here before it shows as memory."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def collect(self):
        yield GaugeMetricFamily("duplexline_bridge_asyncio_tasks", "asyncio tasks alive on the bridge's event loop",
                                value=len(asyncio.all_tasks(self._loop)))


async def serve(settings: Settings, stop: asyncio.Event, registry: CollectorRegistry | None = None) -> None:
    """Run until `stop` is set, then drain and unwind. Raises OSError naming the address
    when a port is taken."""
    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    registry.register(_TaskCount(asyncio.get_running_loop()))
    logging.getLogger("aiohttp.server").addFilter(_NoBadRequestTracebacks())
    metrics = AgentMetrics(registry)
    bridge_id = f"bridge-{uuid.uuid4().hex[:8]}"
    agent = await asyncio.get_running_loop().run_in_executor(None, build_agent, settings, registry, metrics,
                                                             bridge_id)
    manager = CallManager(agent, create_store(settings.redis), metrics, bridge_id=bridge_id,
                          records=build_records(settings, registry), dead_air_seconds=settings.dead_air_seconds)
    await manager.start()
    drained = asyncio.Event()

    async def drain() -> None:
        await manager.drain(settings.drain_timeout)
        drained.set()
        stop.set()

    legs: list = []
    sip = None  # the SIP leg once it runs (its routes are mounted before the server starts)

    def details() -> dict:
        merged: dict = {}
        for leg in legs:
            merged.update(leg.describe())
        return merged

    app = web.Application(client_max_size=64 * 1024)
    add_control_routes(app, manager, registry, settings.admin_token, drain, details)
    add_sip_routes(app, lambda: sip, settings.admin_token)
    runner = web.AppRunner(app, access_log=None)
    try:
        webrtc = await webrtc_signaling.start(settings, manager, app, registry)
        if webrtc is not None:
            legs.append(webrtc)
        await runner.setup()
        site = web.TCPSite(runner, settings.http_listen.host, settings.http_listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for HTTP on {settings.http_listen}: {exc.strerror}") from exc
        sip = await sip_leg.start(settings, manager, registry)
        if sip is not None:
            legs.append(sip)
        log.info("HTTP on http://%s (/metrics /healthz /readyz /calls /sip /webrtc); agent %s; store %s",
                 settings.http_listen, settings.agent, settings.store_name)
        print(f"duplexline: serving on http://{settings.http_listen} and sip:{settings.sip_listen}; "
              f"agent {settings.agent}; event loop {settings.event_loop}; press Ctrl-C to stop", flush=True)
        await stop.wait()
        if not drained.is_set():
            log.info("stopping: draining calls (up to %.0f s)", settings.drain_timeout)
            for leg in legs:
                leg.drain()
            await manager.drain(settings.drain_timeout)
    finally:
        for leg in reversed(legs):
            await leg.close()
        await runner.cleanup()
        await manager.close()


def run_server(settings: Settings) -> int:
    return run_until_signalled("duplexline", lambda stop: serve(settings, stop), settings.event_loop)
