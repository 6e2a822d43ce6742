"""`WorkerThread`: the lifecycle the engine and the tokenizer batcher share. One daemon
thread runs the subclass's `_run()`; callers and the thread meet on `self._cv`;
`close()` sets `_stopping`, wakes the thread and joins it (idempotent)."""

from __future__ import annotations

import threading

__all__ = ["WorkerThread"]

JOIN_TIMEOUT = 30.0  # a step or a batch in flight finishes well within this


class WorkerThread:
    def __init__(self, name: str) -> None:
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._thread_name = name

    def _start_thread(self) -> bool:
        """Start the thread unless it runs; True when this call started it."""
        if self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._run, name=self._thread_name, daemon=True)
        self._thread.start()
        return True

    def start(self):
        """Start the thread (idempotent); returns self."""
        self._start_thread()
        return self

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the thread; what it does with pending work on `_stopping` is its own."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT)
            self._thread = None
