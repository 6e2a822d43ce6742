"""SIPVicious (pip package `sipvicious`) as an attacker would run it, inside the test's
network namespace against 127.0.0.1 there, with its output read back:

- svmap: an OPTIONS sweep; finds the bridge (fine: it is a SIP server);
- svwar: extension enumeration by INVITE, REGISTER and OPTIONS; must find nothing, though
  the bridge has routes ('bot', '1000') the dictionary holds: auth is asked before routing;
- svcrack: digest password guessing with a 200-word list whose last word is the password.

Each tool is a subprocess (`ip netns exec`, killed by its timeout); results are parsed
from the tables it prints. The tools run through this module's own entry point
(`python -m tests.torture.sipvicious TOOL ARGS`), which binds their sockets to a chosen
source address: svcrack 0.3.8 accepts `-b` but never uses it, and the bridge's per-source
bans must meet the attacker's address, not the one the harness's own calls come from.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Tool", "available", "wordlist", "svmap", "svwar", "svcrack", "EXTENSIONS", "COMMON_PASSWORDS"]

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
_SOURCE_ENV = "TORTURE_SV_SOURCE"

COMMON_PASSWORDS = (
    "123456 password 123456789 12345678 12345 qwerty 1234567 111111 1234567890 123123 abc123 1234 password1 "
    "iloveyou 1q2w3e4r 000000 qwerty123 zaq12wsx dragon sunshine princess letmein 654321 monkey 27653 1qaz2wsx "
    "123321 qwertyuiop superman asdfghjkl secret admin welcome 1111 0000 2222 9999 changeme voip sip asterisk "
    "freeswitch phone 100 101 1000 1001 pass test test123 root toor guest master hello shadow michael football "
    "baseball trustno1 access mustang batman starwars whatever").split()

EXTENSIONS = ("100", "101", "200", "1000", "1001", "2000", "bot", "alice", "bob", "admin", "test", "sales",
              "support", "operator", "duplexline", "reception", "voicemail", "9999")


@dataclass(frozen=True)
class Tool:
    name: str
    returncode: int | None  # None: killed at its timeout
    stdout: str
    stderr: str
    seconds: float

    def table_rows(self) -> list[list[str]]:
        """The rows of the result table it printed (header and rules left out)."""
        rows, header_seen = [], False
        for line in self.stdout.splitlines():
            if not line.startswith("|"):
                continue
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not header_seen:
                header_seen = True
                continue
            rows.append(cells)
        return rows

    def summary(self) -> str:
        tail = (self.stderr.strip().splitlines() or [""])[-1][:160]
        return f"{self.name}: exit {self.returncode} in {self.seconds:.1f} s; last message {tail!r}"


def available() -> str | None:
    """None when the tools are installed, else how to get them."""
    missing = [t for t in ("svmap", "svwar", "svcrack") if not (BIN / f"sipvicious_{t}").exists()]
    if missing:
        return (f"SIPVicious is not installed ({', '.join('sipvicious_' + m for m in missing)} missing from "
                f"{BIN}): `.venv/bin/pip install sipvicious==0.3.8` (a test extra of pyproject.toml)")
    return None


def wordlist(path: Path, password: str, size: int = 200) -> Path:
    """`size` words: common passwords, then filler guesses, the real password last."""
    words = list(COMMON_PASSWORDS)
    words += [f"guess{k:03d}" for k in range(size - 1 - len(words))]
    words = words[: size - 1] + [password]
    path.write_text("\n".join(words) + "\n")
    return path


def _run(ns, name: str, args: list[str], timeout: float, source: str = "127.0.0.1") -> Tool:
    t0 = time.monotonic()
    env = {**os.environ, _SOURCE_ENV: source}
    try:
        done = ns.run([sys.executable, "-m", "tests.torture.sipvicious", name, *args], timeout=timeout,
                      capture_output=True, text=True, env=env, cwd=str(REPO))
        return Tool(name, done.returncode, done.stdout, done.stderr, time.monotonic() - t0)
    except subprocess.TimeoutExpired as exc:  # subprocess.run killed it
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        return Tool(name, None, out, err, time.monotonic() - t0)


def svmap(ns, port: int, timeout: float = 30.0, source: str = "127.0.8.1") -> tuple[Tool, bool]:
    """(the run, whether it listed 127.0.0.1:port)."""
    tool = _run(ns, "svmap", ["127.0.0.1", "-p", str(port)], timeout, source)
    return tool, any(row and row[0] == f"127.0.0.1:{port}" for row in tool.table_rows())


def svwar(ns, port: int, method: str, dictionary: Path, timeout: float = 60.0, source: str = "127.0.8.2"
          ) -> tuple[Tool, list[str]]:
    """(the run, the extensions it reports)."""
    tool = _run(ns, "svwar", ["-m", method, "-d", str(dictionary), "127.0.0.1", "-p", str(port)], timeout, source)
    return tool, [row[0] for row in tool.table_rows() if row and row[0]]


def svcrack(ns, port: int, *, user: str, extension: str, dictionary: Path, source: str, password: str,
            timeout: float, pace: float | None = None) -> tuple[Tool, bool]:
    """(the run, whether it printed the password)."""
    args = ["-u", user, "-e", extension, "-m", "INVITE", "-d", str(dictionary)]
    if pace is not None:
        args += ["-t", str(pace)]
    tool = _run(ns, "svcrack", [*args, "127.0.0.1", "-p", str(port)], timeout, source)
    cracked = any(password in cell for row in tool.table_rows() for cell in row) or \
        bool(re.search(rf"password for \S+ is {re.escape(password)}", tool.stderr))
    return tool, cracked


def _main() -> None:
    """`python -m tests.torture.sipvicious TOOL ARGS`: the tool, its unbound sockets bound
    to $TORTURE_SV_SOURCE instead of the wildcard."""
    source = os.environ.get(_SOURCE_ENV, "")
    if source:
        bind = socket.socket.bind

        def bind_to_source(self, address):
            if isinstance(address, tuple) and address and address[0] in ("", "0.0.0.0"):
                address = (source, *address[1:])
            return bind(self, address)

        socket.socket.bind = bind_to_source
    tool = sys.argv[1]
    sys.argv = [f"sipvicious_{tool}", *sys.argv[2:]]
    sys.exit(importlib.import_module(f"sipvicious.{tool}").main())


if __name__ == "__main__":
    _main()
