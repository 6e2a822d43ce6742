"""Bridge processes that share one SIP address on one machine (`--sip-shared-listen yes`)
find each other here, so that every new call goes to the least-loaded process, not only to
the one the kernel handed the INVITE to.

Why: SO_REUSEPORT spreads callers over the processes by source address and port, so each
caller's transactions stay with one process; but a trunk sends every INVITE from one
address, and all its calls would land on one process and stop at its 255. With siblings,
the front that receives an INVITE forwards it to the stack of whichever process holds the
fewest calls (itself included); that stack answers through the forwarding front.

The registry is a directory per SIP address, `$TMPDIR/duplexline-sip-HOST-PORT/`, private
to the user (mode 0700): one JSON file per process (`{"stack": "host:port", "calls": n}`),
rewritten every second by its owner, ignored once 3 s stale, removed on close; and a
`key` file holding the route key every sibling's stack accepts (the proof that a
forwarded INVITE came through one of our fronts). Nothing here is on the media path.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
import time
from pathlib import Path

__all__ = ["Siblings", "STALE_AFTER"]

log = logging.getLogger(__name__)

STALE_AFTER = 3.0


class Siblings:
    def __init__(self, listen_host: str, listen_port: int, stack: tuple[str, int], *,
                 root: Path | None = None) -> None:
        base = Path(root or tempfile.gettempdir())
        self.dir = base / f"duplexline-sip-{listen_host.replace(':', '_')}-{listen_port}"
        self.stack = stack
        self._own = self.dir / f"{os.getpid()}.json"
        self._view: list[tuple[tuple[str, int], int]] = [(stack, 0)]
        self._assigned: dict[tuple[str, int], int] = {}
        self.key = ""

    def start(self) -> None:
        """Create the directory and the shared key (the first process does), publish."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.dir.stat().st_uid != os.getuid():
            raise OSError(f"{self.dir} belongs to another user: refusing to share calls through it")
        key_path = self.dir / "key"
        try:
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16))
        self.key = key_path.read_text().strip()
        self.publish(0)

    def close(self) -> None:
        """Leave the registry; the last process out removes it (a process starting in
        the same instant recreates it with a fresh key)."""
        try:
            self._own.unlink()
        except FileNotFoundError:
            pass
        try:
            if not any(self.dir.glob("*.json")):
                (self.dir / "key").unlink(missing_ok=True)
                self.dir.rmdir()
        except OSError:
            pass  # a sibling is still there (or just arrived): it keeps the registry

    def publish(self, calls: int) -> None:
        """Write our load, then read everyone's (once a second, from the leg's loop)."""
        tmp = self._own.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stack": f"{self.stack[0]}:{self.stack[1]}", "calls": calls}))
        os.replace(tmp, self._own)
        now = time.time()
        view: list[tuple[tuple[str, int], int]] = []
        for path in self.dir.glob("*.json"):
            try:
                if now - path.stat().st_mtime > STALE_AFTER:
                    continue
                data = json.loads(path.read_text())
                host, _, port = data["stack"].rpartition(":")
                view.append(((host, int(port)), int(data["calls"])))
            except (OSError, ValueError, KeyError):
                continue  # a sibling mid-write or gone: next second
        if not any(addr == self.stack for addr, _ in view):
            view.append((self.stack, calls))
        self._view = view
        self._assigned.clear()

    def pick(self) -> tuple[str, int]:
        """The stack with the fewest calls, counting what we sent it since the last read;
        ties go to our own stack (no extra hop)."""
        best = min(self._view, key=lambda e: (e[1] + self._assigned.get(e[0], 0), e[0] != self.stack))[0]
        self._assigned[best] = self._assigned.get(best, 0) + 1
        return best

    @property
    def count(self) -> int:
        return len(self._view)
