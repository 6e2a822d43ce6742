"""Inbound protection at the SIP front door, checked in this order for each new INVITE:

1. source allowlist (CIDR networks): anything else gets 403;
2. per-source rate limit (token bucket, `rate` INVITEs/s, burst 2×rate): over it, 503 with
   Retry-After, so a well-behaved peer backs off and a flood costs us one datagram each;
3. digest authentication (RFC 2617/7616 MD5, qop=auth): no or stale credentials get a 401
   challenge, wrong ones 403.

Nonces are stateless: a timestamp signed with a per-process secret, valid `NONCE_TTL`
seconds, so nothing grows per challenge. The rate limiter's table is bounded (oldest
source evicted first); none of this allocates per packet beyond the message itself.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import time
from collections import OrderedDict
from dataclasses import dataclass

from .sip_message import SipMessage

__all__ = ["Allowlist", "RateLimiter", "DigestAuth", "AuthResult", "NONCE_TTL"]

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
    status: int = 0  # 401 (challenge) or 403 (wrong credentials) when not ok
    stale: bool = False


class DigestAuth:
    """Checks `Authorization: Digest ...` on an INVITE against one user and password."""

    def __init__(self, user: str, password: str, realm: str = "duplexline") -> None:
        self.user = user
        self.realm = realm
        self._ha1 = _md5(f"{user}:{realm}:{password}")
        self._secret = os.urandom(16)

    def nonce(self, now: float | None = None) -> str:
        ts = f"{int(time.time() if now is None else now):x}"
        sig = hmac.new(self._secret, ts.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{ts}{sig}"

    def _nonce_ok(self, nonce: str, now: float) -> tuple[bool, bool]:
        """(valid signature, fresh)."""
        ts, sig = nonce[:-24], nonce[-24:]
        if not ts or not hmac.compare_digest(hmac.new(self._secret, ts.encode(), hashlib.sha256)
                                             .hexdigest()[:24], sig):
            return False, False
        try:
            age = now - int(ts, 16)
        except ValueError:
            return False, False
        return True, 0 <= age <= NONCE_TTL

    def challenge(self, stale: bool = False) -> tuple[str, str]:
        value = f'Digest realm="{self.realm}", nonce="{self.nonce()}", algorithm=MD5, qop="auth"'
        if stale:
            value += ", stale=true"
        return "WWW-Authenticate", value

    def check(self, msg: SipMessage, now: float | None = None) -> AuthResult:
        now = time.time() if now is None else now
        header = msg.get("Authorization")
        if not header or not header.lower().startswith("digest "):
            return AuthResult(False, 401)
        p = _digest_params(header[7:])
        nonce = p.get("nonce", "")
        valid, fresh = self._nonce_ok(nonce, now)
        if not valid:
            return AuthResult(False, 401)
        if p.get("username") != self.user or p.get("realm") != self.realm:
            return AuthResult(False, 403)
        ha2 = _md5(f"{msg.method}:{p.get('uri', '')}")
        qop = p.get("qop")
        if qop:
            if qop.lower() != "auth":
                return AuthResult(False, 401)
            expected = _md5(f"{self._ha1}:{nonce}:{p.get('nc', '')}:{p.get('cnonce', '')}:{qop}:{ha2}")
        else:
            expected = _md5(f"{self._ha1}:{nonce}:{ha2}")
        if not hmac.compare_digest(expected, p.get("response", "").lower()):
            return AuthResult(False, 403)
        if not fresh:
            return AuthResult(False, 401, stale=True)
        return AuthResult(True)


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
