"""CDRs to files (`--cdr-dir DIR`): one JSON line per call, one file per UTC day
(`cdr-2026-12-07.jsonl`), appended.

Why a thread: a write can block for as long as the disk likes (a full journal, NFS),
and the event loop runs every call's 20 ms media. So `offer()` only puts the line on a
bounded queue (never blocks); one writer thread appends it. A full queue or a failed
write drops that record, counts it (`duplexline_cdr_records_total{sink="file"}`) and
logs, throttled. The day is taken when the record is offered (the call's end), not when
the thread gets to it, so a backlog at midnight does not land in the next day's file.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Callable, TextIO

from .once import stop_writer
from .record_metrics import RecordMetrics, Throttled

__all__ = ["CdrFile"]

log = logging.getLogger(__name__)

_STOP = None


class CdrFile:
    name = "file"

    def __init__(self, directory: Path, metrics: RecordMetrics, *, clock: Callable[[], float] = time.time,
                 maxsize: int = 4096) -> None:
        self.directory = Path(directory)
        self._metrics = metrics
        self._clock = clock
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize)
        self._thread: threading.Thread | None = None
        self._file: TextIO | None = None
        self._day = ""
        self._warn = Throttled(log)

    def path_for(self, day: str) -> Path:
        return self.directory / f"cdr-{day}.jsonl"

    def _today(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self._clock()))

    async def start(self) -> None:
        """Raises OSError naming the folder when it cannot be created or written: a CDR
        folder the operator set must not fail silently at the first call."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path_for(self._today()).open("a").close()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write CDRs to {self.directory} (--cdr-dir): {exc.strerror}") from exc
        self._thread = threading.Thread(target=self._run, name="cdr-file", daemon=True)
        self._thread.start()
        log.info("CDRs to %s", self.path_for("YYYY-MM-DD"))

    def offer(self, line: str) -> None:
        """Queue one record (a JSON line without newline). Never blocks."""
        try:
            self._queue.put_nowait((self._today(), line))
        except queue.Full:
            self._metrics.cdr.labels(sink=self.name, outcome="queue_full").inc()
            self._warn.warn("CDR file writer behind (%d queued): record dropped", self._queue.maxsize)

    async def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (for at most `timeout` seconds), then stop."""
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        await asyncio.to_thread(self._stop_and_join, thread, timeout)

    def _stop_and_join(self, thread: threading.Thread, timeout: float) -> None:
        if not stop_writer(self._queue, thread, _STOP, timeout):
            log.warning("CDR file writer did not finish within %.0f s; %d records not written", timeout,
                        self._queue.qsize())

    # ---- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not _STOP:
                self._write(*item)
        finally:
            if self._file is not None:
                self._file.close()

    def _write(self, day: str, line: str) -> None:
        try:
            if day != self._day or self._file is None:
                if self._file is not None:
                    self._file.close()
                    self._file = None
                self._file = self.path_for(day).open("a", encoding="utf-8")
                self._day = day
            self._file.write(line + "\n")
            self._file.flush()  # a crash loses no finished call's record
        except OSError as exc:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass
                self._file = None  # reopened for the next record: the folder may come back
            self._metrics.cdr.labels(sink=self.name, outcome="error").inc()
            self._warn.warn("cannot write a CDR to %s: %s", self.path_for(day), exc)
            return
        self._metrics.cdr.labels(sink=self.name, outcome="written").inc()
