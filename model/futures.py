"""Completing asyncio futures from the engine's and the tokenizer's threads.

Those threads hand results back with `loop.call_soon_threadsafe(resolve, fut, value)`;
the future may have been cancelled meanwhile (the call hung up), so both helpers check."""

from __future__ import annotations

import asyncio

__all__ = ["resolve", "fail"]


def resolve(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


def fail(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
