"""The SIP front door under a seeded, grammar-aware fuzzer (tests/torture/sip_fuzz.py):
UDP datagrams from several loopback sources, then TCP messages whole, pipelined,
trickled, cut short and left hanging, and a crowd of idle connections that never finish
a header. Each phase runs on a fresh bridge and ends with the harness's checks (alive,
back to the baseline, a real call echoes, SIGTERM exits 0, the log stays small and
traceback-free); the fuzz itself adds its own: no answer may reach the canary (a trusted
`received=`), valid control cases keep being answered (over UDP after a client's
retransmissions, RFC 3261 Timer A: a burst may overrun a receive buffer, and the
table's "kernel drops" column counts that), the fences (a valid OPTIONS) keep being
answered, and an OPTIONS flood from one address is limited (no more than half of 300
answered: an unlimited OPTIONS path is an amplifier). UDP "tried" counts the flood too.

A traceback is pinned on its case: the bridge is fenced every 50 cases (an OPTIONS that
must be answered), and a block whose fence finds a new traceback is replayed one case at a
time. Any case replays alone: `python -m tests.torture.replay --seed S --case N`.
"""

from __future__ import annotations

import time

import pytest

from .fuzz_client import CANARY_HOST, TcpFuzzClient, UdpFuzzClient, open_idle, options_flood
from .harness import SCALE, SEED, Phase, udp_sources
from .probe import LogWatch, sip_tcp_peers
from .replay import bisect
from .sip_fuzz import SipFuzzer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600 if SCALE.name == "full" else 300)]

SOURCES = udp_sources(SCALE)
TCP_SOURCES = tuple(f"127.0.2.{k}" for k in range(1, 9))
IDLE_SOURCES = tuple(f"127.0.3.{k}" for k in range(1, 9))
FLOOD, FLOOD_SOURCE = 300, "127.0.0.5"  # OPTIONS back to back from one address
TCP_FIRST_CASE = 10_000_000  # TCP cases have their own index range (same seed)
BLOCK = 50  # cases between fences
BLOCK_BYTES = 256 * 1024  # ... or bytes
_LOG_PER_CALL = 6  # log lines one answered call may write (start, answer, end summary, ...)
_LOG_FIXED = 150


class _Fence:
    """Sends a barrier after each block and notes what the log and the process did in it."""

    def __init__(self, phase: Phase, client: UdpFuzzClient) -> None:
        self.phase = phase
        self.client = client
        self.offset = phase.bridge.log.mark()
        self.traceback_blocks: list[tuple[int, int, str]] = []
        self.lost = 0
        self.fences = 0

    def after(self, first: int, last: int) -> bool:
        """False when the bridge died in the block."""
        self.fences += 1
        if not self.client.barrier(timeout=2.0):
            self.lost += 1
        self.phase.sample()
        if not self.phase.alive():
            self.phase.fail(f"the bridge died within cases {first}..{last} (seed {SEED})")
            return False
        lines = self.phase.bridge.log.since(self.offset)
        self.offset = self.phase.bridge.log.mark()
        found = LogWatch.tracebacks(lines)
        if found:
            last_line = next((l for l in reversed(lines) if l and not l.startswith(" ")), "")
            self.traceback_blocks.append((first, last, last_line[:200]))
        return True


def _pin_tracebacks(phase: Phase, client: UdpFuzzClient, fuzzer: SipFuzzer, fence: _Fence,
                    most: int = 3) -> list[str]:
    """Replay the cases of the first blocks that logged a traceback, one at a time."""
    found = []
    for first, last, _ in fence.traceback_blocks[:most]:
        for i in range(first, last + 1):
            if not phase.alive():
                return found
            case = fuzzer.case(i, client.target(i % len(client.socks)))
            mark = phase.bridge.log.mark()
            client.send(case, i % len(client.socks))
            client.barrier(timeout=2.0)
            lines = phase.bridge.log.since(mark)
            if LogWatch.tracebacks(lines):
                error = next((l for l in reversed(lines) if l and not l.startswith(" ")), "")
                found.append(f"{case.describe()} -> {error[:160]}")
    return found


def _drain(client: UdpFuzzClient, cases: list, timeout: float = 10.0) -> None:
    """Wait (bounded) until every valid control has its final answer (the stack answers
    after the agent admits the call, which a busy machine may delay) and late answers
    stop arriving."""
    want = {c.index for c in cases if c.valid and c.method not in ("ACK", "CANCEL")}
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        with client.tally.lock:
            now = len(client.tally.final) + client.tally.acks + client.tally.unmatched
            missing = want - client.tally.final.keys()
        if now == last and not missing:
            return
        last = now
        time.sleep(0.5)  # polling interval; the tally decides


