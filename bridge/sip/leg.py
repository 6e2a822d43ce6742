"""The SIP leg: phone calls in and out of the bridge.

    callers --SIP--> SipFront (public address; refuses 403/401/503/404) --> Stack (baresip or
    pjsua2, private loopback port) --> SipCall per call --> CallManager.admit -> CallSession
                                   ^ MediaTicker: one 20 ms tick moves every call's audio

`start(settings, manager, registry)` builds it (the server calls it) and returns a `SipLeg`
with `drain()` (new INVITEs get 503 + Retry-After from now on), `async close()`
(idempotent: hangs up what is left, unregisters, stops the stack), `dial()` for outbound
calls and `describe()` for /readyz details. Its HTTP call-control routes live in
bridge/sip/http.py.

Inbound order of events: the front accepts and forwards the INVITE -> the stack reports it
-> the agent admits a session (or we answer 486) -> 200 OK -> established: the session
is answered and media flows. A call is never answered before its session exists.

Calls reaching the stack without the front's route header (with this process's key) are
refused: nobody bypasses protection by dialling the private port. Calls arriving through a
registered account (from its registrar) are routed by the account's user.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import TYPE_CHECKING

from agent.call import CallInfo, CallRefused
from agent.once import BackgroundTasks, Once
from agent.store import Transport

from ..errors import BridgeError, ConfigError
from . import backends
from .accounts import AccountEntry, Registration, load_accounts
from .call import LineSink, SipCall, SipCallState
from .front import CALLED_HEADER, ROUTE_HEADER, Refusal, SipFront
from .guard import Allowlist, DigestAuth, PendingInvites, RateLimiter
from .media import MediaTicker
from .metrics import SipMetrics
from .routes import Route, RouteTable
from .siblings import Siblings
from .stack import (INBOUND_USER, AccountSpec, CallEvent, CallEventKind, DialFailed, DialNoAnswer, Stack, StackAccount,
                    StackCall, StackError)
from .tls import server_context

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from agent.calls import CallManager

    from ..settings import Settings

__all__ = ["start", "SipLeg", "DialRefused"]

log = logging.getLogger(__name__)


class DialRefused(BridgeError):
    """An outbound call was not placed (draining, no such account, agent full). Nothing
    rang; `status` is the HTTP-ish status to report."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


async def start(settings: "Settings", manager: "CallManager", registry: "CollectorRegistry | None" = None,
                *_: object) -> "SipLeg":
    leg = SipLeg(settings, manager, registry)
    await leg.start()
    return leg


