"""What the long-running commands (`serve`, `worker`) share as processes: the event loop
they run on, logging, and the signal rule: the first SIGINT or SIGTERM asks the command to
stop (it drains), a second one stops it at once. Start-up errors become one line on
stderr and an exit status."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Awaitable, Callable

from agent.errors import AgentError
from model.errors import ModelError

from .errors import BridgeError

__all__ = ["configure_logging", "loop_factory", "run_until_signalled"]


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def loop_factory(name: str):
    """uvloop's loop (libuv: cheaper timers, task wake-ups and UDP sends, which the media
    legs do for every packet), or None for the standard library's."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise BridgeError("uvloop is not installed (pip install uvloop, or --event-loop asyncio)") from None
    return uvloop.new_event_loop


def run_until_signalled(name: str, main: Callable[[asyncio.Event], Awaitable[None]], event_loop: str) -> int:
    """Run `main(stop)` on the chosen loop; `stop` is set by the first signal. Exit status:
    0 stopped, 1 an address or file problem, 2 bad model files or configuration, 130 a
    second signal."""
    async def run() -> None:
        stop = asyncio.Event()
        signals = {"count": 0}

        def on_signal() -> None:
            signals["count"] += 1
            if signals["count"] > 1:
                raise SystemExit(130)  # a second Ctrl-C: stop now
            stop.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        await main(stop)

    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            runner.run(run())
    except (ModelError, AgentError, BridgeError) as exc:  # bad model files, store unreachable: named by the error
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{name}: cannot start: {exc}", file=sys.stderr)
        return 1
    print(f"{name}: stopped", flush=True)
    return 0
