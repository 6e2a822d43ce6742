"""The pjsua2 backend: the ONLY module that imports pjsua2 (the `pjsua2-python` wheel,
pjproject 2.15.1; GPLv2, an optional extra: `pip install duplexline[pjsua2]`).

It implements the SIP stack of bridge/sip/stack.py on pjsua2, like the baresip backend:

    Stack          one pjsua2 Endpoint per process (pjsua is process-global), on a private
                   loopback port behind the front door (bridge/sip/front.py)
    StackAccount   one pjsua2 Account
    StackCall      one pjsua2 Call; its audio goes through one AudioMediaPort at 16 kHz mono
                   connected to the call in the conference bridge

One media clock for every call, no thread per call: the null sound device's clock thread
drives the conference bridge every 20 ms, which pulls each call's frame out of its port
(`onFrameRequested`) and pushes the caller's in (`onFrameReceived`); the ports meet the
event loop in two small locked buffers per call. Every SIP and RTP socket is polled on the
event loop's thread (`libHandleEvents(0)` every `POLL_SECONDS`; no pjsua worker threads),
so every SIP callback runs there too and no event crosses threads.

Facts about the wheel this relies on (bench/pjsua2_probe.py, docs/sip.md):
- it is a PJ_DEBUG build: a failed pj assertion aborts the process, so no pj call is made
  on a call pjsua has already disconnected (its id is then invalid), and every callback
  catches its own exceptions (one escaping a SWIG director ends the process too);
- PJSUA_MAX_CALLS is 4 (a larger `maxCalls` is clamped silently): `MAX_CALLS`;
- no Opus codec; OpenSSL 1.0.2k: TLS and SRTP are refused here (`refusals`);
- the bindings release the GIL around every pj call, so the clock thread's callbacks never
  wait on a pj call made from the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import pjsua2 as pj

from . import MAX_CALLS as _MOST
from ..message import SipParseError, addr_uri, parse
from ..stack import (AccountSpec, AudioFormat, CallEvent, CallEventKind, DialBusy, DialDeclined, DialFailed,
                     DialNoAnswer, MediaInactive, RegisterFailed, RtpStats, StackError, TransferRefused)

__all__ = ["Stack", "StackAccount", "StackCall", "STACK_CODECS", "MAX_CALLS", "refusals"]

log = logging.getLogger(__name__)

MAX_CALLS = _MOST["pjsua2"]  # the wheel's PJSUA_MAX_CALLS: a compile-time ceiling
# Operator codec names -> pjmedia codec ids (the wheel has no Opus).
STACK_CODECS = {"pcmu": "PCMU/8000/1", "pcma": "PCMA/8000/1", "g722": "G722/16000/1"}
RATE = 16000  # the conference bridge's clock and every call port's: the agent's own rate
PTIME_US = 20000
FRAME_BYTES = RATE // 50 * 2
JITTER_MS = (40, 20, 60)  # the receive jitter buffer's start, least and most prefetch
POLL_SECONDS = 0.005  # SIP and RTP sockets are read this often (the jitter buffer absorbs it)
STATS_SECONDS = 5.0  # pjsua2 has no RTCP event: the streams' statistics are reported this often
# The bridge hands our port a frame every 20 ms whether RTP arrives or not (the jitter
# buffer fills in), so "the caller sent audio" is read from the stream's packet count, this
# often; audio read more than HEARD_SECONDS after the last new packet is dropped, as the
# baresip backend returns nothing then (the media timeout and dead air depend on it).
PACKETS_SECONDS = 0.1
HEARD_SECONDS = 0.3
_frame_bytes: "Callable[[pj.ByteVector], bytes]" = bytes  # the fast reader once start() proved it
_POLL_BATCH = 64  # events handled in one poll at most
# Each way at most 4 frames (80 ms) wait between the clock thread and the ticker, the newest
# kept: the clock thread needs the GIL for every frame, so a busy process stalls it now and
# then, and without a cap each stall stayed as echo delay (measured: 60 -> 420 ms within a
# call under load). The ticker keeps about 3 frames queued out, and reads every 10 ms.
_TX_MAX = 4 * FRAME_BYTES
_RX_MAX = 4 * FRAME_BYTES
# Every pj object Python creates (calls, ports, accounts): `Stack.close` disowns any still
# alive before libDestroy (a traceback or a late reference may hold one).
_PJ_OBJECTS: "weakref.WeakSet" = weakref.WeakSet()


def refusals(*, codecs: tuple[str, ...], tls: bool, srtp: bool) -> list[str]:
    """What an operator asked for that this backend cannot do, one sentence each."""
    out = []
    missing = [c for c in codecs if c not in STACK_CODECS]
    if missing:
        out.append(f"codec {','.join(missing)}: not in the pjsua2 wheel (it has {','.join(STACK_CODECS)})")
    if tls:
        out.append("SIP over TLS: the pjsua2 wheel links OpenSSL 1.0.2k, too old to trust; use --sip-backend baresip")
    if srtp:
        out.append("SRTP: refused on the pjsua2 wheel (OpenSSL 1.0.2k); use --sip-backend baresip")
    return out


def _vector_bytes(vector: "pj.ByteVector") -> bytes:
    """A ByteVector's bytes in one copy (~3 µs for a frame), read through the std::vector's
    own layout (begin and end pointers first: libstdc++, which the manylinux wheel uses).
    The binding's own conversion goes element by element (~580 µs a frame: 3 % of a core
    per call in the clock thread, measured). `_check_vector_layout` proves the layout on
    this build at start-up."""
    address = int(vector.this)
    begin = ctypes.c_size_t.from_address(address).value
    end = ctypes.c_size_t.from_address(address + ctypes.sizeof(ctypes.c_size_t)).value
    return ctypes.string_at(begin, end - begin)


def _check_vector_layout() -> "Callable[[pj.ByteVector], bytes]":
    """`_vector_bytes` when it reads known vectors back exactly, else the slow conversion."""
    for probe in (b"", b"duplexline", bytes(range(256)) * 3):
        try:
            if _vector_bytes(pj.ByteVector(probe)) != probe:
                break
        except (ValueError, OSError, TypeError):
            break
    else:
        return _vector_bytes
    log.warning("pjsua2: this build's ByteVector layout is not the expected one; frames are copied slowly")
    return bytes


def _error_text(exc: "pj.Error") -> str:
    try:
        return f"{exc.reason} ({exc.status})"
    except Exception:  # noqa: BLE001 - a SWIG error object without fields
        return repr(exc)


def _dial_error(code: int, reason: str) -> DialFailed:
    text = f"{code} {reason}".strip()
    if code in (486, 600):
        return DialBusy(text, code, reason)
    if code == 603:
        return DialDeclined(text, code, reason)
    if code in (408, 480, 487):
        return DialNoAnswer(text, code, reason)
    return DialFailed(text, code or None, reason)


def _rtp_stats(stat: "pj.StreamStat") -> RtpStats:
    rx, jbuf = stat.rtcp.rxStat, stat.jbuf
    rtt = stat.rtcp.rttUsec
    return RtpStats(rx_packets=rx.pkt, rx_lost=rx.loss, jbuf_late=jbuf.discard, jbuf_lost=jbuf.lost,
                    rx_jitter_ms=rx.jitterUsec.last / 1000.0, rtt_ms=rtt.last / 1000.0 if rtt.n else 0.0,
                    jbuf_jitter_ms=int(jbuf.devDelayMsec))


def _headers(message: str) -> dict[str, str]:
    """The header fields of the INVITE pjsua received, lower-case names (the first of each)."""
    try:
        fields = parse(message.encode()).headers
    except SipParseError:  # the front door forwarded it, so it parsed there: not expected
        return {}
    out: dict[str, str] = {}
    for name, value in fields:
        out.setdefault(name.lower(), value)
    return out


def _op(status: int = 0) -> "pj.CallOpParam":
    op = pj.CallOpParam(True)
    if status:
        op.statusCode = status
    return op


# ---- stack -------------------------------------------------------------------------------------


class Stack:
    """One pjsua2 endpoint. `start()` unwinds on failure; `close()` is idempotent."""

    def __init__(self) -> None:
        self._ep: pj.Endpoint | None = None
        self._host = ""
        self._rtp_ports = (0, 0)
        self._tcp_id: int | None = None
        self._accounts: list[_Account] = []
        self._calls: set[StackCall] = set()  # live ones: kept alive here, polled for statistics
        self._poller: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._next_packets = self._next_stats = 0.0
        self._codecs: tuple[str, ...] = ()  # the first account's, for the whole process
        self._handles: list[StackAccount] = []
        self._ports_made = 0  # one per concurrent call at most, reused (see _Port)
        self._free_ports: list[_Port] = []

    async def start(self, *, host: str, port: int, rtp_ports: tuple[int, int], max_calls: int,
                    log_level: str = "warning", tls_ca: Path | None = None) -> None:
        """`tls_ca` is unused: the leg refuses every TLS setting on this backend before the
        stack starts."""
        if max_calls > MAX_CALLS:
            raise StackError(f"pjsua2 backend: at most {MAX_CALLS} calls per process (the wheel's PJSUA_MAX_CALLS), "
                             f"{max_calls} asked")
        self._host, self._rtp_ports = host, rtp_ports
        ep = pj.Endpoint()
        try:
            ep.libCreate()
            self._ep = ep
            cfg = pj.EpConfig()
            level = {"info": 4, "warning": 2, "error": 1}.get(log_level, 1)
            cfg.logConfig.level = cfg.logConfig.consoleLevel = level
            cfg.uaConfig.maxCalls = max_calls
            cfg.uaConfig.threadCnt = 0  # no pjsua worker threads: the event loop polls every socket
            cfg.uaConfig.mainThreadOnly = False
            cfg.uaConfig.userAgent = "duplexline"
            cfg.medConfig.threadCnt = 0
            cfg.medConfig.clockRate = cfg.medConfig.sndClockRate = RATE
            cfg.medConfig.audioFramePtime = PTIME_US // 1000
            cfg.medConfig.noVad = True
            cfg.medConfig.ecTailLen = 0  # no echo canceller: the line is not a loudspeaker
            cfg.medConfig.maxMediaPorts = 2 * max_calls + 4
            # A short jitter buffer, as on baresip (bridge/sip/backends/baresip.py): every
            # millisecond there is heard as delay. Its cap matters most: RTP is read on the
            # event loop, and after a stall of the loop the packets queued in the socket
            # arrive at once; a 240 ms cap kept them as 200 ms more echo delay, for seconds.
            cfg.medConfig.jbInit, cfg.medConfig.jbMinPre, cfg.medConfig.jbMaxPre = JITTER_MS
            cfg.medConfig.jbMax = JITTER_MS[2] + PTIME_US // 1000
            ep.libInit(cfg)
            transport = pj.TransportConfig()
            transport.boundAddress = transport.publicAddress = host
            transport.port = port
            ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, transport)
            self._tcp_id = ep.transportCreate(pj.PJSIP_TRANSPORT_TCP, transport)
            ep.libStart()
            ep.audDevManager().setNullDev()  # the null device's thread is the one media clock
        except pj.Error as exc:
            await self.close()
            raise StackError(f"the SIP stack (pjsua2) did not start on {host}:{port}: {_error_text(exc)}") from None
        global _frame_bytes
        _frame_bytes = _check_vector_layout()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._poller = self._loop.call_later(POLL_SECONDS, self._poll)

    def soon(self, fn: Callable, *args: object) -> None:
        """Run `fn(*args)` on the event loop: at once when called there (a SIP callback
        inside the poll), else (a pj thread: DTMF comes from the media clock's) queued."""
        if self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _set_codecs(self, codecs: tuple[str, ...]) -> None:
        """pjsua's codec priorities are the endpoint's, not an account's."""
        assert self._ep is not None
        wanted = {STACK_CODECS[c]: 255 - i for i, c in enumerate(codecs)}
        for info in self._ep.codecEnum2():
            self._ep.codecSetPriority(info.codecId, wanted.get(info.codecId, 0))

    def _poll(self) -> None:
        ep, loop = self._ep, self._loop
        if ep is None or loop is None:
            return
        try:
            for _ in range(_POLL_BATCH):  # what is ready, but never the whole loop's time under a flood
                if ep.libHandleEvents(0) <= 0:
                    break
        except Exception:  # a failing callback is logged where it failed; the poll goes on
            log.exception("pjsua2 event poll failed")
        now = time.monotonic()
        if now >= self._next_packets:
            report = now >= self._next_stats
            self._next_packets = now + PACKETS_SECONDS
            if report:
                self._next_stats = now + STATS_SECONDS
            for call in list(self._calls):
                call._read_stats(now, report)
        self._poller = loop.call_later(POLL_SECONDS, self._poll)

    async def close(self) -> None:
        ep, self._ep = self._ep, None
        if ep is None:
            return
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        try:
            ep.hangupAllCalls()
            for account in self._accounts:
                account.shutdown()
            for _ in range(20):  # up to a second for the BYEs' answers
                ep.libHandleEvents(50)
                if not self._calls:
                    break
        except pj.Error as exc:
            log.error("SIP stack (pjsua2) did not close cleanly: %s", _error_text(exc))
        for call in list(self._calls):
            call._gone()
        self._calls.clear()
        for account in self._accounts:
            account.on_call = None
        self._accounts.clear()
        for handle in self._handles:
            handle._account = None  # the last reference: the pj Account goes before libDestroy
        stragglers = list(_PJ_OBJECTS)
        for obj in stragglers:
            obj.thisown = False  # never destroyed now: a pj destructor after libDestroy aborts
        if stragglers:
            log.debug("pjsua2: %d pj objects outlived their calls; left to the process's exit", len(stragglers))
        try:
            ep.libDestroy()
        except pj.Error as exc:
            log.error("SIP stack (pjsua2) did not close cleanly: %s", _error_text(exc))

    async def add_account(self, spec: AccountSpec) -> "StackAccount":
        assert self._ep is not None, "start() first"
        # Best-effort SRTP ("srtp") is plain RTP here; only mandatory SRTP is refused.
        problems = refusals(codecs=spec.codecs, tls=spec.transport == "tls", srtp=spec.mediaenc == "srtp-mand")
        if self._codecs and spec.codecs != self._codecs:
            problems.append(f"codecs {','.join(spec.codecs)}: pjsua2 sets codecs for the whole process, "
                            f"and they are already {','.join(self._codecs)} (give every account the same)")
        if problems:
            raise StackError(f"account {spec.user}@{spec.domain}: " + "; ".join(problems))
        cfg = pj.AccountConfig()
        cfg.idUri = f"sip:{spec.user}@{spec.domain}"
        params = ";transport=tcp" if spec.transport == "tcp" else ""
        # As baresip does: an account that registers without a registrar registers at its domain.
        registrar = spec.registrar or (spec.domain if spec.reg_interval else None)
        if registrar:
            registrar = registrar if registrar.startswith(("sip:", "sips:")) else f"sip:{registrar}"
            cfg.regConfig.registrarUri = registrar if params in registrar else registrar + params
        cfg.regConfig.registerOnAdd = False
        cfg.regConfig.timeoutSec = spec.reg_interval or 600
        cfg.regConfig.retryIntervalSec = 0  # no retries of pjsua's own: the leg retries with backoff
        if spec.password:
            cfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", spec.auth_user or spec.user, 0,
                                                            spec.password))
        if spec.transport == "tcp" and self._tcp_id is not None:
            cfg.sipConfig.transportId = self._tcp_id
        media = cfg.mediaConfig.transportConfig
        media.boundAddress = media.publicAddress = self._host
        media.port = self._rtp_ports[0]
        media.portRange = self._rtp_ports[1] - self._rtp_ports[0]
        cfg.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_DISABLED
        account = _Account(self, spec)
        try:
            account.create(cfg, spec.catch_all)
        except pj.Error as exc:
            raise StackError(f"account {spec.user}@{spec.domain}: {_error_text(exc)}") from None
        self._accounts.append(account)
        if not self._codecs:
            self._codecs = spec.codecs
            self._set_codecs(spec.codecs)
        handle = StackAccount(self, account, spec)
        self._handles.append(handle)
        return handle

    def _take_port(self) -> _Port:
        if self._free_ports:
            port = self._free_ports.pop()
        else:
            self._ports_made += 1
            port = _Port(f"line{self._ports_made}")
        port.reset(active=True)
        return port

    def _give_port(self, port: _Port) -> None:
        port.reset(active=False)
        self._free_ports.append(port)

    def _adopt(self, call: "StackCall") -> None:
        self._calls.add(call)

    def _forget(self, call: "StackCall") -> None:
        self._calls.discard(call)


