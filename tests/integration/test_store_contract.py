"""The session store contract, run against both backends: in memory, and Redis on a
real redis-server. Whatever a caller may rely on is asserted here once, for both."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

import pytest

from agent.errors import DuplicateCall, StaleSession, StoreClosed
from agent.store import (ENDED_EVENT, LEASE_EXPIRED, CallEvent, CallRecord, CallState,
                         SessionStore, StoreConfig, Transport, keep_leases)
from agent.store_memory import MemoryStore
from agent.store_redis import RedisStore
from tests.integration.aio import eventually, run

FAST = StoreConfig(lease_ttl=0.5, renew_interval=0.1, retention=60.0, events_maxlen=50,
                   op_timeout=0.5, health_interval=0.1)


@pytest.fixture(params=["memory", "redis"])
def make_store(request):
    """make_store(**config_overrides) -> a new, unstarted store of the backend under test.
    Redis stores of one test share a server and a key prefix, like bridges do."""
    prefix = f"t{uuid.uuid4().hex[:8]}:"

    def make(**overrides) -> SessionStore:
        config = dataclasses.replace(FAST, key_prefix=prefix, **overrides)
        if request.param == "memory":
            return MemoryStore(config)
        return RedisStore(request.getfixturevalue("redis_server").url, config)

    return make


def rec(call_id: str = "call-1", **fields) -> CallRecord:
    base = CallRecord.new(call_id, Transport.SIP, "sip:alice@example.org", bridge="bridge-a")
    return dataclasses.replace(base, **fields)


def test_put_get_round_trip(make_store):
    async def body():
        async with make_store() as store:
            record = rec(remote="sip:zoë@例え.jp", worker="w1", state=CallState.ACTIVE,
                         frames_in=7)
            await store.put(record)
            assert await store.get("call-1") == record
            assert await store.get("nobody") is None
            with pytest.raises(DuplicateCall):
                await store.put(rec())
            with pytest.raises(ValueError):
                await store.put(rec("x", state=CallState.ENDED, end_reason="r", ended_at=1.0))
            assert await store.ping()
            assert store.available

    run(body())


def test_update_changes_live_calls_only(make_store):
    async def body():
        async with make_store() as store:
            await store.put(rec())
            new = await store.update("call-1", state=CallState.ACTIVE, worker="w2",
                                     frames_in=10, frames_out=9, frames_late=1,
                                     last_activity=time.time())
            assert (new.state, new.worker, new.frames_in, new.frames_late) == \
                (CallState.ACTIVE, "w2", 10, 1)
            assert await store.get("call-1") == new
            with pytest.raises(TypeError, match="started_at"):
                await store.update("call-1", started_at=0.0)
            with pytest.raises(ValueError, match="end"):
                await store.update("call-1", state=CallState.ENDED)
            with pytest.raises(ValueError):
                await store.update("call-1", frames_in=-1)
            with pytest.raises(StaleSession):
                await store.update("nobody", frames_in=1)
            assert await store.get("call-1") == new  # the refused updates changed nothing

    run(body())


def test_end_is_final_and_first_reason_wins(make_store):
    async def body():
        async with make_store() as store:
            await store.put(rec())
            done = await store.end("call-1", "hangup")
            assert (done.state, done.end_reason) == (CallState.ENDED, "hangup")
            assert done.ended_at is not None and done.ended_at >= done.started_at
            assert await store.end("call-1", "timeout") == done
            assert await store.get("call-1") == done
            with pytest.raises(StaleSession) as stale:
                await store.update("call-1", frames_in=1)
            assert stale.value.record == done
            with pytest.raises(StaleSession):
                await store.end("nobody", "hangup")
            assert await store.renew(["call-1"]) == ["call-1"]
            last = (await store.events("call-1"))[-1]
            assert (last.kind, last.data) == (ENDED_EVENT, {"reason": "hangup"})
            assert await store.live_count() == 0

    run(body())


def test_list_and_count(make_store):
    async def body():
        async with make_store() as store:
            t = time.time()
            for i, call_id in enumerate(["b", "a", "c"]):
                await store.put(rec(call_id, started_at=t + i, last_activity=t + i))
            await store.end("a", "hangup")
            assert [r.call_id for r in await store.list_calls()] == ["b", "a", "c"]
            assert [r.call_id for r in await store.list_calls(live_only=True)] == ["b", "c"]
            assert await store.live_count() == 2

    run(body())


def test_events_in_order_limited_and_capped(make_store):
    async def body():
        async with make_store(events_maxlen=10) as store:
            await store.put(rec())
            t = time.time()
            for i in range(300):
                await store.append_event("call-1", CallEvent("dtmf", {"digit": str(i % 10),
                                                                      "n": i}, t + i))
            latest = await store.events("call-1", limit=3)
            assert [e.data["n"] for e in latest] == [297, 298, 299]
            assert latest[-1] == CallEvent("dtmf", {"digit": "9", "n": 299}, t + 299)
            kept = await store.events("call-1", limit=1000)
            # Redis trims with MAXLEN ~ (whole nodes of up to 100 entries): about the cap.
            assert 10 <= len(kept) <= 10 + 100
            assert [e.data["n"] for e in kept] == list(range(300 - len(kept), 300))
            assert await store.events("nobody") == []
            with pytest.raises(StaleSession):
                await store.append_event("nobody", CallEvent("dtmf"))
            with pytest.raises(ValueError):
                await store.events("call-1", limit=0)

    run(body())


def test_unrenewed_lease_is_reaped_with_reason(make_store):
    async def body():
        async with make_store() as store:
            await store.put(rec(state=CallState.ACTIVE))
            assert await store.reap_expired() == []
            assert await store.live_count() == 1
            # Expired but not yet reaped: no longer counted as live.
            await eventually(lambda: _zero(store.live_count()))
            assert await store.list_calls(live_only=True) == []
            reaped = await store.reap_expired()
            assert [(r.call_id, r.state, r.end_reason) for r in reaped] == \
                [("call-1", CallState.ENDED, LEASE_EXPIRED)]
            assert await store.get("call-1") == reaped[0]
            assert await store.reap_expired() == []
            assert await store.renew(["call-1"]) == ["call-1"]
            with pytest.raises(StaleSession):
                await store.update("call-1", frames_in=1)
            last = (await store.events("call-1"))[-1]
            assert (last.kind, last.data) == (ENDED_EVENT, {"reason": LEASE_EXPIRED})

    run(body())


async def _zero(count_coro) -> bool:
    return await count_coro == 0


def test_reap_at_a_given_time(make_store):
    async def body():
        async with make_store(lease_ttl=30.0, renew_interval=5.0) as store:
            await store.put(rec("a"))
            await store.put(rec("b"))
            await store.end("b", "hangup")
            assert await store.reap_expired(now=time.time() + 29) == []
            later = time.time() + 31
            reaped = await store.reap_expired(now=later)
            assert [(r.call_id, r.end_reason, r.ended_at) for r in reaped] == \
                [("a", LEASE_EXPIRED, later)]
            assert (await store.get("b")).end_reason == "hangup"

    run(body())


def test_renewed_lease_stays_live_and_lost_calls_are_reported(make_store):
    async def body():
        async with make_store() as store:
            await store.put(rec("kept"))
            await store.put(rec("gone"))
            held = {"kept", "gone"}
            lost: list[str] = []
            keeper = asyncio.create_task(keep_leases(store, lambda: held, lost.append))
            try:
                await asyncio.sleep(3 * store.config.lease_ttl)  # the span under test
                assert await store.live_count() == 2
                await store.end("gone", "hangup")
                await eventually(lambda: _true("gone" in lost))
                held.discard("gone")
                assert await store.reap_expired() == []
                assert (await store.get("kept")).live
                assert await store.renew(["kept", "never-put"]) == ["never-put"]
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)
            reaped = await eventually(store.reap_expired)
            assert [r.call_id for r in reaped] == ["kept"]

    run(body())


async def _true(value: bool) -> bool:
    return value


def test_ended_calls_kept_for_retention_then_gone(make_store):
    async def body():
        async with make_store(retention=0.3) as store:
            await store.put(rec())
            await store.append_event("call-1", CallEvent("dtmf", {"digit": "1"}))
            await store.end("call-1", "hangup")
            assert (await store.get("call-1")).end_reason == "hangup"
            await store.append_event("call-1", CallEvent("summary", {"frames": 0}))
            assert await eventually(lambda: _none(store.get("call-1")))
            assert await store.list_calls() == []
            assert await store.events("call-1") == []

    run(body())


async def _none(coro) -> bool:
    return await coro is None


def test_put_over_an_ended_call_starts_afresh(make_store):
    async def body():
        async with make_store() as store:
            await store.put(rec())
            await store.append_event("call-1", CallEvent("dtmf", {"digit": "1"}))
            await store.end("call-1", "hangup")
            again = rec(remote="sip:bob@example.org")
            await store.put(again)
            assert await store.get("call-1") == again
            assert await store.events("call-1") == []
            assert await store.live_count() == 1

    run(body())


def test_lifecycle(make_store):
    async def body():
        store = make_store()
        with pytest.raises(RuntimeError, match="start"):
            await store.get("x")
        assert not await store.ping()
        await store.start()
        await store.start()  # idempotent
        await store.put(rec())
        await asyncio.gather(store.close(), store.close())
        await store.close()
        assert not await store.ping()
        assert not store.available
        with pytest.raises(StoreClosed):
            await store.get("call-1")
        with pytest.raises(StoreClosed):
            await store.start()

    run(body())
