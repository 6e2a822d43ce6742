"""Soak: one PCMU echo call through `duplexline serve --agent echo` for N minutes; does the
bridge's memory stay flat?

Run from the repository root: `python bench/soak.py [--minutes 30] [--interval 5]
[--warmup 60] [--tolerance-mb 1]`. Not part of `make bench` (30 minutes by default:
bench/run_all.py leaves it out). Everything stays on 127.0.0.1.

The caller is a raw SIP/RTP user agent (tests/torture/harness.py `EchoPhone`, built on
tests/integration/sip_peers.py `RawPhone`): it sends 20 ms PCMU packets on its own clock
(a 1 kHz tone, 200 ms in every second) and reads what the echo agent sends back. Every
`--interval` seconds the bridge's RSS, open fds and threads are read from /proc
(tests/torture/probe.py) with the echo's level over the interval (the call is alive and
echoing, not merely open).

The table compares the first sample after the warm-up (allocators, codec state and the
first call's one-off costs settle in it) with the last one: delta and ratio per
measure, and the spread (max - min) over the whole measured window. RSS is flat when
the spread stays within `--tolerance-mb`. Exit status 1 when it is not, when the call
stopped echoing, or when the bridge did not exit 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import table  # noqa: E402
from tests.integration.sip_peers import BridgeProcess  # noqa: E402
from tests.torture.harness import EchoPhone, exit_text, mulaw_decode, mulaw_encode, rtp_packet, rtp_payload  # noqa: E402
from tests.torture.probe import snapshot  # noqa: E402

RATE, FRAME = 8000, 160
RTP_RANGE = (31000, 31099)
_ECHO_FLOOR = 0.01  # RMS of the echo over an interval; silence is ~0


def _tone_second() -> bytes:
    """One second of audio: 200 ms of 1 kHz at -10 dBFS, then 800 ms of silence."""
    t = np.arange(RATE) / RATE
    x = 0.3 * 32767 * np.sin(2 * math.pi * 1000 * t) * (t < 0.2)
    return mulaw_encode(x)


def soak(minutes: float, interval: float, warmup: float, workdir: Path) -> tuple[list[dict], int | None]:
    """Samples [{t, rss_mb, fds, threads, echo_rms}] and the bridge's exit status."""
    samples: list[dict] = []
    with BridgeProcess("--agent", "echo", "--rtp-ports", f"{RTP_RANGE[0]}-{RTP_RANGE[1]}",
                       workdir=workdir) as bridge:
        pid = bridge.proc.pid
        with EchoPhone(bridge.sip_port) as phone:
            dialog = phone.call(timeout=10)
            if dialog["status"] != 200:
                raise RuntimeError(f"the soak call was answered {dialog['status']}: {bridge.log()}")
            dest = phone.media[dialog["call_id"]]
            sock = phone.rtp
            sock.setblocking(False)
            tone, ssrc = _tone_second(), secrets.randbits(32)
            start = time.monotonic()
            end = start + warmup + minutes * 60
            next_sample = start + interval
            sent, heard = 0, bytearray()
            print(f"soak: {minutes:g} min after a {warmup:g} s warm-up, a sample every {interval:g} s", flush=True)
            while time.monotonic() < end:
                now = time.monotonic()
                while start + sent * 0.02 <= now:  # the 20 ms media clock
                    at = (sent * FRAME) % RATE
                    sock.sendto(rtp_packet(sent, ssrc, tone[at:at + FRAME]), dest)
                    sent += 1
                try:
                    while True:
                        heard += rtp_payload(sock.recv(2048))
                except BlockingIOError:
                    pass
                if now >= next_sample:
                    snap = snapshot(pid, rtp_range=RTP_RANGE, sip_port=bridge.sip_port)
                    if not snap.alive:
                        raise RuntimeError(f"the bridge died during the soak: {bridge.log()}")
                    x = mulaw_decode(bytes(heard)) if heard else np.zeros(1)
                    samples.append({"t": now - start, "rss_mb": snap.rss_kb / 1024, "fds": snap.fds,
                                    "threads": snap.threads, "echo_rms": float(np.sqrt(np.mean(x ** 2)))})
                    heard.clear()
                    next_sample += interval
                time.sleep(0.005)  # the media clock's tick, not synchronisation
            phone.bye(dialog)
        code = bridge.terminate()
    return samples, code


def report(samples: list[dict], warmup: float, tolerance_mb: float, code: int | None) -> bool:
    window = [s for s in samples if s["t"] >= warmup]
    if len(window) < 2:
        print("soak: too few samples after the warm-up to compare")
        return False
    first, last = window[0], window[-1]
    rows = []
    for key, label, fmt in (("rss_mb", "RSS (MB)", "{:.2f}"), ("fds", "open fds", "{:.0f}"),
                            ("threads", "threads", "{:.0f}"), ("echo_rms", "echo level (RMS)", "{:.3f}")):
        values = [s[key] for s in window]
        ratio = last[key] / first[key] if first[key] else float("nan")
        rows.append([label, fmt.format(first[key]), fmt.format(last[key]), fmt.format(last[key] - first[key]),
                     f"{ratio:.3f}", fmt.format(max(values) - min(values))])
    print(table(["measure", f"first after warm-up (t={first['t']:.0f} s)", f"last (t={last['t']:.0f} s)",
                 "delta", "ratio", "max - min"], rows))
    spread = max(s["rss_mb"] for s in window) - min(s["rss_mb"] for s in window)
    fds_flat = len({s["fds"] for s in window}) == 1
    silent = [s for s in window if s["echo_rms"] < _ECHO_FLOOR]
    flat = spread <= tolerance_mb
    print(f"RSS {'flat' if flat else 'NOT flat'}: spread {spread:.2f} MB over {len(window)} samples "
          f"(tolerance {tolerance_mb:g} MB); fds {'constant' if fds_flat else 'changed'}; "
          f"echo {'alive in every interval' if not silent else f'SILENT in {len(silent)} intervals'}; "
          f"SIGTERM exit {exit_text(code)}")
    return flat and not silent and code == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to measure (default 30)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first compared sample "
                        "(default 60)")
    parser.add_argument("--tolerance-mb", type=float, default=1.0, help="RSS spread allowed (default 1 MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        samples, code = soak(args.minutes, args.interval, args.warmup, Path(tmp))
    return 0 if report(samples, args.warmup, args.tolerance_mb, code) else 1


if __name__ == "__main__":
    sys.exit(main())
