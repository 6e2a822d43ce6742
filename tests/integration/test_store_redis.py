"""The Redis store against a real redis-server that is killed, restarted, flushed and
frozen mid-call, and against a bridge process that crashes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from agent.errors import StaleSession, StoreUnavailable
from agent.store import (ENDED_EVENT, LEASE_EXPIRED, CallEvent, CallRecord, CallState,
                         StoreConfig, Transport)
from agent.store_redis import RedisStore
from tests.integration.aio import eventually, run

FAST = StoreConfig(lease_ttl=0.6, renew_interval=0.2, retention=60.0, events_maxlen=50,
                   op_timeout=0.5, health_interval=0.1, key_prefix="t:")
REPO = Path(__file__).resolve().parents[2]


def rec(call_id: str, **fields) -> CallRecord:
    base = CallRecord.new(call_id, Transport.SIP, f"sip:{call_id}@example.org",
                          bridge="bridge-a", state=CallState.ACTIVE)
    return dataclasses.replace(base, **fields)


async def _available(store: RedisStore) -> bool:
    return store.available


async def _down(store: RedisStore) -> bool:
    return not store.available


def _outage_logs(caplog) -> tuple[int, int]:
    records = [r for r in caplog.records if r.name == "agent.store_redis"]
    down = sum("unavailable" in r.getMessage() for r in records)
    back = sum("is back" in r.getMessage() for r in records)
    return down, back


def test_restart_mid_call_loses_no_live_state(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="agent.store_redis")

    async def body():
        async with RedisStore(redis_server.url, FAST) as bridge:
            for call_id in ("c1", "c2", "c3"):
                await bridge.put(rec(call_id))
            await bridge.append_event("c1", CallEvent("dtmf", {"digit": "1"}))
            await bridge.end("c3", "hangup")

            redis_server.kill()
            # The call path during the outage: nothing raises, nothing waits.
            started = time.monotonic()
            for n in range(1, 1001):
                await bridge.update("c1", frames_in=n, frames_out=n, last_activity=time.time())
            assert time.monotonic() - started < 2 * FAST.op_timeout + 0.5
            await bridge.append_event("c1", CallEvent("dtmf", {"digit": "2"}))
            await bridge.put(rec("c4", transport=Transport.WEBRTC))
            await bridge.end("c2", "hangup")
            assert await bridge.renew(["c1", "c4"]) == []
            assert (await bridge.get("c1")).frames_in == 1000  # held calls read locally
            await eventually(lambda: _down(bridge))
            assert not await bridge.ping()
            with pytest.raises(StoreUnavailable):
                await bridge.list_calls()
            assert bridge.errors_total < 50  # counted per attempt, not per frame

            redis_server.restart()
            await eventually(lambda: _available(bridge))

            # Another bridge, connected to the new server, sees what the first holds.
            async with RedisStore(redis_server.url, FAST) as other:
                c1 = await other.get("c1")
                assert (c1.state, c1.frames_in, c1.frames_out) == (CallState.ACTIVE, 1000, 1000)
                assert (await other.get("c4")).transport is Transport.WEBRTC
                assert (await other.get("c2")).end_reason == "hangup"
                assert (await other.get("c3")).end_reason == "hangup"  # ended, still held
                assert [r.call_id for r in await other.list_calls(live_only=True)] == \
                    ["c1", "c4"]
                assert await other.live_count() == 2
                digits = [e.data["digit"] for e in await other.events("c1")]
                assert digits == ["2"]  # queued during the outage; earlier ones died with Redis
                assert (await other.events("c2"))[-1].kind == ENDED_EVENT
            assert bridge.outages_total == 1

    run(body())
    assert _outage_logs(caplog) == (1, 1)


def test_flushed_redis_is_rewritten_without_a_disconnect(redis_server, caplog):
    caplog.set_level(logging.INFO, logger="agent.store_redis")

    async def body():
        async with RedisStore(redis_server.url, FAST) as bridge:
            await bridge.put(rec("c1"))
            await bridge.update("c1", frames_in=5)
            raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                await raw.flushall()

                async def back() -> bool:
                    return await raw.hget("t:call:c1", "frames_in") == "5"

                await eventually(back)
                assert await raw.zscore("t:live", "c1") > time.time()
            finally:
                await raw.aclose()
            assert bridge.outages_total == 0

    run(body())
    assert any("lost this store's keys" in r.getMessage() for r in caplog.records)


def test_lease_not_renewed_is_reaped_by_another_bridge(redis_server):
    async def body():
        async with RedisStore(redis_server.url, FAST) as a, \
                RedisStore(redis_server.url, FAST) as b:
            await a.put(rec("c1", bridge="bridge-a"))
            await a.append_event("c1", CallEvent("dtmf", {"digit": "5"}))
            assert await b.reap_expired() == []
            assert await b.live_count() == 1
            reaped = await eventually(b.reap_expired)
            assert [(r.call_id, r.bridge, r.state, r.end_reason) for r in reaped] == \
                [("c1", "bridge-a", CallState.ENDED, LEASE_EXPIRED)]
            assert await a.live_count() == 0
            assert [e.kind for e in await b.events("c1")] == ["dtmf", ENDED_EVENT]
            # The bridge that stopped renewing learns it lost the call, and cannot
            # bring it back.
            with pytest.raises(StaleSession) as stale:
                await a.update("c1", frames_in=1)
            assert stale.value.record.end_reason == LEASE_EXPIRED
            assert await a.renew(["c1"]) == ["c1"]
            assert (await a.end("c1", "hangup")).end_reason == LEASE_EXPIRED
            assert (await b.get("c1")).end_reason == LEASE_EXPIRED

    run(body())


def test_lost_lease_is_reported_by_renew(redis_server):
    async def body():
        async with RedisStore(redis_server.url, FAST) as a, \
                RedisStore(redis_server.url, FAST) as b:
            await a.put(rec("c1"))
            assert await b.reap_expired(now=time.time() + 10) != []
            assert await a.renew(["c1"]) == ["c1"]
            assert (await a.get("c1")).end_reason == LEASE_EXPIRED

    run(body())


_BRIDGE = textwrap.dedent("""
    import asyncio, sys
    from agent.store import CallRecord, StoreConfig, keep_leases
    from agent.store_redis import RedisStore

    async def main(url):
        config = StoreConfig(lease_ttl=0.6, renew_interval=0.2, key_prefix="t:")
        async with RedisStore(url, config) as store:
            await store.put(CallRecord.new("crash-1", "sip", "sip:bob@x", bridge="doomed"))
            task = asyncio.create_task(keep_leases(store, lambda: ["crash-1"]))
            print("ready", flush=True)
            await task

    asyncio.run(main(sys.argv[1]))