class _Account(pj.Account):
    """pjsua2's callbacks for one account, on the event loop's thread (inside the poll)."""

    def __init__(self, stack: Stack, spec: AccountSpec) -> None:
        super().__init__()
        self.stack = stack
        self.spec = spec
        self.on_call: Callable[["StackCall"], None] | None = None
        self.reg_listeners: list[Callable[[bool, str, int], None]] = []
        _PJ_OBJECTS.add(self)

    def onIncomingCall(self, prm) -> None:
        try:
            call = StackCall(self.stack, self, prm.callId, headers=_headers(prm.rdata.wholeMsg))
            if self.on_call is None:
                call._hangup_now(486)
                return
            self.stack.soon(self.on_call, call)
        except Exception:
            log.exception("pjsua2 incoming call callback failed")

    def onRegState(self, prm) -> None:
        try:
            ok = 200 <= prm.code < 300 and prm.expiration > 0
            for listener in list(self.reg_listeners):
                self.stack.soon(listener, ok, f"{prm.code} {prm.reason}", prm.code)
        except Exception:
            log.exception("pjsua2 registration callback failed")


class StackAccount:
    def __init__(self, stack: Stack, account: _Account, spec: AccountSpec) -> None:
        self._stack = stack
        self._account = account
        self.spec = spec

    def on_incoming(self, callback: Callable[["StackCall"], None]) -> None:
        self._account.on_call = callback

    def on_registration(self, callback: Callable[[bool, str], None]) -> None:
        self._account.reg_listeners.append(lambda ok, text, _code: callback(ok, text))

    async def _registration(self, renew: bool, timeout: float) -> tuple[bool, str, int]:
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future = loop.create_future()

        def listener(ok: bool, text: str, code: int) -> None:
            if not outcome.done():
                outcome.set_result((ok, text, code))

        self._account.reg_listeners.append(listener)
        try:
            self._account.setRegistration(renew)
            return await asyncio.wait_for(outcome, timeout)
        finally:
            self._account.reg_listeners.remove(listener)

    async def register(self, timeout: float = 10.0) -> None:
        try:
            ok, text, code = await self._registration(True, timeout)
        except pj.Error as exc:
            raise RegisterFailed(f"register {self.spec.user}: {_error_text(exc)}") from None
        except asyncio.TimeoutError:
            raise RegisterFailed(f"register {self.spec.user}: no answer within {timeout:.0f} s") from None
        if not ok:
            raise RegisterFailed(f"register {self.spec.user}: {text}", code or None)

    async def unregister(self, timeout: float = 5.0) -> None:
        try:
            await self._registration(False, timeout)
        except (pj.Error, asyncio.TimeoutError) as exc:
            log.info("unregister %s: %s", self.spec.user, exc)

    async def dial(self, uri: str) -> "StackCall":
        if self.spec.transport == "tcp" and "transport=" not in uri:
            uri += ";transport=tcp"
        call = StackCall(self._stack, self._account, pj.PJSUA_INVALID_ID)
        call._peer = addr_uri(uri)
        try:
            call._call.makeCall(uri, _op())
        except pj.Error as exc:
            call._gone()
            self._stack._forget(call)
            raise DialFailed(f"cannot dial {uri!r}: {_error_text(exc)}") from None
        return call


