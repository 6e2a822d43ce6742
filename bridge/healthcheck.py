"""`python -m bridge.healthcheck`: the container's health check. Exit 0 when this
container's bridge (DUPLEXLINE_HTTP_LISTEN's port) or engine worker
(DUPLEXLINE_WORKER_LISTEN's port) answers /healthz on loopback, 1 otherwise: one image
serves both roles, and only one of the two ports is open."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

PORTS = (("DUPLEXLINE_HTTP_LISTEN", "0.0.0.0:8080"), ("DUPLEXLINE_WORKER_LISTEN", "127.0.0.1:7070"))


def healthy(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def main() -> int:
    ports = [os.environ.get(variable, default).rpartition(":")[2] for variable, default in PORTS]
    return 0 if any(healthy(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
