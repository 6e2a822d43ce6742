"""SIPVicious against a bridge with `--sip-auth` (tests/torture/sipvicious.py): svmap finds
it (fine), svwar finds no extension though routes exist, and svcrack does not find the
password from a 200-word list that ends with it, within the budget: the short run makes
one fast pass from one address; the full run spends `svcrack_budget_s` (10 minutes) on
patient passes, each from an address of its own and slowed by svcrack's own pacing.

A control comes first: from an address of its own, svcrack with the right password as its
only word must succeed, or the main check would prove nothing. The harness's echo calls
authenticate (from 127.0.0.1, an address the attack never uses), so after the attack the
account still works for its owner, or the phase says it does not."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.sip_peers import metric_value

from .harness import SCALE, Phase
from .sipvicious import EXTENSIONS, available, svcrack, svmap, svwar, wordlist

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SCALE.svcrack_budget_s + 300)]

USER, PASSWORD = "bob", "zebra-Kettle-2026"
_PASS_S = 120.0
_OUTCOMES = {"answered": "2xx", "401": "4xx", "403": "4xx", "404": "4xx", "banned": "4xx",
             "rate_limited": "5xx", "503": "5xx", "pending_limit": "5xx", "486": "4xx"}


def _invite_outcomes(phase: Phase) -> dict[str, float]:
    text = phase.bridge.metrics()
    return {k: metric_value(text, "duplexline_sip_invites_total", f'outcome="{k}"') for k in _OUTCOMES}


def test_sipvicious(torture_ns, torture_dir):
    why = available()
    if why:
        pytest.fail(why)
    routes = torture_dir / "sipvicious-routes.json"
    routes.write_text(json.dumps({"routes": [{"match": "bot"}, {"match": "1000"}]}))
    words = wordlist(torture_dir / "passwords.txt", PASSWORD)
    extensions = torture_dir / "extensions.txt"
    extensions.write_text("\n".join(EXTENSIONS) + "\n")
    with Phase("sipvicious", torture_ns, torture_dir, sip_port=5070, http_port=8090, auth=(USER, PASSWORD),
               args=("--sip-auth", f"{USER}:{PASSWORD}", "--sip-routes", str(routes)), log_budget=300) as phase:
        port = phase.bridge.sip_port
        before = _invite_outcomes(phase)
        tried = 0

        tool, found = svmap(torture_ns, port)
        tried += 1
        if not found:  # not a failure (hiding is no defence), but worth a line in the report
            print(f"svmap did not list the bridge: {tool.summary()}")

        for k, method in enumerate(("INVITE", "REGISTER", "OPTIONS")):
            tool, found_ext = svwar(torture_ns, port, method, extensions, source=f"127.0.8.{2 + k}")
            tried += len(EXTENSIONS)
            if found_ext:
                phase.fail(f"svwar -m {method} enumerated extensions {found_ext} ({tool.summary()})")

        control_words = torture_dir / "control.txt"
        control_words.write_text(PASSWORD + "\n")
        tool, cracked = svcrack(torture_ns, port, user=USER, extension="bot", dictionary=control_words,
                                source="127.0.5.1", password=PASSWORD, timeout=60)
        # (its answered call is never ACKed: the bridge hangs it up; the settle waits for that)
        tried += 1
        if not cracked:
            phase.fail(f"control: svcrack with the right password as its only word did not get in, so "
                       f"the attack below proves nothing ({tool.summary()})")

        deadline = time.monotonic() + SCALE.svcrack_budget_s
        passes = 0
        while True:
            source = f"127.0.7.{1 + passes % 200}"
            left = deadline - time.monotonic()
            pace = None if SCALE.name == "short" else 0.3
            # a pass gets at most 2 minutes: then the next address takes over, as a botnet would
            tool, cracked = svcrack(torture_ns, port, user=USER, extension="bot", dictionary=words, source=source,
                                    password=PASSWORD, timeout=max(10.0, min(left, _PASS_S)), pace=pace)
            passes += 1
            tried += 200
            if cracked:
                phase.fail(f"svcrack found the password on pass {passes} (from {source}, "
                           f"{time.monotonic() - deadline + SCALE.svcrack_budget_s:.0f} s into the attack; "
                           f"{tool.summary()})")
                break
            if SCALE.name == "short" or time.monotonic() > deadline - 10:
                break
        print(f"svcrack: {passes} passes of 200 words, not cracked" if not cracked else "svcrack: CRACKED")
        after = _invite_outcomes(phase)
        for outcome, cls in _OUTCOMES.items():
            phase.classes[cls] += int(after[outcome] - before[outcome])
        phase.tried = tried
