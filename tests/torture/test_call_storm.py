"""A storm of short calls: INVITE -> 200 -> ACK -> BYE, `storm_calls` of them (50 in the
short run, 1,000 in the full one) from a few raw UDP user agents at once (RawPhone, from
tests/integration/sip_peers.py), against `--agent echo`. Every call must be answered 200;
afterwards every call is over (live calls, RTP ports, fds back to the baseline), the
bridge counted each one as completed, and the harness's checks hold.

The per-source request limit is raised for this phase (`--sip-invite-rate`): the user
agents share 127.0.0.1, as a trunk's calls share its address, and the storm tests call
churn, not the limiter (the fuzz phases and SIPVicious meet the default limit)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from tests.integration.sip_peers import RawPhone, eventually, metric_value

from .harness import SCALE, Phase

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600 if SCALE.name == "full" else 300)]

_LOG_PER_CALL = 6


def _completed(phase: Phase) -> float:
    return metric_value(phase.bridge.metrics(), "duplexline_calls_total", 'outcome="completed",transport="sip"')


def test_call_storm(torture_ns, torture_dir):
    calls = SCALE.storm_calls
    with Phase("call-storm", torture_ns, torture_dir, args=("--sip-invite-rate", "1000"), sip_port=5066,
               http_port=8086, log_budget=150 + _LOG_PER_CALL * calls) as phase:
        before = _completed(phase)
        statuses: Counter = Counter()
        problems: list[str] = []
        lock = threading.Lock()
        counter = iter(range(calls))

        def worker() -> None:
            phone = torture_ns.call(RawPhone, phase.bridge.sip_port)
            with phone:
                for n in counter:  # shared iterator: each call number is taken once
                    try:
                        dialog = phone.call(timeout=10)
                    except TimeoutError as exc:
                        with lock:
                            statuses["none"] += 1
                            problems.append(f"call {n}: {exc}")
                        continue
                    with lock:
                        statuses[f"{dialog['status'] // 100}xx"] += 1
                        if dialog["status"] != 200:
                            problems.append(f"call {n}: answered {dialog['status']}")
                    if dialog["status"] == 200:
                        phone.bye(dialog)

        threads = [threading.Thread(target=worker, name=f"storm-{k}") for k in range(SCALE.storm_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(60.0, calls * 1.0))  # each call is bounded by its own 10 s timeout
            if t.is_alive():
                problems.append(f"{t.name} still placing calls when the storm's time was up")
        phase.sample()
        phase.tried = calls
        phase.classes.update(statuses)
        if problems:
            phase.fail(f"{len(problems)} of {calls} storm calls did not get 200: " + "; ".join(problems[:5]))
        answered = statuses["2xx"]
        # The last BYEs are in flight: the count catches up (bounded poll).
        try:
            eventually(lambda: _completed(phase) - before >= answered, timeout=30,
                       what=f"{answered} completed calls in duplexline_calls_total")
        except pytest.fail.Exception:
            phase.fail(f"the bridge counted {_completed(phase) - before:g} completed calls, {answered} were "
                       f"answered and hung up")
