"""`Once`: an idempotent async action (close, end). The first call starts it as a task;
every caller, concurrent or later, awaits that same run; a caller that is cancelled while
waiting does not cancel the action (a half-done close would leak what it frees)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

__all__ = ["Once"]


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
