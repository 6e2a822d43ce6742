"""Real SIP peers for the SIP leg's tests: Debian's `baresip` (package baresip-core) run as
a separate process with its own config dir on 127.0.0.1, driven over its ctrl_tcp socket
(netstring JSON: dial, sndcode, hangup, quit; its events tell us when a call is up or
closed). It plays a WAV (`aufile`) and its `sndfile` filter records what it sent (enc)
and what it heard (dec), which the tests compare tone by tone.

Also here: tone-sweep WAVs and tone detection, a raw SIP/UDP client for protocol facts
(404/403/401/503 + Retry-After), a small UDP responder that answers INVITEs as told
(busy, declined, no answer), a digest-auth registrar, and a bridge runner
(`python -m tests.integration.sip_peers bridge ...`) that is `duplexline serve` with the SIP
call-control routes mounted, until the server wires them itself.

Every wait is bounded; processes are killed by PID at teardown.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import wave
from dataclasses import dataclass, field
from typing import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.integration.serve_process import ServeProcess, free_port

__all__ = ["BaresipPeer", "require_baresip", "tone_sweep_wav", "read_wav", "tone_runs", "compare_tones",
           "TONES", "sip_request", "wait_sip_ready", "RawPhone", "Responder", "Registrar", "BridgeProcess", "free_sip_port",
           "metric_value", "eventually", "lag_samples"]

TONES = (400, 700, 1000, 1300, 1600, 1900)  # all inside the telephone band (300-3400 Hz)
TONE_S, GAP_S = 0.4, 0.1
_rtp_block = itertools.count()


def require_baresip() -> str:
    binary = shutil.which("baresip")
    if binary is None:
        pytest.fail("baresip not found: install Debian's baresip-core "
                    "(scripts/system-packages.txt lists it; scripts/setup.sh installs it)")
    return binary


def free_sip_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1, with the next one free for TCP too: SIP listens
    on both, and baresip puts its TLS transport on the port after."""
    for _ in range(50):
        port = free_port(socket.SOCK_DGRAM)
        if port >= 65535 or not all(_tcp_free(p) for p in (port, port + 1)):
            continue
        return port
    raise OSError("no free SIP port")


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def eventually(check, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `check()` until truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(interval)  # polling interval; the check decides


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample from Prometheus text (0 when absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


# ---- audio ---------------------------------------------------------------------------------------


def tone_sweep_wav(path: Path, rate: int, *, lead_s: float = 0.3, tail_s: float = 1.2,
                   tones: tuple[int, ...] = TONES, amplitude: float = 0.3, channels: int = 1) -> Path:
    """baresip 1.0's aufile wants the codec's own rate and channel count (Opus: 48 kHz stereo)."""
    parts = [np.zeros(int(rate * lead_s))]
    for f in tones:
        t = np.arange(int(rate * TONE_S)) / rate
        ramp = np.minimum(1.0, np.minimum(t, TONE_S - t) / 0.01)  # 10 ms fades: no clicks
        parts += [amplitude * ramp * np.sin(2 * np.pi * f * t), np.zeros(int(rate * GAP_S))]
    parts.append(np.zeros(int(rate * tail_s)))
    pcm = (np.concatenate(parts) * 32767).astype(np.int16)
    if channels == 2:
        pcm = np.repeat(pcm, 2)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def silence_wav(path: Path, rate: int, seconds: float) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.zeros(int(rate * seconds), np.int16).tobytes())
    return path


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    if channels == 2:
        x = x[0::2]
    return rate, x


def tone_runs(rate: int, x: np.ndarray, tones: tuple[int, ...] = TONES, win_s: float = 0.01,
              min_run_s: float = 0.1) -> list[tuple[int, float]]:
    """(tone, onset seconds) for each run of one tone lasting at least `min_run_s`, in order.
    A window is a tone when it is loud and its spectral peak is within 60 Hz of one."""
    win = int(rate * win_s)
    n = len(x) // win
    labels: list[int | None] = []
    hann = np.hanning(win)
    freqs = np.fft.rfftfreq(4 * win, 1 / rate)
    for i in range(n):
        seg = x[i * win:(i + 1) * win]
        if np.sqrt(np.mean(seg ** 2)) < 0.02:
            labels.append(None)
            continue
        peak = freqs[np.argmax(np.abs(np.fft.rfft(seg * hann, n=4 * win)))]
        best = min(tones, key=lambda t: abs(t - peak))
        labels.append(best if abs(best - peak) < 60 else None)
    runs: list[tuple[int, float]] = []
    i = 0
    while i < n:
        if labels[i] is None:
            i += 1
            continue
        j = i
        while j < n and labels[j] == labels[i]:
            j += 1
        if (j - i) * win_s >= min_run_s:
            if not runs or runs[-1][0] != labels[i]:
                runs.append((labels[i], i * win_s))
        i = j
    return runs


def lag_samples(reference: np.ndarray, delayed: np.ndarray, max_lag: int) -> int:
    """The lag, in samples, at which `delayed` best matches `reference` (delayed[n] is
    reference[n - lag]), by cross-correlation over |lag| <= max_lag."""
    a, b = reference.astype(np.float64), delayed.astype(np.float64)
    n = min(len(a), len(b)) - 2 * max_lag
    assert n > 0, "signals shorter than the lags searched"
    middle = b[max_lag:max_lag + n]
    scores = [float(np.dot(middle, a[max_lag - lag:max_lag - lag + n])) for lag in range(-max_lag, max_lag + 1)]
    return int(np.argmax(scores)) - max_lag


def compare_tones(sent: list[tuple[int, float]], heard: list[tuple[int, float]]) -> list[float]:
    """Delays (s) of each sent tone as heard; fails unless every tone came back, in order."""
    assert [t for t, _ in sent] == list(TONES), f"the sent recording is not the sweep: {sent}"
    assert [t for t, _ in heard] == [t for t, _ in sent], f"heard {heard}, sent {sent}"
    return [h - s for (_, s), (_, h) in zip(sent, heard)]


# ---- baresip as a peer ---------------------------------------------------------------------------


class _PortTaken(RuntimeError):
    """baresip could not bind a port it was given."""


class BaresipPeer:
    """Debian's baresip with a private config dir. `answer=True`: it answers calls itself."""

    def __init__(self, workdir: Path, *, user: str = "alice", codecs: tuple[str, ...] = ("pcmu",),
                 wav: Path | None = None, password: str | None = None, answer: bool = False,
                 auth_user: str | None = None, transport: str = "udp", mediaenc: str | None = None,
                 certificate: Path | None = None) -> None:
        """`transport` udp, tcp or tls (its TLS listener, on the SIP port + 1, presents
        `certificate`: a PEM with the key); `mediaenc` e.g. srtp-mand (its srtp module)."""
        self.binary = require_baresip()
        self.dir = workdir / f"baresip-{user}-{os.getpid()}-{next(_rtp_block)}"
        self.dir.mkdir(parents=True)
        self.snd = self.dir / "snd"
        self.snd.mkdir()
        self.user = user
        self._wav = wav or silence_wav(self.dir / "silence.wav", 8000, 60)
        self._codecs, self._password, self._answer = codecs, password, answer
        self._auth_user, self._transport = auth_user, transport
        self._mediaenc, self._certificate = mediaenc, certificate
        self._configure()
        (self.dir / "contacts").write_text("")
        self.log_path = self.dir / "baresip.log"
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._events: queue.Queue = queue.Queue()
        self._responses: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._reader: threading.Thread | None = None
        self._token = itertools.count(1)

    def _configure(self) -> None:
        """Pick free ports and write baresip's config and account files."""
        self.sip_port = free_sip_port()
        self.ctrl_port = free_port()
        block = 30000 + (next(_rtp_block) % 90) * 100  # its own RTP ports, clear of the bridge's
        config = [
            "poll_method epoll", f"sip_listen 127.0.0.1:{self.sip_port}", "net_interface 127.0.0.1",
            f"audio_source aufile,{self._wav}", "audio_player alsa,null", "audio_alert aufile,/dev/null",
            f"rtp_ports {block}-{block + 99}", "module_path /usr/lib/baresip/modules",
            "module g711.so", "module g722.so", "module opus.so", "module aufile.so", "module alsa.so",
            "module sndfile.so", f"snd_path {self.snd}", "module_app account.so", "module_app menu.so",
            "module_app ctrl_tcp.so", f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}", "opus_bitrate 32000",
        ]
        if self._mediaenc:
            config.append("module srtp.so")
        if self._certificate is not None:
            config.append(f"sip_certificate {self._certificate}")
        (self.dir / "config").write_text("\n".join(config) + "\n")
        params = ["regint=0", f"answermode={'auto' if self._answer else 'manual'}",
                  "audio_codecs=" + ",".join(self._codecs)]
        if self._password is not None:
            params.append(f"auth_pass={self._password}")
        if self._auth_user is not None:
            params.append(f"auth_user={self._auth_user}")
        if self._mediaenc:
            params.append(f"mediaenc={self._mediaenc}")
        aor = f"sip:{self.user}@127.0.0.1:{self.sip_port}" + (
            f";transport={self._transport}" if self._transport != "udp" else "")
        (self.dir / "accounts").write_text(f"<{aor}>;" + ";".join(params) + "\n")

    @property
    def uri(self) -> str:
        return f"sip:{self.user}@127.0.0.1:{self.sip_port}"

    def start(self, timeout: float = 10.0, attempts: int = 3) -> "BaresipPeer":
        """Start baresip; a port taken between picking and binding (another process got it
        first) means fresh ports and another try."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                self._configure()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> "BaresipPeer":
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([self.binary, "-f", str(self.dir)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                text = self.log()
                if "Address already in use" in text:
                    raise _PortTaken(text)
                raise RuntimeError(f"baresip exited with {self.proc.returncode}: {text}")
            try:
                self._sock = socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=0.5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"baresip ctrl_tcp not up within {timeout} s: {self.log()}")
                time.sleep(0.05)  # polling a starting process
        self._sock.settimeout(None)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def log(self, full: bool = False) -> str:
        """The log's tail (for failure messages), or all of it to search in."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text if full else text[-3000:]

    def _read(self) -> None:
        buf = b""
        sock = self._sock
        assert sock is not None
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while True:
                colon = buf.find(b":")
                if colon < 0 or not buf[:colon].isdigit():
                    break
                n = int(buf[:colon])
                if len(buf) < colon + 1 + n + 1:
                    break
                msg = json.loads(buf[colon + 1:colon + 1 + n])
                buf = buf[colon + 2 + n:]
                (self._events if msg.get("event") else self._responses).put(msg)

    def command(self, command: str, params: str | None = None, timeout: float = 5.0) -> dict:
        token = str(next(self._token))
        body = {"command": command, "token": token}
        if params is not None:
            body["params"] = params
        raw = json.dumps(body).encode()
        assert self._sock is not None
        self._sock.sendall(str(len(raw)).encode() + b":" + raw + b",")
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._responses.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"baresip did not answer {command!r} within {timeout} s") from None
            if msg.get("token") == token:
                return msg

    def wait_event(self, *types: str, timeout: float = 10.0) -> dict:
        """The next event of one of `types` (earlier ones are kept in `self.events`)."""
        deadline = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("type") in types and not ev.get("_seen"):
                ev["_seen"] = True
                return ev
        while True:
            try:
                ev = self._events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {'/'.join(types)} from baresip within {timeout} s; "
                                   f"events: {[e.get('type') for e in self.events]}") from None
            self.events.append(ev)
            if ev.get("type") in types:
                ev["_seen"] = True
                return ev

    def dial(self, uri: str) -> None:
        self.command("dial", uri)

    def send_digits(self, digits: str, gap_s: float = 0.25) -> None:
        """One digit per command: baresip 1.0 overlaps the digits of one `sndcode`."""
        for d in digits:
            self.command("sndcode", d)
            time.sleep(gap_s)  # pacing the keypad like a person, not synchronisation

    def hangup(self) -> None:
        self.command("hangup")

    def recordings(self) -> tuple[Path, Path]:
        """(what it sent, what it heard) for the latest call."""
        enc = sorted(self.snd.glob("*-enc.wav"))
        dec = sorted(self.snd.glob("*-dec.wav"))
        assert enc and dec, f"baresip recorded nothing in {self.snd}: {self.log()}"
        return enc[-1], dec[-1]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None and self._sock is not None:
            try:
                self.command("quit", timeout=2)
            except (OSError, TimeoutError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "BaresipPeer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- raw SIP over UDP ----------------------------------------------------------------------------


@dataclass
class SipReply:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)
    raw: str = ""


