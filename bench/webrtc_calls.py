"""WebRTC call capacity: N Opus echo calls from aiortc clients in a second process.

Run from the repository root, as root (it makes a private network namespace):
`python bench/webrtc_calls.py [--points stock:10,15 fast:30,50,60] [--seconds 8]`.

Each point starts `duplexline serve --agent echo --webrtc-media MODE` pinned to CPU 0 and
a client process pinned to CPU 1, both inside one namespace (nothing leaves it). The
client opens N calls the way the page does (offer with a data channel, POST
/webrtc/offer), sends 50 Opus packets a second on each (a tone, encoded once and replayed,
so the client spends nothing on encoding) and counts the packets each call gets back
(without decoding them). After a warm-up it measures for `--seconds`:

- server CPU, in % of the one core it is pinned to (utime + stime from /proc);
- frames each call got back per second (the echo, 50 when the server keeps up), min and
  median over the calls;
- frames the server fed its sessions per second per call (mean), and the share of them
  more than one frame period late on the call's clock (the agent's own counters);
- "holds": every call got >= 47.5 frames/s back (95% of 50), the server fed its sessions
  >= 47.5 frames/s per call, and under 10% of those frames were late (a server that
  keeps the rate only by working off a growing backlog has all of them late).

`stock` is aiortc's own media path, the baseline; `fast` is the default (see
bridge/webrtc/peer.py and docs/webrtc.md). Calls per core = the largest N that holds.
One table is printed; ratios against the stock rows of the same run are what to compare
(the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOLD_FPS = 47.5
MAX_LATE = 0.10  # a server that falls behind has every frame late; bursts make a few late
DEFAULT_POINTS = "stock:10,15,20 fast:30,45,60"

from bench._procs import cpu_seconds, parse_metrics, thread_cpu_seconds  # noqa: E402


# ---- the client process (runs inside the namespace, pinned to CPU 1) --------------------------

def _tone_packets(seconds: float = 1.0) -> list[bytes]:
    import av
    import numpy as np

    codec = av.CodecContext.create("libopus", "w")
    codec.bit_rate, codec.format, codec.layout, codec.sample_rate = 32000, "s16", "mono", 48000
    codec.time_base = fractions.Fraction(1, 48000)
    t = np.arange(int(48000 * seconds)) / 48000
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    out = []
    for k in range(len(pcm) // 960):
        frame = av.AudioFrame.from_ndarray(pcm[k * 960:(k + 1) * 960].reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = 48000, k * 960, codec.time_base
        out += [bytes(p) for p in codec.encode(frame)]
    return out


async def _client(url: str, calls: int, warmup: float, seconds: float) -> dict:
    import aiohttp
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

    payloads = _tone_packets()
    base = fractions.Fraction(1, 48000)

    class Replay(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.n = 0
            self.start: float | None = None

        async def recv(self):
            if self.readyState != "live":
                raise MediaStreamError
            loop = asyncio.get_running_loop()
            if self.start is None:
                self.start = loop.time()
            due = self.start + self.n * 0.02
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            packet = av.Packet(payloads[self.n % len(payloads)])
            packet.pts, packet.time_base = self.n * 960, base
            self.n += 1
            return packet

    class Count:  # stands in for the receiver's jitter buffer and decoder queue: count only
        capacity = 16

        def __init__(self) -> None:
            self.n = 0

        def add(self, packet):
            self.n += 1
            return False, None

        def put(self, item) -> None:
            pass

        def get(self):
            return None  # lets aiortc's decoder thread end at once

    tracks = []

    async def open_call(session: aiohttp.ClientSession) -> tuple:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        track = Replay()
        tracks.append(track)
        transceiver = pc.addTransceiver(track, direction="sendrecv")
        counter = Count()
        setattr(transceiver.receiver, "_RTCRtpReceiver__jitter_buffer", counter)
        setattr(transceiver.receiver, "_RTCRtpReceiver__decoder_queue", counter)
        pc.createDataChannel("events")
        await pc.setLocalDescription(await pc.createOffer())
        async with session.post(url + "/webrtc/offer", json={"type": "offer", "sdp": pc.localDescription.sdp}) as r:
            answer = await r.json()
            if r.status != 200:
                raise RuntimeError(f"offer refused: {r.status} {answer}")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        return pc, counter, answer["call_id"]

    async with aiohttp.ClientSession() as session:
        opened = []
        for k in range(0, calls, 5):  # a few at a time, like callers arriving
            opened += await asyncio.gather(*(open_call(session) for _ in range(min(5, calls - k))))
        deadline = time.monotonic() + 30
        while not all(pc.connectionState == "connected" for pc, _, _ in opened):
            if time.monotonic() > deadline:
                states = [pc.connectionState for pc, _, _ in opened]
                raise RuntimeError(f"not all calls connected within 30 s: {states}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(warmup)
        print(json.dumps({"phase": "measure"}), flush=True)  # the parent samples the server now
        before = [c.n for _, c, _ in opened]
        sent0 = [t.n for t in tracks]
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - t0
        got = [(c.n - b) / elapsed for (_, c, _), b in zip(opened, before)]
        sent = [(t.n - b) / elapsed for t, b in zip(tracks, sent0)]
        print(json.dumps({"phase": "done", "fps": got, "sent": sent, "ids": [i for _, _, i in opened]}), flush=True)
        # wait for the parent to read the server's counters before hanging up
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(pc.close() for pc, _, _ in opened), return_exceptions=True)
    return {}


# ---- the parent ------------------------------------------------------------------------------

def _cpu_times(cpu: int) -> list[int]:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            return [int(x) for x in line.split()[1:]]
    return []


def _cpu_share(a: list[int], b: list[int]) -> dict[str, float]:
    """user nice system idle iowait irq softirq steal: % of the interval."""
    d = [y - x for x, y in zip(a, b)]
    total = sum(d[:8]) or 1
    return {"busy": 100 * (total - d[3] - d[4]) / total, "softirq": 100 * d[6] / total, "steal": 100 * d[7] / total}


def _metrics(ns, url: str) -> dict[str, float]:
    def fetch():
        with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
            return r.read().decode()
    return parse_metrics(ns.call(fetch))


FED = "duplexline_agent_frame_lateness_seconds_count"  # one per caller frame fed to a session
LATE = "duplexline_agent_late_frames_total"
RESYNCS = "duplexline_webrtc_send_resyncs_total"


def run_point(ns, mode: str, calls: int, seconds: float, warmup: float, workdir: Path, nice: int = 0) -> dict:
    from tests.integration.netns import NsServer

    port = 8100 + calls
    env_note = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    os.environ.update(env_note)  # the server inherits these: one core per bridge process
    # the client opens several offers at once from one address: not an attack, so no pending caps
    server = NsServer(ns, ["--agent", "echo", "--webrtc-media", mode, "--webrtc-max-calls", "1000",
                           "--webrtc-max-pending", "1000", "--webrtc-max-pending-per-source", "1000",
                           "--log-level", "WARNING"], workdir / f"server-{mode}-{calls}.log",
                      http_port=port, sip_port=6000 + calls)
    client = None
    try:
        server.wait_ready()
        subprocess.run(["taskset", "-a", "-pc", "0", str(server.proc.pid)], check=True, capture_output=True)
        if nice:  # a shared machine: keep other work off the measured core's share
            for tid in os.listdir(f"/proc/{server.proc.pid}/task"):  # nice is per thread on Linux
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        client = ns.popen(["nice", "-n", str(nice), "taskset", "-c", "1", sys.executable, __file__, "--client", server.url,
                           "--calls", str(calls), "--seconds", str(seconds), "--warmup", str(warmup)],
                          stdout=subprocess.PIPE, stderr=open(workdir / f"client-{mode}-{calls}.log", "wb"),
                          stdin=subprocess.PIPE)
        line = client.stdout.readline()
        if not line:
            raise RuntimeError(f"the client failed: {(workdir / f'client-{mode}-{calls}.log').read_text()[-2000:]}")
        assert json.loads(line)["phase"] == "measure"
        cpu0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
        ccpu0 = cpu_seconds(client.pid)
        core0 = _cpu_times(0)
        threads0 = thread_cpu_seconds(server.proc.pid)
        m0 = _metrics(ns, server.url)
        done = json.loads(client.stdout.readline())
        cpu1, t1 = cpu_seconds(server.proc.pid), time.monotonic()
        ccpu1 = cpu_seconds(client.pid)
        core = _cpu_share(core0, _cpu_times(0))
        threads1 = thread_cpu_seconds(server.proc.pid)
        busy = sorted(((threads1[k] - threads0.get(k, 0)) / (t1 - t0) * 100, k) for k in threads1)[-3:]
        print(f"    {mode} {calls}: core 0 busy {core['busy']:.0f}% (softirq {core['softirq']:.0f}%, steal "
              f"{core['steal']:.0f}%); client CPU {100 * (ccpu1 - ccpu0) / (t1 - t0):.0f}%, busiest server threads "
              + ", ".join(f"{name} {pct:.0f}%" for pct, name in reversed(busy)), flush=True)
        m1 = _metrics(ns, server.url)
        client.stdin.write(b"\n")
        client.stdin.flush()
        client.wait(timeout=60)
        deadline = time.monotonic() + 20
        while _metrics(ns, server.url).get("duplexline_webrtc_peers", 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # the calls end; their per-call counters land in /metrics
        m2 = _metrics(ns, server.url)
        fps = done["fps"]
        print(f"    {mode} {calls}: client sent min {min(done['sent']):.1f} fps", flush=True)
        fed = (m1.get(FED, 0) - m0.get(FED, 0)) / (t1 - t0) / calls
        late = (m1.get(LATE, 0) - m0.get(LATE, 0)) / max(1.0, m1.get(FED, 0) - m0.get(FED, 0))
        resyncs = m2.get(RESYNCS, 0)
        return {"mode": mode, "calls": calls, "cpu": 100 * (cpu1 - cpu0) / (t1 - t0),
                "fps_min": min(fps), "fps_median": statistics.median(fps), "in_mean": fed,
                "late": 100 * late, "resyncs": resyncs,
                "holds": min(fps) >= HOLD_FPS and fed >= HOLD_FPS and late < MAX_LATE}
    finally:
        if client is not None:
            ns.kill(client)
        ns.kill(server.proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default=DEFAULT_POINTS, help=f"MODE:N,N ... (default {DEFAULT_POINTS!r})")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--nice", type=int, default=0,
                        help="run server and clients at this nice value (e.g. -10 on a shared machine; root)")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(_client(args.client, args.calls, args.warmup, args.seconds))
        return 0

    from bench._common import table
    from tests.integration.netns import NetNs, netns_available

    why = netns_available()
    if why:
        print(f"webrtc_calls: skipped: {why}")
        return 0
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"webrtc-bench-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    with NetNs() as ns:
        for spec in args.points.split():
            mode, _, counts = spec.partition(":")
            for n in (int(c) for c in counts.split(",")):
                try:
                    r = run_point(ns, mode, n, args.seconds, args.warmup, workdir, args.nice)
                except Exception as exc:  # one point failing still prints the others
                    print(f"{mode} {n}: failed: {exc}", file=sys.stderr)
                    continue
                rows.append(r)
                print(f"  {mode:5} {n:3} calls: cpu {r['cpu']:5.1f}%  back min {r['fps_min']:.1f} "
                      f"median {r['fps_median']:.1f}  in {r['in_mean']:.1f}  late {r['late']:.2f}%  "
                      f"resyncs {r['resyncs']:.0f}  {'holds' if r['holds'] else 'FAILS'}", flush=True)
    stock = [r for r in rows if r["mode"] == "stock"]
    stock_cpu = statistics.median(r["cpu"] / r["calls"] for r in stock) if stock else None
    out = []
    for r in rows:
        per_call = r["cpu"] / r["calls"]
        out.append([r["mode"], r["calls"], f"{r['cpu']:.0f}%", f"{per_call:.2f}%",
                    f"{stock_cpu / per_call:.1f}x" if stock_cpu else "-", f"{r['fps_min']:.1f}",
                    f"{r['fps_median']:.1f}", f"{r['in_mean']:.1f}", f"{r['late']:.2f}%",
                    "yes" if r["holds"] else "no"])
    print(table(["media", "calls", "server CPU (1 core)", "CPU per call", "vs stock", "back fps min",
                 "back fps median", "in fps mean", "late frames", "holds 50 fps"], out))
    for mode in ("stock", "fast"):
        held = [r["calls"] for r in rows if r["mode"] == mode and r["holds"]]
        if held:
            print(f"{mode}: holds {max(held)} calls on one core (largest point measured that held)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