class SipLeg:
    def __init__(self, settings: "Settings", manager: "CallManager", registry: "CollectorRegistry | None") -> None:
        self.settings = settings
        self.sip = settings.sip
        self.manager = manager
        self.metrics = SipMetrics(registry)
        self.draining = False
        self.stack: Stack = backends.load(self.sip.backend).Stack()
        self.ticker = MediaTicker(self.metrics)
        self.front: SipFront | None = None
        self.routes = RouteTable.default(settings.agent)
        self.registrations: dict[str, Registration] = {}
        self._accounts: dict[str, StackAccount] = {}
        self._inbound: StackAccount | None = None
        self._calls: dict[str, SipCall] = {}
        self._key = os.urandom(8).hex()  # proves a forwarded INVITE came through our front
        self._closing = Once()
        self._bg = BackgroundTasks()
        self.siblings: Siblings | None = None
        self._publisher: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Raises ConfigError (routes/accounts files), OSError naming the address when the
        SIP port is taken, StackError when the stack cannot start. A failed start unwinds."""
        listen = self.settings.sip_listen
        if self.sip.routes is not None:
            self.routes = RouteTable.load(self.sip.routes, self.settings.agent, self.manager.agent.check_route_settings,
                                          can_record=self.settings.records.record_dir is not None)
        entries = load_accounts(self.sip.accounts, self.sip.codecs) if self.sip.accounts else []
        tls = self.sip.tls_listen
        if self.sip.backend == "pjsua2":
            _refuse_on_pjsua2(tls is not None or self.sip.tls_ca is not None, self.routes)
        tls_context = server_context(self.sip.tls_cert, self.sip.tls_key) if tls is not None else None
        stack_host = self.sip.public_address or listen.host
        if stack_host in ("0.0.0.0", "::"):
            raise ConfigError("sip_public_address", None, "required when --sip-listen is a wildcard "
                              "address: the stack must advertise one address in SDP and Contact")
        try:
            port = _free_port(stack_host)
            await self.stack.start(host=stack_host, port=port, rtp_ports=self.sip.rtp_ports,
                                   max_calls=self.sip.max_calls,
                                   log_level="info" if self.settings.log_level == "DEBUG" else "error",
                                   tls_ca=self.sip.tls_ca)
            # SRTP best effort for every inbound call; each route's policy is the front's (sip/srtp.py).
            self._inbound = await self.stack.add_account(AccountSpec(
                INBOUND_USER, f"{stack_host}:{port}", reg_interval=0, codecs=self.sip.codecs, catch_all=True,
                mediaenc="srtp"))
            self._inbound.on_incoming(self._on_front_call)
            for entry in entries:
                account = await self.stack.add_account(entry.spec)
                account.on_incoming(lambda call, e=entry: self._on_account_call(e, call))
                self._accounts[entry.name] = account
                reg = Registration(entry, account, self.metrics)
                self.registrations[entry.name] = reg
                reg.start()
            if self.sip.shared_listen:
                # Processes sharing this SIP address share calls too (least-loaded first).
                self.siblings = Siblings(listen.host, listen.port, (stack_host, port))
                self.siblings.start()
                self._key = self.siblings.key
                self._publisher = asyncio.get_running_loop().create_task(self._publish(), name="sip-siblings")
            auth = DigestAuth(*self.sip.auth) if self.sip.auth else None
            stack_rate = backends.INVITE_RATE[self.sip.backend]  # None: no limit of the stack's own
            self.front = SipFront(listen.host, listen.port, upstream=(stack_host, port), routes=self.routes,
                                  metrics=self.metrics, allow=Allowlist(self.sip.allow),
                                  limiter=RateLimiter(self.sip.invite_rate), auth=auth,
                                  draining=lambda: self.draining or self.manager.draining,
                                  shared_listen=self.sip.shared_listen, route_key=self._key,
                                  choose=self.siblings.pick if self.siblings is not None else None,
                                  pending=PendingInvites(self.sip.max_pending_per_source, self.sip.max_pending),
                                  tcp_max_connections=self.sip.tcp_max_connections,
                                  tcp_idle_timeout=self.sip.tcp_idle_timeout, on_refused=self._front_refused,
                                  tls_listen=(tls.host, tls.port) if tls is not None else None,
                                  tls_context=tls_context,
                                  stack_rate=RateLimiter(stack_rate, burst=stack_rate))
            await self.front.start()
            self.ticker.start()
        except BaseException:
            await self._close()
            raise
        log.info("SIP leg up: sip:%s (udp, tcp)%s, stack %s, codecs %s, at most %d calls, %d routes, %d accounts",
                 listen, f", sips:{tls} (tls)" if tls is not None else "", self.sip.backend, ",".join(self.sip.codecs),
                 self.sip.max_calls,
                 len(self.routes.routes), len(entries))

    def drain(self) -> None:
        """From now on new INVITEs get 503 with Retry-After; live calls go on."""
        if not self.draining:
            log.info("SIP leg draining: %d live calls", len(self._calls))
        self.draining = True

    async def close(self) -> None:
        await self._closing.run(self._close)

    async def _close(self) -> None:
        self.draining = True
        self.ticker.close()
        if self._publisher is not None:
            self._publisher.cancel()
            await asyncio.gather(self._publisher, return_exceptions=True)
        if self.siblings is not None:
            self.siblings.close()  # siblings stop sending us calls within a second
        if self.front is not None:
            await self.front.close()
        calls = [c for c in self._calls.values() if c.state is not SipCallState.ENDED]
        await asyncio.gather(*(c.hangup("shutdown") for c in calls), return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self.registrations.values()), return_exceptions=True)
        await self.stack.close()
        for call in list(self._calls.values()):
            call.finish("shutdown")  # no close report comes from a stopped stack
        await self._bg.wait(5.0)

    # ---- views -------------------------------------------------------------------------------

    def get(self, call_id: str) -> SipCall | None:
        return self._calls.get(call_id)

    def describe(self) -> dict:
        """For /readyz details: registration state per account, live SIP calls."""
        return {"sip": {"listen": str(self.settings.sip_listen), "calls": len(self._calls),
                        "draining": self.draining,
                        "processes": self.siblings.count if self.siblings is not None else 1,
                        "registrations": [r.describe() for r in self.registrations.values()]}}

    # ---- inbound -----------------------------------------------------------------------------

    def _on_front_call(self, stack_call: StackCall) -> None:
        headers = stack_call.headers
        route_name, _, rest = headers.get(ROUTE_HEADER.lower(), "").partition(";k=")
        key, _, wire = rest.partition(";w=")
        route = self.routes.by_name(route_name) if key == self._key else None
        if route is None:
            log.warning("refusing a call from %s that did not come through the SIP front", stack_call.peer)
            self._bg.spawn(stack_call.reject())
            return
        called = headers.get(CALLED_HEADER.lower(), "")
        self._settle_when_up(stack_call)
        self._admit_and_answer(stack_call, local=called, route=route,
                               wire=wire if wire in ("udp", "tcp", "tls") else "udp")

    def _settle_when_up(self, stack_call: StackCall) -> None:
        """The front counts a forwarded INVITE as pending until the call is established
        (the stack reports that when the ACK comes: the caller got our 200 at the address
        it claimed) or over; this tells it so at once rather than at its timeout. The
        codec of our 200 OK, which the front saw go by, goes to the call's record."""
        front, call_id = self.front, stack_call.call_id

        def listener(event: CallEvent) -> None:
            if front is not None and event.kind in (CallEventKind.ESTABLISHED, CallEventKind.CLOSED):
                front.settle(call_id)
                codec = front.answered_codec(call_id)
                call = self._calls.get(call_id)
                if codec is not None and call is not None and call.session is not None:
                    call.session.detail.codec = codec

        stack_call.on_event(listener)

    def _front_refused(self, refusal: Refusal) -> None:
        """The front refused an INVITE (404, 503): the call's record."""
        route = self.routes.by_name(refusal.route) if refusal.route else None
        info = CallInfo(refusal.call_id or f"sip-{uuid.uuid4().hex[:12]}", Transport.SIP, refusal.remote,
                        refusal.called, wire=refusal.wire, webhooks=route.webhooks if route else ())
        self.manager.refused(info, refusal.status, refusal.reason)

    def _refuse_account_call(self, stack_call: StackCall, local: str, reason: str) -> None:
        self.metrics.invites.labels(outcome="486").inc()
        self.manager.refused(CallInfo(stack_call.call_id or f"sip-{uuid.uuid4().hex[:12]}", Transport.SIP,
                                      stack_call.peer, local), 486, reason)
        self._bg.spawn(stack_call.reject())

    def _on_account_call(self, entry: AccountEntry, stack_call: StackCall) -> None:
        if self.draining or self.manager.draining:
            self._refuse_account_call(stack_call, entry.spec.user, "draining")
            return
        route = self.routes.lookup(entry.spec.user)
        if route is None:
            log.info("call to account %s: no route for %r; refused", entry.name, entry.spec.user)
            self._refuse_account_call(stack_call, entry.spec.user, "no-route")
            return
        self._admit_and_answer(stack_call, local=entry.spec.user, route=route)

    def _admit_and_answer(self, stack_call: StackCall, *, local: str, route: Route, wire: str = "udp") -> None:
        call_id = stack_call.call_id or f"sip-{uuid.uuid4().hex[:12]}"
        if call_id in self._calls:
            self._bg.spawn(stack_call.reject())
            return
        call = SipCall(stack_call, call_id=call_id, direction="in", metrics=self.metrics, local=local,
                       media_timeout=self.settings.media_timeout)
        self._track(call)
        self._bg.spawn(self._answer(call, route, wire))

    async def _answer(self, call: SipCall, route: Route, wire: str) -> None:
        info = CallInfo(call.call_id, Transport.SIP, remote=call.stack.peer, local=call.local, settings=route.settings,
                        wire=wire, webhooks=route.webhooks, record=route.record)
        try:
            session = await self.manager.admit(info, call.sink)
        except CallRefused as exc:
            # The stack can only refuse with 486; 503-while-draining is the front's job.
            log.info("call %s refused: %s", call.call_id, exc)
            await call.stack.reject()
            return
        call.attach(session)
        if call.state is SipCallState.ENDED:
            return  # cancelled while admitting: attach() ended the session
        try:
            await call.stack.answer()
        except StackError as exc:
            log.warning("call %s: %s", call.call_id, exc)
            await session.end("answer-failed")

    # ---- outbound ----------------------------------------------------------------------------

    async def dial(self, uri: str, account: str | None = None, timeout: float | None = None) -> SipCall:
        """Place a call and attach an agent session once it is answered. Raises DialRefused
        (nothing rang) or DialFailed and its subclasses DialBusy, DialDeclined, DialNoAnswer
        (it rang and was not answered; the session is ended with that outcome)."""
        if self.draining or self.manager.draining:
            self.metrics.outbound.labels(outcome="refused").inc()
            raise DialRefused("draining: no new calls", 503)
        if account is not None:
            acc = self._accounts.get(account)
            if acc is None:
                raise DialRefused(f"no account {account!r}; known: {', '.join(self._accounts) or 'none'}", 404)
        else:
            acc = next(iter(self._accounts.values()), self._inbound)
        assert acc is not None
        call_id = f"out-{uuid.uuid4().hex[:16]}"
        sink = LineSink()
        try:
            session = await self.manager.admit(CallInfo(call_id, Transport.SIP, remote=uri, local=acc.spec.user,
                                                        direction="out", wire=_uri_wire(uri)), sink)
        except CallRefused as exc:
            self.metrics.outbound.labels(outcome="refused").inc()
            raise DialRefused(f"not admitted: {exc}", 503 if exc.status >= 500 else 409) from None
        try:
            stack_call = await acc.dial(uri)
        except DialFailed as exc:
            session.detail.sip_code = exc.status
            await session.end(self._dial_failed(call_id, uri, exc))
            raise
        call = SipCall(stack_call, call_id=call_id, direction="out", metrics=self.metrics, local=acc.spec.user,
                       sink=sink, media_timeout=self.settings.media_timeout)
        self._track(call)
        call.attach(session)
        ring = timeout or self.sip.ring_timeout
        try:
            try:
                # Our own clock, so that the hang-up of an unanswered call is ours and ends
                # the session as "no-answer" (the stack would report it as a rejection).
                await asyncio.wait_for(stack_call.wait_established(ring + 60), ring)
            except asyncio.TimeoutError:
                await call.hangup("no-answer")
                raise DialNoAnswer(f"not answered within {ring:g} s") from None
        except DialFailed as exc:
            session.detail.sip_code = exc.status
            call.finish(self._dial_failed(call_id, uri, exc))
            raise
        self.metrics.outbound.labels(outcome="answered").inc()
        return call

    def _dial_failed(self, call_id: str, uri: str, exc: DialFailed) -> str:
        """Count and log an outbound call that was not answered; the end reason for it."""
        self.metrics.outbound.labels(outcome=exc.outcome).inc()
        log.info("outbound call %s to %s: %s", call_id, uri, exc.outcome)
        return exc.outcome.replace("_", "-")

    # ---- plumbing ----------------------------------------------------------------------------

    def _track(self, call: SipCall) -> None:
        self._calls[call.call_id] = call
        self.ticker.add(call)

        def done(_: asyncio.Future) -> None:
            self.ticker.remove(call)
            if self._calls.get(call.call_id) is call:
                del self._calls[call.call_id]

        call.closed.add_done_callback(done)

    async def _publish(self) -> None:
        """Once a second: our live calls to the siblings, theirs to our front. A draining
        process says it is full, so new calls go elsewhere."""
        assert self.siblings is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                self.siblings.publish(self.sip.max_calls if self.draining or self.manager.draining
                                      else len(self._calls))
                self.metrics.processes.set(self.siblings.count)
            except OSError as exc:
                log.warning("cannot publish SIP load to %s: %s", self.siblings.dir, exc)



