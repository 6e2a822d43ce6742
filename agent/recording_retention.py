"""Recording retention (`--record-retention-days N`): recordings (`*.wav` in the recording
folder, not its subfolders) whose last change is older than N days are deleted, at start
and then every hour, each sweep logged.

Age is the file's modification time: a recording being written is synced every second,
so a live call's file is never old. The sweep lists and unlinks files, which can block on
a slow disk: it runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Callable

from prometheus_client import Counter

__all__ = ["sweep", "prune_once", "keep_pruning", "SWEEP_SECONDS"]

log = logging.getLogger(__name__)

SWEEP_SECONDS = 3600.0
_DAY = 86400.0


def sweep(directory: Path, days: float, now: float) -> tuple[list[Path], int]:
    """Delete the recordings older than `days` at `now` (epoch seconds). Returns the
    deleted paths and how many could not be deleted (logged)."""
    cutoff = now - days * _DAY
    deleted: list[Path] = []
    failed = 0
    for path in directory.glob("*.wav"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                deleted.append(path)
        except FileNotFoundError:
            continue  # gone meanwhile: someone else's sweep, or an operator
        except OSError as exc:
            failed += 1
            log.warning("cannot delete old recording %s: %s", path, exc)
    return deleted, failed


async def prune_once(directory: Path, days: float, deleted_total: Counter,
                     clock: Callable[[], float] = time.time) -> int:
    deleted, failed = await asyncio.to_thread(sweep, directory, days, clock())
    deleted_total.inc(len(deleted))
    if deleted or failed:
        log.info("recording retention: deleted %d recordings older than %g days from %s%s", len(deleted), days,
                 directory, f" ({failed} could not be deleted)" if failed else "")
    return len(deleted)


async def keep_pruning(directory: Path, days: float, deleted_total: Counter, every: float = SWEEP_SECONDS,
                       clock: Callable[[], float] = time.time) -> None:
    """Sweep every `every` seconds until cancelled (the first sweep is the start's)."""
    while True:
        await asyncio.sleep(every)
        try:
            await prune_once(directory, days, deleted_total, clock)
        except Exception:  # a sweep that fails (the folder gone) must not end the sweeps
            log.exception("recording retention sweep of %s failed", directory)
