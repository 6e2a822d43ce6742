"""SIP accounts (`--sip-accounts FILE`) and keeping them registered.

The file is JSON, a list or {"accounts": [...]}; each account:

    {"name": "office", "user": "1000", "domain": "pbx.example.com", "password": "secret",
     "registrar": "10.0.0.5:5060", "auth_user": "1000", "interval": 600, "transport": "udp",
     "srtp": "off"}

`transport` is udp, tcp or tls (the stack verifies the far end's certificate and name:
bridge/sip/tls.py). `srtp` (bridge/sip/srtp.py): `required` (the account's calls are SRTP
or fail), `optional` (offer SDES keys, take plain RTP too) or `off` (the default). SDES keys
over udp or tcp travel in clear: allowed (some trunks demand SRTP anyway), with a warning.

`register: false` makes a trunk: no REGISTER, the far end knows us by address; such an
account still places outbound calls (`duplexline dial`, POST /calls). The first account is
the default for outbound calls.

`Registration` keeps one account registered: the stack refreshes a live registration by
itself; when it fails (a refresh, or our own attempt), the failure is logged, counted in
`duplexline_sip_registration_failures_total` and the state gauge drops to 0, and we try
again after a backoff that doubles from 1 s to 60 s. `describe()` feeds /readyz details.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..options import json_entries
from .metrics import SipMetrics
from .srtp import ACCOUNT_MEDIAENC, parse_policy
from .stack import AccountSpec, RegisterFailed, StackAccount

__all__ = ["AccountEntry", "load_accounts", "Registration"]

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class AccountEntry:
    name: str
    spec: AccountSpec
    register: bool


def load_accounts(path: Path, codecs: tuple[str, ...]) -> list[AccountEntry]:
    """Raises ConfigError naming the file and the entry that is wrong."""
    items = json_entries("sip_accounts", path, "accounts", 'a list or {"accounts": [...]}', bare_list=True)
    out: list[AccountEntry] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        where = f"accounts[{i}]"
        if not isinstance(item, dict):
            raise ConfigError("sip_accounts", str(path), f"{where}: expected an object")
        for key in ("user", "domain"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise ConfigError("sip_accounts", str(path), f"{where}: needs a non-empty string {key!r}")
        register = item.get("register", True)
        if not isinstance(register, bool):
            raise ConfigError("sip_accounts", str(path), f"{where}: 'register' must be true or false")
        interval = item.get("interval", 600)
        if not isinstance(interval, int) or isinstance(interval, bool) or not 10 <= interval <= 86400:
            raise ConfigError("sip_accounts", str(path), f"{where}: 'interval' must be 10..86400 seconds")
        name = str(item.get("name") or f"{item['user']}@{item['domain']}")
        if name in names:
            raise ConfigError("sip_accounts", str(path), f"{where}: name {name!r} is used twice")
        names.add(name)
        try:
            srtp = parse_policy(item.get("srtp", "off"))
            spec = AccountSpec(user=item["user"], domain=item["domain"], password=str(item.get("password", "")),
                               registrar=item.get("registrar"), auth_user=item.get("auth_user"),
                               reg_interval=interval if register else 0,
                               transport=str(item.get("transport", "udp")), codecs=codecs,
                               mediaenc=ACCOUNT_MEDIAENC[srtp])
        except (TypeError, ValueError) as exc:
            raise ConfigError("sip_accounts", str(path), f"{where}: {exc}") from None
        if spec.transport not in ("udp", "tcp", "tls"):
            raise ConfigError("sip_accounts", str(path), f"{where}: transport must be udp, tcp or tls")
        if srtp != "off" and spec.transport != "tls":
            log.warning("account %s: srtp %s over %s: the SDES keys travel in clear SIP; use transport tls",
                        name, srtp, spec.transport)
        out.append(AccountEntry(name, spec, register))
    return out


class Registration:
    """One account's registration, kept alive until `close()`."""

    def __init__(self, entry: AccountEntry, account: StackAccount, metrics: SipMetrics) -> None:
        self.entry = entry
        self.account = account
        self.metrics = metrics
        self.state = "registering" if entry.register else "trunk"
        self.failures = 0
        self.last_error = ""
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None
        metrics.registered.labels(account=entry.name).set(0)
        account.on_registration(self._on_report)

    def start(self) -> None:
        if self.entry.register:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"register-{self.entry.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.state == "registered":
            await self.account.unregister()
        self.metrics.registered.labels(account=self.entry.name).set(0)

    def describe(self) -> dict:
        return {"account": self.entry.name, "state": self.state, "failures": self.failures,
                "last_error": self.last_error}

    def _on_report(self, ok: bool, detail: str) -> None:
        """Every outcome the stack reports, its own refreshes included."""
        if ok:
            return
        if self.state == "registered":  # a refresh failed: the run loop takes it from here
            self._fail(detail or "refresh failed")
            self._lost.set()

    def _fail(self, detail: str) -> None:
        self.failures += 1
        self.state = "failed"
        self.last_error = detail
        self.metrics.registered.labels(account=self.entry.name).set(0)
        self.metrics.registration_failures.labels(account=self.entry.name).inc()

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                await self.account.register()
            except RegisterFailed as exc:
                self._fail(str(exc))
                # Log the first failure and then at each doubling of the wait: visible, not a flood.
                if backoff == BACKOFF_FIRST or backoff >= BACKOFF_MAX / 2:
                    log.warning("account %s: registration failed (%d so far): %s; retrying in %.0f s",
                                self.entry.name, self.failures, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            self.state = "registered"
            self.last_error = ""
            self.metrics.registered.labels(account=self.entry.name).set(1)
            log.info("account %s: registered", self.entry.name)
            backoff = BACKOFF_FIRST
            self._lost.clear()
            await self._lost.wait()  # the stack refreshes by itself until a refresh fails
            log.warning("account %s: registration lost: %s", self.entry.name, self.last_error)
