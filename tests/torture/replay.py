"""Replay fuzz cases against a fresh bridge, one at a time, and say what each did.

    python -m tests.torture.replay --seed S --case N            one UDP case
    python -m tests.torture.replay --seed S --case N..M         a range, in order
    python -m tests.torture.replay --seed S --case N --tcp      a TCP case (whole, one connection)
    python -m tests.torture.replay --seed S --case N --show     print the bytes, start nothing
    python -m tests.torture.replay --seed S --case 0..599 --bisect
        the smallest prefix of the range after which SIGTERM does not exit 0 (a fresh
        bridge per probe), then its last case alone; when that alone is harmless, the
        shortest window ending there that still fails (its first case corrupted the
        heap, the last tripped over it): finds the message that corrupts the native
        heap, which only shows at exit

Each case is sent from the source address it had in the run (127.0.1.<1 + N mod count>, the
count set by TORTURE_SCALE as in the run; the port differs) to a bridge in a private network namespace (needs root), fenced by an
OPTIONS, then: its answers, any traceback it logged, whether the bridge is alive, and
finally the bridge's exit status on SIGTERM (134 = SIGABRT: heap corruption).
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.netns import NetNs, require_netns

from .fuzz_client import UdpFuzzClient, parse_answer
from .harness import SCALE, TortureBridge, exit_text, udp_sources
from .probe import LogWatch
from .sip_fuzz import SipFuzzer, Target

SOURCES = udp_sources(SCALE)  # as in the run: TORTURE_SCALE=full for a full run's cases


def _range(text: str) -> range:
    first, sep, last = text.partition("..")
    return range(int(first), int(last if sep else first) + 1)


def _await(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling interval; the check decides
    return True


def _quiet(client: UdpFuzzClient, timeout: float = 5.0) -> None:
    """Wait (bounded) until answers stop arriving for half a second."""
    last, deadline = -1, time.monotonic() + timeout
    while time.monotonic() < deadline:
        with client.tally.lock:
            now = len(client.tally.final) + client.tally.acks + client.tally.unmatched
        if now == last:
            return
        last = now
        time.sleep(0.5)  # polling interval; the tally decides


def _tcp_case(ns: NetNs, fuzzer: SipFuzzer, index: int, port: int, udp: UdpFuzzClient) -> list[int]:
    def exchange() -> list[int]:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0, source_address=("127.0.2.1", 0)) as sock:
            case = fuzzer.case(index, udp.tcp_target(*sock.getsockname()))
            sock.sendall(case.data)
            statuses, buf = [], b""
            try:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
            except socket.timeout:
                pass
            for part in buf.split(b"SIP/2.0 ")[1:]:
                answer = parse_answer(b"SIP/2.0 " + part)
                if answer is not None:
                    statuses.append(answer.status)
            return statuses

    return ns.call(exchange)


def run(seed: int, cases, tcp: bool, workdir: Path, verbose: bool = True) -> int | None:
    """Send `cases` (case indices, in order) to a fresh bridge; its SIGTERM exit status."""
    fuzzer = SipFuzzer(seed)
    cases = list(cases)
    name = f"replay-{cases[0]}-{cases[-1]}-{len(cases)}" if cases else "replay-none"
    with NetNs() as ns:
        bridge = TortureBridge(ns, workdir, name).start()
        try:
            with UdpFuzzClient(ns, bridge.sip_port, sources=SOURCES) as client:
                if not verbose and not tcp:  # bisect probes: fast, fenced in blocks as in the run
                    for n, i in enumerate(cases):
                        client.send(fuzzer.case(i, client.target(i % len(SOURCES))), i % len(SOURCES))
                        if n % 50 == 49:
                            client.barrier(timeout=2.0)
                    client.barrier(timeout=2.0)
                    _quiet(client)  # the stack's answers and our ACKs land
                    cases = []
                for i in cases:
                    mark = bridge.log.mark()
                    if tcp:
                        statuses = _tcp_case(ns, fuzzer, i, bridge.sip_port, client)
                        described = fuzzer.case(i, client.tcp_target("127.0.2.1", 0)).describe()
                    else:
                        k = i % len(SOURCES)
                        case = fuzzer.case(i, client.target(k))
                        client.send(case, k)
                        fenced = client.barrier(timeout=2.0)
                        if case.method != "ACK":  # the stack's answer may follow the fence
                            _await(lambda: i in client.tally.final, 3.0)
                        with client.tally.lock:
                            statuses = [client.tally.final.get(i)] if i in client.tally.final else []
                        described = case.describe() + ("" if fenced else " [fence unanswered]")
                    lines = bridge.log.since(mark)
                    tracebacks = LogWatch.tracebacks(lines)
                    alive = bridge.returncode() is None
                    if verbose:
                        print(f"{described}: answers {statuses or 'none'}"
                              + (f", TRACEBACK:\n{LogWatch.excerpt(lines, tracebacks[0])}" if tracebacks else "")
                              + ("" if alive else f", BRIDGE DIED ({exit_text(bridge.returncode())})"), flush=True)
                    if not alive:
                        break
            code = bridge.terminate()
        finally:
            bridge.kill()
    if verbose:
        print(f"SIGTERM: exit {exit_text(code)}  (log: {bridge.log_path})", flush=True)
    return code


def bisect(seed: int, cases: range, tcp: bool, workdir: Path, say=print) -> str:
    """The shortest prefix of `cases` whose replay leaves a bad exit, then its last case
    alone (a fresh bridge per probe); a one-line verdict."""
    say(f"bisect: replaying all {len(cases)} cases ...")
    code = run(seed, cases, tcp, workdir, verbose=False)
    if code == 0:
        return f"replaying cases {cases.start}..{cases.stop - 1} alone leaves exit 0: not reproduced"
    lo, hi = cases.start, cases.stop  # the prefix [start, hi) fails; [start, lo) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        code = run(seed, range(cases.start, mid), tcp, workdir, verbose=False)
        say(f"bisect: cases {cases.start}..{mid - 1}: exit {exit_text(code)}")
        if code == 0:
            lo = mid
        else:
            hi = mid
    culprit = hi - 1
    alone = run(seed, [culprit], tcp, workdir, verbose=False)
    if alone != 0:
        return f"bisected: case {culprit} alone leaves SIGTERM exit {exit_text(alone)} ({_describe(seed, culprit, tcp)})"
    # Not alone: an earlier case corrupts, this one trips over it. The shortest window
    # ending at it that still fails starts at the corrupting case (probably).
    bad_start, good_start = cases.start, culprit  # [bad_start, culprit] fails; [culprit] alone does not
    while good_start - bad_start > 1:
        mid = (bad_start + good_start) // 2
        code = run(seed, range(mid, culprit + 1), tcp, workdir, verbose=False)
        say(f"bisect: cases {mid}..{culprit}: exit {exit_text(code)}")
        if code == 0:
            good_start = mid
        else:
            bad_start = mid
    first = bad_start
    pair = run(seed, [first, culprit], tcp, workdir, verbose=False)
    first_alone = run(seed, [first], tcp, workdir, verbose=False)
    return (f"bisected: SIGTERM fails once cases {first}..{culprit} have been sent; case {first} "
            f"({_describe(seed, first, tcp)}) then case {culprit} ({_describe(seed, culprit, tcp)}): exit "
            f"{exit_text(pair)}; case {first} alone: exit {exit_text(first_alone)}; case {culprit} alone: exit 0")


def _describe(seed: int, index: int, tcp: bool) -> str:
    target = Target(5060, "127.0.2.1", 0, transport="TCP") if tcp else Target(5060, SOURCES[index % len(SOURCES)], 0)
    return SipFuzzer(seed).case(index, target).describe()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.torture.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--case", required=True, help="N or N..M")
    parser.add_argument("--tcp", action="store_true", help="TCP cases (the run numbers them from 10000000)")
    parser.add_argument("--show", action="store_true", help="print the bytes only")
    parser.add_argument("--bisect", action="store_true", help="find the case after which SIGTERM fails")
    args = parser.parse_args(argv)
    cases = _range(args.case)
    if args.show:
        fuzzer = SipFuzzer(args.seed)
        for i in cases:
            target = (Target(5060, "127.0.2.1", 40000, transport="TCP") if args.tcp
                      else Target(5060, SOURCES[i % len(SOURCES)], 40000))
            case = fuzzer.case(i, target)
            print(f"--- {case.describe()}")
            print(case.data.decode("utf-8", "backslashreplace")[:4000])
        return 0
    require_netns()
    workdir = Path(tempfile.mkdtemp(prefix="torture-replay-"))
    if args.bisect:
        print(bisect(args.seed, cases, args.tcp, workdir, say=lambda text: print(text, flush=True)))
    else:
        code = run(args.seed, cases, args.tcp, workdir)
        return 0 if code == 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
