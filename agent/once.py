"""Small task helpers the calls, legs and stores share.

`Once`: an idempotent async action (close, end). The first call starts it as a task;
every caller, concurrent or later, awaits that same run; a caller that is cancelled while
waiting does not cancel the action (a half-done close would leak what it frees).

`BackgroundTasks`: fire-and-forget work started from callbacks (a store write, an answer,
an end), kept referenced until done so it is not garbage-collected mid-flight, and
awaited with a bound before the owner goes away.

`stop_writer`: the end of a writer thread that drains a queue (CDR file, recordings): a
stop marker behind what is queued, then a bounded join."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Awaitable, Callable

__all__ = ["BackgroundTasks", "Once", "stop_writer"]


class Once:
    def __init__(self) -> None:
        self._task: asyncio.Task | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    async def run(self, action: Callable[[], Awaitable[Any]]) -> Any:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(action())
        return await asyncio.shield(self._task)


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> None:
        """Run `coro` as a task; without a running loop (a callback at shutdown) it is
        closed unstarted."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, timeout: float) -> None:
        """Let what is running finish, for at most `timeout` seconds."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def stop_writer(q: queue.Queue, thread: threading.Thread, stop: object, timeout: float) -> bool:
    """Put `stop` on the thread's queue behind what is queued and wait for the thread to
    finish, `timeout` seconds in all. True when it finished. Blocks: call it in a worker
    thread (`asyncio.to_thread`), never on the event loop."""
    deadline = time.monotonic() + timeout
    try:
        q.put(stop, timeout=timeout)
    except queue.Full:
        pass
    thread.join(max(0.0, deadline - time.monotonic()))
    return not thread.is_alive()
