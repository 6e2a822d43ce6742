"""The worker registry against a real, private redis-server: round trips, ordering and
filters, lease expiry, concurrent reservations, an unreachable Redis, garbled hashes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
import time

import pytest
import redis.asyncio as aioredis

from model.errors import ModelError
from model.worker_registry import RegistryUnavailable, WorkerInfo, WorkerRegistry
from tests.integration.aio import eventually, run

PREFIX = "t"


def info(worker_id: str, **fields) -> WorkerInfo:
    base = WorkerInfo(worker_id=worker_id, address=f"{worker_id}.workers.local:9100",
                      model_id="omni-7b", slots=4, free=4, step_p99=0.05, draining=False,
                      updated=time.time())
    return dataclasses.replace(base, **fields)


async def registry(url: str, lease_seconds: float = 60.0) -> WorkerRegistry:
    reg = WorkerRegistry(url, prefix=PREFIX, lease_seconds=lease_seconds)
    await reg.connect()
    return reg


def test_publish_round_trips_every_field(redis_server):
    async def body():
        reg = await registry(redis_server.url)
        try:
            published = WorkerInfo(worker_id="gpu-a", address="10.0.0.7:9100",
                                   model_id="omni-7b", slots=8, free=5,
                                   step_p99=0.0123456789012345, draining=False,
                                   updated=1722222222.123456)
            await reg.publish(published)
            assert await reg.workers() == [published]
            # A worker's later publish replaces what it said before.
            again = dataclasses.replace(published, free=2, step_p99=0.0, draining=True,
                                        updated=published.updated + 1.5)
            await reg.publish(again)
            assert await reg.workers() == []
            assert await reg.workers(include_draining=True) == [again]
            await reg.withdraw("gpu-a")
            assert await reg.workers(include_draining=True) == []
        finally:
            await reg.close()

    run(body())


def test_order_model_filter_and_draining(redis_server):
    async def body():
        reg = await registry(redis_server.url)
        try:
            for w in (info("w-few", free=1), info("w-many", free=3),
                      info("w-slow", free=2, step_p99=0.09),
                      info("w-zfast", free=2, step_p99=0.02),  # fastest, though last by id
                      info("w-tie-b", free=2, step_p99=0.09),
                      info("w-other", free=4, model_id="tiny"),
                      info("w-drain", free=4, draining=True)):
                await reg.publish(w)
            ids = [w.worker_id for w in await reg.workers("omni-7b")]
            assert ids == ["w-many", "w-zfast", "w-slow", "w-tie-b", "w-few"]
            assert [w.worker_id for w in await reg.workers("tiny")] == ["w-other"]
            assert await reg.workers("no-such-model") == []
            everyone = [w.worker_id for w in await reg.workers()]
            assert everyone == ["w-other", "w-many", "w-zfast", "w-slow", "w-tie-b", "w-few"]
            with_draining = [w.worker_id for w in await reg.workers(include_draining=True)]
            assert with_draining[:2] == ["w-drain", "w-other"]  # id breaks the free=4 tie
            assert len(with_draining) == 7
        finally:
            await reg.close()

    run(body())


def test_lease_expires_a_silent_worker(redis_server):
    async def body():
        short = await registry(redis_server.url, lease_seconds=0.3)
        long = await registry(redis_server.url, lease_seconds=60.0)
        raw = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            await short.publish(info("silent"))
            await long.publish(info("alive", free=1))
            assert {w.worker_id for w in await long.workers()} == {"silent", "alive"}
            assert await raw.zscore(f"{PREFIX}:workers", "silent") is not None

            async def gone():
                listed = {w.worker_id for w in await long.workers()}
                return "silent" not in listed and \
                    await raw.zscore(f"{PREFIX}:workers", "silent") is None

            await eventually(gone, timeout=3.0)
            assert [w.worker_id for w in await long.workers()] == ["alive"]
            assert not await raw.exists(f"{PREFIX}:worker:silent")
            assert await raw.zrange(f"{PREFIX}:workers", 0, -1) == ["alive"]
        finally:
            await raw.aclose()
            await short.close()
            await long.close()

    run(body())


def test_concurrent_reservations_never_exceed_free(redis_server):
    async def body():
        clients = [await registry(redis_server.url) for _ in range(4)]
        try:
            await clients[0].publish(info("gpu", slots=3, free=3))
            attempts = [c.reserve("gpu") for c in clients for _ in range(10)]
            results = await asyncio.gather(*attempts)
            assert len(results) == 40 and results.count(True) == 3
            assert (await clients[1].workers())[0].free == 0
            assert await clients[2].reserve("gpu") is False

            await clients[3].release("gpu")  # the worker refused one: it goes back
            assert await clients[0].reserve("gpu") is True
            assert await clients[0].reserve("gpu") is False

            for c in clients:  # more releases than reservations: capped at slots
                await asyncio.gather(*(c.release("gpu") for _ in range(5)))
            assert (await clients[0].workers())[0].free == 3

            # The worker's next publish is the truth, whatever bridges reserved since.
            assert await clients[1].reserve("gpu") is True
            await clients[0].publish(info("gpu", slots=3, free=1))
            assert (await clients[2].workers())[0].free == 1
        finally:
            for c in clients:
                await c.close()

    run(body())


def test_reserve_refuses_draining_and_unknown_workers(redis_server):
    async def body():
        reg = await registry(redis_server.url)
        raw = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            await reg.publish(info("drain", free=4, draining=True))
            assert await reg.reserve("drain") is False
            assert await reg.reserve("nobody") is False
            await reg.release("nobody")
            assert not await raw.exists(f"{PREFIX}:worker:nobody")  # nothing created
            assert (await reg.workers(include_draining=True))[0].free == 4
        finally:
            await raw.aclose()
            await reg.close()

    run(body())


def test_unreachable_redis_raises_registry_unavailable(redis_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    url = f"redis://127.0.0.1:{closed_port}/0"

    async def body():
        reg = WorkerRegistry(url, prefix=PREFIX)
        with pytest.raises(RegistryUnavailable) as caught:
            await reg.connect()
        assert url in str(caught.value)
        assert isinstance(caught.value, ModelError)

        # Redis going away after connect: every call says so, naming the URL.
        up = await registry(redis_server.url)
        try:
            await up.publish(info("w"))
            redis_server.kill()
            for call in (lambda: up.publish(info("w")), lambda: up.workers(),
                         lambda: up.reserve("w"), lambda: up.release("w")):
                with pytest.raises(RegistryUnavailable, match=re.escape(redis_server.url)):
                    await call()
        finally:
            await up.close()

    run(body())


def test_garbled_hash_is_skipped_with_one_warning(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger="model.worker_registry")

    async def body():
        reg = await registry(redis_server.url)
        raw = aioredis.from_url(redis_server.url, decode_responses=True)
        try:
            good = info("good")
            await reg.publish(good)
            bad = dict(worker_id="bad", address="x:1", model_id="omni-7b", free="2",
                       step_p99="0.01", draining="0", updated="1.0")  # no "slots"
            await raw.hset(f"{PREFIX}:worker:bad", mapping=bad)
            await raw.zadd(f"{PREFIX}:workers", {"bad": (time.time() + 60) * 1000})
            assert await reg.workers() == [good]
            assert await reg.workers() == [good]
            warnings = [r for r in caplog.records if r.name == "model.worker_registry"]
            assert len(warnings) == 1 and "t:worker:bad" in warnings[0].getMessage()
        finally:
            await raw.aclose()
            await reg.close()

    run(body())
