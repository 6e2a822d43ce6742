"""What a bridge process holds, read from /proc (no cooperation from the process needed):
open file descriptors, resident memory, threads, its UDP sockets (those bound inside the
RTP port range are the RTP ports of live or leaked calls), its TCP connections on the SIP
port; and, where the bridge exposes one, its asyncio task count.

/proc/PID/net/* shows the sockets of the process's own network namespace, so this works
for a bridge inside a test's namespace too; sockets are matched to the process by inode
(the `socket:[N]` links in /proc/PID/fd), so other processes in that namespace don't count.

Also here: `LogWatch`, which reads a log file from a mark (line counts, tracebacks, lines
too long or carrying control characters) without holding the file open.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Snapshot", "snapshot", "LogWatch", "TASKS_METRIC", "bridge_sockets", "sip_tcp_peers"]

# The gauge the torture tier reads for the asyncio task count, when the bridge has it
# (it does not yet: see tests/torture/__init__.py).
TASKS_METRIC = "duplexline_bridge_asyncio_tasks"
_TCP_ESTABLISHED = "01"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Snapshot:
    alive: bool
    fds: int = 0
    rss_kb: int = 0
    threads: int = 0
    rtp_ports: int = 0  # UDP sockets bound inside the RTP range
    udp: int = 0
    udp_drops: int = 0  # datagrams the kernel dropped at the process's UDP sockets (a receive buffer full)
    tcp_sip: int = 0  # established TCP connections to the SIP port
    tcp: int = 0  # every TCP socket (listeners, connections, half-closed)
    tasks: int | None = None

    def describe(self) -> str:
        tasks = "n/a" if self.tasks is None else str(self.tasks)
        return (f"fds {self.fds}, RSS {self.rss_kb / 1024:.1f} MB, threads {self.threads}, RTP ports "
                f"{self.rtp_ports}, UDP sockets {self.udp}, SIP TCP connections {self.tcp_sip}, "
                f"TCP sockets {self.tcp}, asyncio tasks {tasks}")


def _inodes(pid: int) -> tuple[int, set[str]]:
    fd_dir = f"/proc/{pid}/fd"
    count, inodes = 0, set()
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed between listdir and readlink
            continue
        count += 1
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return count, inodes


def _table(pid: int, name: str) -> list[list[str]]:
    rows = []
    for family in (name, name + "6"):
        try:
            lines = Path(f"/proc/{pid}/net/{family}").read_text().splitlines()[1:]
        except OSError:
            continue
        rows += [line.split() for line in lines]
    return rows


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def bridge_sockets(pid: int) -> dict[str, list[tuple[int, int, str]]]:
    """{'udp': [(local port, remote port, state)], 'tcp': [...]} of the process's sockets."""
    _, inodes = _inodes(pid)
    out: dict[str, list[tuple[int, int, str]]] = {}
    for proto in ("udp", "tcp"):
        out[proto] = [(_port(r[1]), _port(r[2]), r[3]) for r in _table(pid, proto) if len(r) > 9 and r[9] in inodes]
    return out


def sip_tcp_peers(pid: int, sip_port: int) -> list[tuple[str, int]]:
    """(remote address, port) of each established TCP connection to the SIP port."""
    _, inodes = _inodes(pid)
    out = []
    for r in _table(pid, "tcp"):
        if len(r) > 9 and r[9] in inodes and r[3] == _TCP_ESTABLISHED and _port(r[1]) == sip_port:
            addr, port = r[2].rsplit(":", 1)
            if len(addr) == 8:  # IPv4, little-endian hex
                addr = ".".join(str(b) for b in bytes.fromhex(addr)[::-1])
            out.append((addr, int(port, 16)))
    return out


def snapshot(pid: int, *, rtp_range: tuple[int, int], sip_port: int, metrics: str | None = None) -> Snapshot:
    """One reading; `Snapshot(alive=False)` when the process is gone (or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        if "\nState:\tZ" in status or "\nState:\tX" in status:
            return Snapshot(alive=False)
        fds, inodes = _inodes(pid)
        udp = [r for r in _table(pid, "udp") if len(r) > 9 and r[9] in inodes]
        tcp = [r for r in _table(pid, "tcp") if len(r) > 9 and r[9] in inodes]
    except (FileNotFoundError, ProcessLookupError):
        return Snapshot(alive=False)
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    lo, hi = rtp_range
    tasks = None
    if metrics:
        m = re.search(rf"^{TASKS_METRIC} ([0-9.e+]+)$", metrics, re.M)
        tasks = int(float(m.group(1))) if m else None
    return Snapshot(
        alive=True, fds=fds, rss_kb=int(fields.get("VmRSS", "0 kB").split()[0]),
        threads=int(fields.get("Threads", "0")),
        rtp_ports=sum(1 for r in udp if lo <= _port(r[1]) <= hi), udp=len(udp),
        udp_drops=sum(int(r[12]) for r in udp if len(r) > 12),
        tcp_sip=sum(1 for r in tcp if r[3] == _TCP_ESTABLISHED and _port(r[1]) == sip_port),
        tcp=len(tcp), tasks=tasks)


class LogWatch:
    """A log file read from a mark: `mark()` remembers the end, `since(mark)` gives the
    lines written after it (reads only the new part; the file is never held open)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(mark)
                data = f.read()
        except FileNotFoundError:
            return []
        return data.decode("utf-8", "replace").splitlines()

    @staticmethod
    def tracebacks(lines: list[str]) -> list[int]:
        return [i for i, line in enumerate(lines) if "Traceback" in line]

    @staticmethod
    def excerpt(lines: list[str], at: int, before: int = 2, after: int = 12) -> str:
        part = lines[max(0, at - before):at + after]
        return "\n".join(line[:300] for line in part)

    @staticmethod
    def bad_lines(lines: list[str], max_chars: int) -> tuple[list[int], list[int]]:
        """(lines longer than `max_chars`, lines with control characters other than tab)."""
        long = [i for i, line in enumerate(lines) if len(line) > max_chars]
        control = [i for i, line in enumerate(lines) if _CONTROL.search(line)]
        return long, control
