"""Frame lateness with many concurrent call sessions in one process.

A transport's 20 ms ticker feeds every session one caller frame and takes one playout
frame back. Lateness = how long after its 20 ms slot a session's frame was handled. The
baseline is one echo session in the same run; rows for 50 echo sessions and 50 sessions on
the tiny OmniFlatten model (engine, tokenizer and decoder threads competing for the CPU).

    python bench/agent_sessions.py [--sessions 50] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from agent.agents import EchoAgent, OmniFlattenAgent  # noqa: E402
from agent.call import CallInfo  # noqa: E402
from agent.calls import CallManager  # noqa: E402
from agent.metrics import AgentMetrics  # noqa: E402
from agent.store import Transport  # noqa: E402
from agent.store_memory import MemoryStore  # noqa: E402
from bench._common import table  # noqa: E402
from bridge.line_audio import LineAudio  # noqa: E402


def build(kind: str, slots: int):
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    if kind == "echo":
        return CallManager(EchoAgent(), MemoryStore(), metrics)
    from model.checkpoint import build_model, tiny_config
    from model.decoder_standin import StandInToneDecoder
    from model.engine import Engine
    from model.s3_tokenizer import S3Config, S3Tokenizer
    from model.voice import LocalVoiceEngine

    cfg = tiny_config()
    engine = Engine(build_model(cfg), slots, registry=registry)
    tok = S3Tokenizer.random(S3Config(width=64, heads=4, layers=2, codebook_size=4096), seed=0)
    voice = LocalVoiceEngine(engine, tok, StandInToneDecoder())
    return CallManager(OmniFlattenAgent(voice, metrics), MemoryStore(), metrics)


async def run(kind: str, sessions: int, seconds: float) -> list[float]:
    manager = build(kind, sessions)
    await manager.start()
    lines = [LineAudio(8000) for _ in range(sessions)]
    calls = [await manager.admit(CallInfo(f"c{i}", Transport.SIP, "bench"), lines[i]) for i in range(sessions)]
    for c in calls:
        await c.answered()
    t = np.arange(320) / 16000
    frame = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    start = loop.time() + 0.05
    for n in range(int(seconds * 50)):
        slot = start + n * 0.02
        await asyncio.sleep(max(0.0, slot - loop.time()))
        for call, line in zip(calls, lines):
            lateness.append(loop.time() - slot)
            call.feed(frame)
            line.next_frame()
            call.frame_sent()
    await manager.close()
    return lateness


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    rows = []
    for kind, n in (("echo", 1), ("echo", args.sessions), ("omniflatten-tiny", args.sessions)):
        lat = np.array(asyncio.run(run("echo" if kind == "echo" else "omniflatten", n, args.seconds))) * 1000
        rows.append([kind, n, f"{np.percentile(lat, 50):.2f}", f"{np.percentile(lat, 99):.2f}",
                     f"{lat.max():.2f}", f"{(lat > 5).mean() * 100:.2f}%"])
    print(f"frame lateness in one process, {args.seconds:.0f} s on the 20 ms clock; baseline = one echo session")
    print(table(["agent", "sessions", "p50 ms", "p99 ms", "max ms", "frames > 5 ms late"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
