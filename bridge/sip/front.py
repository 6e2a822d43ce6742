"""The SIP front door: a small stateless proxy (RFC 3261 §16.11) on the public SIP address,
UDP and TCP (and TLS on its own port, `tls_listen`: bridge/sip/tls.py), in front of this
process's SIP stack (baresip, on a private loopback port).

Why it exists: the stack can only refuse a call with 486, while a phone network needs
403, 404, 401 and 503 with Retry-After; and one stack holds at most 255 calls, while a
machine should take more. So every new INVITE meets the front first:

    allowlist (403) -> per-source rate limit (503 + Retry-After) -> digest auth (401/403)
    -> route lookup by the called user (404) -> the route's SRTP policy against the SDP
    offer (488, bridge/sip/srtp.py) -> draining, and no sibling process to take
    the call (503 + Retry-After)
    -> forwarded to the stack, Request-URI rewritten to its one catch-all user, with
       X-Duplexline-Route / X-Duplexline-Called headers (any the caller sent are removed)

The stack answers the forwarded INVITE after the agent admitted the call (200), or 486
when it could not. Responses come back through the front (its Via is on top) and go to the
caller along the next Via (received/rport honoured; TCP and TLS callers get them on their
own connection). The stack's Contact is its own address, so in-dialog requests (ACK for
200, BYE, re-INVITE, INFO) go straight to the stack and never touch the front, over UDP
even for TLS callers (docs/sip.md, "TLS and SRTP"). OPTIONS is
answered here: 200, or 503 + Retry-After while draining, so that a SIP load balancer's
health probe (Kamailio's dispatcher, docs/kamailio.md) stops sending this process calls.

Invariants:
- stateless forwarding: the branch we add is a hash of the caller's branch, so an INVITE
  retransmission, its CANCEL and the ACK for a non-2xx answer all reach the same stack
  transaction;
- our own refusals are remembered for 32 s by the caller's branch: a retransmitted INVITE
  gets the same answer again (and is not counted twice), its ACK is absorbed;
- several bridge processes can listen on one address (`shared_listen`, SO_REUSEPORT): the
  kernel spreads callers over them by source address and port, and each new INVITE goes to
  the least-loaded process's stack (`choose`, bridge/sip/siblings.py); each process
  forwards from its own private socket, so responses come back to the front that sent the
  INVITE, and its CANCEL, retransmissions and non-2xx ACK follow it to the same stack.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, cast

from .guard import Allowlist, DigestAuth, PendingInvites, RateLimiter
from .message import SipMessage, SipParseError, addr_uri, header_param, parse, sdp_codec, split_frames, uri_user
from .metrics import SipMetrics
from .routes import RouteTable
from .srtp import answer_suite, offer_refusal, strip_crypto
from .validate import check_request

__all__ = ["SipFront", "Refusal", "ROUTE_HEADER", "CALLED_HEADER", "SOURCE_HEADER"]

log = logging.getLogger(__name__)

ROUTE_HEADER = "X-Duplexline-Route"
CALLED_HEADER = "X-Duplexline-Called"
SOURCE_HEADER = "X-Duplexline-Source"
_OUR_HEADERS = (ROUTE_HEADER.lower(), CALLED_HEADER.lower(), SOURCE_HEADER.lower())
_CODECS_KEPT = 1024  # answered calls' codecs awaiting their ACK
_BRANCH_PREFIX = "z9hG4bKdl"
_LOCAL_TTL = 32.0  # Timer H/J: how long our own final answers are remembered
_PENDING_TTL = 64.0
_RETRY_AFTER_DRAINING = 30
_ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY, UPDATE"
_WARN_EVERY = 10.0
_LOG_SOURCE_EVERY = 60.0  # a malformed-input line per source at most this often
_LOG_SOURCES = 4096
_RETRY_AFTER_PENDING = 5
_TCP_PER_SOURCE = 32  # connections one address may hold open
_TCP_PARTIAL_TIMEOUT = 10.0  # seconds a half-sent message may wait for the rest (slow loris)


@dataclass(frozen=True)
class Refusal:
    """An INVITE the front refused after it passed the allowlist, the rate limit and
    auth (404 no route, 503 draining or too many pending): a call for the records. The
    refusals before those (403, 401, floods) are counted in metrics only: a scanner must
    not fill the CDRs."""

    call_id: str
    remote: str  # the From URI
    called: str
    wire: str  # udp, tcp
    status: int
    reason: str
    route: str | None  # the route's name, when one matched


@dataclass
class _Pending:
    started: float
    upstream: tuple[str, int]
    counted: bool = False


@dataclass
class _Conn:
    transport: asyncio.Transport
    source: str
    last_data: float
    partial_since: float | None = None  # when the buffer last went from empty to non-empty
    tls: bool = False


class SipFront:
    def __init__(self, host: str, port: int, *, upstream: tuple[str, int], routes: RouteTable,
                 metrics: SipMetrics, allow: Allowlist, limiter: RateLimiter, auth: DigestAuth | None,
                 draining: Callable[[], bool], shared_listen: bool = False, route_key: str = "",
                 choose: Callable[[], tuple[str, int]] | None = None, pending: PendingInvites | None = None,
                 tcp_max_connections: int = 1024, tcp_idle_timeout: float = 60.0,
                 on_refused: Callable[[Refusal], None] | None = None,
                 tls_listen: tuple[str, int] | None = None, tls_context: ssl.SSLContext | None = None,
                 stack_rate: RateLimiter | None = None) -> None:
        """`stack_rate`: new INVITEs this process's stack takes per second, from all sources
        together (None, or a limiter without a rate: as many as the other limits let through)."""
        self.host = host
        self.tls_listen = tls_listen if tls_context is not None else None
        self.tls_context = tls_context
        self.on_refused = on_refused
        self.port = port
        self.upstream = upstream
        self.routes = routes
        self.metrics = metrics
        self.allow = allow
        self.limiter = limiter
        self.stack_rate = stack_rate or RateLimiter(None)
        self.auth = auth
        self.draining = draining
        self.shared_listen = shared_listen
        self.route_key = route_key
        self.choose = choose  # picks the stack for a new call (siblings); None: our own
        self._udp: asyncio.DatagramTransport | None = None
        self._up: asyncio.DatagramTransport | None = None
        self._up_addr: tuple[str, int] = ("", 0)
        self._tcp: asyncio.AbstractServer | None = None
        self._tls: asyncio.AbstractServer | None = None
        self.pending = pending if pending is not None else PendingInvites(per_source=16, total=64)
        self.tcp_max_connections = tcp_max_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self._conns: dict[int, _Conn] = {}
        self._conns_by_source: dict[str, int] = {}
        self._next_conn = 1
        self._sweeper: asyncio.Task | None = None
        self._local: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._last_warn = 0.0
        self._dropped = 0
        self._logged: OrderedDict[str, float] = OrderedDict()  # source -> last malformed-input line
        self._codecs: OrderedDict[str, str] = OrderedDict()  # call id -> codec of the stack's 200 OK

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
            if self.tls_listen is not None:
                host, port = self.tls_listen
                try:
                    # The handshake has the half-message budget: a stalled one pins a socket too.
                    self._tls = await loop.create_server(lambda: _Stream(self, tls=True), host, port,
                                                         ssl=self.tls_context, reuse_port=self.shared_listen or None,
                                                         ssl_handshake_timeout=_TCP_PARTIAL_TIMEOUT)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen for SIP on {host}:{port}/tls: {exc.strerror}") from exc
            self._sweeper = loop.create_task(self._sweep_connections(), name="sip-front-tcp-sweeper")
        except BaseException:
            await self.close()
            raise
        tls = f", tls on {self.tls_listen[0]}:{self.tls_listen[1]}" if self.tls_listen else ""
        log.info("SIP front on %s:%d (udp, tcp%s) -> stack at %s:%d", self.host, self.port, tls, *self.upstream)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        for t in (self._udp, self._up):
            if t is not None:
                t.close()
        self._udp = self._up = None
        servers = [s for s in (self._tcp, self._tls) if s is not None]
        for server in servers:
            server.close()
        for conn in list(self._conns.values()):
            conn.transport.close()
        for server in servers:
            await server.wait_closed()
        self._tcp = self._tls = None

    # ---- downstream (callers) --------------------------------------------------------------

    def _on_downstream_datagram(self, data: bytes, addr: tuple) -> None:
        if data in (b"\r\n\r\n", b"\r\n"):  # NAT keep-alive
            return
        self._handle_downstream(data, addr[0], addr[1], None)

    def _handle_downstream(self, data: bytes, host: str, port: int, conn: int | None) -> None:
        try:
            msg = parse(data)
        except SipParseError as exc:
            self._malformed("size" if "too large" in str(exc) else "parse", str(exc), host, port)
            return
        if not msg.is_request:
            return  # responses to the front: it sends no requests of its own downstream
        try:
            self._on_request(msg, len(data), host, port, conn)
        except Exception:  # one caller's bad message must never stop the front
            self._malformed("parse", "the front failed on it", host, port)
            log.debug("SIP front failed on a %s from %s:%d", msg.method, host, port, exc_info=True)

    def _on_request(self, msg: SipMessage, size: int, host: str, port: int, conn: int | None) -> None:
        problem = check_request(msg, size)
        if problem is not None:
            self._malformed(problem.reason, problem.detail, host, port)
            # Answer what can be answered (never an ACK), within the source's rate.
            if msg.method != "ACK" and self.limiter.allow(host):
                _stamp_via(msg, host, port, force=True)
                self._reply(msg, "", conn, 400, f"Bad Request ({problem.reason})", remember=False)
            return
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
        cached = self._local.get(key)
        if cached is not None:  # a retransmission of something we refused
            self._send_down(cached[1], msg, conn)
            return
        if msg.method == "INVITE" and _our_branch(key) in self._pending:
            self._forward(msg, key, conn, rewrite=True, to=self._pending[_our_branch(key)].upstream)
            return  # a retransmission of a forwarded INVITE: counted once
        # Every other request costs its source a token: OPTIONS and REGISTER scans included.
        if not self.limiter.allow(host):
            self.metrics.refused.labels(reason="rate_limited").inc()
            if msg.method == "INVITE":
                self.metrics.invites.labels(outcome="rate_limited").inc()
                self._warn("request rate limit: refusing calls from %s", host)
                self._reply(msg, key, conn, 503, "Service Unavailable (rate limited)",
                            extra=[("Retry-After", str(self.limiter.retry_after))])
            return  # anything else over the limit is dropped: no reply to amplify
        if msg.to_tag() is not None:  # in-dialog: the stack owns it
            self._forward(msg, key, conn, rewrite=False)
            return
        if msg.method == "OPTIONS":
            if self.draining():  # a SIP load balancer's probe takes us out (docs/kamailio.md)
                self._reply(msg, key, conn, 503, "Service Unavailable (draining)",
                            extra=[("Retry-After", str(_RETRY_AFTER_DRAINING))])
                return
            self._reply(msg, key, conn, 200, "OK", extra=[("Allow", _ALLOW), ("Accept", "application/sdp")])
            return
        if msg.method != "INVITE":
            self._reply(msg, key, conn, 405, "Method Not Allowed", extra=[("Allow", _ALLOW)])
            return
        self._on_invite(msg, key, host, conn)

    def _on_invite(self, msg: SipMessage, key: str, host: str, conn: int | None) -> None:
        m = self.metrics.invites
        if not self.allow.allows(host):
            m.labels(outcome="403").inc()
            self._reply(msg, key, conn, 403, "Forbidden")
            return
        if self.auth is not None and not self._authenticated(msg, key, host, conn):
            return
        mf = msg.get("Max-Forwards")
        if mf is not None and int(mf) <= 0:  # an ASCII number: checked by check_request
            self._reply(msg, key, conn, 483, "Too Many Hops")
            return
        called = uri_user(msg.uri) or uri_user(msg.get("To") or "")
        route = self.routes.lookup(called)
        wire = self._wire(conn)
        if route is None:
            m.labels(outcome="404").inc()
            log.info("INVITE for %r from %s: no route, 404", called, host)
            self._reply(msg, key, conn, 404, "Not Found")
            self._refused(msg, called, wire, 404, "no-route", None)
            return
        refusal = offer_refusal(route.srtp, msg.body, wire)
        if refusal is not None:
            m.labels(outcome="488").inc()
            log.info("INVITE for %r from %s over %s: %s (route %s, srtp %s), 488", called, host, wire, refusal,
                     route.name, route.srtp)
            self._reply(msg, key, conn, 488, f"Not Acceptable Here ({refusal})")
            self._refused(msg, called, wire, 488, refusal, route.name)
            return
        if route.srtp == "off":
            msg.body = strip_crypto(msg.body)
        full = self.pending.full(host)
        if full is not None:
            m.labels(outcome="pending_limit").inc()
            self.metrics.refused.labels(reason=f"pending_{full}").inc()
            self._warn("pending INVITE limit (%s): refusing a call from %s", full, host)
            self._reply(msg, key, conn, 503, "Service Unavailable (too many pending calls)",
                        extra=[("Retry-After", str(_RETRY_AFTER_PENDING))])
            self._refused(msg, called, wire, 503, "too-many-pending", route.name)
            return
        if not self.stack_rate.allow("stack"):
            m.labels(outcome="pending_limit").inc()
            self.metrics.refused.labels(reason="stack_rate").inc()
            self._warn("the SIP stack's INVITE rate (%g a second): refusing a call from %s", self.stack_rate.rate, host)
            self._reply(msg, key, conn, 503, "Service Unavailable (too many new calls)",
                        extra=[("Retry-After", str(self.stack_rate.retry_after))])
            self._refused(msg, called, wire, 503, "stack-rate", route.name)
            return
        upstream = self.choose() if self.choose is not None else self.upstream
        if self.draining() and upstream == self.upstream:  # no sibling takes it either
            m.labels(outcome="503").inc()
            self._reply(msg, key, conn, 503, "Service Unavailable (draining)",
                        extra=[("Retry-After", str(_RETRY_AFTER_DRAINING))])
            self._refused(msg, called, wire, 503, "draining", route.name)
            return
        msg.headers = [(n, v) for n, v in msg.headers if n.lower() not in _OUR_HEADERS]
        # The wire (udp, tcp, tls: for the call's record) rides in the route header: a
        # fourth exposed header broke the stack's dial-out (connection reset on every call).
        msg.headers.append((ROUTE_HEADER, f"{route.name};k={self.route_key};w={wire}"))
        msg.headers.append((CALLED_HEADER, called or "-"))
        msg.headers.append((SOURCE_HEADER, host))
        self._pending[_our_branch(key)] = _Pending(time.monotonic(), upstream)
        self.pending.add(msg.call_id, host)
        self._expire()
        self._forward(msg, key, conn, rewrite=True, to=upstream)

    def _authenticated(self, msg: SipMessage, key: str, host: str, conn: int | None) -> bool:
        """Digest auth with the throttle in front of it; replies itself when not."""
        auth = self.auth
        assert auth is not None
        m = self.metrics
        user = auth.user if auth.user in (msg.get("Authorization") or "") else None
        if auth.throttle.banned_for(host, user) > 0:
            m.invites.labels(outcome="banned").inc()
            m.auth_failures.labels(reason="banned").inc()
            self._reply(msg, key, conn, 403, "Forbidden")
            return False
        result = auth.check(msg, host)
        if result.ok:
            auth.throttle.succeeded(host)
            return True
        m.invites.labels(outcome=str(result.status)).inc()
        m.auth_failures.labels(reason=result.reason).inc()
        if result.reason in ("wrong-password", "wrong-user", "bad-uri", "replay"):
            for kind in auth.throttle.failed(host, user):
                m.auth_bans.labels(kind=kind).inc()
                log.warning("digest auth: %s %s banned after repeated failures", kind,
                            host if kind == "source" else user)
        extra = [auth.challenge(host, result.stale)] if result.status == 401 else []
        self._reply(msg, key, conn, result.status, "Unauthorized" if result.status == 401 else "Forbidden",
                    extra=extra)
        return False

    def _refused(self, msg: SipMessage, called: str, wire: str, status: int, reason: str,
                 route: str | None) -> None:
        if self.on_refused is None:
            return
        try:
            self.on_refused(Refusal(msg.call_id, addr_uri(msg.get("From") or ""), called, wire, status, reason,
                                    route))
        except Exception:  # the records must never stop the front
            log.exception("recording a refused INVITE failed")

    def answered_codec(self, call_id: str) -> str | None:
        """The codec of the stack's 200 OK to this call's INVITE, once (then forgotten);
        None when it did not pass through this front."""
        return self._codecs.pop(call_id, None)

    def settle(self, call_id: str) -> None:
        """The leg says this call is established or over: it no longer counts as pending."""
        self.pending.settle(call_id)

    def _reply(self, msg: SipMessage, key: str, conn: int | None, status: int, reason: str, *,
               extra: list[tuple[str, str]] | None = None, remember: bool = True) -> None:
        tag = os.urandom(6).hex()
        data = msg.response(status, reason, to_tag=tag, extra=extra).encode()
        if status >= 200 and remember:
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
        if mf is not None:  # an ASCII number: checked by check_request
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
            first = self._count_final(branch, msg.status)
            if msg.status < 300:
                self.pending.answered(msg.call_id)
                suite = answer_suite(msg.body) if first and msg.body else None
                if suite is not None:  # once per call: the record that its media is encrypted
                    log.info("call %s: SRTP negotiated (%s)", msg.call_id, suite)
                codec = sdp_codec(msg.body) if msg.body else None
                if codec is not None:
                    self._codecs[msg.call_id] = codec
                    while len(self._codecs) > _CODECS_KEPT:
                        self._codecs.popitem(last=False)
            else:
                self.pending.settle(msg.call_id)
        dlc = header_param(ours, "dlc")  # the caller's TCP connection, when it came over TCP
        self._send_down(msg.encode(), msg, int(dlc) if dlc is not None and dlc.isdigit() else None)

    def _count_final(self, branch: str, status: int) -> bool:
        """Count an INVITE's final answer once; True the first time."""
        pending = self._pending.get(branch)
        if pending is None or pending.counted:
            return False
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
        return True

    # ---- plumbing --------------------------------------------------------------------------

    def _send_down(self, data: bytes, request: SipMessage, conn: int | None) -> None:
        if conn is not None:
            entry = self._conns.get(conn)
            if entry is not None and not entry.transport.is_closing():
                entry.transport.write(data)
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

    def _malformed(self, reason: str, detail: str, host: str, port: int) -> None:
        """Count by reason; log at most one line per source per `_LOG_SOURCE_EVERY` and no
        more than the global warning rate (a flood from many addresses)."""
        self.metrics.malformed.labels(reason=reason).inc()
        now = time.monotonic()
        last = self._logged.get(host)
        if last is not None and now - last < _LOG_SOURCE_EVERY:
            return
        self._logged[host] = now
        self._logged.move_to_end(host)
        if len(self._logged) > _LOG_SOURCES:
            self._logged.popitem(last=False)
        self._warn("dropped or refused malformed SIP from %s:%d (%s: %s)", host, port, reason, detail[:120])

    # ---- TCP connections -------------------------------------------------------------------

    def _wire(self, conn: int | None) -> str:
        """How the caller reached us, for records and the SRTP policy: udp, tcp or tls."""
        if conn is None:
            return "udp"
        entry = self._conns.get(conn)
        return "tls" if entry is not None and entry.tls else "tcp"

    def _add_conn(self, transport: asyncio.Transport, source: str, tls: bool = False) -> int | None:
        """A connection id, or None when the source or the process holds too many."""
        held = self._conns_by_source.get(source, 0)
        reason = ("tcp_source" if held >= _TCP_PER_SOURCE
                  else "tcp_total" if len(self._conns) >= self.tcp_max_connections else None)
        if reason is not None:
            self.metrics.refused.labels(reason=reason).inc()
            self._warn("SIP TCP connection limit (%s): closing a connection from %s", reason, source)
            return None
        conn = self._next_conn
        self._next_conn += 1
        self._conns[conn] = _Conn(transport, source, time.monotonic(), tls=tls)
        self._conns_by_source[source] = held + 1
        return conn

    def _drop_conn(self, conn: int) -> None:
        entry = self._conns.pop(conn, None)
        if entry is None:
            return
        left = self._conns_by_source.get(entry.source, 1) - 1
        if left > 0:
            self._conns_by_source[entry.source] = left
        else:
            self._conns_by_source.pop(entry.source, None)

    def _conn_data(self, conn: int, partial: bool) -> None:
        entry = self._conns.get(conn)
        if entry is not None:
            entry.last_data = time.monotonic()
            if not partial:
                entry.partial_since = None
            elif entry.partial_since is None:
                entry.partial_since = entry.last_data

    async def _sweep_connections(self) -> None:
        """Once a second: close connections idle for `tcp_idle_timeout`, or holding half a
        message for `_TCP_PARTIAL_TIMEOUT` (a slow sender pins a buffer and a socket)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for entry in list(self._conns.values()):
                if entry.partial_since is not None and now - entry.partial_since > _TCP_PARTIAL_TIMEOUT:
                    reason = "tcp_partial"
                elif now - entry.last_data > self.tcp_idle_timeout:
                    reason = "tcp_idle"
                else:
                    continue
                self.metrics.refused.labels(reason=reason).inc()
                entry.transport.close()  # connection_lost drops it from the table


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
    return host, int(port) if port.isascii() and port.isdigit() and 0 < int(port) < 65536 else 5060


def _stamp_via(msg: SipMessage, host: str, port: int, *, force: bool = False) -> None:
    """RFC 3261 §18.2.1 and RFC 3581: note where the request really came from. The caller's
    own `received`/`rport` values are replaced, never trusted: answers go back to the
    address the datagram came from, so they cannot be reflected at a third party. With
    `force` the source port is stamped too (an answer to a request whose Via is bad)."""
    via = msg.top_via()
    parts = via.split(";")
    wants_rport = force or any(p.strip().lower().split("=", 1)[0] == "rport" for p in parts[1:])
    kept = [parts[0]] + [p for p in parts[1:] if p.strip().lower().split("=", 1)[0] not in ("received", "rport")]
    kept.append(f"received={host}")
    if wants_rport:
        kept.append(f"rport={port}")
    changed = ";".join(kept)
    for i, (n, _) in enumerate(msg.headers):
        if n == "Via":
            msg.headers[i] = (n, changed)
            break


def _via_destination(via: str) -> tuple[str, int] | None:
    """Where a response goes: the `received` address the front stamped, the `rport` it
    stamped when the caller asked for one, else the port the caller named (RFC 3261 §18.2.2)."""
    if not via:
        return None
    received = header_param(via, "received")
    if not received:
        return None  # not stamped by us: nowhere trustworthy to send it
    _, port = _sent_by(via)
    rport = header_param(via, "rport")
    if rport and rport.isascii() and rport.isdigit():
        port = int(rport)
    return received, port


class _Datagram(asyncio.DatagramProtocol):
    def __init__(self, handler: Callable[[bytes, tuple], None]) -> None:
        self._handler = handler

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._handler(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("SIP UDP error: %s", exc)  # ICMP unreachable from a vanished peer


class _Stream(asyncio.Protocol):
    """One caller's TCP or TLS connection: frames by Content-Length, answers on the same
    connection. Over TLS asyncio calls `connection_made` once the handshake is done."""

    def __init__(self, front: SipFront, tls: bool = False) -> None:
        self._front = front
        self._tls = tls
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
        conn = self._front._add_conn(self._transport, self._peer[0], self._tls)
        if conn is None:
            transport.close()
            return
        self._conn = conn

    def data_received(self, data: bytes) -> None:
        if not self._conn:
            return  # refused at connect; the close is under way
        self._buf += data
        try:
            frames = split_frames(self._buf)
        except SipParseError as exc:
            self._front._malformed("size" if "too large" in str(exc) else "parse", str(exc), *self._peer)
            self._transport.close()
            return
        self._front._conn_data(self._conn, partial=bool(self._buf))
        for frame in frames:
            self._front._handle_downstream(frame, self._peer[0], self._peer[1], self._conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn:
            self._front._drop_conn(self._conn)