""")


def test_crashed_bridge_process_calls_are_reaped(redis_server):
    proc = subprocess.Popen([sys.executable, "-c", _BRIDGE, redis_server.url], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        async def body():
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 10)
            assert line.strip() == "ready", proc.stderr.read() if proc.poll() else line
            async with RedisStore(redis_server.url, FAST) as survivor:
                # Alive and renewing: survives several lease periods of reaping.
                deadline = time.monotonic() + 3 * FAST.lease_ttl
                while time.monotonic() < deadline:
                    assert await survivor.reap_expired() == []
                    await asyncio.sleep(0.05)
                assert await survivor.live_count() == 1

                proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                reaped = await eventually(survivor.reap_expired)
                assert time.monotonic() - killed <= FAST.lease_ttl + 1.0
                assert [(r.call_id, r.bridge, r.end_reason) for r in reaped] == \
                    [("crash-1", "doomed", LEASE_EXPIRED)]
                assert await survivor.live_count() == 0

        run(body())
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_frozen_redis_times_out_and_calls_go_on(redis_server):
    async def body():
        async with RedisStore(redis_server.url, FAST) as bridge:
            await bridge.put(rec("c1"))
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                await bridge.update("c1", frames_in=1)  # waits one op_timeout at most
                for n in range(2, 200):
                    await bridge.update("c1", frames_in=n)
                assert time.monotonic() - started < FAST.op_timeout + 1.0
                assert not bridge.available
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
            await eventually(lambda: _available(bridge))
            async with RedisStore(redis_server.url, FAST) as other:
                assert (await other.get("c1")).frames_in == 199

    run(body())


def test_keys_prefix_and_expiry(redis_server):
    async def body():
        config = dataclasses.replace(FAST, key_prefix="dl-test:", events_maxlen=10,
                                     retention=30.0)
        async with RedisStore(redis_server.url, config) as store:
            await store.put(rec("c1"))
            for i in range(500):
                await store.append_event("c1", CallEvent("tick", {"i": i}))
            await store.end("c1", "hangup")
            raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
            try:
                keys = await raw.keys("*")
                assert keys and all(k.startswith("dl-test:") for k in keys)
                assert await raw.xlen("dl-test:events:c1") <= 10 + 100  # MAXLEN ~
                for key in ("dl-test:call:c1", "dl-test:events:c1"):
                    assert 0 < await raw.pttl(key) <= 30_000
                assert await raw.zscore("dl-test:live", "c1") is None
            finally:
                await raw.aclose()

    run(body())


def test_start_without_redis_fails_clearly(redis_server):
    url = redis_server.url
    redis_server.kill()

    async def body():
        store = RedisStore(url, FAST)
        with pytest.raises(StoreUnavailable, match="redis-server is running"):
            await store.start()

    run(body(), timeout=5.0)


def test_password_is_redacted():
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0", FAST)
    assert "s3cret" not in store._shown and "***" in store._shown
