"""Dial and transfer targets (`POST /calls`, `POST /calls/{id}/transfer`) are checked
against a narrowed SIP URI grammar before the native SIP stack sees them: an unchecked
40,000-character target corrupted its heap. The route itself answers 400 naming the field;
tests/integration/test_hardening_http.py checks that on a real bridge."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sip.http import MAX_URI_CHARS, sip_uri_problem

GOOD = [
    "sip:alice@127.0.0.1:5060", "sips:1000@pbx.example.com", "SIP:bob@Example.COM",
    "sip:+4930123456@[2001:db8::1]:5070;transport=tcp", "sip:1000@pbx.example.com;user=phone;lr",
    "sip:%2B49@trunk.example.net", "sip:x@localhost", "sip:a@h.example.",
    "sip:" + "1" * (MAX_URI_CHARS - len("sip:@h.example")) + "@h.example",
]

BAD = [
    ("sip:" + "a" * 40000 + "@example.com", "40016 characters"),
    ("sip:" + "1" * (MAX_URI_CHARS - len("sip:@h.example") + 1) + "@h.example", "at most 256"),
    ("sip:alice\x00@example.com", "'\\x00'"),
    ("sip:alice@example.com\r\nX-Evil: 1", "'\\r'"),
    ("sip:alice@exa\x7fmple.com", "'\\x7f'"),
    ("sip:ali ce@example.com", "' '"),
    ("sip:alice@example.com\t", "'\\t'"),
    ("tel:+4930123456", "not of the form"),
    ("http://example.com", "not of the form"),
    ("sip:example.com", "not of the form"),  # no user
    ("sip:alice:secret@example.com", "not of the form"),  # no passwords
    ("sip:alice@example.com?Subject=hi", "not of the form"),  # no headers
    ("<sip:alice@example.com>", "not of the form"),
    ('sip:alice@example.com;x="y"', "not of the form"),
    ("sip:alicé@example.com", "not of the form"),
    ("sip:alice@", "not of the form"),
    ("sip:alice@example.com:0", "port 0"),
    ("sip:alice@example.com:65536", "port 65536"),
    ("sip:alice@256.1.1.1", "not an IPv4 address"),
    ("sip:alice@1.2.3", "not an IPv4 address"),
    ("sip:alice@[2001:db8::zz]", "not of the form"),
    ("sip:alice@[1:2:3]", "not an IPv6 address"),
    ("sip:alice@-example.com", "not a host name"),
    ("sip:alice@exa..mple.com", "not a host name"),
    ("sip:alice@" + "a" * 64 + ".com", "not a host name"),
]


@pytest.mark.parametrize("uri", GOOD)
def test_ordinary_targets_pass(uri):
    assert sip_uri_problem(uri) is None


@pytest.mark.parametrize("uri, why", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_targets_are_refused_saying_why(uri, why):
    problem = sip_uri_problem(uri)
    assert problem is not None and why in problem, problem


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=400) | st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=300)
       .map(lambda t: "sip:" + t))
def test_whatever_passes_is_short_printable_and_sip(uri):
    if sip_uri_problem(uri) is None:
        assert len(uri) <= MAX_URI_CHARS
        assert uri[:4].lower() == "sip:" or uri[:5].lower() == "sips:"
        assert all(0x21 <= ord(c) <= 0x7E for c in uri) and not set(uri) & set('<>"\\ ')
