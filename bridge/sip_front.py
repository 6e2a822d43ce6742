"""The SIP front door: a small stateless proxy (RFC 3261 §16.11) on the public SIP address,
UDP and TCP, in front of this process's SIP stack (baresip, on a private loopback port).

Why it exists: the stack can only refuse a call with 486, while a phone network needs
403, 404, 401 and 503 with Retry-After; and one stack holds at most 255 calls, while a
machine should take more. So every new INVITE meets the front first:

    allowlist (403) -> per-source rate limit (503 + Retry-After) -> digest auth (401/403)
    -> route lookup by the called user (404) -> draining, and no sibling process to take
    the call (503 + Retry-After)
    -> forwarded to the stack, Request-URI rewritten to its one catch-all user, with
       X-Duplexline-Route / X-Duplexline-Called headers (any the caller sent are removed)

The stack answers the forwarded INVITE after the agent admitted the call (200), or 486
when it could not. Responses come back through the front (its Via is on top) and go to the
caller along the next Via (received/rport honoured; TCP callers get them on their own
connection). The stack's Contact is its own address, so in-dialog requests (ACK for 200,
BYE, re-INVITE, INFO) go straight to the stack and never touch the front.

Invariants:
- stateless forwarding: the branch we add is a hash of the caller's branch, so an INVITE
  retransmission, its CANCEL and the ACK for a non-2xx answer all reach the same stack
  transaction;
- our own refusals are remembered for 32 s by the caller's branch: a retransmitted INVITE
  gets the same answer again (and is not counted twice), its ACK is absorbed;
- several bridge processes can listen on one address (`shared_listen`, SO_REUSEPORT): the
  kernel spreads callers over them by source address and port, and each new INVITE goes to
  the least-loaded process's stack (`choose`, bridge/sip_siblings.py); each process
  forwards from its own private socket, so responses come back to the front that sent the
  INVITE, and its CANCEL, retransmissions and non-2xx ACK follow it to the same stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, cast

from .sip_guard import Allowlist, DigestAuth, RateLimiter
from .sip_message import SipMessage, SipParseError, header_param, parse, split_frames, uri_user
from .sip_metrics import SipMetrics
from .sip_routes import RouteTable

__all__ = ["SipFront", "ROUTE_HEADER", "CALLED_HEADER", "SOURCE_HEADER"]

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-Duplexline-Route"
CALLED_HEADER = "X-Duplexline-Called"
SOURCE_HEADER = "X-Duplexline-Source"
_OUR_HEADERS = (ROUTE_HEADER.lower(), CALLED_HEADER.lower(), SOURCE_HEADER.lower())
_BRANCH_PREFIX = "z9hG4bKdl"
_LOCAL_TTL = 32.0  # Timer H/J: how long our own final answers are remembered
_PENDING_TTL = 64.0
_RETRY_AFTER_DRAINING = 30
_ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE"
_WARN_EVERY = 10.0


@dataclass
class _Pending:
    started: float
    upstream: tuple[str, int]
    counted: bool = False


class SipFront:
    def __init__(self, host: str, port: int, *, upstream: tuple[str, int], routes: RouteTable,
                 metrics: SipMetrics, allow: Allowlist, limiter: RateLimiter, auth: DigestAuth | None,
                 draining: Callable[[], bool], shared_listen: bool = False, route_key: str = "",
                 choose: Callable[[], tuple[str, int]] | None = None) -> None:
        self.host = host
        self.port = port
        self.upstream = upstream
        self.routes = routes
        self.metrics = metrics
        self.allow = allow
        self.limiter = limiter
        self.auth = auth
        self.draining = draining
        self.shared_listen = shared_listen
        self.route_key = route_key
        self.choose = choose  # picks the stack for a new call (siblings); None: our own
        self._udp: asyncio.DatagramTransport | None = None
        self._up: asyncio.DatagramTransport | None = None
        self._up_addr: tuple[str, int] = ("", 0)
        self._tcp: asyncio.AbstractServer | None = None
        self._conns: dict[int, asyncio.Transport] = {}
        self._next_conn = 1
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._last_warn = 0.0
        self._dropped = 0

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind UDP and TCP on the public address and a private UDP socket toward the stack.
        Raises OSError naming the address when it is taken; a failed start unwinds."""
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            if self.shared_listen:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # A burst of call set-ups must not overflow the default 212 KB buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            try:
                sock.bind((self.host, self.port))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen for SIP on {self.host}:{self.port}/udp: "
                              f"{exc.strerror}") from exc
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagram(self._on_downstream_datagram), sock=sock)
            self._up, _ = await loop.create_datagram_endpoint(
                lambda: _Datagram(self._on_upstream_datagram), local_addr=(self.upstream[0], 0))
            self._up_addr = self._up.get_extra_info("sockname")[:2]
            try:
                self._tcp = await loop.create_server(lambda: _Stream(self), self.host, self.port,
                                                     reuse_port=self.shared_listen or None)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen for SIP on {self.host}:{self.port}/tcp: "
                              f"{exc.strerror}") from exc
        except BaseException:
            await self.close()
            raise
        log.info("SIP front on %s:%d (udp, tcp) -> stack at %s:%d", self.host, self.port, *self.upstream)

    async def close(self) -> None:
        for t in (self._udp, self._up):
            if t is not None:
                t.close()
        self._udp = self._up = None
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._conns.values()):
                conn.close()
            await self._tcp.wait_closed()
            self._tcp = None

    # ---- downstream (callers) --------------------------------------------------------------

    def _on_downstream_datagram(self, data: bytes, addr: tuple) -> None:
        if data in (b"\r\n\r\n", b"\r\n"):  # NAT keep-alive
            return
        self._handle_downstream(data, addr[0], addr[1], None)

    def _handle_downstream(self, data: bytes, host: str, port: int, conn: int | None) -> None:
        try:
            msg = parse(data)
        except SipParseError as exc:
            self._warn("dropped a malformed SIP message from %s:%d: %s", host, port, exc)
            return
        if not msg.is_request:
            return  # responses to the front: it sends no requests of its own downstream
        try:
            self._on_request(msg, host, port, conn)
        except Exception:  # one caller's bad message must never stop the front
            log.exception("SIP front failed on a %s from %s:%d", msg.method, host, port)

    def _on_request(self, msg: SipMessage, host: str, port: int, conn: int | None) -> None:
        _stamp_via(msg, host, port)
        branch = msg.branch()
        key = f"{branch}|{host}"
        if msg.method == "ACK":
            if key in self._local:
                return  # the ACK for our own refusal: the transaction is done
            # The ACK for a non-2xx answer of the stack follows its INVITE; any other
            # ACK (for a 200) is in-dialog and already addressed to the stack.
            pending = self._pending.get(_our_branch(key))
            self._forward(msg, key, conn, rewrite=pending is not None,
                          to=pending.upstream if pending else None)
            return
        if msg.method == "CANCEL":
            pending = self._pending.get(_our_branch(key))
            self._forward(msg, key, conn, rewrite=msg.to_tag() is None,
                          to=pending.upstream if pending else None)
            return
        if msg.to_tag() is not None:  # in-dialog: the stack owns it
            self._forward(msg, key, conn, rewrite=False)
            return
        cached = self._local.get(key)
        if cached is not None:  # a retransmission of something we refused
            self._send_down(cached[1], msg, conn)
            return
        if msg.method == "OPTIONS":
            self._reply(msg, key, conn, 200, "OK", extra=[("Allow", _ALLOW), ("Accept", "application/sdp")])
            return
        if msg.method != "INVITE":
            self._reply(msg, key, conn, 405, "Method Not Allowed", extra=[("Allow", _ALLOW)])
            return
        self._on_invite(msg, key, host, conn)

    def _on_invite(self, msg: SipMessage, key: str, host: str, conn: int | None) -> None:
        ours = _our_branch(key)
        pending = self._pending.get(ours)
        if pending is not None:  # a retransmission of a forwarded INVITE
            self._forward(msg, key, conn, rewrite=True, to=pending.upstream)
            return
        m = self.metrics.invites
        if not self.allow.allows(host):
            m.labels(outcome="403").inc()
            self._reply(msg, key, conn, 403, "Forbidden")
            return
        if not self.limiter.allow(host):
            m.labels(outcome="rate_limited").inc()
            self._warn("INVITE rate limit: refusing calls from %s", host)
            self._reply(msg, key, conn, 503, "Service Unavailable (rate limited)",
                        extra=[("Retry-After", str(self.limiter.retry_after))])
            return
        if self.auth is not None:
            result = self.auth.check(msg)
            if not result.ok:
                m.labels(outcome=str(result.status)).inc()
                extra = [self.auth.challenge(result.stale)] if result.status == 401 else []
                self._reply(msg, key, conn, result.status,
                            "Unauthorized" if result.status == 401 else "Forbidden", extra=extra)
                return
        mf = msg.get("Max-Forwards")
        if mf is not None and mf.strip().isdigit() and int(mf) <= 0:
            self._reply(msg, key, conn, 483, "Too Many Hops")
            return
        called = uri_user(msg.uri) or uri_user(msg.get("To") or "")
        route = self.routes.lookup(called)
        if route is None:
            m.labels(outcome="404").inc()
            log.info("INVITE for %r from %s: no route, 404", called, host)
            self._reply(msg, key, conn, 404, "Not Found")
            return
        upstream = self.choose() if self.choose is not None else self.upstream
        if self.draining() and upstream == self.upstream:  # no sibling takes it either
            m.labels(outcome="503").inc()
            self._reply(msg, key, conn, 503, "Service Unavailable (draining)",
                        extra=[("Retry-After", str(_RETRY_AFTER_DRAINING))])
            return
        msg.headers = [(n, v) for n, v in msg.headers if n.lower() not in _OUR_HEADERS]
        msg.headers.append((ROUTE_HEADER, f"{route.name};k={self.route_key}"))
        msg.headers.append((CALLED_HEADER, called or "-"))
        msg.headers.append((SOURCE_HEADER, host))
        self._pending[ours] = _Pending(time.monotonic(), upstream)
        self._expire()
        self._forward(msg, key, conn, rewrite=True, to=upstream)

    def _reply(self, msg: SipMessage, key: str, conn: int | None, status: int, reason: str, *,
               extra: list[tuple[str, str]] | None = None) -> None:
        tag = os.urandom(6).hex()
        data = msg.response(status, reason, to_tag=tag, extra=extra).encode()
        if status >= 200:
            self._local[key] = (time.monotonic(), data)
            self._expire()
        self._send_down(data, msg, conn)

    def _forward(self, msg: SipMessage, key: str, conn: int | None, *, rewrite: bool,
                 to: tuple[str, int] | None = None) -> None:
        if self._up is None:
            return
        to = to or self.upstream
        via = f"SIP/2.0/UDP {self._up_addr[0]}:{self._up_addr[1]};branch={_our_branch(key)};rport"
        if conn is not None:
            via += f";dlc={conn}"
        msg.prepend("Via", via)
        if rewrite:
            msg.uri = f"sip:duplexline@{to[0]}:{to[1]}"
        mf = msg.get("Max-Forwards")
        if mf is not None and mf.strip().isdigit():
            msg.set("Max-Forwards", str(max(0, int(mf) - 1)))
        self._up.sendto(msg.encode(), to)

    # ---- upstream (the stack's responses) --------------------------------------------------

    def _on_upstream_datagram(self, data: bytes, addr: tuple) -> None:
        try:
            msg = parse(data)
        except SipParseError as exc:
            self._warn("dropped a malformed message from the stack: %s", exc)
            return
        if msg.is_request:
            return  # the stack sends in-dialog requests straight to the peer's Contact
        ours = msg.remove_first("Via") or ""
        branch = header_param(ours, "branch") or ""
        if not branch.startswith(_BRANCH_PREFIX) or not msg.top_via():
            return
        if msg.cseq_method == "INVITE" and msg.status >= 200:
            self._count_final(branch, msg.status)
        dlc = header_param(ours, "dlc")  # the caller's TCP connection, when it came over TCP
        self._send_down(msg.encode(), msg, int(dlc) if dlc is not None and dlc.isdigit() else None)

    def _count_final(self, branch: str, status: int) -> None:
        pending = self._pending.get(branch)
        if pending is None or pending.counted:
            return
        pending.counted = True
        m = self.metrics
        if 200 <= status < 300:
            m.invites.labels(outcome="answered").inc()
            m.setup.observe(time.monotonic() - pending.started)
        elif status in (404, 486, 503, 403, 401):
            m.invites.labels(outcome=str(status)).inc()
        elif status == 487:
            m.invites.labels(outcome="cancelled").inc()
        else:
            m.invites.labels(outcome="failed").inc()

    # ---- plumbing --------------------------------------------------------------------------

    def _send_down(self, data: bytes, request: SipMessage, conn: int | None) -> None:
        if conn is not None:
            transport = self._conns.get(conn)
            if transport is not None and not transport.is_closing():
                transport.write(data)
            return
        dest = _via_destination(request.top_via())
        if dest is not None and self._udp is not None:
            self._udp.sendto(data, dest)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._local and now - next(iter(self._local.values()))[0] > _LOCAL_TTL:
            self._local.popitem(last=False)
        while self._pending and now - next(iter(self._pending.values())).started > _PENDING_TTL:
            self._pending.popitem(last=False)

    def _warn(self, fmt: str, *args: object) -> None:
        """Rate-limited: a flood must not become a flood of log lines."""
        now = time.monotonic()
        self._dropped += 1
        if now - self._last_warn >= _WARN_EVERY:
            self._last_warn = now
            log.warning(fmt + " (%d such events since the last warning)", *args, self._dropped)
            self._dropped = 0

    def _add_conn(self, transport: asyncio.Transport) -> int:
        conn = self._next_conn
        self._next_conn += 1
        self._conns[conn] = transport
        return conn

    def _drop_conn(self, conn: int) -> None:
        self._conns.pop(conn, None)


