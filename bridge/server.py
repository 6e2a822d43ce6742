"""The serve process: builds the parts from Settings, runs them, and unwinds them in
reverse on SIGINT/SIGTERM.

The HTTP server answers `/healthz` and `/readyz` today; the SIP leg, the agent, the
store and the WebRTC page are added by their own modules as they land, each started
here and stopped in reverse order.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from .settings import Settings

__all__ = ["run_server", "serve"]

log = logging.getLogger(__name__)


def build_app(settings: Settings, stopping: asyncio.Event) -> web.Application:
    app = web.Application()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready = not stopping.is_set()
        body = {"ready": ready, "draining": stopping.is_set(), "agent": settings.agent,
                "store": settings.store_name}
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run until `stop` is set. Raises OSError (with the address) when a port is taken."""
    app = build_app(settings, stop)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.http_listen.host, settings.http_listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for HTTP on {settings.http_listen}: "
                          f"{exc.strerror}") from exc
        log.info("HTTP listening on http://%s (/healthz, /readyz)", settings.http_listen)
        log.warning("SIP leg not built yet: %s is not answered (agent %s, store %s)",
                    settings.sip_listen, settings.agent, settings.store_name)
        print(f"duplexline: serving HTTP on http://{settings.http_listen}; press Ctrl-C to stop",
              flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def run_server(settings: Settings) -> int:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        asyncio.run(main())
    except OSError as exc:
        log.error("%s", exc)
        return 1
    print("duplexline: stopped", flush=True)
    return 0
