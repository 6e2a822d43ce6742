"""Measure what the pjsua2-python wheel really allows (issue #15 groundwork).

Standalone: run it with a venv that has the wheel, never with the project's venv, and it
imports nothing from the project:

    python3.11 -m venv /tmp/pj && /tmp/pj/bin/pip install pjsua2-python==2.15.1.post1 numpy
    /tmp/pj/bin/python bench/pjsua2_probe.py            # everything, prints one table
    /tmp/pj/bin/python bench/pjsua2_probe.py --calls 40 --hold 5

What it does, loopback only (127.0.0.1, ephemeral SIP ports):

1. build facts: pjproject version, the OpenSSL the wheel links, pj_dump_config()'s
   compile-time values, codecs (codecEnum2), transports (UDP/TCP/TLS), SRTP;
2. maxCalls ceiling: libCreate/libInit with maxCalls 32, 64, 128, 256, 512, each in its
   own process (a failed pj assertion aborts the process);
3. calls: an answering endpoint in a child process, a dialling endpoint here, both with
   the highest accepted maxCalls and a bridge as big as allowed; each call's audio goes
   through an AudioMediaPort (onFrameRequested sends a tone, onFrameReceived counts frames)
   connected through the conference bridge; calls are dialled in batches until one fails,
   then held for --hold seconds and the frames each call received are counted.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time

import pjsua2 as pj

ROWS: list[tuple[str, str, str]] = []
CLOCK = 16000          # bridge clock and port rate: the project wants 16 kHz frames
PTIME_US = 20000
FRAME_BYTES = CLOCK // 50 * 2


def row(setting: str, value, what: str) -> None:
    ROWS.append((setting, str(value), what))


def err_text(e) -> str:
    try:
        return f"{e.info()}".strip().replace("\n", " ")
    except Exception:  # noqa: BLE001
        return repr(e)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- endpoint helpers

def make_endpoint(max_calls: int, max_ports: int, med_threads: int = 1, log_level: int = 0):
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = log_level
    cfg.logConfig.consoleLevel = log_level
    cfg.uaConfig.maxCalls = max_calls
    cfg.uaConfig.threadCnt = 0            # SIP events only in libHandleEvents (our thread)
    cfg.uaConfig.mainThreadOnly = False
    cfg.medConfig.threadCnt = med_threads
    cfg.medConfig.maxMediaPorts = max_ports
    cfg.medConfig.clockRate = CLOCK
    cfg.medConfig.sndClockRate = CLOCK
    cfg.medConfig.noVad = True
    cfg.medConfig.ecTailLen = 0
    ep.libInit(cfg)
    ep.libStart()
    ep.audDevManager().setNullDev()
    return ep, cfg


def udp_transport(ep) -> int:
    tc = pj.TransportConfig()
    tc.boundAddress = "127.0.0.1"
    tc.publicAddress = "127.0.0.1"
    tc.port = 0
    tid = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
    return ep.transportGetInfo(tid).localName  # "127.0.0.1:PORT"


def account(ep, user: str, host: str, rtp_base: int, srtp: int | None = None):
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{host}"
    acfg.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
    acfg.mediaConfig.transportConfig.publicAddress = "127.0.0.1"
    acfg.mediaConfig.transportConfig.port = rtp_base
    acfg.mediaConfig.transportConfig.portRange = 4000
    if srtp is not None:
        acfg.mediaConfig.srtpUse = srtp
        acfg.mediaConfig.srtpSecureSignaling = 0
    return acfg


TONE = b"".join(
    struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / CLOCK)))
    for i in range(CLOCK // 50)
)


class Port(pj.AudioMediaPort):
    """One call's PCM: a tone out, frames in counted (no per-frame copy to Python bytes)."""

    def __init__(self):
        super().__init__()
        self.rx = 0
        self.tx = 0
        self.tone = pj.ByteVector(TONE)

    def onFrameRequested(self, frame):
        frame.type = pj.PJMEDIA_FRAME_TYPE_AUDIO
        frame.buf = self.tone
        frame.size = len(TONE)
        self.tx += 1

    def onFrameReceived(self, frame):
        if frame.type == pj.PJMEDIA_FRAME_TYPE_AUDIO and frame.size:
            self.rx += 1


