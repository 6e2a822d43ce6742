"""The torture tier's harness: a bridge under test in a private network namespace, the
checks every phase ends with, and the report table.

A phase (`Phase`, a context manager) runs on a fresh `duplexline serve --agent echo`, so a
crash, a leak or a heap corrupted at exit is pinned on that phase and no other:

    start -> one echo call (warm-up) -> baseline snapshot -> THE PHASE (the test's body)
    -> alive? -> settle (bounded poll until fds, RTP ports, SIP TCP connections and live
       calls are back to the baseline) -> RSS within tolerance -> a real call still echoes
    -> SIGTERM: exit 0? (134/SIGABRT = the native heap was corrupted) -> the log since the
       baseline: no "Traceback", at most the phase's line budget, no control characters
       (log injection), no line longer than 4 KB -> one row in the report

Every failure names the phase, and where the test gave them, the seed and case index that
reproduce it (`python -m tests.torture.replay`). Scale: TORTURE_SCALE=short (default, the
normal test run) or full (`make torture`); TORTURE_SEED fixes the seed (short runs use a
fixed one, full runs a fresh one each time; both print it).
"""

from __future__ import annotations

import hashlib
import math
import os
import queue
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.integration.netns import REPO, NetNs, NsServer
from tests.integration.sip_peers import RawPhone, wait_sip_ready

from .probe import LogWatch, Snapshot, snapshot

__all__ = ["Scale", "SCALE", "SEED", "TortureBridge", "EchoPhone", "echo_check", "Phase", "Report", "REPORT",
           "RTP_RANGE", "exit_text", "udp_sources",
           "supported_flags", "mulaw_encode", "mulaw_decode", "rtp_packet", "rtp_payload"]

RTP_RANGE = (30000, 30999)
_FD_TOLERANCE = 8
_TASK_TOLERANCE = 5
_MAX_LOG_LINE = 4096
_SETTLE_S = 40.0  # 64·T1 = 32 s is the longest a SIP transaction may live; then margin


@dataclass(frozen=True)
class Scale:
    name: str
    udp_cases: int
    udp_sources: int  # source addresses the UDP cases come from (127.0.1.1 ...)
    tcp_cases: int
    tcp_idle: int  # idle partial-header TCP connections
    tcp_idle_limit_s: float  # by when the bridge must have closed them
    storm_calls: int
    storm_workers: int
    offers: int  # hostile WebRTC offers over HTTP
    stuck_offers: int  # good offers that never connect
    svcrack_budget_s: float
    rss_tolerance_mb: float  # RSS growth allowed over a phase (after the settle)


_SCALES = {
    "short": Scale("short", udp_cases=600, udp_sources=64, tcp_cases=120, tcp_idle=100, tcp_idle_limit_s=40.0, storm_calls=50,
                   storm_workers=4, offers=40, stuck_offers=6, svcrack_budget_s=30.0, rss_tolerance_mb=48.0),
    "full": Scale("full", udp_cases=10_000, udp_sources=250, tcp_cases=1_000, tcp_idle=2_000, tcp_idle_limit_s=40.0,
                  storm_calls=1_000, storm_workers=8, offers=400, stuck_offers=20, svcrack_budget_s=600.0,
                  rss_tolerance_mb=96.0),
}


def _scale() -> Scale:
    name = os.environ.get("TORTURE_SCALE", "short").strip().lower()
    if name not in _SCALES:
        raise ValueError(f"TORTURE_SCALE={name!r}: expected one of {', '.join(_SCALES)}")
    idle = os.environ.get("TORTURE_TCP_IDLE_S")
    scale = _SCALES[name]
    if idle:
        scale = Scale(**{**scale.__dict__, "tcp_idle_limit_s": float(idle)})
    return scale


# The SIP stack behind the front door (--sip-backend): TORTURE_SIP_BACKEND=pjsua2 runs the
# tier against the second stack.
SIP_BACKEND = os.environ.get("TORTURE_SIP_BACKEND", "baresip").strip() or "baresip"


def _seed(scale: Scale) -> int:
    text = os.environ.get("TORTURE_SEED", "").strip()
    if text:
        return int(text)
    return 20261207 if scale.name == "short" else secrets.randbelow(1 << 31)


SCALE = _scale()
SEED = _seed(SCALE)


_FLAGS: set[str] | None = None


