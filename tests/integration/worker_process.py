"""Running `duplexline worker` (an engine worker, docs/worker.md) as a real process for
tests: a free port, ready once its "serving model" line is in its log (bounded), its HTTP
side (/metrics, /readyz) read with `get()`, stopped by SIGTERM (`terminate`: it drains)
or SIGKILL (`kill9`: a crash), and killed by PID at teardown whatever happened."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.integration.serve_process import DUPLEXLINE, REPO, free_port, http_json

__all__ = ["WorkerProcess", "start_admitting"]

READY_LINE = "serving model"
_WARM_UP = re.compile(r"tick ms by batch size \([^)]*\) ([0-9:, ]+); admission keeps a tick within (\d+) ms")


class WorkerProcess:
    """`duplexline worker --listen 127.0.0.1:PORT --slots N --device cpu [--redis URL]
    [--worker-id ID] ARGS`. The caller's DUPLEXLINE_* variables are left out; `env` adds
    to the rest (e.g. OMP_NUM_THREADS)."""

    def __init__(self, *args: str, workdir: Path, slots: int = 2, redis: str | None = None,
                 worker_id: str | None = None, env: dict | None = None, nice: int = 0) -> None:
        self.port = free_port()
        self.nice = nice
        self.worker_id = worker_id
        self.args = ["worker", "--listen", f"127.0.0.1:{self.port}", "--slots", str(slots), "--device", "cpu",
                     *(["--redis", redis] if redis else []), *(["--worker-id", worker_id] if worker_id else []),
                     *args]
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEXLINE_")}
        self.env = {**inherited, **(env or {})}
        self.log_path = workdir / f"worker-{worker_id or 'anon'}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> "WorkerProcess":
        """Start the process without waiting (several start at once: `start_all`)."""
        out = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(DUPLEXLINE + self.args, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=self._renice if self.nice else None)
        finally:
            out.close()
        return self

    def _renice(self) -> None:
        """In the child: `nice` (negative: ahead of the machine's other processes) where
        allowed (root), as it is otherwise."""
        try:
            os.nice(self.nice)
        except OSError:
            pass

    def wait_serving(self, deadline: float) -> "WorkerProcess":
        """Until its log says it serves (it listens by then), by `deadline` (monotonic)."""
        assert self.proc is not None, "spawn() first"
        while READY_LINE not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"duplexline worker exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill9()
                raise TimeoutError(f"duplexline worker not serving in time: {self.log()}")
            time.sleep(0.05)  # polling a starting process's log, bounded by the deadline
        return self

    def start(self, timeout: float = 90.0, attempts: int = 3) -> "WorkerProcess":
        """Spawn and wait until serving; a port taken between picking and binding (by
        another process on the machine) means a fresh port and another try."""
        deadline = time.monotonic() + timeout
        for attempt in range(attempts):
            try:
                return self.spawn().wait_serving(deadline)
            except RuntimeError:
                if attempt == attempts - 1 or "Address already in use" not in self.log():
                    raise
            self._move(free_port())
        raise AssertionError("unreachable")

    def _move(self, port: int) -> None:
        at = self.args.index("--listen") + 1
        self.args[at] = f"127.0.0.1:{port}"
        self.port = port
        self.log_path = self.log_path.with_name(f"worker-{self.worker_id or 'anon'}-{port}.log")

    def warm_up(self) -> tuple[dict[int, float], float] | None:
        """From its log: (tick ms by batch size as its engine's warm-up measured them, the
        admission bound in ms), or None before the warm-up line."""
        m = _WARM_UP.search(self.log())
        if m is None:
            return None
        ticks = {int(b): float(ms) for b, ms in (part.split(":") for part in m.group(1).split(","))}
        return ticks, float(m.group(2))

    def admits(self, sessions: int) -> bool:
        """Its engine's warm-up says a tick for `sessions` fits its admission bound. A warm-up
        measured while the machine was busy (other processes starting) can say no; the
        engine then refuses every session ("deadline") until it has stepped live ones,
        which it never gets."""
        found = self.warm_up()
        if found is None:
            return False
        ticks, bound = found
        size = min((b for b in ticks if b >= sessions), default=max(ticks))
        return ticks[size] * max(1.0, sessions / size) <= bound

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, dict]:
        return http_json("GET", self.url + path, timeout=timeout)

    def readyz(self) -> dict:
        return self.get("/readyz")[1]

    def metrics(self) -> str:
        return self.get("/metrics")[1]["raw"]

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL by PID: a crash, nothing said to anyone."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM: the worker drains (see `wait`)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def __enter__(self) -> "WorkerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill9()


def start_admitting(make, sessions: int, attempts: int = 3, timeout: float = 90.0) -> WorkerProcess:
    """A worker from `make()` whose warm-up says it admits `sessions` (see `admits`): on a
    busy machine the measurement can be off, so it is started again, `attempts` times at
    most; the last one's log is in the error."""
    for attempt in range(attempts):
        worker = make().start(timeout)
        if worker.admits(sessions):
            return worker
        print(f"worker {worker.worker_id} measured {worker.warm_up()} at start: too slow, started again")
        worker.kill9()
    raise RuntimeError(f"a worker measured itself too slow for {sessions} sessions {attempts} times: "
                       f"{worker.warm_up()}\n{worker.log()}")