# ---- calls -------------------------------------------------------------------------------------


class _Port(pj.AudioMediaPort):
    """A call's PCM at 16 kHz, exchanged with the conference bridge's clock thread.

    Ports are pooled by the stack, never destroyed while it runs: pjproject 2.15's bridge
    applies a port's removal at its next tick, so a port destroyed at once was still called
    by the clock thread after Python freed it (the torture tier's UDP fuzz: a callback on a
    half-freed object, then SIGSEGV). A port between calls takes and gives nothing."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.rx = bytearray()
        self.tx = bytearray()
        self.active = False
        _PJ_OBJECTS.add(self)
        fmt = pj.MediaFormatAudio()
        fmt.init(pj.PJMEDIA_FORMAT_PCM, RATE, 1, PTIME_US, 16)
        self.createPort(name, fmt)

    def reset(self, active: bool) -> None:
        with self.lock:
            self.rx.clear()
            self.tx.clear()
            self.active = active

    def onFrameReceived(self, frame) -> None:  # clock thread
        try:
            if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
                data = _frame_bytes(frame.buf)[:frame.size]
                with self.lock:
                    if not self.active:
                        return
                    self.rx += data
                    if len(self.rx) > _RX_MAX:  # nobody reads: keep the newest
                        del self.rx[:len(self.rx) - _RX_MAX]
        except Exception:
            log.exception("pjsua2 frame in failed")

    def onFrameRequested(self, frame) -> None:  # clock thread
        try:
            with self.lock:
                if not self.active or len(self.tx) < FRAME_BYTES:
                    return  # nothing queued: the bridge plays silence
                data = bytes(self.tx[:FRAME_BYTES])
                del self.tx[:FRAME_BYTES]
            frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
            frame.buf = pj.ByteVector(data)
            frame.size = FRAME_BYTES
        except Exception:
            log.exception("pjsua2 frame out failed")


class _Call(pj.Call):
    def __init__(self, owner: "StackCall", account: _Account, call_id: int) -> None:
        super().__init__(account, call_id)
        self.owner = owner
        _PJ_OBJECTS.add(self)

    def onCallState(self, prm) -> None:
        try:
            self.owner._on_state(self.owner._info())
        except Exception:
            log.exception("pjsua2 call state callback failed")

    def onCallMediaState(self, prm) -> None:
        try:
            self.owner._on_media(self.owner._info())
        except Exception:
            log.exception("pjsua2 media state callback failed")

    def onCallTsxState(self, prm) -> None:
        try:
            event = prm.e
            if event.type != pj.PJSIP_EVENT_TSX_STATE:
                return
            tsx = event.body.tsxState.tsx
            if (tsx.method == "INVITE" and tsx.role == pj.PJSIP_ROLE_UAC and tsx.statusCode >= 200
                    and tsx.state in (pj.PJSIP_TSX_STATE_COMPLETED, pj.PJSIP_TSX_STATE_TERMINATED)):
                self.owner._stack.soon(self.owner._on_reinvite, tsx.statusCode, tsx.statusText)
        except Exception:
            log.exception("pjsua2 transaction callback failed")

    def onDtmfDigit(self, prm) -> None:
        try:
            self.owner._stack.soon(self.owner._emit, CallEvent(CallEventKind.DTMF, prm.digit))
        except Exception:
            log.exception("pjsua2 DTMF callback failed")

    def onCallTransferRequest(self, prm) -> None:
        prm.statusCode = 603  # a REFER from the far end: declined (the agent transfers, not the caller)

    def onCallTransferStatus(self, prm) -> None:
        try:
            self.owner._stack.soon(self.owner._on_transfer, prm.statusCode, prm.reason, prm.finalNotify)
            if prm.finalNotify or prm.statusCode >= 200:
                prm.cont = False
        except Exception:
            log.exception("pjsua2 transfer callback failed")

    def onStreamDestroyed(self, prm) -> None:
        try:
            self.owner._final_stats(prm.streamIdx)
        except Exception:
            log.exception("pjsua2 stream callback failed")


class StackCall:
    """One call. Events arrive on the event loop through `on_event`."""

    def __init__(self, stack: Stack, account: _Account, call_id: int, headers: dict[str, str] | None = None) -> None:
        self._stack = stack
        self._call: _Call | None = _Call(self, account, call_id)
        self._headers = headers or {}
        self._listeners: list[Callable[[CallEvent], None]] = []
        self._rtcp: list[Callable[[RtpStats], None]] = []
        self._port: _Port | None = None
        self._media_index = -1
        self._rx_packets = 0
        self._heard_until = 0.0
        self._alive = True  # False once pjsua disconnected it: no pj call may name it again
        self._confirmed = False
        self._remote_hold = False
        self._closed_text: str | None = None
        self._dial_error: DialFailed | None = None
        self._established: asyncio.Event = asyncio.Event()
        self._transfer: asyncio.Future | None = None
        self._reinvite: asyncio.Future | None = None  # our hold/resume re-INVITE's final answer
        self._call_id = ""
        # The far end's address of record as its request named it (pjsua's remoteUri drops the port).
        self._peer = addr_uri(self._headers.get("from", ""))
        self.stats: RtpStats | None = None
        stack._adopt(self)

    @property
    def call_id(self) -> str:
        if not self._call_id and self._alive:
            self._info()
        return self._call_id

    @property
    def peer(self) -> str:
        return self._peer

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._headers)

    def _info(self) -> "pj.CallInfo | None":
        if self._call is None:
            return None
        try:
            info = self._call.getInfo()
        except pj.Error:
            return None
        self._call_id = info.callIdString
        return info

    def on_event(self, listener: Callable[[CallEvent], None]) -> None:
        self._listeners.append(listener)

    def on_rtcp(self, listener: Callable[[RtpStats], None]) -> None:
        """`listener(stats)` every `STATS_SECONDS` while the call has audio (pjsua2 has no
        RTCP event; the figures are the stream's, RTCP's where a report arrived)."""
        self._rtcp.append(listener)

    def _emit(self, event: CallEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("SIP call listener failed on %s", event.kind.value)

    # ---- pjsua2's callbacks (event loop thread, inside the poll) ------------------------------

    # pjsua's side of each callback runs where the callback runs; what the leg sees goes
    # through `Stack.soon`, on the event loop.

    def _on_state(self, info: "pj.CallInfo | None") -> None:
        if info is None:
            return
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED and not self._confirmed:
            self._confirmed = True
            self._stack.soon(self._up)
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            code, reason = info.lastStatusCode, info.lastReason
            confirmed = self._confirmed
            self._gone()  # now, inside the callback: pjsua may reuse the call's id right after
            text = ("BYE" if code in (0, 200) else f"{code} {reason}") if confirmed else f"{code} {reason}"
            self._stack.soon(self._closed, text, None if confirmed else _dial_error(code, reason))

    def _up(self) -> None:
        self._established.set()
        self._emit(CallEvent(CallEventKind.ESTABLISHED))

    def _closed(self, text: str, dial_error: DialFailed | None) -> None:
        self._stack._forget(self)
        self._closed_text, self._dial_error = text, dial_error
        self._established.set()
        self._emit(CallEvent(CallEventKind.CLOSED, text))

    def _on_media(self, info: "pj.CallInfo | None") -> None:
        if info is None:
            return
        for media in info.media:
            if media.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            if media.status == pj.PJSUA_CALL_MEDIA_REMOTE_HOLD and not self._remote_hold:
                self._remote_hold = True
                self._stack.soon(self._emit, CallEvent(CallEventKind.REMOTE_HOLD))
            elif media.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                if self._remote_hold:
                    self._remote_hold = False
                    self._stack.soon(self._emit, CallEvent(CallEventKind.REMOTE_RESUME))
                self._connect(media.index)
            return

    def _connect(self, index: int) -> None:
        """The call's audio to and from our port (again after a re-INVITE replaced it)."""
        audio = self._call.getAudioMedia(index)
        if self._port is None:
            self._port = self._stack._take_port()
        audio.startTransmit(self._port)
        self._port.startTransmit(audio)
        self._media_index = index

    def _on_reinvite(self, status: int, reason: str) -> None:
        future = self._reinvite
        if future is not None and not future.done():
            future.set_result((status, reason))

    def _on_transfer(self, status: int, reason: str, final: bool) -> None:
        future = self._transfer
        if future is None or future.done():
            return
        if 200 <= status < 300:
            future.set_result(None)
        elif status >= 300 or final:
            future.set_exception(TransferRefused(f"transfer failed: {status} {reason}", status))

    def _final_stats(self, index: int) -> None:
        try:
            self.stats = _rtp_stats(self._call.getStreamStat(index))
        except pj.Error:
            pass

    def _read_stats(self, now: float, report: bool) -> None:
        """New packets since the last look: the caller is heard (see HEARD_SECONDS); every
        STATS_SECONDS the figures also go to the RTCP listeners."""
        if not self._alive or self._media_index < 0:
            return
        try:
            stats = _rtp_stats(self._call.getStreamStat(self._media_index))
        except pj.Error:
            return
        if stats.rx_packets != self._rx_packets:
            self._rx_packets = stats.rx_packets
            self._heard_until = now + HEARD_SECONDS
        if report:
            for listener in list(self._rtcp):
                listener(stats)

    def _gone(self) -> None:
        """pjsua disconnected the call (its stream left the conference bridge, so the clock
        thread no longer calls our port): drop the pj objects now, while pjsua runs. A pj
        Call or port destroyed after `libDestroy` fails a pj assertion and aborts."""
        self._alive = False
        if self._port is not None:
            # Its connections went with the call's own port (pjsua removed it); calling
            # stopTransmit on that gone slot would fail a pj assertion.
            self._stack._give_port(self._port)
            self._port = None
        self._call = None

    def _hangup_now(self, status: int = 0) -> None:
        if self._alive:
            self._call.hangup(_op(status))

    # ---- call control -----------------------------------------------------------------------

    def _check_alive(self, what: str) -> None:
        if not self._alive:
            raise StackError(f"{what}: the call is gone")

    async def answer(self) -> None:
        self._check_alive("answer")
        try:
            self._call.answer(_op(200))
        except pj.Error as exc:
            raise StackError(f"answer failed: {_error_text(exc)}") from None

    async def reject(self) -> None:
        """486 Busy Here (the front door sends every other refusal)."""
        try:
            self._hangup_now(486)
        except pj.Error:
            pass

    async def hangup(self) -> None:
        try:
            self._hangup_now()
        except pj.Error as exc:
            raise StackError(f"hangup failed: {_error_text(exc)}") from None

    async def wait_established(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._established.wait(), timeout)
        except asyncio.TimeoutError:
            raise DialNoAnswer(f"no answer within {timeout:.0f} s") from None
        if self._dial_error is not None:
            raise self._dial_error
        if not self._confirmed:
            raise DialFailed(f"call closed: {self._closed_text}")

    async def set_hold(self, on: bool, timeout: float = 10.0) -> None:
        """Returns once the far end answered the re-INVITE (pjsua refuses another one while
        one is pending: a resume right after a hold must wait for it)."""
        what = "hold" if on else "resume"
        self._check_alive(what)
        self._reinvite = asyncio.get_running_loop().create_future()
        try:
            if on:
                self._call.setHold(_op())
            else:
                op = _op()
                op.opt.flag = pj.PJSUA_CALL_UNHOLD
                self._call.reinvite(op)
        except pj.Error as exc:
            raise StackError(f"{what} failed: {_error_text(exc)}") from None
        try:
            status, reason = await asyncio.wait_for(self._reinvite, timeout)
        except asyncio.TimeoutError:
            raise StackError(f"{what}: no answer to the re-INVITE within {timeout:.0f} s") from None
        if status >= 300:
            raise StackError(f"{what} refused: {status} {reason}")

    async def transfer(self, uri: str, timeout: float = 30.0) -> None:
        self._check_alive("transfer")
        self._transfer = asyncio.get_running_loop().create_future()
        try:
            self._call.xfer(uri, _op())
        except pj.Error as exc:
            raise TransferRefused(f"bad transfer target {uri!r}: {_error_text(exc)}") from None
        try:
            await asyncio.wait_for(self._transfer, timeout)
        except asyncio.TimeoutError:
            raise TransferRefused(f"transfer to {uri!r}: no outcome within {timeout:.0f} s") from None
        try:
            self._hangup_now()  # the far end now talks to the target: our leg of the call ends (pjsua leaves it up)
        except pj.Error as exc:
            log.info("hangup after transfer: %s", _error_text(exc))

    async def send_dtmf(self, digits: str) -> None:
        if not digits or any(d not in "0123456789*#ABCDabcd" for d in digits):
            raise StackError(f"DTMF: {digits!r} is not made of 0-9 * # A-D")
        self._check_alive("DTMF")
        try:
            self._call.dialDtmf(digits)
        except pj.Error as exc:
            raise StackError(f"DTMF failed: {_error_text(exc)}") from None

    # ---- audio (the media ticker; event loop thread) ------------------------------------------

    def audio_format(self) -> AudioFormat:
        port = self._port
        if port is None or not self._alive:
            raise MediaInactive("no audio yet")
        with port.lock:
            queued = len(port.tx)
        return AudioFormat(RATE, 1, RATE, 1, queued)

    def read(self, max_bytes: int) -> bytes:
        port = self._port
        if port is None:
            raise MediaInactive("no audio")
        with port.lock:
            if time.monotonic() > self._heard_until:  # no packets: the jitter buffer's fill, not the caller
                port.rx.clear()
                return b""
            n = min(max_bytes, len(port.rx)) & ~1
            data = bytes(port.rx[:n])
            del port.rx[:n]
        return data

    def write(self, pcm) -> int:
        """PCM16 at 16 kHz mono (an int16 array or bytes); returns the bytes taken."""
        port = self._port
        if port is None:
            raise MediaInactive("no audio")
        data = memoryview(pcm).cast("B")
        with port.lock:
            port.tx += data
            if len(port.tx) > _TX_MAX:  # the clock stalled: drop the oldest, not the newest
                del port.tx[:len(port.tx) - _TX_MAX]
        return len(data)
