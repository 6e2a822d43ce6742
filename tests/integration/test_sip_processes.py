"""Several bridge processes behind ONE SIP address (`--sip-shared-listen yes`): calls that
all come from one source address and port (a trunk; here a raw UDP user agent) are still
spread over the processes, least-loaded first, and each is answered and ended by the
process that took it. This is how a machine goes past the stack's 255 calls per process."""

from __future__ import annotations

import pytest

from tests.integration.sip_peers import BridgeProcess, RawPhone, eventually, free_sip_port, metric_value

pytestmark = pytest.mark.slow


def _live(server: BridgeProcess) -> int:
    return len(server.get("/calls?live=1")[1]["calls"])


def _processes(server: BridgeProcess) -> int:
    return int(metric_value(server.metrics(), "duplexline_sip_processes"))


def test_calls_from_one_source_spread_over_processes_sharing_the_address(tmp_path, sip_backend):
    port = free_sip_port()
    with BridgeProcess("--agent", "echo", "--sip-shared-listen", "yes", "--rtp-ports", "26000-26499",
                       "--sip-backend", sip_backend,
                       workdir=tmp_path, sip_port=port) as first, \
            BridgeProcess("--agent", "echo", "--sip-shared-listen", "yes", "--rtp-ports", "26500-26999",
                          "--sip-backend", sip_backend,
                          workdir=tmp_path, sip_port=port) as second:
        # Each process rewrites the load registry once a second: wait until both see two.
        eventually(lambda: _processes(first) == 2 and _processes(second) == 2, timeout=5,
                   what="the processes to see each other")
        with RawPhone(port) as phone:
            dialogs = [phone.call() for _ in range(6)]
            assert [d["status"] for d in dialogs] == [200] * 6
            counts = (_live(first), _live(second))
            assert sum(counts) == 6 and min(counts) >= 2, counts
            for dialog in dialogs:
                phone.bye(dialog)
            eventually(lambda: _live(first) == 0 and _live(second) == 0, timeout=10, what="all calls ended")
        answered = sum(metric_value(s.metrics(), "duplexline_sip_invites_total", 'outcome="answered"')
                       for s in (first, second))
        assert answered == 6
        assert first.terminate() == 0 and second.terminate() == 0
