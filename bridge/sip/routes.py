"""Inbound routing: the called user or number -> the agent that answers (`--sip-routes`).

The routes file is JSON:

    {"routes": [
        {"match": "bot", "agent": "echo"},
        {"match": "+4930*", "agent": "omniflatten", "name": "berlin", "settings": {"voice": "anna"},
         "webhooks": ["https://crm.example.com/hooks/berlin"], "record": true},
        {"match": "*", "agent": "echo"}
    ]}

`match` is an exact user part, or a prefix ending in `*` (a lone `*` matches everything).
Exact matches win, then the longest prefix. An unmatched call is refused with 404 at the
front door, never left ringing. With no routes file, every call goes to `--agent` (the
embedded default table holds one catch-all route). This process serves one agent, so a
route naming another agent is a configuration error at start, not a surprise mid-call.
`settings` go to the agent with each call of the route; the agent checks them at start
(omniflatten takes `voice`: a voice of its decoder), and refuses anything it does not take.
`webhooks` (http/https URLs) get the route's call events besides the `--webhook` URLs
(docs/webhooks.md); a URL that does not parse stops the start. `record: true` records the
route's calls (docs/recording.md); it needs `--record-dir`, or the start stops.
`srtp`: `required`, `optional` (the default) or `off`: what the route demands of the
caller's media encryption (bridge/sip/srtp.py; docs/sip.md, "TLS and SRTP").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import ConfigError
from ..options import http_url, json_entries
from .srtp import parse_policy

__all__ = ["Route", "RouteTable"]

_KEYS = frozenset({"match", "agent", "name", "settings", "webhooks", "record", "srtp"})


@dataclass(frozen=True)
class Route:
    match: str
    agent: str
    name: str
    settings: dict = field(default_factory=dict, hash=False, compare=False)
    webhooks: tuple[str, ...] = ()
    record: bool = False
    srtp: str = "optional"  # required | optional | off (bridge/sip/srtp.py)


class RouteTable:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = list(routes)
        self._exact = {r.match: r for r in routes if not r.match.endswith("*")}
        self._prefixes = sorted((r for r in routes if r.match.endswith("*")),
                                key=lambda r: len(r.match), reverse=True)

    @classmethod
    def default(cls, agent: str) -> "RouteTable":
        return cls([Route("*", agent, "default")])

    @classmethod
    def load(cls, path: Path, served_agent: str, check: Callable[[Mapping[str, Any]], None] | None = None,
             *, can_record: bool = False) -> "RouteTable":
        """Raises ConfigError naming the file and the entry that is wrong. `check`: the
        served agent's check of a route's settings (ValueError saying what is wrong).
        `can_record`: a recording folder is set, so routes may ask for recordings."""
        items = json_entries("sip_routes", path, "routes", '{"routes": [{"match": ..., "agent": ...}]}')
        routes: list[Route] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            where = f"routes[{i}]"
            if not isinstance(item, dict) or not isinstance(item.get("match"), str) or not item["match"]:
                raise ConfigError("sip_routes", str(path), f"{where}: needs a non-empty string 'match'")
            unknown = sorted(set(item) - _KEYS)
            if unknown:  # a typo ("webhook") must not be silently ignored
                raise ConfigError("sip_routes", str(path), f"{where}: unknown keys {unknown}; known: {sorted(_KEYS)}")
            match = item["match"].strip()
            if "*" in match[:-1]:
                raise ConfigError("sip_routes", str(path), f"{where}: '*' may only end a match")
            if match in seen:
                raise ConfigError("sip_routes", str(path), f"{where}: {match!r} is listed twice")
            seen.add(match)
            agent = item.get("agent", served_agent)
            if agent != served_agent:
                raise ConfigError("sip_routes", str(path), f"{where}: agent {agent!r}, but this "
                                  f"process serves {served_agent!r} (--agent); run one process per agent")
            settings = item.get("settings", {})
            if not isinstance(settings, dict):
                raise ConfigError("sip_routes", str(path), f"{where}: 'settings' must be an object")
            if check is not None:
                try:
                    check(settings)
                except ValueError as exc:
                    raise ConfigError("sip_routes", str(path), f"{where}: settings: {exc}") from None
            record = item.get("record", False)
            if not isinstance(record, bool):
                raise ConfigError("sip_routes", str(path), f"{where}: 'record' must be true or false")
            if record and not can_record:
                raise ConfigError("sip_routes", str(path), f"{where}: 'record' needs --record-dir DIR")
            try:
                srtp = parse_policy(item.get("srtp", "optional"))
            except ValueError as exc:
                raise ConfigError("sip_routes", str(path), f"{where}: {exc}") from None
            routes.append(Route(match, agent, str(item.get("name") or match), settings,
                                _webhooks(item.get("webhooks", []), path, where), record, srtp))
        return cls(routes)

    def lookup(self, user: str) -> Route | None:
        route = self._exact.get(user)
        if route is not None:
            return route
        for r in self._prefixes:
            if user.startswith(r.match[:-1]):
                return r
        return None

    def by_name(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)


def _webhooks(value: object, path: Path, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError("sip_routes", str(path), f"{where}: 'webhooks' must be a list of URLs")
    try:
        return tuple(dict.fromkeys(http_url(url) if isinstance(url, str) else http_url("") for url in value))
    except ValueError as exc:
        raise ConfigError("sip_routes", str(path), f"{where}: webhooks: {exc}") from None