def _parse_reply(data: bytes) -> SipReply:
    text = data.decode(errors="replace")
    head = text.split("\r\n\r\n", 1)[0].split("\r\n")
    parts = head[0].split(" ", 2)
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), v.strip())
    return SipReply(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, text)


def sip_request(port: int, *, method: str = "INVITE", user: str = "bot", sock: socket.socket | None = None,
                headers: dict[str, str] | None = None, timeout: float = 3.0, call_id: str | None = None,
                cseq: int = 1, sdp: str | None = None) -> SipReply:
    """Send one request to 127.0.0.1:`port` and return its first final response (ACKing a
    non-2xx INVITE answer, as a client must). `sdp`: an INVITE's offer (default: PCMU, RTP/AVP)."""
    own = sock is None
    if own:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    try:
        lport = sock.getsockname()[1]
        branch = "z9hG4bK" + os.urandom(6).hex()
        call_id = call_id or os.urandom(8).hex()
        tag = os.urandom(4).hex()
        uri = f"sip:{user}@127.0.0.1:{port}"
        lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport",
                 "Max-Forwards: 70", f"From: <sip:tester@127.0.0.1:{lport}>;tag={tag}", f"To: <{uri}>",
                 f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", f"Contact: <sip:tester@127.0.0.1:{lport}>"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if sdp is None:
            sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                   "m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n") if method == "INVITE" else ""
        if sdp:
            lines.append("Content-Type: application/sdp")
        lines.append(f"Content-Length: {len(sdp)}")
        sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + sdp).encode(), ("127.0.0.1", port))
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data, _ = sock.recvfrom(65535)
            except socket.timeout:
                raise TimeoutError(f"no final answer to {method} within {timeout} s") from None
            reply = _parse_reply(data)
            if reply.headers.get("call-id") != call_id or reply.status < 200:
                continue
            if method == "INVITE" and reply.status >= 300:
                ack = [f"ACK {uri} SIP/2.0", f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch={branch};rport",
                       "Max-Forwards: 70", f"From: <sip:tester@127.0.0.1:{lport}>;tag={tag}",
                       f"To: {reply.headers.get('to', '')}", f"Call-ID: {call_id}", f"CSeq: {cseq} ACK",
                       "Content-Length: 0"]
                sock.sendto(("\r\n".join(ack) + "\r\n\r\n").encode(), ("127.0.0.1", port))
            return reply
    finally:
        if own:
            sock.close()


