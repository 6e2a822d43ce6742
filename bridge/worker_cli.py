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
import signal
import sys

from aiohttp import web
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from model.errors import ModelError

from .compose import build_voice_engine
from .errors import BridgeError
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
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import _loop_factory

    try:
        with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
            runner.run(_run(settings))
    except (ModelError, BridgeError) as exc:
        print(f"duplexline worker: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"duplexline worker: cannot start: {exc}", file=sys.stderr)
        return 1
    print("duplexline worker: stopped", flush=True)
    return 0


async def _run(settings: Settings) -> None:
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
        stop = asyncio.Event()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                raise SystemExit(130)
            loop.create_task(_drain_then_stop(server, stop))

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        print(f"duplexline worker {w.worker_id}: serving model {settings.resolved_model_id} on ws://{w.listen}/ws "
              f"(advertised {w.address}); {'registry ' + str(settings.redis) if placement else 'no registry'}; "
              "press Ctrl-C to stop", flush=True)
        await stop.wait()
    finally:
        await server.close()
        await runner.cleanup()


async def _drain_then_stop(server, stop: asyncio.Event) -> None:
    await server.drain()
    stop.set()
