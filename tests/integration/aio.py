"""Bounded helpers for async tests: every wait has a deadline."""

from __future__ import annotations

import asyncio
import time

__all__ = ["run", "eventually"]


def run(coro, timeout: float = 20.0):
    """Run one test's coroutine with a bound on the whole of it."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def eventually(check, timeout: float = 5.0, interval: float = 0.02):
    """Poll the async `check()` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)
