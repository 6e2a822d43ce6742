"""A real Prometheus (Debian's `prometheus` package) for tests: started on 127.0.0.1 with a
config and a TSDB in a temp folder, readiness polled with a bounded timeout, killed by PID at
teardown. Nothing is left behind but the temp folder pytest removes.

    with PrometheusProcess(config_dict, tmp_path) as prom:
        prom.wait_for(lambda: prom.targets_up() >= 2, timeout=30, what="both targets scraped")
        series = prom.api("/api/v1/series", {"match[]": '{__name__=~"duplexline_.*"}'})
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest
import yaml

from tests.integration.serve_process import free_port

__all__ = ["PrometheusProcess", "require_binary"]

T = TypeVar("T")


def require_binary(name: str, package: str) -> str:
    """The path of `name`, or a test failure naming the Debian package to install (never a
    silent skip: scripts/system-packages.txt lists it and `make test` installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: install Debian's `{package}` package "
                    f"(`apt-get install {package}`; scripts/system-packages.txt lists it)")
    return path


class PrometheusProcess:
    def __init__(self, config: dict, workdir: Path) -> None:
        self.binary = require_binary("prometheus", "prometheus")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusProcess":
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir)
        log.close()
        try:
            self.wait_for(self._ready, timeout, "Prometheus /-/ready")
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def api(self, path: str, params: dict[str, str] | None = None, timeout: float = 5.0) -> Any:
        """GET an HTTP API path; returns `data` of a successful answer, raises otherwise
        (with Prometheus's own error message, e.g. a PromQL parse error)."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets(self) -> list[dict]:
        return self.api("/api/v1/targets")["activeTargets"]

    def wait_for(self, probe: Callable[[], T], timeout: float, what: str) -> T:
        """Poll `probe` until it returns something truthy; fail naming `what` after
        `timeout` seconds. Prometheus scrapes on its own clock, so polling its API is the
        only way to know a scrape happened."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log()}")
            value = probe()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; prometheus log:\n{self.log()}")
            time.sleep(0.2)  # polling interval, bounded by the deadline

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "PrometheusProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