class _UdpAgent:
    """A small SIP user agent on one UDP socket on 127.0.0.1: a reader thread hands each
    datagram to `handle(data, addr)`; the socket is closed and the thread joined on exit."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []  # what handle() raised, for a failing test's message
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(timeout=5)  # the reader stops within its 0.2 s receive timeout
        self.sock.close()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            try:
                self.handle(data, addr)
            except Exception as exc:  # a stray datagram must not kill the reader: keep it for the test
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def handle(self, data: bytes, addr) -> None:
        raise NotImplementedError

    def _send(self, lines: list[str], addr, body: str = "") -> None:
        lines = lines + [f"Content-Length: {len(body)}"]
        self.sock.sendto(("\r\n".join(lines) + "\r\n\r\n" + body).encode(), addr)


class RawPhone(_UdpAgent):
    """A minimal UDP user agent on ONE socket that places many calls: INVITE (SDP pointing
    at the discard port), ACK the 200 to its Contact, BYE later; requests from the far end
    (the stack's re-INVITE, BYE) are answered 200 by a reader thread. For tests that need
    many calls from one source address, as a trunk sends them."""

    _SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 9 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")

    def __init__(self, port: int) -> None:
        super().__init__()
        self.lport, self.port = self.port, port  # our socket's port; the bridge's SIP port
        self.tag = os.urandom(4).hex()
        self._replies: dict[str, queue.Queue] = {}

    def _request(self, method: str, uri: str, call_id: str, cseq: int, to: str) -> list[str]:
        return [f"{method} {uri} SIP/2.0",
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.lport};branch=z9hG4bK{os.urandom(6).hex()};rport",
                "Max-Forwards: 70", f"From: <sip:raw@127.0.0.1:{self.lport}>;tag={self.tag}", f"To: {to}",
                f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", f"Contact: <sip:raw@127.0.0.1:{self.lport}>"]

    def handle(self, data: bytes, addr) -> None:
        text = data.decode(errors="replace")
        first = text.split("\r\n", 1)[0]
        if first.startswith("SIP/2.0 "):
            reply = _parse_reply(data)
            q = self._replies.get(reply.headers.get("call-id", ""))
            if q is not None:
                q.put(reply)
            return
        method = first.split(" ", 1)[0]
        if method == "ACK":
            return
        lines = text.split("\r\n\r\n", 1)[0].split("\r\n")[1:]
        keep = [h for h in lines if h.lower().split(":", 1)[0] in ("via", "from", "to", "call-id", "cseq")]
        body = self._SDP if method == "INVITE" else ""
        extra = [f"Contact: <sip:raw@127.0.0.1:{self.lport}>"] + (
            ["Content-Type: application/sdp"] if body else [])
        self._send(["SIP/2.0 200 OK", *keep, *extra], addr, body)

    def call(self, user: str = "bot", timeout: float = 10.0) -> dict:
        """Returns the dialog ({"status": 200, ...}) or {"status": N} when refused."""
        call_id = os.urandom(8).hex()
        q: queue.Queue = queue.Queue()
        self._replies[call_id] = q
        uri = f"sip:{user}@127.0.0.1:{self.port}"
        self._send(self._request("INVITE", uri, call_id, 1, f"<{uri}>") + ["Content-Type: application/sdp"],
                   ("127.0.0.1", self.port), self._SDP)
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no final answer to the INVITE (reader errors: {self.errors})") from None
            if reply.status < 200 or reply.headers.get("cseq", "").split()[-1:] != ["INVITE"]:
                continue
            if reply.status >= 300:
                return {"status": reply.status}
            contact = reply.headers.get("contact", "").split("<", 1)[-1].split(">", 1)[0]
            host, _, port = contact.split("@", 1)[-1].split(";", 1)[0].partition(":")
            dialog = {"status": 200, "call_id": call_id, "to": reply.headers.get("to", ""), "uri": contact,
                      "dest": (host, int(port or 5060))}
            self._send(self._request("ACK", contact, call_id, 1, dialog["to"]), dialog["dest"])
            return dialog

    def bye(self, dialog: dict) -> None:
        self._send(self._request("BYE", dialog["uri"], dialog["call_id"], 2, dialog["to"]), dialog["dest"])


class NeverAcksPhone(RawPhone):
    """A RawPhone that takes the 200 OK and never sends the ACK: a caller that holds a slot
    without proving its address."""

    def _send(self, lines: list[str], addr, body: str = "") -> None:
        if not lines[0].startswith("ACK "):
            super()._send(lines, addr, body)


def wait_sip_ready(port: int, timeout: float = 30.0, gone: "Callable[[], str | None] | None" = None) -> None:
    """The SIP leg answers OPTIONS once its front door is up. `gone()` says why it never
    will (the process exited: its SIP leg did not start) and ends the wait at once."""
    deadline = time.monotonic() + timeout
    while True:
        why = gone() if gone is not None else None
        if why is not None:
            raise RuntimeError(why)
        try:
            if sip_request(port, method="OPTIONS", timeout=0.5).status == 200:
                return
        except (TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SIP on 127.0.0.1:{port} within {timeout} s")


class Responder(_UdpAgent):
    """A UDP user agent that answers every INVITE with `status` (486 busy, 603 declined),
    or with 180 Ringing forever (`status=None`: nobody picks up; CANCEL gets 200 + 487)."""

    def __init__(self, status: int | None, reason: str = "") -> None:
        self.status = status
        self.reason = reason or {486: "Busy Here", 603: "Decline"}.get(status or 0, "")
        super().__init__()
        self.invites = 0

    @property
    def uri(self) -> str:
        return f"sip:carol@127.0.0.1:{self.port}"

    def _reply(self, req: list[str], status: int, reason: str, addr) -> None:
        keep = [h for h in req[1:] if h.lower().split(":", 1)[0] in ("via", "from", "call-id", "cseq")]
        to = next((h for h in req[1:] if h.lower().startswith("to:")), "To: <sip:carol@127.0.0.1>")
        if ";tag=" not in to:
            to += ";tag=resp1"
        self._send([f"SIP/2.0 {status} {reason}", *keep, to], addr)

    def handle(self, data: bytes, addr) -> None:
        lines = data.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
        method = lines[0].split(" ", 1)[0]
        if method == "INVITE":
            self.invites += 1
            self._reply(lines, 100, "Trying", addr)
            if self.status is None:
                self._reply(lines, 180, "Ringing", addr)
            else:
                self._reply(lines, self.status, self.reason, addr)
        elif method == "CANCEL":
            self._reply(lines, 200, "OK", addr)
            invite = [h.replace("CANCEL", "INVITE") if h.lower().startswith("cseq") else h for h in lines]
            self._reply(invite, 487, "Request Terminated", addr)


class Registrar(_UdpAgent):
    """A registrar that demands digest auth (MD5, qop=auth) for one user and password."""

    def __init__(self, user: str, password: str, realm: str = "test.invalid") -> None:
        self.user, self.password, self.realm = user, password, realm
        super().__init__()
        self.registered: list[str] = []  # Contact of each accepted REGISTER
        self.rejected = 0
        self.challenges = 0

    def handle(self, data: bytes, addr) -> None:
        head = data.decode(errors="replace").split("\r\n\r\n", 1)[0].split("\r\n")
        if not head[0].startswith("REGISTER "):
            return
        headers: dict[str, str] = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
        keep = [line for line in head[1:] if line.lower().split(":", 1)[0] in ("via", "from", "call-id", "cseq", "v", "f", "i")]
        to = next((line for line in head[1:] if line.lower().startswith(("to:", "t:"))), "To: <sip:x@x>")
        to += ";tag=reg1" if ";tag=" not in to else ""
        auth = headers.get("authorization", "")
        if not auth:
            self.challenges += 1
            nonce = os.urandom(8).hex()
            extra = [f'WWW-Authenticate: Digest realm="{self.realm}", nonce="{nonce}", algorithm=MD5, qop="auth"']
            self._send(["SIP/2.0 401 Unauthorized", *keep, to, *extra], addr)
            return
        p = dict(_kv(auth[7:]))
        ha1 = hashlib.md5(f"{self.user}:{self.realm}:{self.password}".encode()).hexdigest()
        ha2 = hashlib.md5(f"REGISTER:{p.get('uri', '')}".encode()).hexdigest()
        want = hashlib.md5(f"{ha1}:{p.get('nonce')}:{p.get('nc')}:{p.get('cnonce')}:{p.get('qop')}:{ha2}"
                           .encode()).hexdigest()
        if p.get("username") == self.user and p.get("response") == want:
            contact = headers.get("contact", headers.get("m", ""))
            self.registered.append(contact)
            self._send(["SIP/2.0 200 OK", *keep, to, f"Contact: {contact};expires=600"], addr)
        else:
            self.rejected += 1
            self._send(["SIP/2.0 403 Forbidden", *keep, to], addr)


def _kv(text: str):
    for part in text.split(","):
        k, _, v = part.strip().partition("=")
        yield k.strip().lower(), v.strip().strip('"')


# ---- the bridge ----------------------------------------------------------------------------------


class BridgeProcess(ServeProcess):
    """`duplexline serve` on free ports, its log in `workdir`; ready once /healthz answers
    and SIP answers OPTIONS; SIGTERM to stop, SIGKILL by PID at teardown."""

    def __init__(self, *args: str, workdir: Path, token: str | None = None,
                 sip_port: int | None = None) -> None:
        sip_port = sip_port or free_sip_port()
        super().__init__(*args, sip_port=sip_port, token=token,
                         log_path=workdir / f"bridge-{sip_port}-{os.getpid()}-{next(_rtp_block)}.log")

    def wait_ready(self, deadline: float) -> None:
        def exited() -> str | None:
            code = self.proc.poll() if self.proc is not None else None
            return None if code is None else f"duplexline serve exited with {code}: {self.log()}"

        wait_sip_ready(self.sip_port, timeout=max(1.0, deadline - time.monotonic()), gone=exited)
