"""CDRs to a Redis stream (with `--redis`): `XADD duplexline:cdr MAXLEN ~ N * cdr <json>`,
so every bridge's records meet in one place a consumer group can read, and the stream
stays bounded (`~`: Redis trims whole nodes, cheaply, to about N entries).

`offer()` puts the line on a bounded queue (never blocks); one task writes it, each
write bounded by a timeout. Redis down, a full queue or a failed write drop that record,
counted (`duplexline_cdr_records_total{sink="redis"}`) and logged, throttled. The file
(`--cdr-dir`) is the record to keep; the stream is for live consumers.
"""

from __future__ import annotations

import asyncio
import logging

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from .record_metrics import RecordMetrics, Throttled

__all__ = ["CdrStream", "STREAM", "STREAM_MAXLEN"]

log = logging.getLogger(__name__)

STREAM = "duplexline:cdr"
STREAM_MAXLEN = 100_000
_OP_TIMEOUT = 2.0


class CdrStream:
    name = "redis"

    def __init__(self, url: str, metrics: RecordMetrics, *, stream: str = STREAM, maxlen: int = STREAM_MAXLEN,
                 maxsize: int = 4096) -> None:
        self.stream = stream
        self.maxlen = maxlen
        self._url = url
        self._metrics = metrics
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize)
        self._client: Redis | None = None
        self._task: asyncio.Task | None = None
        self._warn = Throttled(log)

    async def start(self) -> None:
        # Redis being down at start is not fatal: the session store decides that, and
        # records written meanwhile are counted as errors.
        self._client = Redis.from_url(self._url, socket_connect_timeout=_OP_TIMEOUT, socket_timeout=None)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cdr-redis")

    def offer(self, line: str) -> None:
        try:
            self._queue.put_nowait(line)
        except asyncio.QueueFull:
            self._metrics.cdr.labels(sink=self.name, outcome="queue_full").inc()
            self._warn.warn("CDR stream writer behind (%d queued): record dropped", self._queue.maxsize)

    async def close(self, timeout: float = 5.0) -> None:
        if self._task is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except asyncio.TimeoutError:
            log.warning("CDR stream: %d records not written within %.0f s", self._queue.qsize(), timeout)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._client is not None:
            await self._client.aclose()

    async def _run(self) -> None:
        assert self._client is not None
        while True:
            line = await self._queue.get()
            try:
                async with asyncio.timeout(_OP_TIMEOUT):
                    await self._client.xadd(self.stream, {"cdr": line}, maxlen=self.maxlen, approximate=True)
            except (redis_errors.RedisError, OSError, asyncio.TimeoutError) as exc:
                self._metrics.cdr.labels(sink=self.name, outcome="error").inc()
                self._warn.warn("cannot add a CDR to Redis stream %s: %s", self.stream, exc)
            else:
                self._metrics.cdr.labels(sink=self.name, outcome="written").inc()
            finally:
                self._queue.task_done()