class Call(pj.Call):
    def __init__(self, acc, owner, call_id=pj.PJSUA_INVALID_ID):
        super().__init__(acc, call_id)
        self.owner = owner
        self.port: Port | None = None
        self.state = "new"
        self.last_code = 0
        self.srtp = None

    def onCallState(self, prm):
        ci = self.getInfo()
        self.state = ci.stateText
        self.last_code = ci.lastStatusCode
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            self.owner.ended.append((ci.lastStatusCode, ci.lastReason))

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                if self.port is not None:
                    return
                am = self.getAudioMedia(i)
                fmt = pj.MediaFormatAudio()
                fmt.init(pj.PJMEDIA_FORMAT_PCM, CLOCK, 1, PTIME_US, 16)
                port = Port()
                try:
                    port.createPort(f"c{ci.id}", fmt)
                    am.startTransmit(port)
                    port.startTransmit(am)
                except pj.Error as e:
                    self.owner.media_errors.append(err_text(e))
                    return
                self.port = port
                try:
                    si = self.getStreamInfo(i)
                    self.srtp = si.codecName
                except pj.Error:
                    pass
                try:
                    tr = self.getMedTransportInfo(i)
                    self.srtp = f"{self.srtp} via {tr.localRtpName}"
                except pj.Error:
                    pass


class Acc(pj.Account):
    def __init__(self, answer: bool):
        super().__init__()
        self.answer = answer
        self.calls: list[Call] = []
        self.ended: list = []
        self.media_errors: list[str] = []
        self.incoming = 0
        self.answer_errors: list[str] = []

    def onIncomingCall(self, prm):
        self.incoming += 1
        c = Call(self, self, prm.callId)
        self.calls.append(c)
        op = pj.CallOpParam()
        op.statusCode = 200
        try:
            c.answer(op)
        except pj.Error as e:
            self.answer_errors.append(err_text(e))


# ---------------------------------------------------------------- 1. build facts

def build_facts() -> None:
    ep, cfg = make_endpoint(4, 254, log_level=0)
    row("pjproject", ep.libVersion().full, "Endpoint.libVersion()")
    d = pj.EpConfig()
    row("default uaConfig.maxCalls", d.uaConfig.maxCalls, "EpConfig() default")
    row("default uaConfig.threadCnt", d.uaConfig.threadCnt, "EpConfig() default (SIP worker threads)")
    row("default medConfig.threadCnt", d.medConfig.threadCnt, "EpConfig() default (media ioqueue threads)")
    row("default medConfig.maxMediaPorts", d.medConfig.maxMediaPorts, "EpConfig() default (conference bridge ports)")
    row("default medConfig.clockRate", d.medConfig.clockRate, "EpConfig() default (bridge clock, Hz)")

    so = glob.glob(os.path.join(os.path.dirname(pj.__file__), "_pjsua2*.so"))[0]
    lib = ctypes.CDLL(so)
    lib.pj_ioqueue_name.restype = ctypes.c_char_p
    row("ioqueue", lib.pj_ioqueue_name().decode(), "pj_ioqueue_name()")
    # pj_dump_config() logs compile-time values through pj_log at level 3
    dump = dump_config(so)
    for key in ("PJ_IOQUEUE_MAX_HANDLES", "PJ_HAS_SSL_SOCK", "PJ_SSL_SOCK_IMP", "PJ_MAX_SOCKOPT_PARAMS",
                "PJ_DEBUG", "PJ_HAS_IPV6", "PJ_CC_NAME/VER_"):
        if key in dump:
            row(key, dump[key], "pj_dump_config()")

    libcrypto = glob.glob(os.path.join(os.path.dirname(pj.__file__), "..", "pjsua2_python.libs", "libcrypto*"))
    if libcrypto:
        c = ctypes.CDLL(libcrypto[0])
        c.SSLeay_version.restype = ctypes.c_char_p
        row("OpenSSL", c.SSLeay_version(0).decode(), os.path.basename(libcrypto[0]) + " (bundled, SSLeay_version)")
    out = subprocess.run(["ldd", so], capture_output=True, text=True).stdout
    ssl = [ln.split("=>")[0].strip() for ln in out.splitlines() if "ssl" in ln or "crypto" in ln]
    row("ldd libssl/libcrypto", " ".join(ssl), "ldd _pjsua2.so")

    codecs = [f"{c.codecId}:{c.priority}" for c in ep.codecEnum2()]
    row("codecs (id:priority)", " ".join(codecs), "codecEnum2()")
    ids = " ".join(codecs).lower()
    for name in ("opus", "g722", "speex", "ilbc", "gsm", "g7221", "amr", "l16"):
        row(f"codec {name}", "yes" if name + "/" in ids else "no", "in codecEnum2()")

    for name, kind in (("UDP", pj.PJSIP_TRANSPORT_UDP), ("TCP", pj.PJSIP_TRANSPORT_TCP),
                       ("TLS", pj.PJSIP_TRANSPORT_TLS), ("UDP6", pj.PJSIP_TRANSPORT_UDP6)):
        tc = pj.TransportConfig()
        tc.boundAddress = "::1" if name == "UDP6" else "127.0.0.1"
        tc.port = 0
        try:
            tid = ep.transportCreate(kind, tc)
            row(f"transport {name}", "yes", f"transportCreate ok: {ep.transportGetInfo(tid).localName}")
        except pj.Error as e:
            row(f"transport {name}", "no", err_text(e)[:160])
    ep.libDestroy()
    del ep


