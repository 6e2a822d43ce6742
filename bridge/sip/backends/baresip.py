"""The baresip backend: the ONLY module that imports baresip (baresip-python 0.5.2a3).

It implements the SIP stack on baresip and turns the binding's objects into the stack's
own small types (bridge/sip/stack.py: events, values, errors) at the boundary:

    Stack          one baresip Runtime per process (libre is process-global), listening on a
                   private loopback port behind the front door (bridge/sip/front.py)
    StackAccount   one baresip UserAgent: the catch-all inbound identity, or an operator's
                   account (registration, outbound dialling)
    StackCall      one baresip Call, with events translated to `CallEvent` values and audio
                   as PCM bytes at the negotiated codec's rate
    errors         the binding's exceptions become bridge/sip/stack.py's (`StackError`,
                   `MediaInactive`, `MediaRestarted`, `DialFailed` and its outcomes, ...)

Facts about the binding this relies on (checked against its source and on this machine):
- `Config(max_concurrent_calls=None)`: the binding's default is 2; baresip holds at most
  255 calls per process in any case;
- loopback needs `net_interface` pinned, and each process its own `sip_listen`/`rtp_ports`;
- received PCM is readable whatever the player, transmit PCM comes from `aumem`; both run
  at the negotiated codec's rate and channel count (Opus: 48 kHz stereo);
- after a re-INVITE the audio streams are replaced: the next read/write raises
  AudioRestarted once, then binds to the new streams;
- a wrong codec spec only logs a warning, so codec names are mapped here, never passed raw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import baresip
from baresip import Account, Config, Event, Runtime, StackEvent, UserAgent

from agent.once import Once

from ..stack import (AccountSpec, AudioFormat, CallEvent, CallEventKind, DialBusy, DialDeclined, DialFailed,
                     DialNoAnswer, MediaInactive, MediaRestarted, RegisterFailed, RtpStats, StackError,
                     TransferRefused)
from ..tls import stack_tls_config

__all__ = ["Stack", "StackAccount", "StackCall", "STACK_CODECS"]

log = logging.getLogger(__name__)

# Operator codec names -> the stack's codec specs (a bare name means 8 kHz to the stack).
STACK_CODECS = {"pcmu": "pcmu", "pcma": "pcma", "g722": "g722/16000/1", "opus": "opus/48000/2"}

# Receive jitter buffer: every millisecond here is heard as delay before the agent can
# answer. Measured on loopback: the stack's default (adaptive, from 100 ms) grew and lost
# audio (echo 160 -> 220 ms with gaps); fixed 20-60 ms gave an 80 ms echo, no gaps.
_JITTER = "audio_jitter_buffer_type fixed\naudio_jitter_buffer_ms 20-60\n"


def _dial_error(exc: "baresip.CallFailed") -> DialFailed:
    if isinstance(exc, baresip.CallBusy):
        return DialBusy(str(exc), exc.status, exc.reason)
    if isinstance(exc, baresip.CallDeclined):
        return DialDeclined(str(exc), exc.status, exc.reason)
    # The caller's own timeout, or 408 Request Timeout / 480 Temporarily Unavailable /
    # 487 (our CANCEL): nobody picked up.
    if isinstance(exc, baresip.CallTimeout) or exc.status in (408, 480, 487):
        return DialNoAnswer(str(exc), exc.status, exc.reason)
    return DialFailed(str(exc), exc.status, exc.reason)


def _rtp_stats(s: "baresip.CallStats") -> RtpStats:
    # jbuf_* are None from a native build without jitter-buffer statistics: 0 here
    return RtpStats(s.rx_packets, s.rx_lost, s.jbuf_late or 0, s.jbuf_lost or 0, s.rx_jitter_ms, s.mos_estimate,
                    s.rtt_ms, s.jbuf_jitter_ms or 0)


# ---- stack -------------------------------------------------------------------------------------


class Stack:
    """One baresip runtime. `start()` unwinds on failure; `close()` is idempotent."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None
        self._closing = Once()

    async def start(self, *, host: str, port: int, rtp_ports: tuple[int, int], max_calls: int,
                    log_level: str = "warning", tls_ca: Path | None = None) -> None:
        """`tls_ca`: what the stack verifies TLS peers against (None: the system's CAs);
        ConfigError naming --sip-tls-ca when it cannot be read (bridge/sip/tls.py)."""
        tls_config = stack_tls_config(tls_ca)
        extra = (f"sip_listen {host}:{port}\n"
                 f"rtp_ports {rtp_ports[0]}-{rtp_ports[1]}\n"
                 f"{_JITTER}{tls_config}")
        config = Config(net_interface=host, max_concurrent_calls=max_calls,
                        expose_headers=("X-Duplexline-Route", "X-Duplexline-Called", "X-Duplexline-Source"),
                        native_log_level=log_level, extra_config_text=extra)
        runtime = Runtime(native_log_level=log_level)
        try:
            await runtime.start(config)
        except baresip.BaresipError as exc:
            raise StackError(f"the SIP stack did not start on {host}:{port}: {exc}") from exc
        self._runtime = runtime

    async def close(self) -> None:
        if self._runtime is None:
            return
        await self._closing.run(self._close)

    async def _close(self) -> None:
        try:
            await self._runtime.close()
        except baresip.BaresipError as exc:
            log.error("SIP stack did not close cleanly: %s", exc)

    async def add_account(self, spec: AccountSpec) -> "StackAccount":
        assert self._runtime is not None, "start() first"
        extra = (("catchall=yes",) if spec.catch_all else ()) + (
            (f"mediaenc={spec.mediaenc}",) if spec.mediaenc else ())
        try:
            account = Account(spec.user, spec.domain, spec.password, registrar=spec.registrar,
                              reg_interval=spec.reg_interval, transport=spec.transport,  # type: ignore[arg-type]
                              audio_codecs=tuple(STACK_CODECS[c] for c in spec.codecs),
                              auth_user=spec.auth_user, extra_params=extra)
            ua = await UserAgent.create(self._runtime, account, transfer_policy="reject")
        except (ValueError, TypeError) as exc:
            raise StackError(f"account {spec.user}@{spec.domain}: {exc}") from None
        except baresip.BaresipError as exc:
            raise StackError(f"account {spec.user}@{spec.domain}: {exc}") from exc
        return StackAccount(self._runtime, ua, spec)


