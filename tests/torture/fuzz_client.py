"""Sending fuzz cases to a bridge the way a SIP user agent would, and recording what came
back: over UDP from several loopback source addresses (so per-source limits meet more
than one caller), over TCP whole, pipelined, trickled, cut short or left hanging.

A user agent's duties are kept, or the bridge would be blamed for our leaks: a 2xx to an
INVITE is ACKed to its Contact and the call hung up (BYE); a non-2xx final answer is
ACKed on the same transaction; requests the far end sends us (BYE, re-INVITE) get 200.
Answers are matched to cases by Call-ID, or by the branch of the top Via when a mutation
spoiled the Call-ID; what matches neither is counted as unmatched.

Canaries: UDP sockets on an address no case is sent from (127.0.0.9), on the canary port
and on each source port. A front that trusts `received=` (or otherwise answers somewhere
other than where the request came from) sends answers there; every datagram a canary
hears is kept, with the case it belongs to.

Every socket is made on a thread inside the test's network namespace (`NetNs.call`);
every wait is bounded; threads are joined and sockets closed on exit.
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bridge.sip.message import header_param

from .sip_fuzz import Case, SipFuzzer, Target

__all__ = ["Answer", "parse_answer", "Tally", "UdpFuzzClient", "TcpFuzzClient", "CANARY_HOST", "STATUS_CLASSES",
           "open_idle", "options_flood"]

CANARY_HOST = "127.0.0.9"
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "none")
_COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
            "c": "content-type"}
_TCP_READ_MAX_S = 2.0  # how long one TCP connection waits for answers
_TCP_QUIET_S = 1.0  # ... or this long without a byte once every request was sent


@dataclass
class Answer:
    """A SIP message as heard from the bridge, parsed leniently (we only route on it)."""

    status: int  # 0 for a request
    method: str  # the request's method, or the CSeq method of a response
    uri: str
    headers: dict[str, str]  # first value of each header, lower-case names
    vias: list[str]

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id", "")

    @property
    def cseq(self) -> tuple[str, str]:
        parts = self.headers.get("cseq", "").split()
        return (parts[0], parts[1].upper()) if len(parts) == 2 else ("1", "")


def parse_answer(data: bytes) -> Answer | None:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace").split("\r\n")
    first = head[0].split(" ", 2)
    if len(first) < 2:
        return None
    headers: dict[str, str] = {}
    vias: list[str] = []
    for line in head[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        name = name.strip().lower()
        name = _COMPACT.get(name, name)
        if name == "via":
            vias.append(value.strip())
        headers.setdefault(name, value.strip())
    if first[0] == "SIP/2.0":
        if not first[1].isascii() or not first[1].isdigit():
            return None
        parts = headers.get("cseq", "").split()
        return Answer(int(first[1]), parts[1].upper() if len(parts) == 2 else "", "", headers, vias)
    if len(first) < 3:
        return None
    return Answer(0, first[0].upper(), first[1], headers, vias)


def _contact_addr(contact: str) -> tuple[str, int] | None:
    """host and port of a Contact on loopback (we send nowhere else)."""
    uri = contact.split("<", 1)[1].split(">", 1)[0] if "<" in contact else contact.split(";", 1)[0]
    hostport = uri.split("@", 1)[-1].split(";", 1)[0]
    host, _, port = hostport.partition(":")
    if not host.startswith("127.") or (port and not (port.isascii() and port.isdigit())):
        return None
    return host, int(port or 5060)


def _contact_uri(contact: str) -> str:
    return contact.split("<", 1)[1].split(">", 1)[0] if "<" in contact else contact.split(";", 1)[0]


def _request(method: str, uri: str, answer: Answer, via: str, cseq: str) -> bytes:
    lines = [f"{method} {uri} SIP/2.0", f"Via: {via}", "Max-Forwards: 70",
             f"From: {answer.headers.get('from', '')}", f"To: {answer.headers.get('to', '')}",
             f"Call-ID: {answer.call_id}", f"CSeq: {cseq} {method}", "Content-Length: 0"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace")


def reactions(answer: Answer, *, via_host: str, via_port: int, transport: str = "UDP"
              ) -> list[tuple[str, bytes, tuple[str, int] | None]]:
    """What a user agent sends on hearing `answer`: [(kind, bytes, destination)]; a
    destination of None means "back the way the answer came" (the same socket or
    connection). kind: 'ack', 'bye', 'ok'."""
    out: list[tuple[str, bytes, tuple[str, int] | None]] = []
    if answer.status:
        num, method = answer.cseq
        if method != "INVITE" or answer.status < 200:
            return out
        num = num if num.isascii() and num.isdigit() and len(num) < 10 else "1"
        if answer.status >= 300:  # ACK for a non-2xx: same transaction (the top Via is ours)
            via = answer.vias[0] if answer.vias else f"SIP/2.0/{transport} {via_host}:{via_port};branch=z9hG4bKx"
            out.append(("ack", _request("ACK", "sip:bot@127.0.0.1", answer, via, num), None))
            return out
        contact = answer.headers.get("contact", "")
        dest = _contact_addr(contact)
        if dest is None:
            return out
        uri = _contact_uri(contact)
        for method, n in (("ACK", num), ("BYE", str(int(num) + 1))):
            via = f"SIP/2.0/UDP {via_host}:{via_port};branch=z9hG4bK{os.urandom(6).hex()};rport"
            out.append((method.lower(), _request(method, uri, answer, via, n), dest))
        return out
    if answer.method in ("ACK", ""):
        return out
    keep = [f"Via: {v}" for v in answer.vias]
    keep += [f"{n.title()}: {answer.headers[n]}" for n in ("from", "to", "call-id", "cseq") if n in answer.headers]
    if "tag=" not in answer.headers.get("to", ""):
        keep = [k + ";tag=tort" if k.startswith("To:") else k for k in keep]
    text = "\r\n".join(["SIP/2.0 200 OK", *keep, "Content-Length: 0"]) + "\r\n\r\n"
    out.append(("ok", text.encode("utf-8", "replace"), None))
    return out


@dataclass
class Tally:
    """What each case got back. Thread-safe: the reader threads write, the test reads."""

    sent: int = 0
    final: dict[int, int] = field(default_factory=dict)  # case index -> first final status
    provisional: set[int] = field(default_factory=set)
    unmatched: int = 0
    acks: int = 0
    byes: int = 0
    canary: list[tuple[int | None, str, bytes]] = field(default_factory=list)  # (case, where, first bytes)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def heard(self, index: int | None, status: int) -> None:
        with self.lock:
            if index is None:
                self.unmatched += 1
            elif status >= 200:
                self.final.setdefault(index, status)
            else:
                self.provisional.add(index)

    def classes(self, indices: list[int]) -> Counter:
        """Status class of each case's first final answer ('1xx': only provisional ones)."""
        out: Counter = Counter()
        with self.lock:
            for i in indices:
                status = self.final.get(i)
                if status is not None:
                    out[f"{status // 100}xx" if 2 <= status // 100 <= 6 else "none"] += 1
                elif i in self.provisional:
                    out["1xx"] += 1
                else:
                    out["none"] += 1
        return out


def _udp(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def _tcp() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


class UdpFuzzClient:
    """Cases over UDP from `sources` (loopback addresses, one socket each), barrier
    sockets, a UA-duty helper, and canaries. `with` starts and stops the reader thread."""

    def __init__(self, ns, bridge_port: int, *, sources: tuple[str, ...], canary_port: int = 9999,
                 helper_host: str = "127.0.0.3") -> None:
        self.ns = ns
        self.bridge_port = bridge_port
        self.tally = Tally()
        self.socks = [ns.call(_udp, host) for host in sources]
        # Fences rotate over their own sources: each stays far below a per-source rate limit.
        self.barrier_socks = [ns.call(_udp, f"127.0.4.{k}") for k in range(1, 9)]
        self.helper = ns.call(_udp, helper_host)  # Contact of TCP cases: in-dialog requests come here
        ports = {canary_port} | {s.getsockname()[1] for s in self.socks}
        self.canaries = []
        for port in sorted(ports):
            try:
                self.canaries.append(ns.call(_udp, CANARY_HOST, port))
            except OSError:  # taken by something else in the namespace: one canary fewer
                pass
        self.canary_port = canary_port
        self._index_by_key: dict[str, int] = {}
        self._barriers: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torture-udp-reader", daemon=True)
        self._barrier_n = 0

    def target(self, k: int) -> Target:
        host, port = self.socks[k].getsockname()
        return Target(self.bridge_port, host, port, CANARY_HOST, self.canary_port, "UDP")

    def tcp_target(self, host: str, port: int) -> Target:
        h_host, h_port = self.helper.getsockname()
        return Target(self.bridge_port, host, port, CANARY_HOST, self.canary_port, "TCP", contact_port=h_port)

    def __enter__(self) -> "UdpFuzzClient":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # the reader wakes every 0.1 s
        for sock in [*self.socks, *self.barrier_socks, self.helper, *self.canaries]:
            sock.close()

    def expect(self, case: Case) -> None:
        """Remember how to match answers to `case` (before it is sent)."""
        self._index_by_key[case.call_id] = case.index
        self._index_by_key[case.branch] = case.index

    def send(self, case: Case, k: int, *, retransmission: bool = False) -> None:
        self.expect(case)
        try:
            self.socks[k].sendto(case.data, ("127.0.0.1", self.bridge_port))
        except BlockingIOError:  # our send buffer is full: give the bridge a moment, once
            time.sleep(0.01)  # back-off on a full buffer, not synchronisation
            try:
                self.socks[k].sendto(case.data, ("127.0.0.1", self.bridge_port))
            except OSError:
                return
        except OSError:  # EMSGSIZE and the like: the case could not go out
            return
        if not retransmission:
            with self.tally.lock:
                self.tally.sent += 1

    def barrier(self, timeout: float = 2.0) -> bool:
        """A valid OPTIONS from the barrier socket, answered: every datagram sent before it
        has been read by the bridge's front (one socket, one loop, in order)."""
        self._barrier_n += 1
        call_id = f"barrier-{self._barrier_n}-{os.urandom(4).hex()}"
        event = threading.Event()
        self._barriers[call_id] = event
        sock = self.barrier_socks[self._barrier_n % len(self.barrier_socks)]
        host, port = sock.getsockname()
        text = "\r\n".join([
            f"OPTIONS sip:bot@127.0.0.1:{self.bridge_port} SIP/2.0",
            f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK{os.urandom(6).hex()};rport", "Max-Forwards: 70",
            f"From: <sip:barrier@{host}:{port}>;tag={os.urandom(4).hex()}", f"To: <sip:bot@127.0.0.1:{self.bridge_port}>",
            f"Call-ID: {call_id}", "CSeq: 1 OPTIONS", "Content-Length: 0"]) + "\r\n\r\n"
        try:
            sock.sendto(text.encode(), ("127.0.0.1", self.bridge_port))
            return event.wait(timeout)
        finally:
            self._barriers.pop(call_id, None)

    def match(self, answer: Answer) -> int | None:
        index = self._index_by_key.get(answer.call_id)
        if index is None and answer.vias:
            index = self._index_by_key.get(header_param(answer.vias[0], "branch") or "")
        return index

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in [*self.socks, *self.barrier_socks, self.helper]:
            sel.register(sock, selectors.EVENT_READ, "ua")
        for sock in self.canaries:
            sel.register(sock, selectors.EVENT_READ, "canary")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(timeout=0.1):
                    sock = key.fileobj
                    for _ in range(64):  # drain, bounded
                        try:
                            data, addr = sock.recvfrom(65535)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:  # ICMP unreachable reported on a later read
                            continue
                        if key.data == "canary":
                            self._canary(sock, data)
                        else:
                            self._ua(sock, data, addr)
        finally:
            sel.close()

    def _canary(self, sock: socket.socket, data: bytes) -> None:
        answer = parse_answer(data)
        index = self.match(answer) if answer else None
        host, port = sock.getsockname()
        with self.tally.lock:
            self.tally.canary.append((index, f"{host}:{port}", data[:160]))

    def _ua(self, sock: socket.socket, data: bytes, addr) -> None:
        answer = parse_answer(data)
        if answer is None:
            self.tally.heard(None, 0)
            return
        if answer.status:
            event = self._barriers.get(answer.call_id)
            if event is not None:
                event.set()
                return
        host, port = sock.getsockname()
        for kind, out, dest in reactions(answer, via_host=host, via_port=port):
            try:
                sock.sendto(out, dest or addr)
            except OSError:
                continue
            with self.tally.lock:
                self.tally.acks += kind == "ack"
                self.tally.byes += kind == "bye"
        if answer.status:  # recorded after the ACK went out: a test that sees it may stop
            self.tally.heard(self.match(answer), answer.status)


@dataclass(frozen=True)
class _Plan:
    conn: int
    mode: str  # whole | pipelined | slow | partial-close | partial-idle
    source: str
    cases: tuple[int, ...]


class TcpFuzzClient:
    """Cases over TCP, a few per connection, `workers` connections at a time. Connections
    in mode 'partial-idle' send part of a message and are held open (`held`) until
    `close_held()`; the others are closed once their answers are in (or time is up)."""

    MODES = ("whole", "whole", "pipelined", "slow", "partial-close", "partial-idle")

    def __init__(self, ns, bridge_port: int, fuzzer: SipFuzzer, udp: UdpFuzzClient, *,
                 sources: tuple[str, ...], first_index: int, workers: int = 8) -> None:
        self.ns = ns
        self.bridge_port = bridge_port
        self.fuzzer = fuzzer
        self.udp = udp  # its helper socket takes the in-dialog traffic of TCP calls; its tally counts
        self.sources = sources
        self.first_index = first_index
        self.workers = workers
        self.held: list[socket.socket] = []
        self.refused = 0  # connections the bridge would not take (reset, refused)
        # Cases sent whole as the first message of their connection: nothing before them on
        # the stream can excuse silence (the valid ones among them are the TCP controls).
        self.first_whole: set[int] = set()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def plans(self, count: int) -> list[_Plan]:
        rng = random.Random(f"{self.fuzzer.seed}/tcp-plans")
        out, index, conn = [], self.first_index, 0
        while index < self.first_index + count:
            n = min(rng.randint(1, 8), self.first_index + count - index)
            out.append(_Plan(conn, rng.choice(self.MODES), rng.choice(self.sources), tuple(range(index, index + n))))
            index += n
            conn += 1
        return out

    def run(self, count: int) -> list[int]:
        """Send `count` cases; returns their indices."""
        plans = self.plans(count)
        with ThreadPoolExecutor(self.workers, thread_name_prefix="torture-tcp") as pool:
            for future in [pool.submit(self._connection, p) for p in plans]:
                future.result(timeout=60)
        return [i for p in plans for i in p.cases]

    def close_held(self) -> None:
        with self._lock:
            held, self.held = self.held, []
        for sock in held:
            sock.close()

    def _connection(self, plan: _Plan) -> None:
        sock = self.ns.call(_tcp)
        sock.settimeout(3.0)
        try:
            sock.bind((plan.source, 0))
            sock.connect(("127.0.0.1", self.bridge_port))
        except OSError:
            sock.close()
            with self._lock:
                self.refused += 1
            return
        host, port = sock.getsockname()
        target = self.udp.tcp_target(host, port)
        cases = [self.fuzzer.case(i, target) for i in plan.cases]
        for case in cases:
            self.udp.expect(case)
        rng = random.Random(f"{self.fuzzer.seed}/tcp-conn/{plan.conn}")
        keep = False
        try:
            if plan.mode in ("whole", "slow"):
                # The first message alone, answered before the rest: a stream error the
                # rest provoke cannot excuse its silence (it is a control when valid).
                self._deliver(sock, plan, cases[:1], rng)
                with self._lock:
                    self.first_whole.add(cases[0].index)
                self._read_answers(sock, cases[:1], target)
                cases = cases[1:]
            if cases:
                keep = self._deliver(sock, plan, cases, rng)
                if plan.mode != "partial-close":
                    self._read_answers(sock, cases, target)
        except OSError:  # reset by the bridge mid-way: allowed, it owes a bad stream nothing
            pass
        finally:
            if keep:
                with self._lock:
                    self.held.append(sock)
            else:
                sock.close()

    def _deliver(self, sock: socket.socket, plan: _Plan, cases: list[Case], rng: random.Random) -> bool:
        """Send per the plan; True when the socket is to be held open."""
        with self.udp.tally.lock:
            self.udp.tally.sent += len(cases)
        if plan.mode == "pipelined":
            sock.sendall(b"".join(c.data for c in cases))
        elif plan.mode == "slow":
            for case in cases:
                data, at = case.data, 0
                for _ in range(40):  # at most 40 pieces per message, then the rest at once
                    if at >= len(data):
                        break
                    step = rng.randint(1, 64)
                    sock.sendall(data[at:at + step])
                    at += step
                    time.sleep(rng.random() * 0.01)  # the slow sender's pace, not synchronisation
                sock.sendall(data[at:])
        elif plan.mode in ("partial-close", "partial-idle"):
            for case in cases[:-1]:
                sock.sendall(case.data)
            last = cases[-1].data
            cut = rng.randint(1, max(1, min(len(last) - 1, last.find(b"\r\n\r\n") if b"\r\n\r\n" in last else len(last))))
            sock.sendall(last[:cut])
            return plan.mode == "partial-idle"
        else:
            for case in cases:
                sock.sendall(case.data)
        return False

    def _read_answers(self, sock: socket.socket, cases: list[Case], target: Target) -> None:
        buf = bytearray()
        wanted = {c.index for c in cases if c.method != "ACK"}
        deadline = time.monotonic() + _TCP_READ_MAX_S
        quiet_until = time.monotonic() + _TCP_QUIET_S
        while time.monotonic() < min(deadline, quiet_until) and wanted:
            sock.settimeout(max(0.01, min(deadline, quiet_until) - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            quiet_until = time.monotonic() + _TCP_QUIET_S
            buf += chunk
            for message in _frames(buf):
                answer = parse_answer(message)
                if answer is None:
                    self.udp.tally.heard(None, 0)
                    continue
                if answer.status:
                    index = self.udp.match(answer)
                    self.udp.tally.heard(index, answer.status)
                    if answer.status >= 200:
                        wanted.discard(index)
                self._react(sock, answer, target)

    def _react(self, sock: socket.socket, answer: Answer, target: Target) -> None:
        h_host, h_port = self.udp.helper.getsockname()
        for kind, out, dest in reactions(answer, via_host=h_host, via_port=h_port, transport="TCP"):
            try:
                if dest is None:
                    sock.sendall(out)
                else:
                    self.udp.helper.sendto(out, dest)
            except OSError:
                continue
            with self.udp.tally.lock:
                self.udp.tally.acks += kind == "ack"
                self.udp.tally.byes += kind == "bye"


def _frames(buf: bytearray) -> list[bytes]:
    """Whole messages cut off a TCP buffer (by Content-Length, 0 when absent)."""
    out = []
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out
        head = bytes(buf[:end]).lower()
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip() in (b"content-length", b"l") and value.strip().isdigit():
                length = int(value.strip())
        if len(buf) < end + 4 + length:
            return out
        out.append(bytes(buf[:end + 4 + length]))
        del buf[:end + 4 + length]


def open_idle(ns, bridge_port: int, count: int, sources: tuple[str, ...]) -> tuple[list[socket.socket], int]:
    """`count` TCP connections that each send the start of an INVITE and then nothing:
    (the sockets, how many the bridge refused or reset at once). The caller closes them."""

    def make() -> tuple[list[socket.socket], int]:
        socks, refused = [], 0
        for k in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            try:
                sock.bind((sources[k % len(sources)], 0))
                sock.connect(("127.0.0.1", bridge_port))
                sock.sendall(f"INVITE sip:bot@127.0.0.1:{bridge_port} SIP/2.0\r\n"
                             f"Via: SIP/2.0/TCP {sources[k % len(sources)]};branch=z9hG4bKidle{k}".encode())
            except OSError:
                sock.close()
                refused += 1
                continue
            socks.append(sock)
        return socks, refused

    return ns.call(make, timeout=max(60.0, count * 0.05))


def options_flood(ns, bridge_port: int, source: str, count: int, wait: float = 2.0) -> tuple[int, int]:
    """`count` valid OPTIONS from one address, back to back: (sent, answered). Answers are
    read until 0.3 s pass without one, `wait` seconds at most."""

    def flood() -> tuple[int, int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((source, 0))
        host, port = sock.getsockname()
        tag, answered, sent = os.urandom(4).hex(), set(), 0
        try:
            for k in range(count):
                text = "\r\n".join([
                    f"OPTIONS sip:bot@127.0.0.1:{bridge_port} SIP/2.0",
                    f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bKflood{k}x{tag};rport", "Max-Forwards: 70",
                    f"From: <sip:flood@{host}:{port}>;tag={tag}", f"To: <sip:bot@127.0.0.1:{bridge_port}>",
                    f"Call-ID: flood-{k}-{tag}", "CSeq: 1 OPTIONS", "Content-Length: 0"]) + "\r\n\r\n"
                sock.sendto(text.encode(), ("127.0.0.1", bridge_port))
                sent += 1
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                # answers take milliseconds: a quiet 0.3 s means the rest were dropped
                sock.settimeout(max(0.01, min(0.3, deadline - time.monotonic())))
                try:
                    answer = parse_answer(sock.recv(65535))
                except socket.timeout:
                    break
                if answer is not None and answer.status >= 200:
                    answered.add(answer.call_id)
        finally:
            sock.close()
        return sent, len(answered)

    return ns.call(flood, timeout=wait + 30)
