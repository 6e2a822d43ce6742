"""Registration with digest authentication against a registrar that demands it (written
here, in sip_peers.Registrar): the account with the right password registers and is
shown as registered in the metrics, a call to its registered contact is answered by the
agent; the account with a wrong password fails visibly (logged, counted, state 0) and is
retried with backoff."""

from __future__ import annotations

import json

import pytest

from tests.integration.sip_peers import BaresipPeer, BridgeProcess, Registrar, eventually, metric_value

pytestmark = pytest.mark.slow


def test_accounts_register_with_digest_auth_and_a_wrong_password_fails_visibly(tmp_path, sip_backend):
    with Registrar("alice", "pa55word") as registrar:
        accounts = tmp_path / "accounts.json"
        accounts.write_text(json.dumps({"accounts": [
            {"name": "good", "user": "alice", "domain": f"127.0.0.1:{registrar.port}", "password": "pa55word",
             "registrar": f"127.0.0.1:{registrar.port}", "interval": 60},
            {"name": "bad", "user": "alice", "auth_user": "alice", "domain": f"127.0.0.1:{registrar.port}",
             "password": "wrong", "interval": 60},
        ]}))
        with BridgeProcess("--agent", "echo", "--sip-accounts", str(accounts), "--rtp-ports", "24000-24999",
                           "--sip-backend", sip_backend,
                           workdir=tmp_path) as server:
            eventually(lambda: metric_value(server.metrics(), "duplexline_sip_registration_up",
                                            'account="good"') == 1, timeout=15, what="account good registered")
            assert registrar.registered, "the registrar accepted no REGISTER"
            # Both accounts are challenged first (each stack sends the second REGISTER in its own time).
            eventually(lambda: registrar.challenges >= 2, timeout=10, what="both accounts challenged")

            eventually(lambda: metric_value(server.metrics(), "duplexline_sip_registration_failures_total",
                                            'account="bad"') >= 2, timeout=15, what="retries of account bad")
            text = server.metrics()
            assert metric_value(text, "duplexline_sip_registration_up", 'account="bad"') == 0
            assert registrar.rejected >= 2
            assert "account bad: registration failed" in server.log()

            # A call to the registered contact reaches the agent through that account.
            contact = registrar.registered[-1].strip("<>").split(">")[0].split(";")[0]
            with BaresipPeer(tmp_path, user="caller") as peer:
                peer.dial(contact)
                call_id = peer.wait_event("CALL_ESTABLISHED", timeout=10)["id"]
                eventually(lambda: server.get(f"/calls/{call_id}")[1].get("state") == "active", timeout=5,
                           what="the call through the account to be active")
                peer.hangup()
                peer.wait_event("CALL_CLOSED", timeout=10)
            assert server.terminate() == 0, server.log()
