"""What the pjsua2 wheel cannot do stops `duplexline serve --sip-backend pjsua2` at start,
with exit code 2 and a message that names the setting and the way out (baresip): TLS (the
wheel's OpenSSL 1.0.2k), a route that demands SRTP, an account over TLS."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from tests.integration.serve_process import DUPLEXLINE, REPO, free_port

pytestmark = pytest.mark.slow


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DUPLEXLINE, "serve", "--agent", "echo", "--sip-backend", "pjsua2",
                           "--http-listen", f"127.0.0.1:{free_port()}", "--sip-listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("case", ["tls-ca", "srtp-route", "tls-account"])
def test_what_the_wheel_cannot_do_stops_the_start(tmp_path, case):
    pytest.importorskip("pjsua2", reason="the pjsua2 extra is not installed")
    if case == "tls-ca":
        ca = tmp_path / "ca.pem"
        ca.write_text("not read: refused before\n")
        args, said = ("--sip-tls-ca", str(ca)), "sip_tls_listen"
    elif case == "srtp-route":
        routes = tmp_path / "routes.json"
        routes.write_text(json.dumps({"routes": [{"match": "bot", "srtp": "required"}]}))
        args, said = ("--sip-routes", str(routes)), "sip_routes"
    else:
        accounts = tmp_path / "accounts.json"
        accounts.write_text(json.dumps({"accounts": [{"name": "x", "user": "a", "domain": "example.com",
                                                      "transport": "tls", "register": False}]}))
        args, said = ("--sip-accounts", str(accounts)), "SIP over TLS"
    done = _serve(*args)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "cannot start" in out and said in out and "--sip-backend baresip" in out, out[-3000:]
