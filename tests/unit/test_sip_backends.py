"""Choosing the SIP stack (--sip-backend): each backend's limits are checked when the
settings are built (nothing starts with a setting the stack cannot honour), an unknown or
missing backend is refused by name, and the pjsua2 backend's own refusals and lifecycle.
The lifecycle runs in a child process: the wheel is a PJ_DEBUG build, and a failed pj
assertion would abort pytest itself."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

import pytest

from bridge.errors import ConfigError
from bridge.settings import add_serve_arguments, settings_from
from bridge.sip import backends
from bridge.sip.call import _unanswered_reason
from bridge.sip.stack import DialBusy, DialDeclined, DialNoAnswer


@pytest.fixture
def pj_backend():
    pytest.importorskip("pjsua2", reason="the pjsua2 extra is not installed (pip install 'duplexline[pjsua2]')")
    from bridge.sip.backends import pjsua2
    return pjsua2


def parse(argv, env=None):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return settings_from(parser.parse_args(argv), env or {})


def test_each_backend_defaults_to_its_own_ceiling_and_codecs():
    baresip = parse([]).sip
    assert (baresip.backend, baresip.max_calls, baresip.codecs) == ("baresip", 255, ("pcmu", "pcma", "g722", "opus"))
    pj = parse([], {"DUPLEXLINE_SIP_BACKEND": "pjsua2"}).sip
    assert (pj.backend, pj.max_calls, pj.codecs) == ("pjsua2", 4, ("pcmu", "pcma", "g722"))


@pytest.mark.parametrize("argv, named, why", [
    (["--sip-backend", "pjsua2", "--sip-max-calls", "5"], "max_calls", "1..4"),
    (["--sip-backend", "pjsua2", "--sip-codecs", "pcmu,opus"], "codecs", "pcmu, pcma, g722"),
    (["--sip-max-calls", "256"], "max_calls", "1..255"),
    (["--sip-backend", "asterisk"], "--sip-backend", "baresip, pjsua2"),
])
def test_what_a_backend_cannot_do_stops_the_start(argv, named, why):
    with pytest.raises(ConfigError) as err:
        parse(argv)
    assert named in str(err.value) and why in str(err.value)


def test_loading_names_the_backend_and_how_to_install_it(monkeypatch, pj_backend):
    assert backends.load("pjsua2") is pj_backend
    with pytest.raises(ConfigError, match="expected one of baresip, pjsua2"):
        backends.load("nope")
    monkeypatch.setitem(sys.modules, "pjsua2", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "bridge.sip.backends.pjsua2")
    with pytest.raises(ConfigError, match=r"duplexline\[pjsua2\]"):
        backends.load("pjsua2")


@pytest.mark.parametrize("code, kind", [(486, DialBusy), (600, DialBusy), (603, DialDeclined), (408, DialNoAnswer),
                                        (480, DialNoAnswer), (487, DialNoAnswer)])
def test_an_unanswered_outbound_call_is_classed_as_the_leg_names_it(code, kind, pj_backend):
    # The leg names an unanswered call from the close text (bridge/sip/call.py); the
    # backend's error must say the same thing.
    error = pj_backend._dial_error(code, "Reason")
    assert type(error) is kind and error.status == code
    assert _unanswered_reason(str(error), "out").replace("-", "_") == kind.outcome


def test_refusals_name_each_thing_the_wheel_lacks(pj_backend):
    assert pj_backend.refusals(codecs=("pcmu", "g722"), tls=False, srtp=False) == []
    said = pj_backend.refusals(codecs=("opus", "pcmu"), tls=True, srtp=True)
    assert len(said) == 3 and "opus" in said[0] and "TLS" in said[1] and "SRTP" in said[2]


_LIFECYCLE = textwrap.dedent("""
    import asyncio, socket
    from bridge.sip.backends.pjsua2 import Stack
    from bridge.sip.stack import AccountSpec, StackError

    def free_port():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    async def main():
        for round in range(2):  # a second endpoint after the first was destroyed
            stack = Stack()
            port = free_port()
            await stack.start(host="127.0.0.1", port=port, rtp_ports=(30000, 30999), max_calls=4)
            await stack.add_account(AccountSpec("duplexline", f"127.0.0.1:{port}", reg_interval=0,
                                                codecs=("pcmu", "pcma"), catch_all=True))
            for bad in (AccountSpec("a", "example.com", codecs=("pcmu", "pcma"), mediaenc="srtp-mand"),
                        AccountSpec("b", "example.com", codecs=("pcmu", "pcma"), transport="tls"),
                        AccountSpec("c", "example.com", codecs=("pcmu",))):
                try:
                    await stack.add_account(bad)
                except StackError as exc:
                    print("refused:", exc)
            await stack.add_account(AccountSpec("d", "example.com", codecs=("pcmu", "pcma"), mediaenc="srtp"))
            await stack.close()
            await stack.close()  # idempotent
        try:
            await Stack().start(host="127.0.0.1", port=free_port(), rtp_ports=(30000, 30999), max_calls=5)
        except StackError as exc:
            print("refused:", exc)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:  # a start that fails half-way unwinds
            taken.bind(("127.0.0.1", 0))
            try:
                await Stack().start(host="127.0.0.1", port=taken.getsockname()[1], rtp_ports=(30000, 30999),
                                    max_calls=4)
            except StackError as exc:
                print("refused:", exc)
        print("closed cleanly")

    asyncio.run(main())
""")


def test_the_stack_starts_refuses_what_it_cannot_do_and_closes_twice_in_one_process(pj_backend):
    done = subprocess.run([sys.executable, "-c", _LIFECYCLE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]  # -6: a pj assertion aborted the process
    refused = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 8, done.stdout
    assert "SRTP" in refused[0] and "TLS" in refused[1] and "whole process" in refused[2]
    assert "at most 4 calls" in refused[6] and "already in use" in refused[7]
    assert done.stdout.rstrip().endswith("closed cleanly")


def test_frames_are_read_out_of_the_binding_exactly_and_fast_path_is_proved(pj_backend):
    import pjsua2

    rng = __import__("random").Random(7)
    for size in (0, 1, 160, 640, 1920):
        data = bytes(rng.randrange(256) for _ in range(size))
        vector = pjsua2.ByteVector(data)
        assert pj_backend._vector_bytes(vector) == bytes(vector) == data  # the binding's own, slow copy
    assert pj_backend._check_vector_layout() is pj_backend._vector_bytes
