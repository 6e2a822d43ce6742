"""Call detail records and webhooks from `duplexline serve --agent echo`, with Debian's
baresip as the far end, a webhook receiver (aiohttp, in this process) on 127.0.0.1 and,
for the drain, a real redis-server: one CDR line per call with the end reason of each way
a call ends (the caller hangs up, the operator hangs up over HTTP, a blind transfer, a
refusal: 404 at the front, 503 while draining, 486 from a callee; the drain's timeout),
each webhook event once and correctly signed, and a receiver that is down for a while
getting every event once it is back, while the calls go on unharmed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry

from agent.agents import EchoAgent
from agent.call import CallInfo
from agent.call_records import CallRecords
from agent.calls import CallManager
from agent.metrics import AgentMetrics
from agent.record_metrics import RecordMetrics
from agent.store import Transport
from agent.store_memory import MemoryStore
from agent.webhooks import Webhooks
from bridge.line_audio import LineAudio
from tests.integration.aio import run
from tests.integration.sip_peers import (BaresipPeer, BridgeProcess, Responder, eventually, metric_value,
                                         sip_request)
from tests.integration.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.slow
TOKEN = "t0ken"
SECRET = "hook-s3cret"


def _hooks_args(receiver: WebhookReceiver, cdr_dir: Path) -> list[str]:
    return ["--agent", "echo", "--cdr-dir", str(cdr_dir), "--webhook", receiver.url, "--webhook-secret", SECRET,
            "--webhook-retry-seconds", "60", "--webhook-backoff", "0.1"]


@pytest.fixture(scope="module")
def receiver():
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture(scope="module")
def cdr_dir(workdir) -> Path:
    return workdir / "cdr"


@pytest.fixture(scope="module")
def route_receiver():
    """The webhook of the route "vip" only."""
    with WebhookReceiver(SECRET) as r:
        yield r


@pytest.fixture(scope="module")
def bridge(workdir, receiver, route_receiver, cdr_dir):
    routes = workdir / "routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "bot"},
                                             {"match": "vip", "webhooks": [route_receiver.url]}]}))
    with BridgeProcess(*_hooks_args(receiver, cdr_dir), "--sip-routes", str(routes), "--rtp-ports", "26000-26999",
                       workdir=workdir, token=TOKEN) as server:
        yield server
        assert server.terminate() == 0, server.log()


def cdrs(cdr_dir: Path) -> dict[str, dict]:
    """Every CDR written so far, by call id (a call id twice would be a bug: kept as a list)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(cdr_dir.glob("cdr-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.setdefault(record["call_id"], []).append(record)
    return out


def cdr_of(cdr_dir: Path, call_id: str, timeout: float = 15.0) -> dict:
    records = eventually(lambda: cdrs(cdr_dir).get(call_id), timeout=timeout, what=f"the CDR of {call_id}")
    assert len(records) == 1, records  # one line per call
    return records[0]


def events_of(receiver: WebhookReceiver, call_id: str, timeout: float = 15.0) -> list:
    """The call's webhook events, once call.ended has come."""
    eventually(lambda: any(r.event == "call.ended" for r in receiver.of(call_id)), timeout=timeout,
               what=f"call.ended for {call_id} at the receiver")
    return receiver.of(call_id)


def _dial_in(peer: BaresipPeer, bridge: BridgeProcess, user: str = "bot") -> str:
    peer.dial(f"sip:{user}@127.0.0.1:{bridge.sip_port}")
    call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
    eventually(lambda: bridge.get(f"/calls/{call_id}")[1].get("state") == "active", timeout=5,
               what="the call to be active")
    return call_id


def test_caller_hangup_writes_one_cdr_and_each_event_once_signed(bridge, workdir, receiver, cdr_dir):
    with BaresipPeer(workdir, user="alice") as peer:
        call_id = _dial_in(peer, bridge)
        peer.send_digits("12")
        eventually(lambda: len([r for r in receiver.of(call_id) if r.event == "call.dtmf"]) >= 2, timeout=10,
                   what="two call.dtmf events")
        peer.hangup()
        peer.wait_event("CALL_CLOSED", timeout=10)
    cdr = cdr_of(cdr_dir, call_id)
    assert cdr["schema"] == 1 and cdr["end_reason"] == "remote-hangup" and cdr["end_detail"] == "remote-hangup"
    assert cdr["direction"] == "in" and cdr["from"] == peer.uri and cdr["to"] == "bot"
    assert cdr["transport"] == "udp" and cdr["codec"] == "pcmu" and cdr["sip_code"] == 200
    assert cdr["worker"] is None and cdr["dtmf_digits"] == 2
    # line quality (docs/quality.md); its loss counts the DTMF packets here: this caller sends no RTCP
    assert cdr["quality"]["packets"] > 0 and cdr["quality"]["packets_lost"] is not None
    assert cdr["invite_at"] <= cdr["answer_at"] <= cdr["end_at"] and cdr["end_at"].endswith("Z")
    assert 0 <= cdr["setup_seconds"] < 5 and cdr["duration_seconds"] > 0
    # 20 ms frames each way for as long as the call was up (media starts a little after the answer)
    most = cdr["duration_seconds"] / 0.02 + 10
    assert 10 < cdr["frames"]["in"] <= most and 10 < cdr["frames"]["out"] <= most, (cdr["frames"], most)

    events = events_of(receiver, call_id)
    assert [r.event for r in events] == ["call.started", "call.answered", "call.dtmf", "call.dtmf", "call.ended"]
    assert all(r.signature_ok for r in events), [r.event for r in events if not r.signature_ok]
    assert len({r.event_id for r in events}) == len(events)  # one delivery each: ids differ
    assert [r.body["digits"] for r in events if r.event == "call.dtmf"] == ["1", "2"]
    assert events[0].body["from"] == peer.uri and events[0].body["transport"] == "udp"
    assert events[-1].body == cdr  # call.ended's body is the CDR, as written to the file
    text = bridge.metrics()
    assert metric_value(text, "duplexline_cdr_records_total", 'outcome="written",sink="file"') >= 1
    assert metric_value(text, "duplexline_webhook_deliveries_total",
                        'event="call.ended",outcome="delivered"') >= 1


def test_operator_hangup_over_http_and_the_routes_webhook(bridge, workdir, receiver, route_receiver, cdr_dir):
    with BaresipPeer(workdir, user="bob") as peer:
        call_id = _dial_in(peer, bridge, user="vip")
        status, _ = bridge.post(f"/calls/{call_id}/hangup")
        assert status == 200
        peer.wait_event("CALL_CLOSED", timeout=10)
    cdr = cdr_of(cdr_dir, call_id)
    assert (cdr["end_reason"], cdr["end_detail"]) == ("operator-hangup", "operator")
    assert [r.event for r in events_of(receiver, call_id)] == ["call.started", "call.answered", "call.ended"]
    # The route's own webhook gets the same events, besides the global one.
    events = events_of(route_receiver, call_id)
    assert [r.event for r in events] == ["call.started", "call.answered", "call.ended"]
    assert all(r.signature_ok for r in events) and events[-1].body == cdr


def test_blind_transfer_of_a_dialled_call(bridge, workdir, receiver, cdr_dir):
    with BaresipPeer(workdir, user="callee", answer=True) as callee, \
            BaresipPeer(workdir, user="carol", answer=True) as carol:
        status, body = bridge.post("/calls", {"to": callee.uri}, timeout=30)
        assert status == 201, body
        call_id = body["call_id"]
        callee.wait_event("CALL_ESTABLISHED", timeout=10)
        status, body = bridge.post(f"/calls/{call_id}/transfer", {"to": carol.uri}, timeout=60)
        assert status == 200, body
        carol.wait_event("CALL_ESTABLISHED", timeout=10)
    cdr = cdr_of(cdr_dir, call_id)
    assert (cdr["end_reason"], cdr["end_detail"]) == ("transfer", "transferred")
    assert cdr["direction"] == "out" and cdr["to"] == callee.uri and cdr["sip_code"] == 200
    events = events_of(receiver, call_id)
    assert [r.event for r in events] == ["call.started", "call.answered", "call.transferred", "call.ended"]
    assert events[2].body["to"] == carol.uri


def test_unknown_number_refused_with_404_is_recorded(bridge, workdir, receiver, route_receiver, cdr_dir):
    with BaresipPeer(workdir, user="lost") as peer:
        peer.dial(f"sip:nobody@127.0.0.1:{bridge.sip_port}")
        closed = peer.wait_event("CALL_CLOSED", timeout=10)
    assert "404" in closed.get("param", ""), closed
    cdr = cdr_of(cdr_dir, closed["id"])
    assert (cdr["end_reason"], cdr["sip_code"], cdr["end_detail"]) == ("refused", 404, "no-route")
    assert cdr["from"] == peer.uri and cdr["to"] == "nobody" and cdr["answer_at"] is None
    assert [r.event for r in events_of(receiver, closed["id"])] == ["call.ended"]
    assert route_receiver.of(closed["id"]) == []  # no route matched: only the global webhook


def test_busy_callee_is_recorded_with_its_486(bridge, cdr_dir):
    with Responder(486) as far:
        status, body = bridge.post("/calls", {"to": far.uri, "timeout": 5}, timeout=30)
    assert status == 409, body
    call_id = next(c["call_id"] for c in bridge.get("/calls")[1]["calls"] if c["remote"] == far.uri)
    cdr = cdr_of(cdr_dir, call_id)
    assert (cdr["end_reason"], cdr["end_detail"], cdr["sip_code"]) == ("not-answered", "busy", 486)


def test_receiver_down_then_up_gets_every_event_and_calls_go_on(bridge, workdir, receiver, cdr_dir):
    retries = metric_value(bridge.metrics(), "duplexline_webhook_retries_total")
    receiver.stop()
    try:
        with BaresipPeer(workdir, user="patient") as peer:
            call_id = _dial_in(peer, bridge)
            # Deliveries are failing and being retried while the call runs, and its audio flows:
            # a second of caller frames reaches the agent meanwhile.
            eventually(lambda: metric_value(bridge.metrics(), "duplexline_webhook_retries_total") > retries,
                       timeout=10, what="webhook retries")
            frames = metric_value(bridge.metrics(), "duplexline_agent_frame_lateness_seconds_count")
            eventually(lambda: metric_value(bridge.metrics(), "duplexline_agent_frame_lateness_seconds_count")
                       >= frames + 50, timeout=10, what="a second of the call's audio")
            peer.hangup()
            peer.wait_event("CALL_CLOSED", timeout=10)
        cdr = cdr_of(cdr_dir, call_id)  # the call went on unharmed, and its record was written
        assert cdr["end_reason"] == "remote-hangup" and cdr["frames"]["in"] >= 50
        assert receiver.of(call_id) == []
    finally:
        receiver.start()
    events = events_of(receiver, call_id, timeout=30)
    assert [r.event for r in events] == ["call.started", "call.answered", "call.ended"]
    assert all(r.signature_ok for r in events)
    assert events[-1].body == cdr


def test_drain_records_the_refusal_and_the_hung_up_call_in_file_and_stream(workdir, redis_server, tmp_path):
    cdr_dir = tmp_path / "cdr"
    with WebhookReceiver(SECRET) as receiver, \
            BridgeProcess(*_hooks_args(receiver, cdr_dir), "--redis", redis_server.url, "--drain-timeout", "3",
                          "--rtp-ports", "27000-27999", workdir=workdir, token=TOKEN) as bridge, \
            BaresipPeer(workdir, user="stayer") as peer:
        call_id = _dial_in(peer, bridge)
        assert bridge.post("/admin/drain")[0] == 202
        eventually(lambda: bridge.get("/readyz")[1].get("draining"), timeout=5, what="draining")
        refused = sip_request(bridge.sip_port, user="bot")
        assert refused.status == 503
        peer.wait_event("CALL_CLOSED", timeout=15)  # hung up at the drain timeout
        assert bridge.proc.wait(timeout=30) == 0, bridge.log()
        refused_id = refused.headers["call-id"]
        records = cdrs(cdr_dir)
        # Written before the process exited: the writer is flushed at shutdown.
        assert len(records[call_id]) == 1 and len(records[refused_id]) == 1
        drained, refusal = records[call_id][0], records[refused_id][0]
        assert (drained["end_reason"], drained["end_detail"]) == ("drain", "drain-timeout")
        assert (refusal["end_reason"], refusal["sip_code"], refusal["end_detail"]) == ("refused", 503, "draining")
        assert [r.event for r in receiver.of(call_id)] == ["call.started", "call.answered", "call.ended"]
        assert [r.event for r in receiver.of(refused_id)] == ["call.ended"]
    stream = redis.Redis.from_url(redis_server.url).xrange("duplexline:cdr")
    by_id = {json.loads(fields[b"cdr"])["call_id"]: json.loads(fields[b"cdr"]) for _, fields in stream}
    assert by_id[call_id] == drained and by_id[refused_id] == refusal
    assert len(stream) == 2


def test_a_rehomed_session_reaches_the_webhook_in_order():
    """The agent's own events (here a move to another engine worker, as the remote engine
    reports it) through a real manager, in this process: every event once, in order."""
    with WebhookReceiver(SECRET) as receiver:
        async def body():
            registry = CollectorRegistry()
            hooks = Webhooks((receiver.url,), RecordMetrics(registry), secret=SECRET, backoff=0.1)
            manager = CallManager(EchoAgent(), MemoryStore(), AgentMetrics(registry),
                                  records=CallRecords((), hooks))
            await manager.start()
            session = await manager.admit(CallInfo("c-rehome", Transport.SIP, "sip:x@127.0.0.1", "bot"),
                                          LineAudio(8000))
            await session.answered()
            session.dtmf("5")
            session.emit("rehomed", {"reason": "worker-lost", "worker": "w2"})  # as agents.py does
            await manager.hangup("c-rehome")
            await manager.close()  # delivers what is queued before it returns

        run(body(), timeout=30)
        events = receiver.of("c-rehome")
    assert [r.event for r in events] == ["call.started", "call.answered", "call.dtmf", "call.rehomed", "call.ended"]
    assert events[3].body["worker"] == "w2" and events[3].body["reason"] == "worker-lost"
    assert events[-1].body["rehomes"] == 1 and events[-1].body["end_reason"] == "operator-hangup"
    assert all(r.signature_ok for r in events)