def _fuzz_checks(phase: Phase, client: UdpFuzzClient, fuzzer: SipFuzzer, cases: list, fence: _Fence | None,
                 controls_among: set[int] | None = None) -> None:
    tally = client.tally
    phase.classes.update(tally.classes([c.index for c in cases]))
    if tally.canary:
        by_case: dict = {}
        for index, where, data in tally.canary:
            by_case.setdefault(index, []).append((where, data))
        hits = []
        for index, heard in list(by_case.items())[:5]:
            what = next((c.describe() for c in cases if c.index == index), f"case {index}")
            hits.append(f"{what}: {len(heard)} datagrams at {heard[0][0]}, the first {heard[0][1][:48]!r}")
        phase.fail(f"{len(tally.canary)} answers to {len(by_case)} cases went to the canary {CANARY_HOST}, not to "
                   f"where they came from (a caller's received= trusted: a reflection anyone can aim):\n  "
                   + "\n  ".join(hits))
    # A CANCEL or ACK that matches nothing may go unanswered (RFC 3261 §9.2: 481 is a SHOULD).
    # Over UDP the silent ones were retransmitted first (_retransmit_silent_controls).
    controls = [c for c in cases if c.valid and c.method not in ("ACK", "CANCEL")
                and (controls_among is None or c.index in controls_among)]
    silent = [c for c in controls if c.index not in tally.final]
    if silent:  # after retransmissions (UDP) or alone on a fresh connection (TCP): the bridge is not answering
        phase.fail(f"{len(silent)} of {len(controls)} valid control cases got no final answer, e.g. "
                   + "; ".join(c.describe() + (" (only a provisional answer)" if c.index in tally.provisional else "")
                               for c in silent[:3])
                   + f"; the bridge counted: {_sip_counters(phase)}")
    if fence is not None and fence.lost > max(2, fence.fences // 10):
        phase.fail(f"{fence.lost} of {fence.fences} fences (a valid OPTIONS) went unanswered")
    answered_calls = sum(1 for c in cases if c.method == "INVITE" and 200 <= tally.final.get(c.index, 0) < 300)
    phase.log_budget = _LOG_FIXED + _LOG_PER_CALL * answered_calls


def _retransmit_silent_controls(client: UdpFuzzClient, cases: list) -> None:
    """Over UDP a client retransmits a request that got no answer (RFC 3261 Timer A/E:
    500 ms, then 1 s): a burst may overrun a receive buffer on the way (the kernel's drop
    counters show it), and a real caller would not give up after one datagram either."""
    controls = [c for c in cases if c.valid and c.method not in ("ACK", "CANCEL")]
    for wait in (0.5, 1.0):
        with client.tally.lock:
            silent = [c for c in controls if c.index not in client.tally.final]
        if not silent:
            return
        for case in silent:
            client.send(case, case.index % len(client.socks), retransmission=True)
        _drain(client, silent, timeout=wait + 2.0)


def _sip_counters(phase: Phase) -> str:
    """The front's refusal and malformed-input counters, for a failure message."""
    wanted = ("duplexline_sip_invites_total", "duplexline_sip_refused_total", "duplexline_sip_malformed_total")
    out = []
    for line in phase.bridge.metrics().splitlines():
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            name, _, value = line.rpartition(" ")
            out.append(f"{name.split('_', 2)[-1]}={float(value):g}")
    return ", ".join(out) or "nothing"


def test_udp_fuzz(torture_ns, torture_dir):
    fuzzer = SipFuzzer(SEED)
    replay = f"python -m tests.torture.replay --seed {SEED} --case N   (N: the case index named above)"

    def find_culprit() -> str:
        (torture_dir / "bisect").mkdir(exist_ok=True)
        return bisect(SEED, range(SCALE.udp_cases), False, torture_dir / "bisect", say=lambda _: None)

    with Phase("sip-udp-fuzz", torture_ns, torture_dir, sip_port=5062, http_port=8082, replay=replay,
               bisect=find_culprit) as phase:
        with UdpFuzzClient(torture_ns, phase.bridge.sip_port, sources=SOURCES) as client:
            fence = _Fence(phase, client)
            cases, first, pending_bytes = [], 0, 0
            for i in range(SCALE.udp_cases):
                k = i % len(client.socks)
                case = fuzzer.case(i, client.target(k))
                cases.append(case)
                client.send(case, k)
                pending_bytes += len(case.data)
                # A fence every BLOCK cases, or sooner after a few big ones: the fuzzer must
                # not overrun the front's receive buffer (that tests the kernel, not us).
                if i - first + 1 >= BLOCK or pending_bytes >= BLOCK_BYTES or i == SCALE.udp_cases - 1:
                    if not fence.after(first, i):
                        break
                    first, pending_bytes = i + 1, 0
            phase.tried = len(cases)
            if phase.alive() and fence.traceback_blocks:
                pinned = _pin_tracebacks(phase, client, fuzzer, fence)
                blocks = ", ".join(f"{a}..{b}" for a, b, _ in fence.traceback_blocks[:10])
                phase.fail(f"tracebacks logged in {len(fence.traceback_blocks)} blocks of {BLOCK} cases "
                           f"({blocks}); pinned on:\n  " + "\n  ".join(pinned or ["(none reproduced alone)"]))
            _drain(client, cases)
            _retransmit_silent_controls(client, cases)
            _fuzz_checks(phase, client, fuzzer, cases, fence)
            if phase.alive():
                sent, answered = options_flood(torture_ns, phase.bridge.sip_port, FLOOD_SOURCE, FLOOD)
                phase.tried += sent
                phase.classes["2xx"] += answered
                phase.classes["none"] += sent - answered
                if answered > FLOOD // 2:
                    phase.fail(f"{answered} of {sent} OPTIONS sent back to back from one address ({FLOOD_SOURCE}) "
                               f"were answered: requests other than INVITE are not rate-limited (an amplifier)")


def test_tcp_fuzz(torture_ns, torture_dir):
    """TCP cases (some whole, some trickled, some cut short or left hanging), and meanwhile
    a crowd of idle connections that sent half a header: the bridge must close those
    within `tcp_idle_limit_s` (TORTURE_TCP_IDLE_S) rather than hold them for ever."""
    fuzzer = SipFuzzer(SEED)
    replay = f"python -m tests.torture.replay --seed {SEED} --case N --tcp"
    with Phase("sip-tcp-fuzz", torture_ns, torture_dir, sip_port=5064, http_port=8084, replay=replay) as phase:
        port = phase.bridge.sip_port
        idle, refused = open_idle(torture_ns, port, SCALE.tcp_idle, IDLE_SOURCES)
        opened = time.monotonic()
        try:
            with UdpFuzzClient(torture_ns, port, sources=SOURCES[:1]) as udp:
                tcp = TcpFuzzClient(torture_ns, port, fuzzer, udp, sources=TCP_SOURCES, first_index=TCP_FIRST_CASE)
                try:
                    indices = tcp.run(SCALE.tcp_cases)
                    phase.sample()
                    cases = [fuzzer.case(i, udp.tcp_target("127.0.2.1", 1)) for i in indices]
                    _drain(udp, [c for c in cases if c.index in tcp.first_whole])
                    phase.tried = len(indices) + SCALE.tcp_idle
                    _fuzz_checks(phase, udp, fuzzer, cases, None, controls_among=tcp.first_whole)
                    phase.classes["none"] += SCALE.tcp_idle  # the idle ones never finish a request
                    phase.log_budget += 50
                    if not phase.alive():
                        return
                    held = _wait_idle_closed(phase, opened, SCALE.tcp_idle_limit_s)
                    if held:
                        phase.fail(f"the bridge still holds {held} of {len(idle)} idle TCP connections "
                                   f"{SCALE.tcp_idle_limit_s:.0f} s after they sent half a header ({refused} more "
                                   f"were refused at once): nothing closes a connection that never finishes a "
                                   f"message")
                finally:
                    tcp.close_held()
        finally:
            for sock in idle:
                sock.close()


def _wait_idle_closed(phase: Phase, since: float, limit: float) -> int:
    """Poll (bounded by `limit` from `since`) until the bridge holds no connection from
    the idle crowd's addresses; how many it held at the end. (Connections the fuzz left
    idle with nothing half-sent fall under the bridge's plain idle timeout instead, and
    the settle's baseline check.)"""
    while True:
        if not phase.alive():
            return 0
        held = sum(1 for host, _ in sip_tcp_peers(phase.bridge.pid, phase.bridge.sip_port) if host in IDLE_SOURCES)
        if held == 0 or time.monotonic() - since > limit:
            return held
        time.sleep(0.5)  # polling interval; the bridge's sockets decide