def _our_branch(key: str) -> str:
    return _BRANCH_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:20]


def _sent_by(via: str) -> tuple[str, int]:
    parts = via.split(None, 1)
    hostport = parts[1].split(";", 1)[0].strip() if len(parts) == 2 else ""
    if hostport.startswith("["):
        host, _, port = hostport[1:].partition("]")
        port = port.lstrip(":")
    else:
        host, _, port = hostport.partition(":")
    return host, int(port) if port.isdigit() else 5060


def _stamp_via(msg: SipMessage, host: str, port: int) -> None:
    """RFC 3261 §18.2.1 and RFC 3581: note where the request really came from."""
    via = msg.top_via()
    sent_host, _ = _sent_by(via)
    changed = via
    if sent_host != host and header_param(via, "received") is None:
        changed += f";received={host}"
    rport = header_param(changed, "rport")
    if rport == "":
        changed = changed.replace(";rport", f";rport={port}", 1)
        if header_param(changed, "received") is None:
            changed += f";received={host}"
    if changed != via:
        for i, (n, _) in enumerate(msg.headers):
            if n == "Via":
                msg.headers[i] = (n, changed)
                break


def _via_destination(via: str) -> tuple[str, int] | None:
    if not via:
        return None
    host, port = _sent_by(via)
    received = header_param(via, "received")
    rport = header_param(via, "rport")
    if received:
        host = received
    if rport and rport.isdigit():
        port = int(rport)
    return host, port


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple], None]) -> None:
        self._handler = handler

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._handler(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP error: %s", exc)  # ICMP unreachable from a vanished peer


class _Stream(asyncio.Protocol):
    """One caller's TCP connection: frames by Content-Length, answers on the same connection."""

    def __init__(self, front: SipFront) -> None:
        self._front = front
        self._buf = bytearray()
        self._conn = 0
        self._peer: tuple[str, int] = ("", 0)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's does not subclass asyncio.Transport: no isinstance)
        self._transport = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")[:2]
        if not self._front.allow.allows(self._peer[0]):
            transport.close()  # not even a 403 over TCP: no connection for strangers
            return
        self._conn = self._front._add_conn(transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        try:
            frames = split_frames(self._buf)
        except SipParseError as exc:
            self._front._warn("closing a SIP TCP connection from %s:%d: %s", *self._peer, exc)
            self._transport.close()
            return
        for frame in frames:
            self._front._handle_downstream(frame, self._peer[0], self._peer[1], self._conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._front._drop_conn(self._conn)