def supported_flags() -> set[str]:
    """The `duplexline serve` flags this checkout has (some phases pass newer ones only
    where they exist, so the tier runs against the code before and after a change)."""
    global _FLAGS
    if _FLAGS is None:
        out = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--help"], capture_output=True,
                             text=True, timeout=60, cwd=REPO).stdout
        _FLAGS = set(re.findall(r"--[a-z][a-z0-9-]+", out))
    return _FLAGS


def udp_sources(scale: Scale) -> tuple[str, ...]:
    """Many callers: a fuzzer from one address would mostly meet the per-source rate limit
    (and test nothing else); from 250, each stays within its burst even at the full count.
    Case N comes from the (N mod count)-th."""
    return tuple(f"127.0.1.{k}" for k in range(1, scale.udp_sources + 1))


def exit_text(code: int | None) -> str:
    """A Popen return code as a shell shows it: -6 -> '134 (SIGABRT)'."""
    if code is None:
        return "running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"{128 - code} ({name})"
    return str(code)


# ---- the report ------------------------------------------------------------------------------------


@dataclass
class Row:
    phase: str
    tried: int = 0
    classes: Counter = field(default_factory=Counter)
    fds: int | None = None
    rss_mb: float | None = None
    rtp: int | None = None
    tcp: int | None = None
    tasks: int | None = None
    drops: int = 0  # datagrams the kernel dropped at the bridge's UDP sockets (SIP, its stack's, RTP)
    log_lines: int = 0
    tracebacks: int = 0
    crashed: str = "no"
    exit: str = "-"
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


class Report:
    """One row per phase; printed as a markdown table at the end of the session."""

    HEADER = ["phase", "tried", "1xx", "2xx", "4xx", "5xx", "3xx/6xx", "no answer", "kernel drops", "Δfds", "ΔRSS MB",
              "ΔRTP ports", "ΔSIP TCP", "Δtasks", "log lines", "tracebacks", "crashed", "SIGTERM exit", "s",
              "result"]

    def __init__(self) -> None:
        self.rows: list[Row] = []

    def markdown(self) -> str:
        def num(v, fmt="{:+d}"):
            return "n/a" if v is None else fmt.format(v)

        cells = [self.HEADER]
        for r in self.rows:
            c = r.classes
            cells.append([r.phase, str(r.tried), str(c["1xx"]), str(c["2xx"]), str(c["4xx"]), str(c["5xx"]),
                          str(c["3xx"] + c["6xx"]), str(c["none"]), str(r.drops), num(r.fds), num(r.rss_mb, "{:+.1f}"),
                          num(r.rtp), num(r.tcp), num(r.tasks), str(r.log_lines), str(r.tracebacks), r.crashed,
                          r.exit, f"{r.seconds:.0f}", "pass" if not r.failures else f"FAIL ({len(r.failures)})"])
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.HEADER))]
        line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        title = f"torture tier: scale {SCALE.name}, seed {SEED}"
        return "\n".join([title, "", line(cells[0]), sep] + [line(r) for r in cells[1:]])

    def failures(self) -> str:
        out = []
        for r in self.rows:
            out += [f"- {r.phase}: {f.splitlines()[0][:240]}" for f in r.failures]
        return "\n".join(out)


REPORT = Report()


# ---- the bridge under test -------------------------------------------------------------------------


