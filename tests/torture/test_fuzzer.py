"""The fuzzer itself (no bridge, a second or two): a case is a pure function of seed and
index, every mutation is reachable, nothing exceeds a UDP datagram, the valid controls
are valid SIP by an independent reading (not the bridge's parser), and every IPv4
address any case names is on loopback."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from .sip_fuzz import MUTATIONS, RAW_MUTATIONS, TEMPLATES, UDP_MAX, SipFuzzer, Target

TARGET = Target(5060, "127.0.1.1", 40000, canary_port=9999)
_QUAD = re.compile(rb"(?<![0-9.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![0-9])")


def test_a_case_depends_only_on_seed_and_index():
    a, b = SipFuzzer(7), SipFuzzer(7)
    assert [a.case(i, TARGET).data for i in (0, 5, 999)] == [b.case(i, TARGET).data for i in (999, 5, 0)][::-1]
    assert a.case(3, TARGET).data != SipFuzzer(8).case(3, TARGET).data


def test_every_mutation_and_template_is_reached_and_sizes_fit_a_datagram():
    fuzzer = SipFuzzer(20261207)
    seen: Counter = Counter()
    methods: Counter = Counter()
    valid = 0
    for i in range(3000):
        case = fuzzer.case(i, TARGET)
        assert len(case.data) <= UDP_MAX, case.describe()
        seen.update(case.mutations)
        methods[case.method] += 1
        valid += case.valid
    assert set(MUTATIONS) | set(RAW_MUTATIONS) <= set(seen), set(MUTATIONS) | set(RAW_MUTATIONS) - set(seen)
    assert set(TEMPLATES) == set(methods)
    assert 0.05 < valid / 3000 < 0.15


def _headers(head: str) -> dict[str, str]:
    out = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(": ")
        out[name.lower()] = value
    return out


def test_valid_controls_are_valid_sip():
    fuzzer = SipFuzzer(1)
    controls = [c for c in (fuzzer.case(i, TARGET) for i in range(600)) if c.valid]
    assert len(controls) > 20
    for case in controls:
        head, sep, body = case.data.partition(b"\r\n\r\n")
        assert sep, case.describe()
        text = head.decode("ascii")
        method, uri, version = text.split("\r\n")[0].split(" ")
        assert (method, version) == (case.method, "SIP/2.0") and uri.startswith("sip:")
        h = _headers(text)
        assert int(h["content-length"]) == len(body)
        assert h["via"].startswith("SIP/2.0/UDP 127.0.1.1:40000;branch=z9hG4bK")
        assert ";tag=" in h["from"] and h["call-id"] == case.call_id and h["max-forwards"] == "70"
        assert h["cseq"].split(" ")[1] == method and h["cseq"].split(" ")[0].isdigit()
        if method == "INVITE":
            sdp = body.decode("ascii").split("\r\n")
            assert sdp[0] == "v=0" and any(line.startswith("m=audio ") for line in sdp)


def test_every_address_a_case_names_is_on_loopback():
    fuzzer = SipFuzzer(99)
    for i in range(3000):
        case = fuzzer.case(i, TARGET)
        for m in _QUAD.finditer(case.data):
            try:
                address = ipaddress.IPv4Address(m.group(0).decode())
            except ValueError:
                continue  # not an address (an octet over 255)
            assert address.is_loopback, f"{case.describe()} names {address}"
