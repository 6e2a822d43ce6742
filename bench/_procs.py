"""Helpers the call benchmarks share (not a benchmark itself): CPU time from /proc and
Prometheus text into numbers. Kept apart from _common.py, which imports the model."""

from __future__ import annotations

import os
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat_path: str | Path) -> float:
    """utime + stime of a /proc/.../stat file (a process or one of its threads)."""
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, all its threads included."""
    return stat_cpu_seconds(f"/proc/{pid}/stat")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time per thread of a process: {"name/tid": seconds} (a thread that ended while
    read is left out)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = stat_cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        out[f"{name}/{tid}"] = seconds
    return out


def parse_metrics(text: str, prefixes: tuple[str, ...] = ("",)) -> dict[str, float]:
    """Prometheus text format -> {series: value} for the series starting with a prefix."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and line.startswith(prefixes):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
