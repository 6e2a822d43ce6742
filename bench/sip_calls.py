"""Concurrent PCMU echo calls through the SIP leg on loopback: CPU per call, echo delay and
frame lateness, against a few-call baseline measured in the same run.

Run from the repository root: `python bench/sip_calls.py [--calls 10,50,100,200]
[--seconds 15] [--servers 1] [--pin] [--backend baresip,pjsua2]`. For each SIP stack
(`--sip-backend`) and each row it starts `--servers` bridge processes (pjsua2: at least one
per 4 calls, the most its wheel holds)
(`duplexline serve --agent echo`) sharing ONE SIP address (`--sip-shared-listen yes`,
SO_REUSEPORT: the kernel spreads callers over them by source address), then client
processes (this file, `--client`; a SIP user agent per process on the project's own
adapter, at most 200 calls each, several per server so the kernel has sources to spread)
that dial the calls at 25 a second and play a 100 ms 1 kHz burst into every call once a
second (from 2 s after the call is up) while reading back what the echo agent returns.

Columns:
- CPU per call: the bridge processes' CPU time (all their threads: baresip's included)
  over the measured window, divided by calls, in % of one core; `calls/core` = 100 / that;
- echo delay: from handing a burst to the client's stack to reading its echo back from it
  (both stacks' jitter buffers, RTP on loopback, the bridge's resampling and playout);
- media tick: cores spent in the bridges' shared 20 ms media tick (Python: read, resample,
  session, echo, playout, write), part of "bridge cores";
- late frames: caller frames the sessions saw more than 20 ms after their 20 ms clock
  (duplexline_agent_late_frames_total over frames fed), and the p99 of that lateness;
- lost: bursts whose echo never came back (a dropped call or lost audio).

The baseline row (the first stack's first row, fewest calls) is what every row's CPU per
call is divided by. `--pin` puts the bridges on CPU 0 and the clients on the others, so "calls per core"
means one core of bridge; without it everything shares the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import pct, table  # noqa: E402
from bench._procs import cpu_seconds, parse_metrics, thread_cpu_seconds  # noqa: E402
from bridge.sip.backends import MAX_CALLS  # noqa: E402
from tests.integration.serve_process import free_port  # noqa: E402

RATE = 8000
FRAME = 160  # samples per 20 ms at 8 kHz
BURST_EVERY = RATE  # one burst a second
BURST_LEN = 800  # 100 ms
CALLS_PER_CLIENT = 200
DIAL_RATE = 25.0  # calls/s: a faster UDP burst of set-ups loses ACKs (measured)


# ---- the client (a subprocess) ---------------------------------------------------------------


async def _client(target: int, calls: int, seconds: float, port: int, rtp: str, out: Path) -> None:
    from bridge.sip.backends.baresip import Stack
    from bridge.sip.stack import AccountSpec, DialFailed, MediaInactive, MediaRestarted

    stack = Stack()
    lo, hi = (int(x) for x in rtp.split("-"))
    await stack.start(host="127.0.0.1", port=port, rtp_ports=(lo, hi), max_calls=255)
    ua = await stack.add_account(AccountSpec("bench", f"127.0.0.1:{port}", reg_interval=0, codecs=("pcmu",)))
    burst = (0.3 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(BURST_LEN) / RATE)).astype(np.int16)
    silence = np.zeros(FRAME, np.int16)
    state: list[dict] = []

    async def dial(i: int) -> None:
        try:
            call = await ua.dial(f"sip:bot@127.0.0.1:{target}")
            await call.wait_established(20)
        except DialFailed:
            return
        state.append({"call": call, "t0": None, "sent": 0, "tx": 0, "pending": [], "quiet": 0,
                      "delays": [], "bursts": 0})

    t0 = time.monotonic()
    tasks = []
    for i in range(calls):
        tasks.append(asyncio.ensure_future(dial(i)))
        await asyncio.sleep(max(0.0, t0 + (i + 1) / DIAL_RATE - time.monotonic()))
    await asyncio.gather(*tasks)
    out.with_suffix(".ready").write_text(str(len(state)))  # the harness measures from here

    loop = asyncio.get_running_loop()
    end = loop.time() + seconds  # a bound: the harness normally says stop first
    stop_file = out.with_suffix(".stop")

    def tick(now: float) -> None:
        for s in state:
            call = s["call"]
            try:
                if s["t0"] is None:
                    call.audio_format()
                    s["t0"] = now
                due = int((now - s["t0"]) / 0.02) + 2
                # Bursts only once the call has settled (its re-INVITE swaps the streams
                # right after set-up) and while an echo still has time to come back.
                measuring = now - s["t0"] > 2.0
                while s["sent"] < due:
                    pos = s["tx"] % BURST_EVERY
                    if pos < BURST_LEN and (measuring or pos > 0):
                        frame = burst[pos:pos + FRAME]
                        if pos == 0:
                            # The burst is handed to the stack now, two frames ahead of the wire.
                            s["pending"].append(now)
                            s["bursts"] += 1
                    else:
                        frame = silence
                    call.write(frame)
                    s["tx"] += FRAME
                    s["sent"] += 1
                data = call.read(FRAME * 2 * 8)
            except (MediaInactive, MediaRestarted):
                continue
            if not data:
                continue
            x = np.frombuffer(data, np.int16)
            loud = np.flatnonzero(np.abs(x) > 3000)
            if len(loud) and s["quiet"] >= RATE // 5 and s["pending"]:
                # Onset after >= 200 ms of quiet: the echo of the oldest burst in flight.
                behind = (len(x) - loud[0]) / RATE
                s["delays"].append(now - behind - s["pending"].pop(0))
                s["quiet"] = 0
            if len(loud):
                s["quiet"] = len(x) - 1 - loud[-1]
            else:
                s["quiet"] += len(x)
            while s["pending"] and now - s["pending"][0] > 1.0:
                s["pending"].pop(0)  # never came back

    next_t = loop.time()
    ticks = 0
    while loop.time() < end:
        next_t += 0.01
        tick(loop.time())
        ticks += 1
        if ticks % 50 == 0 and stop_file.exists():
            break
        await asyncio.sleep(max(0.0, next_t - loop.time()))
    # Bursts still in flight at the stop had no chance to come back: not counted.
    result = {"established": len(state), "delays": [d for s in state for d in s["delays"]],
              "bursts": sum(s["bursts"] - len(s["pending"]) for s in state)}
    for s in state:
        try:
            await s["call"].hangup()
        except Exception:
            pass
    await asyncio.sleep(0.5)  # let the BYEs go out before the stack stops
    await stack.close()
    out.write_text(json.dumps(result))


# ---- the harness -----------------------------------------------------------------------------


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return parse_metrics(text, ("duplexline_agent_", "duplexline_sip_"))


def _affinity(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _lateness_p99(before: list[dict], after: list[dict]) -> float:
    """p99 of duplexline_agent_frame_lateness_seconds over the window, from the buckets."""
    prefix = "duplexline_agent_frame_lateness_seconds_bucket{le="
    buckets: dict[float, float] = {}
    for b, a in zip(before, after):
        for key, value in a.items():
            if key.startswith(prefix):
                le = key[len(prefix) + 1:-2]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + value - b.get(key, 0.0)
    if not buckets:
        return float("nan")
    total = max(buckets.values())
    for bound in sorted(buckets):
        if total and buckets[bound] >= 0.99 * total:
            return bound
    return float("inf")


def _threads(procs: list[subprocess.Popen]) -> dict[tuple[int, str], float]:
    return {(p.pid, k): v for p in procs for k, v in thread_cpu_seconds(p.pid).items()}


def run_row(calls: int, servers: int, seconds: float, pin: bool, workdir: Path, backend: str = "baresip") -> dict:
    servers = max(servers, -(-calls // MAX_CALLS[backend]))
    span = min(1000, 10 * MAX_CALLS[backend])  # RTP ports per process (RTP and RTCP per call)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[0]} if pin and len(cpus) > 1 else None
    client_cpus = set(cpus[1:]) if pin and len(cpus) > 1 else None
    sip = free_port(socket.SOCK_DGRAM)
    procs: list[subprocess.Popen] = []
    https: list[int] = []
    try:
        for i in range(servers):
            http = free_port()
            https.append(http)
            log = (workdir / f"bridge-{backend}-{calls}-{i}.log").open("wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bridge.cli", "serve", "--agent", "echo", "--log-level", "WARNING",
                 "--sip-listen", f"127.0.0.1:{sip}", "--sip-shared-listen", "yes", "--http-listen",
                 f"127.0.0.1:{http}", "--sip-backend", backend,
                 "--rtp-ports", f"{20000 + i * span}-{20000 + (i + 1) * span - 1}",
                 # every call comes from 127.0.0.1 at 25 a second: a trunk, not a flood
                 "--sip-invite-rate", "1000", "--sip-max-pending", "255", "--sip-max-pending-per-source", "255"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_affinity(server_cpus)))
        deadline = time.monotonic() + 60
        for proc, http in zip(procs, https):
            while True:  # GET /sip answers 200 once this process's SIP leg is up (503 before)
                if proc.poll() is not None:
                    raise RuntimeError(f"a bridge exited with {proc.returncode}: see {workdir}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/sip", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError("bridge did not start") from None
                    time.sleep(0.2)  # polling a starting process
        # Several client processes per bridge: the kernel spreads callers by source address.
        per_client = min(CALLS_PER_CLIENT, max(5, -(-calls // (4 * servers))))
        clients: list[tuple[subprocess.Popen, Path]] = []
        left, k = calls, 0
        setup = calls / DIAL_RATE / max(1, -(-calls // per_client)) + 3
        while left > 0:
            n = min(per_client, left)
            out = workdir / f"client-{backend}-{calls}-{k}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--target", str(sip), "--n", str(n),
                   "--seconds", str(seconds + 180), "--port", str(free_port(socket.SOCK_DGRAM)),
                   "--rtp", f"{40000 + k * 600}-{40599 + k * 600}", "--out", str(out)]
            clients.append((subprocess.Popen(cmd, cwd=ROOT, preexec_fn=_affinity(client_cpus),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out))
            left -= n
            k += 1
        deadline = time.monotonic() + setup + 60
        while not all(out.with_suffix(".ready").exists() for _, out in clients):
            if time.monotonic() > deadline:
                raise TimeoutError("the clients did not finish dialling")
            time.sleep(0.2)  # polling the clients' progress
        time.sleep(1.0)  # let the last calls settle: measure from here
        m0 = [_metrics(h) for h in https]
        c0 = sum(cpu_seconds(p.pid) for p in procs)
        th0 = _threads(procs)
        t0 = time.monotonic()
        time.sleep(max(1.0, seconds - 2.0))
        m1 = [_metrics(h) for h in https]
        c1 = sum(cpu_seconds(p.pid) for p in procs)
        wall = time.monotonic() - t0
        th1 = _threads(procs)
        for _, out in clients:
            out.with_suffix(".stop").write_text("")
        results = []
        for proc, out in clients:
            proc.wait(timeout=seconds + setup + 60)
            results.append(json.loads(out.read_text()) if out.exists() else {"established": 0, "delays": [],
                                                                               "bursts": 0})
        active = [m.get('duplexline_sip_calls_active{direction="in"}', 0.0) for m in m1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    fed = sum(a.get("duplexline_agent_frame_lateness_seconds_count", 0) - b.get(
        "duplexline_agent_frame_lateness_seconds_count", 0) for a, b in zip(m1, m0))
    late = sum(a.get("duplexline_agent_late_frames_total", 0) - b.get("duplexline_agent_late_frames_total", 0)
               for a, b in zip(m1, m0))
    delays = [d for r in results for d in r["delays"]]
    bursts = sum(r["bursts"] for r in results)
    established = sum(r["established"] for r in results)
    cores = (c1 - c0) / wall
    tick = sum(a.get("duplexline_sip_media_tick_duration_seconds_sum", 0) -
               b.get("duplexline_sip_media_tick_duration_seconds_sum", 0) for a, b in zip(m1, m0)) / wall
    by_name: dict[str, float] = {}
    for key, used in th1.items():  # threads by name over all the bridges: where the CPU goes
        name = key[1].rsplit("/", 1)[0]
        by_name[name] = by_name.get(name, 0.0) + (used - th0.get(key, 0.0)) / wall  # a new thread: all of it
    busiest = sorted(by_name.items(), key=lambda kv: -kv[1])[:4]
    return {"backend": backend, "calls": calls, "servers": servers, "threads": busiest, "established": established, "spread": active,
            "cores": cores, "tick": tick, "cpu_per_call": 100 * cores / max(1, established),
            "delay": [pct(delays, q) * 1000 if delays else float("nan") for q in (50, 95, 99)],
            "lost": 1 - len(delays) / bursts if bursts else float("nan"),
            "late": late / fed if fed else float("nan"), "late_p99": _lateness_p99(m0, m1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", default="10,50,100", help="comma-separated call counts (default 10,50,100)")
    parser.add_argument("--servers", type=int, default=1, help="bridge processes behind one SIP address")
    parser.add_argument("--seconds", type=float, default=12.0, help="measured seconds per row (default 12)")
    parser.add_argument("--pin", action="store_true", help="bridges on CPU 0, clients on the others")
    parser.add_argument("--backend", default="baresip",
                        help="comma-separated SIP stacks (--sip-backend) to measure, e.g. baresip,pjsua2")
    parser.add_argument("--logs", type=Path, help="keep the bridges' logs and the clients' results here")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rtp", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.target, args.n, args.seconds, args.port, args.rtp, args.out))
        return 0
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="sip-bench-") as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for backend in args.backend.split(","):
            for calls in (int(c) for c in args.calls.split(",")):
                rows.append(run_row(calls, args.servers, args.seconds, args.pin, workdir, backend))
                r = rows[-1]
                print(f"  {backend}, {calls} calls: {r['established']} up in {r['servers']} processes, "
                      f"{r['cores']:.2f} cores", file=sys.stderr, flush=True)
    base = rows[0]["cpu_per_call"]
    print(f"SIP echo calls (PCMU) on loopback, bridge processes behind one SIP address"
          f"{', bridges pinned to one core' if args.pin else ', all cores shared with the clients'}; "
          f"{args.seconds:.0f} s per row; CPU per call vs the {rows[0]['calls']}-call baseline")
    print(table(["stack", "calls", "up", "per process", "bridge cores", "media tick", "CPU/call %", "vs base", "calls/core",
                 "echo p50 ms", "p95", "p99", "lost bursts", "late frames", "lateness p99",
                 "busiest threads (cores)"],
                [[r["backend"], r["calls"], r["established"], "/".join(f"{a:.0f}" for a in r["spread"]), f"{r['cores']:.2f}",
                  f"{r['tick']:.2f}",
                  f"{r['cpu_per_call']:.2f}", f"{r['cpu_per_call'] / base:.2f}",
                  f"{100 / r['cpu_per_call']:.0f}" if r["cpu_per_call"] else "-",
                  *(f"{d:.0f}" for d in r["delay"]), f"{r['lost']:.1%}", f"{r['late']:.2%}",
                  f"{r['late_p99'] * 1000:.0f} ms",
                  ", ".join(f"{name} {cores:.2f}" for name, cores in r["threads"])] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
