"""`TokenizerBatcher`: every call's tokenizer pushes on one thread, batched.

Each call pushes one chunk of audio per chunk period; tokenizing them one by one costs a
forward pass per call (and on the CPU, one Python-heavy pass per call fighting the event
loop for the GIL). Pushes that wait together are encoded in one batched pass
(`SpeechTokenizer.push_many`), the way the engine batches the LLM step. The asyncio side
awaits its codes without blocking.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from .codec import SpeechTokenizer, TokenizerStream
from .futures import fail, resolve
from .worker_thread import WorkerThread

__all__ = ["TokenizerBatcher"]

log = logging.getLogger(__name__)


class TokenizerBatcher(WorkerThread):
    def __init__(self, tokenizer: SpeechTokenizer, max_batch: int = 256) -> None:
        super().__init__("duplexline-tokenizer")
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self._queue: list[tuple[TokenizerStream, np.ndarray, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self.batches = 0

    async def push(self, stream: TokenizerStream, pcm: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            if self._stopping:
                raise RuntimeError("the tokenizer batcher is closed")
            self._queue.append((stream, pcm, fut, loop))
            self._cv.notify()
        return await fut

    def _run(self) -> None:  # TOKENIZER THREAD
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    pending, self._queue = self._queue, []
                    break
                work, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            # A stream pushed twice in one batch would see its chunks out of order: keep the
            # second for the next round.
            seen: set[int] = set()
            batch, later = [], []
            for item in work:
                (later if id(item[0]) in seen else batch).append(item)
                seen.add(id(item[0]))
            if later:
                with self._cv:
                    self._queue[:0] = later
            try:
                codes = self.tokenizer.push_many([b[0] for b in batch], [b[1] for b in batch])
            except Exception as exc:
                log.exception("tokenizer batch of %d failed", len(batch))
                for _, _, fut, loop in batch:
                    loop.call_soon_threadsafe(fail, fut, exc)
                continue
            self.batches += 1
            for (_, _, fut, loop), c in zip(batch, codes):
                loop.call_soon_threadsafe(resolve, fut, c)
        for _, _, fut, loop in pending:
            loop.call_soon_threadsafe(fail, fut, RuntimeError("the tokenizer batcher stopped"))