class TortureBridge:
    """`duplexline serve --agent echo ARGS` inside `ns`, SIP on 127.0.0.1:`sip_port` there."""

    def __init__(self, ns: NetNs, workdir: Path, name: str, args: tuple[str, ...] = (), *,
                 sip_port: int = 5060, http_port: int = 8080) -> None:
        self.ns = ns
        self.name = name
        self.sip_port = sip_port
        self.http_port = http_port
        self.log_path = workdir / f"bridge-{name}.log"
        self.log = LogWatch(self.log_path)
        self.args = ("--agent", "echo", "--rtp-ports", f"{RTP_RANGE[0]}-{RTP_RANGE[1]}", "--drain-timeout", "10",
                     "--sip-backend", SIP_BACKEND, *args)
        self.server: NsServer | None = None

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.proc.pid

    def start(self, timeout: float = 90.0) -> "TortureBridge":
        self.server = NsServer(self.ns, self.args, self.log_path, http_port=self.http_port, sip_port=self.sip_port)
        self.server.wait_ready(timeout)
        self.ns.call(wait_sip_ready, self.sip_port, 30.0, timeout=40)
        return self

    def http(self, method: str, path: str, body: bytes | dict | None = None, *, headers: dict | None = None,
             timeout: float = 15.0) -> tuple[int, dict, bytes]:
        assert self.server is not None
        return self.server.http(method, path, body, headers=headers, timeout=timeout)

    def metrics(self) -> str:
        try:
            return self.http("GET", "/metrics", timeout=5)[2].decode()
        except OSError:
            return ""

    def live_calls(self) -> list | None:
        try:
            status, _, raw = self.http("GET", "/calls?live=1", timeout=5)
        except OSError:
            return None
        import json

        return json.loads(raw).get("calls", []) if status == 200 else None

    def active_calls(self, metrics: str | None = None) -> int:
        """Calls in progress by the bridge's own gauges (public /metrics, every transport)."""
        text = self.metrics() if metrics is None else metrics
        return int(sum(float(v) for v in re.findall(r"^duplexline_calls_active\{[^}]*\} ([0-9.e+]+)$", text, re.M)))

    def snapshot(self, with_metrics: bool = True) -> Snapshot:
        return snapshot(self.pid, rtp_range=RTP_RANGE, sip_port=self.sip_port,
                        metrics=self.metrics() if with_metrics else None)

    def returncode(self) -> int | None:
        assert self.server is not None
        return self.server.proc.poll()

    def terminate(self, timeout: float = 40.0) -> int | None:
        """SIGTERM; the exit status (None: still running after `timeout`, then killed)."""
        assert self.server is not None
        proc = self.server.proc
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except Exception:
            self.kill()
            return None

    def kill(self) -> None:
        if self.server is not None:
            self.ns.kill(self.server.proc)

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(line[:300] for line in self.log.since(0)[-lines:])


# ---- a real call that must still work ----------------------------------------------------------------


def mulaw_encode(x: np.ndarray) -> bytes:
    """G.711 µ-law (bias 0x84, clip 32635), the standard formula."""
    s = np.clip(x.astype(np.int32), -32635, 32635)
    sign = np.where(s < 0, 0x80, 0)
    mag = np.abs(s) + 0x84
    exp = np.floor(np.log2(mag)).astype(np.int32) - 7
    exp = np.clip(exp, 0, 7)
    mant = (mag >> (exp + 3)) & 0x0F
    return (~(sign | (exp << 4) | mant) & 0xFF).astype(np.uint8).tobytes()


def mulaw_decode(b: bytes) -> np.ndarray:
    u = ~np.frombuffer(b, np.uint8).astype(np.int32) & 0xFF
    sign, exp, mant = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    mag = ((mant << 3) + 0x84) << exp
    return np.where(sign, 0x84 - mag, mag - 0x84).astype(np.float32) / 32768.0


