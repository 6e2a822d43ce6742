"""Inbound protection at the SIP front door, checked in this order for each new INVITE:

1. source allowlist (CIDR networks): anything else gets 403;
2. per-source rate limit (token bucket, `rate` INVITEs/s, burst 2×rate): over it, 503 with
   Retry-After, so a well-behaved peer backs off and a flood costs us one datagram each;
3. digest authentication (RFC 7616 MD5, qop=auth): no or stale credentials get a 401
   challenge, wrong ones 403; repeated failures ban the source (and the user name) for a
   growing time (`AuthThrottle`);
4. pending INVITEs (unanswered or un-ACKed) per source and in total (`PendingInvites`).

Nonces are stateless: a timestamp and the caller's address signed with a per-process
secret, valid `NONCE_TTL` seconds, so nothing grows per challenge; only the highest nonce
count accepted per nonce is kept (replays are refused). Every table here is bounded
(oldest entry evicted first); none of this allocates per packet beyond the message itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from .message import SipMessage

__all__ = ["Allowlist", "RateLimiter", "DigestAuth", "AuthResult", "AuthThrottle", "PendingInvites",
           "NONCE_TTL", "AUTH_FAILURES"]

NONCE_TTL = 300.0
_MAX_SOURCES = 10_000


class Allowlist:
    def __init__(self, networks: tuple[str, ...]) -> None:
        self._nets = [ipaddress.ip_network(n, strict=False) for n in networks]

    def allows(self, host: str) -> bool:
        if not self._nets:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(addr in net for net in self._nets)


class RateLimiter:
    """Token bucket per source address. `allow(source)` takes one token or says no."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else (max(1.0, 2 * rate) if rate else 0.0)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, source: str, now: float | None = None) -> bool:
        if self.rate is None:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        self._buckets[source] = (tokens - 1.0 if ok else tokens, now)
        if len(self._buckets) > _MAX_SOURCES:
            self._buckets.popitem(last=False)
        return ok

    @property
    def retry_after(self) -> int:
        return max(1, int(round(1.0 / self.rate))) if self.rate else 1


@dataclass(frozen=True)
class AuthResult:
    ok: bool
    status: int = 0  # 401 (challenge) or 403 (wrong credentials, banned) when not ok
    stale: bool = False
    reason: str = ""  # one of AUTH_FAILURES when not ok: the metric label


AUTH_FAILURES = ("missing", "bad-nonce", "stale", "replay", "bad-uri", "bad-qop", "wrong-user",
                 "wrong-password", "banned")


