"""The SIP edge (deploy/kamailio/kamailio.cfg) in front of two bridges, all real: Debian's
Kamailio runs the shipped configuration (only its defines set on the command line: the
address, the dispatcher list, the control socket, a 1 s probe), two `duplexline serve`
processes stand for two bridge hosts (each its own SIP port on 127.0.0.1), and Debian's
baresip calls the edge.

What it shows:
- 20 calls through the edge are spread over both bridges (each bridge's own count of
  answered INVITEs, from its /metrics), and every call's ACK and BYE came through the edge
  (record-route; the edge's own request counters);
- a bridge that starts draining (`POST /admin/drain`) while it still holds a call answers
  OPTIONS with 503, the edge's probe takes it out of service (while the process is still
  up: the 503 did it, not a timeout), and the next calls all go to the other bridge, not one
  INVITE to the draining one; the held call goes on through the edge until it is hung up,
  then the drained bridge exits 0.

Why not one loopback address per bridge (127.0.0.2, 127.0.0.3): the bridge's SIP stack
(baresip) picks the local address for a call's media by asking the kernel which source
address reaches the caller, and for any 127.x destination that is 127.0.0.1 (the `local
127.0.0.0/8 ... src 127.0.0.1` route), which a stack bound to 127.0.0.2 does not own: it
refuses the call ("no laddr for 127.0.0.1", 500). Tried, also with the addresses added to
`lo` in a private network namespace. Different ports on one address exercise the same
dispatcher code (a destination is an address and a port) and are a real layout too:
several bridge processes per host.

Kamailio runs in its own process group and is killed by that id at the end; every wait
is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.integration.serve_process import REPO
from tests.integration.sip_peers import BaresipPeer, BridgeProcess, eventually, free_sip_port, metric_value

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _sbin(name: str) -> str | None:
    """Debian puts kamailio and kamcmd in /usr/sbin, which a user's PATH may lack."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}",) if Path(p).exists()), None)


KAMAILIO, KAMCMD = _sbin("kamailio"), _sbin("kamcmd")
if KAMAILIO is None or KAMCMD is None:
    pytestmark.append(pytest.mark.skip(reason="kamailio is not installed: apt-get install kamailio "
                                              "(scripts/system-packages.txt lists it; scripts/setup.sh installs it)"))

CONFIG = REPO / "deploy/kamailio/kamailio.cfg"
CALLS = 20
CALLS_AFTER_DRAIN = 6


# ---- SIP OPTIONS, to any address ----------------------------------------------------------------