class EchoPhone(RawPhone):
    """`RawPhone` with a real RTP socket in its SDP: it learns the bridge's media address
    from the 200's SDP, sends a 1 kHz tone, and reads what comes back."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.rtp.bind(("127.0.0.1", 0))
        self._SDP = RawPhone._SDP.replace("m=audio 9 ", f"m=audio {self.rtp.getsockname()[1]} ")
        self.media: dict[str, tuple[str, int]] = {}  # call id -> the bridge's RTP address

    def handle(self, data: bytes, addr) -> None:
        if data.startswith(b"SIP/2.0 200") and b"\r\nm=audio " in data:
            text = data.decode(errors="replace")
            call_id = next((line.split(":", 1)[1].strip() for line in text.split("\r\n")
                            if line.lower().startswith(("call-id:", "i:"))), "")
            host = next((line.split()[-1] for line in text.split("\r\n") if line.startswith("c=IN IP4 ")), "127.0.0.1")
            port = next((int(line.split()[1]) for line in text.split("\r\n") if line.startswith("m=audio ")), 0)
            self.media[call_id] = (host, port)
        super().handle(data, addr)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.rtp.close()

    def call_with_auth(self, user: str, password: str, timeout: float = 10.0) -> dict:
        """RawPhone.call, answering a 401 with digest credentials (MD5, qop=auth) once."""
        call_id = os.urandom(8).hex()
        q: queue.Queue = queue.Queue()
        self._replies[call_id] = q
        uri = f"sip:bot@127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        extra: list[str] = []
        for cseq in (1, 2):
            self._send(self._request("INVITE", uri, call_id, cseq, f"<{uri}>") + extra
                       + ["Content-Type: application/sdp"], ("127.0.0.1", self.port), self._SDP)
            while True:
                try:
                    reply = q.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"no final answer to the INVITE (reader errors: {self.errors})") from None
                if reply.status >= 200 and reply.headers.get("cseq", "").split() == [str(cseq), "INVITE"]:
                    break
            if reply.status != 401 or cseq == 2:
                break
            challenge = reply.headers.get("www-authenticate", "")
            p = dict(re.findall(r'(\w+)="?([^",]*)"?', challenge))
            cnonce, nc = os.urandom(4).hex(), "00000001"
            ha1 = hashlib.md5(f"{user}:{p.get('realm', '')}:{password}".encode()).hexdigest()
            ha2 = hashlib.md5(f"INVITE:{uri}".encode()).hexdigest()
            response = hashlib.md5(f"{ha1}:{p.get('nonce', '')}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
            extra = [f'Authorization: Digest username="{user}", realm="{p.get("realm", "")}", '
                     f'nonce="{p.get("nonce", "")}", uri="{uri}", response="{response}", algorithm=MD5, '
                     f'qop=auth, nc={nc}, cnonce="{cnonce}"']
        if reply.status != 200:
            return {"status": reply.status}
        contact = reply.headers.get("contact", "").split("<", 1)[-1].split(">", 1)[0]
        host, _, port = contact.split("@", 1)[-1].split(";", 1)[0].partition(":")
        dialog = {"status": 200, "call_id": call_id, "to": reply.headers.get("to", ""), "uri": contact,
                  "dest": (host, int(port or 5060))}
        self._send(self._request("ACK", contact, call_id, 2, dialog["to"]), dialog["dest"])
        return dialog


def echo_check(ns: NetNs, sip_port: int, tone_s: float = 0.6, auth: tuple[str, str] | None = None) -> str | None:
    """None when a call to the bridge is answered and echoes a 1 kHz tone; else what went
    wrong. `auth`: (user, password) for a bridge with --sip-auth."""
    phone = ns.call(EchoPhone, sip_port)
    with phone:
        try:
            dialog = phone.call_with_auth(*auth) if auth else phone.call(timeout=10)
        except TimeoutError as exc:
            return f"the INVITE got no final answer: {exc}"
        if dialog["status"] != 200:
            return f"the INVITE was answered {dialog['status']}"
        try:
            dest = phone.media.get(dialog["call_id"])
            if not dest or not dest[1] or not dest[0].startswith("127."):
                return f"the 200 carried no usable SDP (media {dest})"
            return _tone_round_trip(phone.rtp, dest, tone_s)
        finally:
            phone.bye(dialog)


def rtp_packet(seq: int, ssrc: int, payload: bytes, samples: int = 160) -> bytes:
    """A PCMU (payload type 0) RTP packet, `samples` per packet."""
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, (seq * samples) & 0xFFFFFFFF, ssrc) + payload


def rtp_payload(data: bytes) -> bytes:
    """The payload of a PCMU RTP packet (CSRCs and a header extension skipped); b"" otherwise."""
    if len(data) <= 12 or data[1] & 0x7F != 0:
        return b""
    skip = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= skip + 4:
        skip += 4 + 4 * struct.unpack("!H", data[skip + 2:skip + 4])[0]
    return data[skip:]


def _tone_round_trip(sock: socket.socket, dest: tuple[str, int], tone_s: float) -> str | None:
    rate, frame = 8000, 160
    n = int(tone_s * rate / frame)
    t = np.arange(n * frame) / rate
    tone = mulaw_encode(0.3 * 32767 * np.sin(2 * math.pi * 1000 * t))
    ssrc, heard = secrets.randbits(32), bytearray()
    sock.setblocking(False)
    start = time.monotonic()
    end = start + tone_s + 0.6  # the echo's delay is well under that (~100 ms on loopback)
    sent = 0
    while time.monotonic() < end:
        due = start + sent * 0.02
        if sent < n and time.monotonic() >= due:
            sock.sendto(rtp_packet(sent, ssrc, tone[sent * frame:(sent + 1) * frame]), dest)
            sent += 1
        try:
            while True:
                heard += rtp_payload(sock.recv(2048))
        except BlockingIOError:
            pass
        time.sleep(0.005)  # the 20 ms media clock's tick, not synchronisation
    if len(heard) < rate * 0.2:
        return f"only {len(heard)} samples of PCMU came back ({sent} packets sent)"
    x = mulaw_decode(bytes(heard))
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    band = spectrum[(freqs > 950) & (freqs < 1050)].max()
    if np.sqrt(np.mean(x ** 2)) < 0.02 or band < 0.2 * spectrum.max():
        return f"what came back is not the 1 kHz tone (rms {np.sqrt(np.mean(x ** 2)):.3f})"
    return None


# ---- phases ------------------------------------------------------------------------------------------


class Phase:
    """One phase on a fresh bridge (see the module docstring). The test's body sets `tried`,
    `classes`, calls `fail()` for its own findings and `sample()` now and then; on exit
    the common checks run, a row goes to the report, and the test fails with every
    finding, each naming the phase."""

    def __init__(self, name: str, ns: NetNs, workdir: Path, *, args: tuple[str, ...] = (),
                 log_budget: int = 200, settle_s: float = _SETTLE_S, sip_port: int = 5060,
                 http_port: int = 8080, replay: str = "", auth: tuple[str, str] | None = None,
                 bisect: Callable[[], str] | None = None) -> None:
        self.name = name
        self.ns = ns
        self.bridge = TortureBridge(ns, workdir, name, args, sip_port=sip_port, http_port=http_port)
        self.log_budget = log_budget
        self.settle_s = settle_s
        self.replay = replay  # how to replay this phase's cases, for the failure message
        self.auth = auth  # (user, password) the echo calls authenticate with
        # finds the case after which SIGTERM fails (full runs, or TORTURE_BISECT=1)
        self.bisect = bisect
        self.log_hint = ""  # where the first traceback came from, when the test could tell
        self.row = Row(name)
        self.base: Snapshot | None = None
        self.peak_rss_kb = 0
        self.peak_fds = 0
        self._mark = 0
        self._t0 = 0.0

    @property
    def tried(self) -> int:
        return self.row.tried

    @tried.setter
    def tried(self, n: int) -> None:
        self.row.tried = n

    @property
    def classes(self) -> Counter:
        return self.row.classes

    def fail(self, message: str) -> None:
        self.row.failures.append(message)

    def sample(self) -> Snapshot:
        snap = self.bridge.snapshot(with_metrics=False)
        self.peak_rss_kb = max(self.peak_rss_kb, snap.rss_kb)
        self.peak_fds = max(self.peak_fds, snap.fds)
        return snap

    def alive(self) -> bool:
        return self.bridge.returncode() is None

    def __enter__(self) -> "Phase":
        self._t0 = time.monotonic()
        try:
            self.bridge.start()
            problem = echo_check(self.ns, self.bridge.sip_port, auth=self.auth)
            if problem:
                pytest.fail(f"{self.name}: before the phase, a plain echo call failed ({problem}): the "
                            f"harness or the bridge is broken before any torture.\n{self.bridge.log_tail()}")
            quiet = self._wait_quiet(None, 15.0)
            self.base = quiet
            self._mark = self.bridge.log.mark()
        except BaseException:
            self.bridge.kill()
            raise
        return self

    def _settled(self, snap: Snapshot, base: Snapshot | None) -> list[str]:
        """What is still above the baseline (nothing: settled)."""
        live = self.bridge.live_calls() or []
        active = self.bridge.active_calls()
        out = []
        if live or active:
            named = ", ".join(str(c.get("call_id", "?"))[:40] for c in live[:3]) or "ids not listed"
            out.append(f"{max(len(live), active)} calls still live ({named})")
        if base is None:
            return out if snap.rtp_ports == 0 else out + [f"{snap.rtp_ports} RTP ports open"]
        if snap.fds > base.fds + _FD_TOLERANCE:
            out.append(f"fds {base.fds} -> {snap.fds}")
        if snap.rtp_ports > base.rtp_ports:
            out.append(f"RTP ports {base.rtp_ports} -> {snap.rtp_ports}")
        if snap.tcp_sip > base.tcp_sip:
            out.append(f"SIP TCP connections {base.tcp_sip} -> {snap.tcp_sip}")
        if snap.tasks is not None and base.tasks is not None and snap.tasks > base.tasks + _TASK_TOLERANCE:
            out.append(f"asyncio tasks {base.tasks} -> {snap.tasks}")
        return out

    def _wait_quiet(self, base: Snapshot | None, timeout: float) -> Snapshot:
        """Poll (bounded) until nothing is above `base`; the last snapshot either way."""
        deadline = time.monotonic() + timeout
        while True:
            snap = self.bridge.snapshot()
            if not snap.alive or not self._settled(snap, base) or time.monotonic() > deadline:
                return snap
            time.sleep(0.25)  # polling interval; the snapshot decides

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._finish()
        finally:
            self.bridge.kill()
            self.row.seconds = time.monotonic() - self._t0
            REPORT.rows.append(self.row)
        if exc_type is None and self.row.failures:
            where = f"\nreplay: {self.replay}" if self.replay else ""
            pytest.fail(f"torture phase {self.name!r} (scale {SCALE.name}, seed {SEED}) failed "
                        f"{len(self.row.failures)} check(s):\n- " + "\n- ".join(self.row.failures) + where,
                        pytrace=False)

    def _finish(self) -> None:
        assert self.base is not None
        base, row = self.base, self.row
        if not self.alive():
            code = self.bridge.returncode()
            row.crashed = f"died: {exit_text(code)}"
            self.fail(f"the bridge died during the phase (exit {exit_text(code)}); its log ends:\n"
                      f"{self.bridge.log_tail()}")
        else:
            snap = self._wait_quiet(base, self.settle_s)
            left = self._settled(snap, base) if snap.alive else []
            if left:
                try:
                    leg = self.bridge.http("GET", "/sip", timeout=5)[2].decode()[:200]
                except OSError:
                    leg = "?"
                self.fail(f"not back to the baseline {self.settle_s:.0f} s after the phase: {'; '.join(left)} "
                          f"(baseline: {base.describe()}; GET /sip: {leg})")
            row.fds, row.rtp, row.tcp = snap.fds - base.fds, snap.rtp_ports - base.rtp_ports, snap.tcp_sip - base.tcp_sip
            row.drops = snap.udp_drops - base.udp_drops
            row.rss_mb = (snap.rss_kb - base.rss_kb) / 1024
            if snap.tasks is not None and base.tasks is not None:
                row.tasks = snap.tasks - base.tasks
            if row.rss_mb > SCALE.rss_tolerance_mb:
                self.fail(f"RSS grew {row.rss_mb:.1f} MB over the phase (tolerance {SCALE.rss_tolerance_mb:.0f} MB; "
                          f"peak {self.peak_rss_kb / 1024:.0f} MB, baseline {base.rss_kb / 1024:.0f} MB)")
            problem = echo_check(self.ns, self.bridge.sip_port, auth=self.auth) if self.alive() else "the bridge is gone"
            if problem:
                self.fail(f"after the phase a real call does not work: {problem}")
            code = self.bridge.terminate()
            row.exit = exit_text(code)
            if code != 0:
                if code is not None and code < 0:
                    row.crashed = f"at exit: {exit_text(code)}"
                hint = " (SIGABRT at exit: the native heap was corrupted during the phase)" if code == -6 else ""
                if self.bisect is not None:
                    if SCALE.name == "full" or os.environ.get("TORTURE_BISECT"):
                        hint += "; " + self.bisect()
                    else:
                        hint += "; TORTURE_BISECT=1 finds the case that does it (a fresh bridge per probe)"
                self.fail(f"SIGTERM: exit {exit_text(code)} instead of 0{hint}; the log ends:\n"
                          f"{self.bridge.log_tail(8)}")
        self._check_log()

    def _check_log(self) -> None:
        lines = self.bridge.log.since(self._mark)
        row = self.row
        row.log_lines = len(lines)
        tracebacks = LogWatch.tracebacks(lines)
        row.tracebacks = len(tracebacks)
        if tracebacks:
            hint = f" (it followed {self.log_hint})" if self.log_hint else ""
            self.fail(f"{len(tracebacks)} tracebacks in the log; the first{hint}:\n"
                      f"{LogWatch.excerpt(lines, tracebacks[0])}")
        if len(lines) > self.log_budget:
            top = Counter(_log_shape(line) for line in lines).most_common(3)
            self.fail(f"{len(lines)} log lines over the phase (budget {self.log_budget}); the most frequent: "
                      + "; ".join(f"{n}x {shape!r}" for shape, n in top))
        long, control = LogWatch.bad_lines(lines, _MAX_LOG_LINE)
        if long:
            self.fail(f"{len(long)} log lines over {_MAX_LOG_LINE} characters (a caller's bytes copied into the "
                      f"log); the first starts {lines[long[0]][:160]!r}")
        if control:
            self.fail(f"{len(control)} log lines carry control characters (log injection); the first: "
                      f"{lines[control[0]][:160]!r}")


def _log_shape(line: str) -> str:
    """A log line without its timestamp and numbers, to group repeats."""
    text = line.split(" ", 2)[-1] if line[:4].isdigit() else line
    return "".join("#" if ch.isdigit() else ch for ch in text)[:100]