class StackAccount:
    def __init__(self, runtime: Runtime, ua: UserAgent, spec: AccountSpec) -> None:
        self._runtime = runtime
        self._ua = ua
        self.spec = spec

    def on_incoming(self, callback: Callable[["StackCall"], None]) -> None:
        self._ua.on_incoming(lambda call: callback(StackCall(call)))

    def on_registration(self, callback: Callable[[bool, str], None]) -> None:
        """callback(registered, detail) on every REGISTER outcome the stack reports,
        including its own refreshes."""

        def listener(event: StackEvent) -> None:
            if event.event is Event.REGISTER_OK:
                callback(True, event.text or "")
            elif event.event is Event.REGISTER_FAIL:
                callback(False, event.text or "")

        self._ua.on(listener)

    async def register(self, timeout: float = 10.0) -> None:
        try:
            await self._ua.register(timeout=timeout)
        except baresip.RegistrationError as exc:
            raise RegisterFailed(str(exc), exc.status) from None
        except baresip.BaresipError as exc:
            raise RegisterFailed(str(exc)) from None

    async def unregister(self, timeout: float = 5.0) -> None:
        try:
            await self._ua.unregister(timeout=timeout)
        except baresip.BaresipError as exc:
            log.info("unregister %s: %s", self.spec.user, exc)

    async def dial(self, uri: str) -> "StackCall":
        """Raises DialFailed (or a subclass) when the call could not be placed, or when the
        far end refused it before the binding handed us the call object."""
        # The binding builds its Call object only after the dial command completes; a far
        # end that refuses at once (loopback) closes the call in between, and that CLOSED
        # event would reach nobody. So closes are watched from before the dial.
        early: dict[int, str] = {}

        def watch(event: StackEvent) -> None:
            if event.event is Event.CALL_CLOSED:
                early[event.call] = event.text or ""

        self._runtime.subscribe(watch)
        try:
            call = await self._ua.dial(uri)
        except ValueError as exc:
            raise DialFailed(f"cannot dial {uri!r}: {exc}") from None
        except baresip.BaresipError as exc:
            raise DialFailed(f"cannot dial {uri!r}: {exc}") from exc
        finally:
            self._runtime.unsubscribe(watch)
        if call.handle in early:
            failed = baresip.CallFailed.from_close_reason(early[call.handle])
            raise _dial_error(failed)
        return StackCall(call)