def dump_config(so: str) -> dict[str, str]:
    code = (
        "import ctypes,pjsua2 as pj\n"
        "ep=pj.Endpoint();ep.libCreate();c=pj.EpConfig();c.logConfig.level=3;c.logConfig.consoleLevel=3\n"
        "c.logConfig.decor=0\n"
        f"ep.libInit(c);ctypes.CDLL({so!r}).pj_dump_config();ep.libDestroy()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    import re
    found = re.findall(r"(PJ_[A-Z0-9_]+)\s*:\s*(\S+)", out.stdout + out.stderr)
    return {k: v.removesuffix("Dumping") for k, v in found}


def srtp_check(log: bool = False) -> None:
    """One loopback call, both sides SRTP mandatory: does the wheel speak SRTP?"""
    ep, _ = make_endpoint(8, 64)
    host = udp_transport(ep)
    a = Acc(answer=False)
    a.create(account(ep, "a", host, 42000, srtp=pj.PJMEDIA_SRTP_MANDATORY))
    b = Acc(answer=True)
    b.create(account(ep, "b", host, 43000, srtp=pj.PJMEDIA_SRTP_MANDATORY))
    c = Call(a, a)
    try:
        c.makeCall(f"sip:b@{host}", pj.CallOpParam(True))
    except pj.Error as e:
        row("SRTP (mandatory, SDES)", "no", err_text(e)[:160])
        return
    t0 = time.time()
    while time.time() - t0 < 3 and not (c.port and c.port.rx > 20):
        ep.libHandleEvents(10)
    ok = bool(c.port and c.port.rx > 20)
    try:
        srtp_lines = [ln.strip() for ln in c.dump(True, "").splitlines() if "SRTP" in ln or "crypto" in ln.lower()]
    except pj.Error:
        srtp_lines = []
    suites = []
    try:
        so = glob.glob(os.path.join(os.path.dirname(pj.__file__), "_pjsua2*.so"))[0]
        suites = [s for s in ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "AEAD_AES_256_GCM",
                              "AEAD_AES_128_GCM", "AES_256_CM_HMAC_SHA1_80")
                  if s.encode() in open(so, "rb").read()]
    except OSError:
        pass
    row("SRTP (mandatory, SDES)", "yes" if ok else "no",
        f"loopback call {c.state}, {c.port.rx if c.port else 0} frames; call dump: {' '.join(srtp_lines)[:120]}; "
        f"suites in .so: {' '.join(suites)}")
    ep.hangupAllCalls()
    for _ in range(50):
        ep.libHandleEvents(10)
    a.calls.clear(); b.calls.clear()
    del c
    ep.libDestroy()


# ---------------------------------------------------------------- 2. maxCalls ceiling

def try_init(max_calls: int, max_ports: int) -> None:
    """Child: report whether libCreate/libInit accept these values."""
    try:
        ep, cfg = make_endpoint(max_calls, max_ports)
        lib = ctypes.CDLL(glob.glob(os.path.join(os.path.dirname(pj.__file__), "_pjsua2*.so"))[0])
        print(json.dumps({"ok": True, "calls": lib.pjsua_call_get_max_count(),
                          "ports": lib.pjsua_conf_get_max_ports()}), flush=True)
        ep.libDestroy()
    except pj.Error as e:
        print(json.dumps({"ok": False, "err": err_text(e)}), flush=True)


