"""Running `duplexline serve` as a real process for tests: free ports, readiness polled
with a bounded timeout, stopped by SIGTERM and killed by PID at teardown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["free_port", "ServeProcess", "http_json"]

REPO = Path(__file__).resolve().parents[2]
DUPLEXLINE = [sys.executable, "-m", "bridge.cli"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, token: str | None = None, body: dict | None = None,
              timeout: float = 10.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return status, {"raw": raw.decode(errors="replace")}


class ServeProcess:
    """`duplexline serve ARGS` on free ports (or the `sip_port` given). The caller's own
    DUPLEXLINE_* variables are left out (they would change what is tested); `env` adds to
    the rest. `token` becomes --admin-token and goes with `post()`."""

    def __init__(self, *args: str, env: dict | None = None, log_path: Path | None = None,
                 sip_port: int | None = None, token: str | None = None) -> None:
        self.http_port = free_port()
        self.sip_port = sip_port or free_port(socket.SOCK_DGRAM)
        self.token = token
        self._own_sip_port = sip_port is None
        self.args = ["serve", "--http-listen", f"127.0.0.1:{self.http_port}",
                     "--sip-listen", f"127.0.0.1:{self.sip_port}", *(["--admin-token", token] if token else []), *args]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEXLINE_")}
        self.env = {**inherited, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 90.0, attempts: int = 3) -> "ServeProcess":
        """Start and wait until healthy. A port another process took between `free_port`
        and the bind (this machine is shared) means new ports and another try."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError:
                if attempt == attempts - 1 or "Address already in use" not in self.log() or not self._own_sip_port:
                    raise
                self._new_ports()
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        self.http_port, self.sip_port = free_port(), free_port(socket.SOCK_DGRAM)
        self.args[self.args.index("--http-listen") + 1] = f"127.0.0.1:{self.http_port}"
        self.args[self.args.index("--sip-listen") + 1] = f"127.0.0.1:{self.sip_port}"

    def _start(self, timeout: float) -> "ServeProcess":
        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(DUPLEXLINE + self.args, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT)
        if self.log_path:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"duplexline serve exited with {self.proc.returncode}: {self.log()}")
            try:
                healthy = http_json("GET", self.url + "/healthz", timeout=1)[0] == 200
            except OSError:
                healthy = False
            if healthy:
                self.wait_ready(deadline)  # its own timeout names what is missing
                return self
            time.sleep(0.1)  # polling a real process's readiness, bounded by the deadline
        self.kill()
        raise TimeoutError(f"duplexline serve not up within {timeout} s: {self.log()}")

    def wait_ready(self, deadline: float) -> None:
        """More readiness than /healthz, for subclasses that need it (by `deadline`)."""

    def log(self, full: bool = False) -> str:
        """The log's tail (for failure messages), or all of it to search in."""
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        return text if full else text[-6000:]

    def get(self, path: str) -> tuple[int, dict]:
        return http_json("GET", self.url + path, token=self.token)  # /calls is admin data

    def post(self, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
        return http_json("POST", self.url + path, token=self.token, body=body, timeout=timeout)

    def metrics(self) -> str:
        return self.get("/metrics")[1]["raw"]

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