class StackCall:
    """One call. Events arrive on the event loop through `on_event`."""

    def __init__(self, call: "baresip.Call") -> None:
        self._call = call
        self._audio = call.audio
        self._listeners: list[Callable[[CallEvent], None]] = []
        self.stats: RtpStats | None = None
        call.on(self._on_stack_event)
        call.on_dtmf(lambda d: self._emit(CallEvent(CallEventKind.DTMF, d.digit)))
        call.on_audio_warning(lambda w: self._emit(CallEvent(CallEventKind.AUDIO_WARNING, w.direction)))

    @property
    def call_id(self) -> str:
        return self._call.call_id or ""

    @property
    def peer(self) -> str:
        return self._call.peer or ""

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self._call.headers.items()}

    def on_event(self, listener: Callable[[CallEvent], None]) -> None:
        self._listeners.append(listener)

    def on_rtcp(self, listener: Callable[[RtpStats], None]) -> None:
        """`listener(stats)` each time the far end's RTCP report arrives (every few seconds;
        an event on the loop: nothing is polled)."""
        self._call.on_rtcp(lambda stats: listener(_rtp_stats(stats)))

    def _emit(self, event: CallEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("SIP call listener failed on %s", event.kind.value)

    def _on_stack_event(self, event: StackEvent) -> None:
        kind = event.event
        if kind is Event.CALL_ESTABLISHED:
            self._emit(CallEvent(CallEventKind.ESTABLISHED))
        elif kind is Event.CALL_CLOSED:
            final = self._call.final_stats
            if final is not None:
                self.stats = _rtp_stats(final)
            self._emit(CallEvent(CallEventKind.CLOSED, event.text or ""))
        elif kind is Event.CALL_HOLD:
            self._emit(CallEvent(CallEventKind.REMOTE_HOLD))
        elif kind is Event.CALL_RESUME:
            self._emit(CallEvent(CallEventKind.REMOTE_RESUME))

    # ---- call control -----------------------------------------------------------------------

    async def answer(self) -> None:
        try:
            await self._call.answer()
        except baresip.BaresipError as exc:
            raise StackError(f"answer failed: {exc}") from exc

    async def reject(self) -> None:
        """486 Busy Here (the only refusal the stack can send; the front sends the rest)."""
        try:
            await self._call.reject()
        except baresip.StaleHandleError:
            pass

    async def hangup(self) -> None:
        try:
            await self._call.hangup()
        except baresip.StaleHandleError:
            pass  # gone already: the far end hung up first
        except baresip.BaresipError as exc:
            raise StackError(f"hangup failed: {exc}") from exc

    async def wait_established(self, timeout: float) -> None:
        try:
            await self._call.wait_established(timeout)
        except baresip.CallFailed as exc:
            raise _dial_error(exc) from None

    async def set_hold(self, on: bool) -> None:
        try:
            await (self._call.hold() if on else self._call.resume())
        except baresip.BaresipError as exc:
            raise StackError(f"{'hold' if on else 'resume'} failed: {exc}") from exc

    async def transfer(self, uri: str, timeout: float = 30.0) -> None:
        try:
            await self._call.transfer(uri, timeout=timeout)
        except ValueError as exc:
            raise TransferRefused(f"bad transfer target {uri!r}: {exc}") from None
        except baresip.TransferFailed as exc:
            raise TransferRefused(str(exc), exc.status) from None
        except baresip.BaresipError as exc:
            raise TransferRefused(str(exc)) from None

    async def send_dtmf(self, digits: str) -> None:
        try:
            await self._call.send_dtmf(digits)
        except ValueError as exc:
            raise StackError(str(exc)) from None
        except baresip.BaresipError as exc:
            raise StackError(f"DTMF failed: {exc}") from exc

    # ---- audio (the media ticker; event loop thread) ------------------------------------------

    def audio_format(self) -> AudioFormat:
        try:
            info = self._audio.info()
        except baresip.AudioNotActive:
            raise MediaInactive("no audio yet") from None
        if not (info.tx_ready and info.rx_ready) or not info.rx_sample_rate:
            raise MediaInactive("audio not ready")
        return AudioFormat(info.rx_sample_rate, info.rx_channels, info.tx_sample_rate, info.tx_channels,
                           info.tx_buffered)

    def read(self, max_bytes: int) -> bytes:
        try:
            return self._audio.read(max_bytes)
        except baresip.AudioRestarted:
            raise MediaRestarted("audio renegotiated") from None
        except baresip.AudioNotActive:
            raise MediaInactive("no audio") from None

    def write(self, pcm) -> int:
        """PCM16 (an int16 array or bytes) at the transmit rate; returns the bytes taken."""
        try:
            return self._audio.write(memoryview(pcm).cast("B"))
        except baresip.AudioRestarted:
            raise MediaRestarted("audio renegotiated") from None
        except baresip.AudioNotActive:
            raise MediaInactive("no audio") from None