class AuthThrottle:
    """Failed digest attempts, per source address and per user name: `max_failures` within
    `window` seconds ban the key for `ban` seconds, doubling with each ban up to `max_ban`
    (a password guesser gets a handful of guesses an hour). A success clears the source.
    Both tables are bounded; only the configured user name is tracked by name."""

    def __init__(self, *, max_failures: int = 5, user_max_failures: int = 20, window: float = 60.0,
                 ban: float = 30.0, max_ban: float = 3600.0) -> None:
        self.max_failures = max_failures
        self.user_max_failures = user_max_failures
        self.window = window
        self.ban = ban
        self.max_ban = max_ban
        # key -> [failures in window, window start, strikes, banned until]
        self._keys: OrderedDict[str, list[float]] = OrderedDict()

    def banned_for(self, source: str, user: str | None, now: float | None = None) -> float:
        """Seconds left on the longer of the source's and the user's ban (0: not banned)."""
        now = time.monotonic() if now is None else now
        left = 0.0
        for key in (f"s:{source}", f"u:{user}" if user else ""):
            state = self._keys.get(key)
            if state is not None:
                left = max(left, state[3] - now)
        return left

    def failed(self, source: str, user: str | None, now: float | None = None) -> list[str]:
        """Count a failure; the kinds ('source', 'user') that it got banned."""
        now = time.monotonic() if now is None else now
        bans = []
        for key, limit, kind in ((f"s:{source}", self.max_failures, "source"),
                                 (f"u:{user}", self.user_max_failures, "user")):
            if kind == "user" and not user:
                continue
            state = self._keys.pop(key, None) or [0.0, now, 0.0, 0.0]
            if now - state[1] > self.window:
                state[0], state[1] = 0.0, now
            state[0] += 1
            if state[0] >= limit:
                state[3] = now + min(self.max_ban, self.ban * 2 ** state[2])
                state[2] += 1
                state[0], state[1] = 0.0, now
                bans.append(kind)
            self._keys[key] = state
            if len(self._keys) > _MAX_SOURCES:
                self._keys.popitem(last=False)
        return bans

    def succeeded(self, source: str) -> None:
        self._keys.pop(f"s:{source}", None)

    def banned_count(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(1 for state in self._keys.values() if state[3] > now)


class DigestAuth:
    """Checks `Authorization: Digest ...` on an INVITE against one user and password
    (RFC 7616 with MD5 and qop=auth, as SIP phones speak it).

    - The nonce is a timestamp and the caller's address, signed with a per-process secret:
      it is good for `NONCE_TTL` seconds and from that address only. An expired nonce with
      the right password gets a new challenge with stale=true (no password prompt).
    - qop=auth is required, so every request carries a nonce count; a count not above the
      highest one accepted for that nonce is a replay and is refused. The digest's `uri`
      must be the Request-URI.
    - Failures go to an `AuthThrottle` (per source and per user, growing bans)."""

    def __init__(self, user: str, password: str, realm: str = "duplexline",
                 throttle: AuthThrottle | None = None) -> None:
        self.user = user
        self.realm = realm
        self.throttle = throttle or AuthThrottle()
        self._ha1 = _md5(f"{user}:{realm}:{password}")
        self._secret = os.urandom(16)
        self._counts: OrderedDict[str, int] = OrderedDict()  # nonce -> highest nc accepted

    def _sign(self, ts: str, source: str) -> str:
        return hmac.new(self._secret, f"{ts}|{source}".encode(), hashlib.sha256).hexdigest()[:24]

    def nonce(self, source: str, now: float | None = None) -> str:
        ts = f"{int(time.time() if now is None else now):x}"
        return f"{ts}{self._sign(ts, source)}"

    def _nonce_ok(self, nonce: str, source: str, now: float) -> tuple[bool, bool]:
        """(valid signature for this source, fresh)."""
        ts, sig = nonce[:-24], nonce[-24:]
        if not ts or len(ts) > 12 or not hmac.compare_digest(self._sign(ts, source), sig):
            return False, False
        try:
            age = now - int(ts, 16)
        except ValueError:
            return False, False
        return True, 0 <= age <= NONCE_TTL

    def challenge(self, source: str, stale: bool = False) -> tuple[str, str]:
        value = f'Digest realm="{self.realm}", nonce="{self.nonce(source)}", algorithm=MD5, qop="auth"'
        if stale:
            value += ", stale=true"
        return "WWW-Authenticate", value

    def check(self, msg: SipMessage, source: str, now: float | None = None) -> AuthResult:
        now = time.time() if now is None else now
        header = msg.get("Authorization")
        if not header or not header.lower().startswith("digest "):
            return AuthResult(False, 401, reason="missing")
        p = _digest_params(header[7:])
        nonce = p.get("nonce", "")
        valid, fresh = self._nonce_ok(nonce, source, now)
        if not valid:
            return AuthResult(False, 401, reason="bad-nonce")
        if p.get("username") != self.user or p.get("realm") != self.realm:
            return AuthResult(False, 403, reason="wrong-user")
        if (p.get("qop") or "").lower() != "auth":
            return AuthResult(False, 401, reason="bad-qop")
        nc_text = p.get("nc", "")
        try:
            nc = int(nc_text, 16) if len(nc_text) == 8 else -1
        except ValueError:
            nc = -1
        if nc < 1:
            return AuthResult(False, 401, reason="bad-qop")
        ha2 = _md5(f"{msg.method}:{p.get('uri', '')}")
        expected = _md5(f"{self._ha1}:{nonce}:{nc_text}:{p.get('cnonce', '')}:auth:{ha2}")
        if not hmac.compare_digest(expected, p.get("response", "").lower()):
            return AuthResult(False, 403, reason="wrong-password")
        if p.get("uri") != msg.uri:
            return AuthResult(False, 401, reason="bad-uri")  # a captured answer for another URI
        if not fresh:
            return AuthResult(False, 401, stale=True, reason="stale")
        if nc <= self._counts.get(nonce, 0):
            return AuthResult(False, 401, reason="replay")
        self._counts[nonce] = nc
        self._counts.move_to_end(nonce)
        while len(self._counts) > _MAX_SOURCES:
            self._counts.popitem(last=False)
        return AuthResult(True)


class PendingInvites:
    """INVITEs forwarded to the stack and not yet settled: no final answer yet, or answered
    200 and not yet established (ACKed). Each holds a call slot without proof that the
    caller is real, so they are capped per source and in total. Keyed by Call-ID; the leg
    settles a call when it is established or ends. A 200 counts `ack_window` seconds at
    most (the leg hangs up an un-ACKed call by then), anything else `ttl` seconds (RFC 3261
    Timer B/H: no transaction lives longer)."""

    def __init__(self, per_source: int, total: int, *, ack_window: float = 8.0, ttl: float = 64.0) -> None:
        self.per_source = per_source
        self.total = total
        self.ack_window = ack_window
        self.ttl = ttl
        self._calls: OrderedDict[str, tuple[str, float]] = OrderedDict()  # call id -> (source, deadline)
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def count(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def full(self, source: str, now: float | None = None) -> str | None:
        """'source' or 'total' when one more INVITE from `source` would pass a cap."""
        self.expire(time.monotonic() if now is None else now)
        if self.count(source) >= self.per_source:
            return "source"
        if len(self._calls) >= self.total:
            return "total"
        return None

    def add(self, call_id: str, source: str, now: float | None = None) -> None:
        if call_id in self._calls:
            return
        self._calls[call_id] = (source, (time.monotonic() if now is None else now) + self.ttl)
        self._by_source[source] = self.count(source) + 1

    def answered(self, call_id: str, now: float | None = None) -> None:
        """A 200 went out: the ACK should follow within `ack_window`."""
        entry = self._calls.get(call_id)
        if entry is not None:
            deadline = (time.monotonic() if now is None else now) + self.ack_window
            self._calls[call_id] = (entry[0], min(entry[1], deadline))

    def settle(self, call_id: str) -> None:
        entry = self._calls.pop(call_id, None)
        if entry is None:
            return
        left = self._by_source.get(entry[0], 1) - 1
        if left > 0:
            self._by_source[entry[0]] = left
        else:
            self._by_source.pop(entry[0], None)

    def expire(self, now: float) -> None:
        for call_id in [c for c, (_, deadline) in self._calls.items() if deadline <= now]:
            self.settle(call_id)


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _digest_params(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " ,\t":
            i += 1
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().lower()
        i = eq + 1
        if i < n and text[i] == '"':
            end = text.find('"', i + 1)
            end = n if end < 0 else end
            out[key] = text[i + 1:end]
            i = end + 1
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            out[key] = text[i:end].strip()
            i = end
    return out
