"""A private network namespace for WebRTC tests, made and removed by the test.

Browsers and aiortc gather ICE candidates on every interface they see, so every WebRTC
test runs its server and its clients inside one namespace that holds only `lo` and a veth
pair with private test addresses (both ends inside):

    dlx-test-<random>:  lo (up)   veth-a 10.231.N.1/24   veth-b 10.231.N.2/24

Nothing in it routes anywhere else: no packet leaves loopback or the namespace. The
namespace is removed at teardown (also after a failure); processes started with
`popen` are killed by PID before it goes. Needs root (`ip netns`).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any, Callable, Sequence, TypeVar

import pytest

__all__ = ["NetNs", "NsServer", "netns_available", "require_netns", "REPO"]

REPO = Path(__file__).resolve().parents[2]
_IP = shutil.which("ip") or "/usr/sbin/ip"
_CMD_TIMEOUT = 10.0
_CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _enter(name: str) -> None:
    """Move the calling THREAD (only it) into the namespace: sockets it makes live there."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _ip(*args: str) -> None:
    subprocess.run([_IP, *args], check=True, capture_output=True, timeout=_CMD_TIMEOUT)


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if not Path(_IP).exists():
        return "the ip command is missing: apt-get install iproute2"
    return None


def require_netns() -> None:
    why = netns_available()
    if why:
        pytest.fail(f"WebRTC tests run in a private network namespace: {why}")


class NetNs:
    def __init__(self) -> None:
        self.name = f"dlx-test-{secrets.token_hex(4)}"
        subnet = 1 + secrets.randbelow(250)
        self.server_ip = f"10.231.{subnet}.1"
        self.client_ip = f"10.231.{subnet}.2"
        self._procs: list[subprocess.Popen] = []
        self._made = False
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def create(self) -> "NetNs":
        _ip("netns", "add", self.name)
        self._made = True
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            _ip("-n", self.name, "link", "add", "veth-a", "type", "veth", "peer", "name", "veth-b")
            _ip("-n", self.name, "addr", "add", f"{self.server_ip}/24", "dev", "veth-a")
            _ip("-n", self.name, "addr", "add", f"{self.client_ip}/24", "dev", "veth-b")
            _ip("-n", self.name, "link", "set", "veth-a", "up")
            _ip("-n", self.name, "link", "set", "veth-b", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 60.0, **kw: Any) -> T:
        """Run `fn` on a thread that lives in the namespace (e.g. an HTTP request to the
        server inside): the test process itself stays where it is."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=self.name, initializer=_enter, initargs=(self.name,))
        return self._thread.submit(fn, *args, **kw).result(timeout=timeout)

    def argv(self, args: Sequence[str]) -> list[str]:
        return [_IP, "netns", "exec", self.name, *args]

    def popen(self, args: Sequence[str], *, stdout: IO | int | None = subprocess.DEVNULL,
              stderr: IO | int | None = subprocess.STDOUT, stdin: IO | int | None = subprocess.DEVNULL,
              **kw) -> subprocess.Popen:
        """Start a process inside; it is killed (by PID) when the namespace is removed.
        `ip netns exec` execs the command, so the PID is the program's own."""
        proc = subprocess.Popen(self.argv(args), stdout=stdout, stderr=stderr, stdin=stdin, **kw)
        self._procs.append(proc)
        return proc

    def run(self, args: Sequence[str], timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(args), timeout=timeout, **kw)

    def kill(self, proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def remove(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)  # its calls are all bounded
            self._thread = None
        for proc in reversed(self._procs):
            self.kill(proc)
        self._procs.clear()
        if self._made:
            # Any process we did not start (there should be none) is killed by PID first,
            # so the namespace can go.
            listed = subprocess.run([_IP, "netns", "pids", self.name], capture_output=True, text=True,
                                    timeout=_CMD_TIMEOUT)
            for pid in listed.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run([_IP, "netns", "del", self.name], capture_output=True, timeout=_CMD_TIMEOUT)
            self._made = False

    def __enter__(self) -> "NetNs":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class NsServer:
    """`duplexline serve` inside the namespace, HTTP on 127.0.0.1 there (a secure context
    for the page; media goes over the veth addresses, since aioice skips loopback).

    `http(method, path, ...)` runs the request from a thread inside the namespace and
    returns (status, headers, body bytes)."""

    def __init__(self, ns: NetNs, args: Sequence[str], log_path: Path, *, http_port: int = 8080,
                 sip_port: int = 5070) -> None:
        self.ns = ns
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{http_port}"
        argv = [sys.executable, "-m", "bridge.cli", "serve", "--http-listen", f"127.0.0.1:{http_port}",
                "--sip-listen", f"127.0.0.1:{sip_port}", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEXLINE_")}
        with open(log_path, "wb") as log:
            self.proc = ns.popen(argv, stdout=log, cwd=str(REPO), env=env)

    def wait_ready(self, timeout: float = 90.0) -> "NsServer":
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"duplexline serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http("GET", "/readyz", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"duplexline serve not ready within {timeout} s:\n{self.log()}")
            time.sleep(0.1)  # polling a real process's readiness; the deadline bounds it

    def http(self, method: str, path: str, body: bytes | dict | None = None, *,
             headers: dict | None = None, timeout: float = 15.0) -> tuple[int, dict, bytes]:
        return self.ns.call(_request, method, self.url + path, body, headers or {}, timeout, timeout=timeout + 5)

    def json(self, method: str, path: str, body: bytes | dict | None = None, **kw) -> tuple[int, Any]:
        status, _, raw = self.http(method, path, body, **kw)
        return status, json.loads(raw) if raw else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def _request(method: str, url: str, body, headers: dict, timeout: float) -> tuple[int, dict, bytes]:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **headers}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()

