"""`duplexline worker`: an engine worker (docs/worker.md). It loads the model, runs the
engine (tokenizer, LLM, decoder) and serves bridges' sessions over WebSocket; with
`--redis` it publishes itself for placement. SIGTERM or Ctrl-C drains: no new sessions,
the registry says draining at once, live sessions go on until they end or
`--drain-timeout`, then move to other workers; a second signal stops at once."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from .compose import build_voice_engine
from .process import configure_logging, run_until_signalled
from .settings import Settings, add_worker_arguments, settings_from

__all__ = ["add_worker_parser"]

log = logging.getLogger(__name__)


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    worker = sub.add_parser("worker", help="run an engine worker: the model for bridges' calls (--engine)",
                            description="Run an engine worker: load the model, run the batching engine and "
                            "serve bridges' sessions over WebSocket (docs/worker.md). Every option also "
                            "reads a DUPLEXLINE_* environment variable; a flag wins.")
    add_worker_arguments(worker)
    worker.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    settings = settings_from(args, os.environ)
    configure_logging(settings.log_level)
    return run_until_signalled("duplexline worker", lambda stop: _run(settings, stop), settings.event_loop)


async def _run(settings: Settings, stop: asyncio.Event) -> None:
    from model.worker_registry import WorkerRegistry
    from model.worker_server import WorkerServer

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    loop = asyncio.get_running_loop()
    voice = await loop.run_in_executor(None, build_voice_engine, settings, registry)
    w = settings.worker
    placement = WorkerRegistry(settings.redis) if settings.redis else None
    server = WorkerServer(voice, registry, worker_id=w.worker_id, model_id=settings.resolved_model_id,
                          advertise=w.address, placement=placement, drain_timeout=settings.drain_timeout)
    await server.start()
    runner = web.AppRunner(server.app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, w.listen.host, w.listen.port)
        try:
            await site.start()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {w.listen}: {exc.strerror}") from exc
        print(f"duplexline worker {w.worker_id}: serving model {settings.resolved_model_id} on ws://{w.listen}/ws "
              f"(advertised {w.address}); {'registry ' + str(settings.redis) if placement else 'no registry'}; "
              "press Ctrl-C to stop", flush=True)
        await stop.wait()
        await server.drain()  # a second signal stops at once
    finally:
        await server.close()
        await runner.cleanup()