def ceiling(values, flag: str, max_other: int) -> int:
    best = 0
    for v in values:
        args = ["--max-calls", str(v), "--max-ports", str(max_other)] if flag == "calls" else \
               ["--max-calls", str(max_other), "--max-ports", str(v)]
        p = subprocess.run([sys.executable, __file__, "--role", "init", *args],
                           capture_output=True, text=True, timeout=60)
        res = None
        for ln in p.stdout.splitlines():
            if ln.startswith("{"):
                res = json.loads(ln)
        name = "uaConfig.maxCalls" if flag == "calls" else "medConfig.maxMediaPorts"
        if res and res["ok"]:
            eff = res["calls"] if flag == "calls" else res["ports"]
            row(name, v, f"libInit accepted; in effect: {eff} "
                f"({'pjsua_call_get_max_count' if flag == 'calls' else 'pjsua_conf_get_max_ports'}())")
            best = max(best, eff)
        elif res:
            row(name, v, "libInit refused: " + res["err"][:200])
        else:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1][:200]
            row(name, v, f"process died rc={p.returncode}: {tail}")
    return best


# ---------------------------------------------------------------- 3. calls

def answerer(max_calls: int, max_ports: int, med_threads: int) -> None:
    """Child: answer every call, report counts once a second on stdout (JSON lines)."""
    ep, _ = make_endpoint(max_calls, max_ports, med_threads)
    host = udp_transport(ep)
    acc = Acc(answer=True)
    acc.create(account(ep, "b", host, 30000))
    print(json.dumps({"host": host}), flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    last = 0.0
    while not stop.is_set():
        ep.libHandleEvents(10)
        now = time.time()
        if now - last >= 0.5:
            last = now
            live = [c for c in acc.calls if c.port is not None and c.state == "CONFIRMED"]
            print(json.dumps({
                "t": now, "incoming": acc.incoming, "confirmed": sum(c.state == "CONFIRMED" for c in acc.calls),
                "media": len(live), "rx": [c.port.rx for c in live], "ended": acc.ended[-3:],
                "n_ended": len(acc.ended), "media_errors": acc.media_errors[-3:],
                "n_media_errors": len(acc.media_errors), "answer_errors": acc.answer_errors[-3:],
                "ports": ep.mediaActivePorts() if hasattr(ep, "mediaActivePorts") else -1,
            }), flush=True)
    ep.hangupAllCalls()
    for _ in range(100):
        ep.libHandleEvents(10)
    acc.calls.clear()
    ep.libDestroy()


def dial(max_calls: int, max_ports: int, med_threads: int, target: int, batch: int, hold: float) -> dict:
    child = subprocess.Popen(
        [sys.executable, __file__, "--role", "answer", "--max-calls", str(max_calls),
         "--max-ports", str(max_ports), "--med-threads", str(med_threads)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status: dict = {}
    host = None
    for ln in child.stdout:          # pjlib logs a few lines to stdout before libInit
        if ln.startswith('{"host"'):
            host = json.loads(ln)["host"]
            break
    if host is None:
        raise SystemExit("answerer died: " + child.stderr.read()[-500:])

    def reader():
        for ln in child.stdout:
            if ln.startswith("{"):
                status.update(json.loads(ln))
    threading.Thread(target=reader, daemon=True).start()

    ep, _ = make_endpoint(max_calls, max_ports, med_threads)
    me = udp_transport(ep)
    acc = Acc(answer=False)
    acc.create(account(ep, "a", me, 50000))
    dial_errors: list[str] = []
    calls: list[Call] = []

    def pump(sec):
        t = time.time() + sec
        while time.time() < t:
            ep.libHandleEvents(10)

    while len(calls) < target and not dial_errors:
        for _ in range(min(batch, target - len(calls))):
            c = Call(acc, acc)
            try:
                c.makeCall(f"sip:b@{host}", pj.CallOpParam(True))
                calls.append(c)
            except pj.Error as e:
                dial_errors.append(f"call {len(calls) + 1}: {err_text(e)}")
                break
        pump(1.0)
        if acc.ended:                      # the far end refused something: stop dialling
            pump(1.0)
            break
    pump(2.0)
    c0 = cpu_seconds(os.getpid()); s0 = cpu_seconds(child.pid)
    rx0 = {id(c): c.port.rx for c in calls if c.port}
    srx0, st0 = list(status.get("rx", [])), status.get("t", 0)
    t0 = time.time()
    pump(hold)
    wall = time.time() - t0
    cpu_me = (cpu_seconds(os.getpid()) - c0) / wall
    cpu_srv = (cpu_seconds(child.pid) - s0) / wall
    rates = [(c.port.rx - rx0.get(id(c), 0)) / (wall * 50) for c in calls if c.port and c.state == "CONFIRMED"]
    pump(0.6)
    srx1, st1 = list(status.get("rx", [])), status.get("t", 1)
    srates = [(b - a) / ((st1 - st0) * 50) for a, b in zip(srx0, srx1)]
    res = {
        "dialled": len(calls), "confirmed": sum(c.state == "CONFIRMED" for c in calls),
        "with_port": sum(c.port is not None for c in calls),
        "dial_errors": dial_errors, "ended": acc.ended[:3], "n_ended": len(acc.ended),
        "media_errors": acc.media_errors[:3], "n_media_errors": len(acc.media_errors),
        "server": {k: status.get(k) for k in ("incoming", "confirmed", "media", "n_ended", "ended",
                                             "n_media_errors", "media_errors", "answer_errors")},
        "client_rx_min": min(rates, default=0), "client_rx_mean": sum(rates) / len(rates) if rates else 0,
        "server_rx_min": min(srates, default=0), "server_rx_mean": sum(srates) / len(srates) if srates else 0,
        "cpu_client": cpu_me, "cpu_server": cpu_srv,
    }
    ep.hangupAllCalls()
    pump(1.5)
    calls.clear(); acc.calls.clear()
    try:
        child.stdin.close()
        child.wait(10)
    except Exception:  # noqa: BLE001
        child.kill()
    res["server_stderr"] = (child.stderr.read() or "").strip().splitlines()[-3:]
    ep.libDestroy()
    return res


def report_calls(label: str, r: dict, max_calls: int, max_ports: int, med_threads: int) -> None:
    srv = r["server"]
    what = (f"dialled {r['dialled']}, client confirmed {r['confirmed']} (with port {r['with_port']}), "
            f"server answered {srv['confirmed']} of {srv['incoming']} incoming, server ports {srv['media']}; "
            f"frames rx min/mean client {r['client_rx_min']:.2f}/{r['client_rx_mean']:.2f}, "
            f"server {r['server_rx_min']:.2f}/{r['server_rx_mean']:.2f}; "
            f"CPU client {r['cpu_client']:.2f} server {r['cpu_server']:.2f} cores")
    fails = []
    if r["dial_errors"]:
        fails.append("dial: " + r["dial_errors"][0][:200])
    if r["n_ended"]:
        fails.append(f"{r['n_ended']} ended, first {r['ended'][:1]}")
    if r["n_media_errors"]:
        fails.append(f"client media errors {r['n_media_errors']}: {r['media_errors'][0][:200]}")
    if srv.get("n_media_errors"):
        fails.append(f"server media errors {srv['n_media_errors']}: {srv['media_errors'][0][:200]}")
    if srv.get("answer_errors"):
        fails.append(f"server answer errors: {srv['answer_errors'][0][:200]}")
    if r.get("server_stderr"):
        fails.append("server stderr: " + " | ".join(r["server_stderr"])[:200])
    row(label, f"maxCalls={max_calls} ports={max_ports} medThreads={med_threads}",
        what + ("; " + "; ".join(fails) if fails else ""))


def print_table() -> None:
    print("\n| setting | value | what happened |\n|---|---|---|")
    for s, v, w in ROWS:
        print(f"| {s} | {v.replace('|', '/')} | {w.replace('|', '/')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", default="main", choices=["main", "init", "answer"])
    ap.add_argument("--max-calls", type=int, default=0)
    ap.add_argument("--max-ports", type=int, default=0)
    ap.add_argument("--med-threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=0, help="calls to dial (default: maxCalls + 8)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--hold", type=float, default=5.0)
    ap.add_argument("--skip-facts", action="store_true")
    a = ap.parse_args()
    if a.role == "init":
        return try_init(a.max_calls, a.max_ports)
    if a.role == "answer":
        return answerer(a.max_calls, a.max_ports, a.med_threads)

    if not a.skip_facts:
        build_facts()
        srtp_check()
    mc = ceiling([3, 4, 5, 32, 64, 128, 256, 512], "calls", 254)
    mp = ceiling([254, 512, 1024, 4096], "ports", mc or 4)
    max_calls = a.max_calls or mc or 4
    max_ports = a.max_ports or mp or 254
    target = a.calls or max_calls + 8
    r = dial(max_calls, max_ports, a.med_threads, target, a.batch, a.hold)
    report_calls(f"loopback calls, target {target}", r, max_calls, max_ports, a.med_threads)
    print(json.dumps(r, indent=1), file=sys.stderr)
    print_table()


if __name__ == "__main__":
    main()
