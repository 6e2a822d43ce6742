"""The `duplexline worker` command's own settings (the `worker` section of Settings): where
its WebSocket listens, the address bridges are told to use, and its id in the registry.
The model, device, slots, registry (--redis) and drain timeout are the serve command's."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

from .options import HostPort, Option

__all__ = ["WorkerSettings", "WORKER_OPTIONS"]

_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _worker_id(text: str) -> str:
    if not _ID.fullmatch(text):
        raise ValueError("1-64 letters, digits, '.', '_' or '-'")
    return text


@dataclass(frozen=True)
class WorkerSettings:
    listen: HostPort = HostPort("127.0.0.1", 7070)
    advertise: HostPort | None = None  # default: listen (a wildcard listen needs one)
    id: str | None = None  # default: host name and process id

    def __post_init__(self) -> None:
        if self.advertise is None and self.listen.host in ("0.0.0.0", "::"):
            raise ValueError("a wildcard --listen needs --advertise HOST:PORT: the address bridges connect to")

    @property
    def address(self) -> str:
        return str(self.advertise or self.listen)

    @property
    def worker_id(self) -> str:
        return self.id or f"{socket.gethostname()}-{os.getpid()}"


WORKER_OPTIONS: tuple[Option, ...] = (
    Option("worker_listen", HostPort.parse, "worker: address its WebSocket (/ws) and /metrics listen on "
           "(default 127.0.0.1:7070)", "HOST:PORT", section="worker", field="listen"),
    Option("worker_advertise", HostPort.parse, "worker: the address bridges connect to, published in the "
           "registry (default: the listen address)", "HOST:PORT", section="worker", field="advertise"),
    Option("worker_id", _worker_id, "worker: its id in the registry (default: host name and process id)", "ID",
           section="worker", field="id"),
)