def _uri_wire(uri: str) -> str:
    """What carries an outbound call to `uri`, for its record: the URI's transport."""
    low = uri.lower()
    if low.startswith("sips:") or ";transport=tls" in low:
        return "tls"
    return "tcp" if ";transport=tcp" in low else "udp"


def _free_port(host: str) -> int:
    """A port free for both UDP and TCP on `host` (the stack listens on both)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(20):
        with socket.socket(family, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
            return port
    raise OSError(f"no free port on {host} for the SIP stack")


def _refuse_on_pjsua2(tls: bool, routes: RouteTable) -> None:
    """What the pjsua2 wheel cannot do is refused before anything starts (its OpenSSL is
    1.0.2k): TLS, and routes that demand SRTP."""
    if tls:
        raise ConfigError("sip_tls_listen", "set", "SIP over TLS is refused on --sip-backend pjsua2 (the wheel "
                          "links OpenSSL 1.0.2k); use --sip-backend baresip")
    demanding = [r.name or r.match for r in routes.routes if r.srtp == "required"]
    if demanding:
        raise ConfigError("sip_routes", ",".join(demanding), "srtp required is refused on --sip-backend pjsua2 "
                          "(no SRTP on the wheel's OpenSSL 1.0.2k); use --sip-backend baresip")
