"""Hostile WebRTC offers against POST /webrtc/offer, on a bridge inside the namespace (the
leg gathers ICE candidates on every interface: the namespace holds only its own), at the
HTTP and SDP level (tests/torture/offers.py), plus offers that are fine but never connect.

Facts checked, besides the harness's own:
- every hostile request gets a 4xx (or, when full, 503) with a JSON error naming what was
  wrong, or the connection is closed; never another 5xx, never a hang;
- an SDP mutation the leg accepts (200) is hung up at once and leaves nothing;
- offers that never connect (no candidates: ICE can never check anything) do not lock
  other callers out: right after a burst of them, an offer from another address is
  answered; and each is reaped (no live WebRTC call, no open peer connection) within the
  connect timeout plus a margin;
- afterwards a good offer is answered again.

This phase stays at HTTP and SDP level plus aiortc's own answer: no browser connects.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections import Counter

import pytest

from .harness import SCALE, SEED, Phase, supported_flags
from .offers import CHROME_OFFER, hostile_cases, offer_body, raw_cases, raw_exchange
from .probe import LogWatch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600 if SCALE.name == "full" else 300)]

MAX_CALLS = 4
CONNECT_TIMEOUT = 5.0  # passed when the bridge has --webrtc-connect-timeout; else its built-in one
_OLD_CONNECT_TIMEOUT = 20.0  # the leg's fixed timeout before the flag existed
_REAP_MARGIN = 15.0
ATTACKER, CALLER = "127.0.0.1", "127.0.0.2"  # HTTP sources; the offer limits are per address


def _post(ns, port: int, source: str, body: bytes, headers: dict, timeout: float = 20.0
          ) -> tuple[int, dict, bytes, float]:
    """POST /webrtc/offer from `source` (a thread in the namespace): status, headers, body, seconds."""

    def go():
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
        try:
            conn.request("POST", "/webrtc/offer", body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read(), time.monotonic() - t0
        except (ConnectionError, http.client.HTTPException) as exc:  # closed on us: allowed
            return 0, {}, str(exc).encode(), time.monotonic() - t0
        finally:
            conn.close()

    return ns.call(go, timeout=timeout + 10)


def _hang_up(phase: Phase, raw: bytes) -> None:
    try:
        call_id = json.loads(raw)["call_id"]
    except (ValueError, KeyError, TypeError):
        return
    phase.bridge.http("DELETE", f"/webrtc/calls/{call_id}")


def _webrtc_left(phase: Phase) -> tuple[int, float]:
    """(live WebRTC calls, open peer connections)."""
    live = [c for c in (phase.bridge.live_calls() or []) if c.get("transport") == "webrtc"]
    m = re.search(r"^duplexline_webrtc_peers ([0-9.e+]+)$", phase.bridge.metrics(), re.M)
    return len(live), float(m.group(1)) if m else 0.0


def _check_answer(phase: Phase, what: str, status: int, headers: dict, raw: bytes, seconds: float,
                  statuses: Counter) -> None:
    statuses["none" if status == 0 else f"{status // 100}xx"] += 1
    if status >= 500 and status != 503:
        phase.fail(f"{what}: answered {status} (a server error): {raw[:200]!r}")
    elif 400 <= status < 500 or status == 503:
        ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
        try:
            data = json.loads(raw)
            ok = isinstance(data, dict) and data.get("error") and data.get("message")
        except ValueError:
            ok = False
        # aiohttp's own refusals of a broken request line/headers come before our handler
        if not ok and not (status in (400, 405, 413, 431) and not ctype.startswith("application/json")):
            phase.fail(f"{what}: {status} without a JSON error naming the problem: {raw[:160]!r}")
    if seconds > 15:
        phase.fail(f"{what}: took {seconds:.1f} s to answer")


def test_webrtc_hostile_offers(torture_ns, torture_dir):
    flags = supported_flags()
    args = ["--webrtc-max-calls", str(MAX_CALLS)]
    connect_timeout = _OLD_CONNECT_TIMEOUT
    if "--webrtc-connect-timeout" in flags:
        args += ["--webrtc-connect-timeout", str(CONNECT_TIMEOUT)]
        connect_timeout = CONNECT_TIMEOUT
    stuck = SCALE.stuck_offers
    with Phase("webrtc-offers", torture_ns, torture_dir, args=tuple(args), sip_port=5068, http_port=8088,
               log_budget=200 + 4 * (SCALE.offers + stuck)) as phase:
        port = phase.bridge.http_port
        statuses: Counter = Counter()
        good = offer_body(CHROME_OFFER)
        json_ct = {"Content-Type": "application/json"}

        # 1. offers that never connect, from one address
        stuck_answered = 0
        for k in range(stuck):
            status, headers, raw, secs = _post(torture_ns, port, ATTACKER, good, json_ct)
            _check_answer(phase, f"never-connecting offer {k}", status, headers, raw, secs, statuses)
            stuck_answered += status == 200
        last_stuck = time.monotonic()
        if stuck_answered == 0:
            phase.fail(f"none of {stuck} good offers was answered 200: the phase tests nothing")

        # 2. meanwhile a caller at another address must get through
        status, headers, raw, _ = _post(torture_ns, port, CALLER, good, json_ct)
        statuses["2xx" if status == 200 else f"{status // 100}xx"] += 1
        if status != 200:
            phase.fail(f"{stuck} offers that never connect (from {ATTACKER}) lock other callers out: an offer "
                       f"from {CALLER} got {status} {raw[:160]!r}")
        else:
            _hang_up(phase, raw)

        # 3. hostile requests, from rotating addresses (the per-address caps are not the point)
        first_traceback = ""
        for case in hostile_cases(SEED, SCALE.offers):
            source = f"127.0.6.{1 + case.index % 200}"
            mark = phase.bridge.log.mark()
            status, headers, raw, secs = _post(torture_ns, port, source, case.body, case.headers)
            _check_answer(phase, case.describe(), status, headers, raw, secs, statuses)
            if status == 200:
                _hang_up(phase, raw)
            if not first_traceback and LogWatch.tracebacks(phase.bridge.log.since(mark)):
                first_traceback = f"{case.describe()} (answered {status})"
        for name, head, body in raw_cases():
            t0 = time.monotonic()
            mark = phase.bridge.log.mark()
            status, first = torture_ns.call(raw_exchange, port, head, then=body, timeout=30)
            if not first_traceback and LogWatch.tracebacks(phase.bridge.log.since(mark)):
                first_traceback = f"raw request {name} (answered {status})"
            secs = time.monotonic() - t0
            statuses["none" if status == 0 else f"{status // 100}xx"] += 1
            if status and not 400 <= status < 500:
                phase.fail(f"raw request {name}: answered {status}, not a 4xx: {first[:120]!r}")
            if secs > 15:
                phase.fail(f"raw request {name}: took {secs:.1f} s")
        phase.tried = stuck + 1 + SCALE.offers + len(raw_cases())
        phase.classes.update(statuses)

        if first_traceback:  # the harness counts them; this says where the first one came from
            phase.log_hint = (f"{first_traceback}; a late one may belong to an earlier offer: aiortc's tasks run "
                              f"on after the answer")

        # 4. the never-connecting offers are reaped
        deadline = last_stuck + connect_timeout + _REAP_MARGIN
        while True:
            live, peers = _webrtc_left(phase)
            if (live == 0 and peers == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # polling interval; the bridge's state decides
        if live or peers:
            phase.fail(f"{live} WebRTC calls and {peers:g} peer connections still open "
                       f"{time.monotonic() - last_stuck:.0f} s after offers that never connected "
                       f"(connect timeout {connect_timeout:g} s)")

        # 5. and a good offer is answered again
        status, headers, raw, _ = _post(torture_ns, port, ATTACKER, good, json_ct)
        if status != 200:
            phase.fail(f"after the phase a good offer got {status}: {raw[:160]!r}")
        else:
            _hang_up(phase, raw)
