"""Shared fixtures. `redis_server`: a real, private redis-server for one test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

_READY_TIMEOUT = 10.0  # seconds for redis-server to answer PING after start


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server on 127.0.0.1 with no persistence, so a restart loses every key
    (the worst case a store must survive). `kill()` is SIGKILL; `restart()` starts a
    fresh server on the same port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"redis-{self.starts}.log"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        first = self.starts == 0
        for _ in range(3):
            if self._spawn():
                return
            # Another process took the port between _free_port() and bind: pick another,
            # unless this is a restart, which must keep its port.
            if not first or b"in use" not in self.log_path.read_bytes():
                break
            self.port = _free_port()
        pytest.fail(f"redis-server exited with {self.proc.returncode} on port {self.port}:\n"
                    f"{self.log_path.read_text(errors='replace')}")

    def _spawn(self) -> bool:
        self.starts += 1
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + _READY_TIMEOUT
        while not _pong(self.port):
            if self.proc.poll() is not None:
                return False
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server did not answer PING within {_READY_TIMEOUT} s")
            time.sleep(0.01)  # polling interval, not synchronisation: PING decides
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def redis_server(tmp_path: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server not found on PATH: install it with "
                    "`apt-get install redis-server` (scripts/system-packages.txt lists it)")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(binary, workdir)
    try:
        server.start()
    except BaseException:
        server.kill()
        raise
    yield server
    server.kill()