def options(host: str, port: int, timeout: float = 1.0) -> tuple[int, dict[str, str]] | None:
    """One OPTIONS to host:port over UDP: (status, headers) of the final answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        lport = sock.getsockname()[1]
        call_id = os.urandom(8).hex()
        uri = f"sip:{host}:{port}"
        lines = [f"OPTIONS {uri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bK{os.urandom(6).hex()};rport",
                 "Max-Forwards: 70", f"From: <sip:probe@127.0.0.1:{lport}>;tag={os.urandom(4).hex()}",
                 f"To: <{uri}>", f"Call-ID: {call_id}", "CSeq: 1 OPTIONS", "Content-Length: 0"]
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n").encode(), (host, port))
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65535)
            except (socket.timeout, ConnectionRefusedError):
                return None
            head = data.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            status = int(head[0].split()[1])
            if headers.get("call-id") == call_id and status >= 200:
                return status, headers


# ---- the parts -----------------------------------------------------------------------------------


class FarmBridge(BridgeProcess):
    """`duplexline serve --agent echo`, one bridge of the farm (SIP on 127.0.0.1:`sip_port`)."""

    def __init__(self, *args: str, workdir: Path) -> None:
        super().__init__("--agent", "echo", *args, workdir=workdir)
        self.host = "127.0.0.1"

    @property
    def uri(self) -> str:
        return f"sip:{self.host}:{self.sip_port}"

    def answered(self) -> int:
        return int(metric_value(self.metrics(), "duplexline_sip_invites_total", 'outcome="answered"'))

    def invites(self) -> int:
        """Every INVITE its front decided on, whatever the outcome (answered, 503, ...)."""
        return int(sum(float(line.split()[-1]) for line in self.metrics().splitlines()
                       if line.startswith("duplexline_sip_invites_total{")))

    def live(self) -> int:
        return len(self.get("/calls?live=1")[1]["calls"])


class Kamailio:
    """Debian's kamailio in the foreground (-DD -E) with deploy/kamailio/kamailio.cfg copied
    to `workdir`, a dispatcher list of `bridges`, its own pid file, runtime dir and control
    socket; probes every second, one answer to change a bridge's state."""

    def __init__(self, workdir: Path, bridges: list[str]) -> None:
        self.dir = workdir / "kamailio"
        self.dir.mkdir()
        self.cfg = self.dir / "kamailio.cfg"
        shutil.copy(CONFIG, self.cfg)
        self.list = self.dir / "dispatcher.list"
        self.list.write_text("".join(f"1 {uri} 0 0 duid=bridge-{i}\n" for i, uri in enumerate(bridges)))
        self.ctl = f"unix:{self.dir}/ctl.sock"
        self.port = free_sip_port()
        self.log_path = self.dir / "kamailio.log"
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"sip:bot@127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "Kamailio":
        argv = [KAMAILIO, "-DD", "-E", "-f", str(self.cfg), "-P", str(self.dir / "kamailio.pid"),
                "-Y", str(self.dir), "-n", "2", "-m", "64", "-M", "8",
                "-A", "LISTEN_ADDR=127.0.0.1", "-A", f"SIP_PORT={self.port}",
                "-A", f'DISPATCHER_LIST="{self.list}"', "-A", f'CTL_SOCKET="{self.ctl}"',
                "-A", "DS_PING_INTERVAL=1", "-A", "DS_PROBING_THRESHOLD=1", "-A", "DS_INACTIVE_THRESHOLD=1"]
        with self.log_path.open("wb") as log:
            # Its own process group: the main process and its children go together by that id.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while (options("127.0.0.1", self.port, 0.5) or (0,))[0] != 200:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kamailio exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"kamailio not answering OPTIONS within {timeout} s: {self.log()}")
            time.sleep(0.05)  # polling a starting process; the deadline bounds it
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def rpc(self, *command: str) -> str:
        proc = subprocess.run([KAMCMD, "-s", self.ctl, *command], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, f"kamcmd {' '.join(command)}: {proc.stderr} {self.log()}"
        return proc.stdout

    def states(self) -> dict[str, str]:
        """Each bridge's dispatcher flags: AP in service (probed), IP out (inactive, probed)."""
        return dict(re.findall(r"URI: (\S+)\s+FLAGS: (\S+)", self.rpc("dispatcher.list")))

    def received(self, method: str) -> int:
        """Requests of `method` the edge received (Kamailio's core statistics)."""
        name = f"rcv_requests_{method.lower()}"
        out = self.rpc("stats.get_statistics", "core:")
        match = re.search(rf"core:{name} = (\d+)", out)
        assert match, out
        return int(match.group(1))

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        try:  # children the main process left behind, by the same group id
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Kamailio":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def refused(bridge: FarmBridge) -> tuple[int, dict[str, str]] | None:
    """The bridge's answer to OPTIONS when it is a 503, else None."""
    answer = options(bridge.host, bridge.sip_port)
    return answer if answer is not None and answer[0] == 503 else None


def call_once(peer: BaresipPeer, uri: str) -> None:
    """One call from `peer` to `uri`: answered, then hung up by the caller."""
    peer.dial(uri)
    peer.wait_event("CALL_ESTABLISHED", timeout=15)
    peer.hangup()
    peer.wait_event("CALL_CLOSED", timeout=15)


# ---- the test ------------------------------------------------------------------------------------


def test_the_edge_spreads_calls_and_takes_a_draining_bridge_out(tmp_path):
    tmp = tmp_path
    with ExitStack() as stack:  # unwound in reverse: callers, the edge, then the bridges
        a, b = (stack.enter_context(FarmBridge("--rtp-ports", rtp, workdir=tmp))
                for rtp in ("26000-26499", "26500-26999"))
        edge = stack.enter_context(Kamailio(tmp, [a.uri, b.uri]))
        eventually(lambda: edge.states() == {a.uri: "AP", b.uri: "AP"}, timeout=10,
                   what="both bridges in service at the edge (dispatcher FLAGS AP)")

        # Calls spread over the bridges, and their dialogs stay on the edge's path.
        caller = stack.enter_context(BaresipPeer(tmp, user="caller"))
        for _ in range(CALLS):
            call_once(caller, edge.uri)
        counts = {a.uri: a.answered(), b.uri: b.answered()}
        # Round robin: every other call to each bridge (they answer at once, so no failover
        # moves a call).
        assert sorted(counts.values()) == [CALLS // 2] * 2, f"not spread round robin over both bridges: {counts}"
        assert edge.received("INVITE") >= CALLS  # (+ the bridges' re-INVITEs, through the edge too)
        assert edge.received("ACK") >= CALLS and edge.received("BYE") >= CALLS, \
            "ACK and BYE did not come back through the edge: no record-route?"

        # A call held open, so that the bridge holding it stays up while it drains.
        holder = stack.enter_context(BaresipPeer(tmp, user="holder"))
        holder.dial(edge.uri)
        holder.wait_event("CALL_ESTABLISHED", timeout=15)
        [draining] = [br for br in (a, b) if br.live() == 1]
        [other] = [br for br in (a, b) if br is not draining]
        assert draining.post("/admin/drain")[0] == 202  # the drain starts right after the answer
        answer = eventually(lambda: refused(draining), timeout=10, what="OPTIONS answered 503 while draining")
        assert answer[1].get("retry-after", "").isdigit(), answer
        eventually(lambda: edge.states()[draining.uri].startswith("I"), timeout=10,
                   what="the edge taking the draining bridge out")
        assert draining.proc.poll() is None, "the draining bridge exited: the probe saw no answer, not its 503"
        assert edge.states()[other.uri] == "AP"

        invites_before, other_before = draining.invites(), other.answered()
        for _ in range(CALLS_AFTER_DRAIN):
            call_once(caller, edge.uri)
        assert other.answered() - other_before == CALLS_AFTER_DRAIN
        assert draining.invites() == invites_before, "a new call was sent to the draining bridge"

        # The held call went on through the edge; its BYE gets there, and the drain ends.
        assert draining.live() == 1
        byes = edge.received("BYE")
        holder.hangup()
        holder.wait_event("CALL_CLOSED", timeout=15)
        assert edge.received("BYE") > byes
        assert draining.proc.wait(timeout=30) == 0, draining.log()

