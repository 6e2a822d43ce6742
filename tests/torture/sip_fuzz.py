"""A seeded, grammar-aware SIP fuzzer: valid requests (INVITE with SDP, REGISTER, OPTIONS,
BYE, CANCEL, ACK) bent by the mutations of tests/torture/sip_mutations.py (which know
SIP's grammar) and, now and again, by byte-level damage.

Model: case `i` of seed `s` is a pure function of (s, i) and the addresses it is rendered
for (our source address and port, the bridge's SIP port, the canary's address): its random
generator is seeded with the text "s/i", so any one case can be rebuilt alone, without
the thousands before it (`python -m tests.torture.replay`). About one case in ten is left
valid, as a control: a bridge that stops answering valid requests under fuzz is broken too.
Each case names the mutations that made it, so a failure can say which ones did.

Every IPv4 address a case names is on 127.0.0.0/8 (a final guard puts back any that a fold
or a flipped byte moved off it), so even a stack that obeys a hostile Via, Contact or SDP
stays on loopback; the torture tier also runs the bridge in a private network namespace,
so nothing can leave the machine whatever a case says.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .sip_mutations import MUTATIONS, RAW_MUTATIONS, Draft, sdp_offer

__all__ = ["SipFuzzer", "Case", "Target", "TEMPLATES", "MUTATIONS", "RAW_MUTATIONS", "UDP_MAX"]

TEMPLATES = ("INVITE", "REGISTER", "OPTIONS", "BYE", "CANCEL", "ACK")
_TEMPLATE_WEIGHTS = (50, 10, 12, 10, 9, 9)
UDP_MAX = 65507  # the largest UDP payload over IPv4
_VALID_SHARE = 0.10  # cases left unmutated (controls)
_RAW_SHARE = 0.15  # cases that also get byte-level damage


@dataclass(frozen=True)
class Target:
    """Where a case is rendered for: the bridge's SIP port, our source, the canary (a
    socket that should never hear anything), and the transport the Via names."""

    bridge_port: int
    local_host: str
    local_port: int
    canary_host: str = "127.0.0.9"
    canary_port: int = 9
    transport: str = "UDP"  # or "TCP"
    contact_port: int | None = None  # where in-dialog requests should reach us (default local_port)


@dataclass(frozen=True)
class Case:
    """One message: the template it started from, the mutations applied (in order; empty:
    a valid control), the bytes, and the identifiers an answer is matched on."""

    seed: int
    index: int
    method: str
    mutations: tuple[str, ...]
    data: bytes
    call_id: str
    branch: str

    @property
    def valid(self) -> bool:
        return not self.mutations

    def describe(self) -> str:
        what = ", ".join(self.mutations) or "valid control"
        return f"seed {self.seed} case {self.index}: {self.method} [{what}] ({len(self.data)} bytes)"


def _template(method: str, t: Target, seed: int, index: int, rng: random.Random) -> tuple[Draft, str, str]:
    call_id = f"fz{seed:x}-{index}@{t.local_host}"
    branch = f"z9hG4bKfz{seed:x}x{index}"
    user = rng.choice(["bot", "bot", "1000", "alice", "+4930123456"])
    uri = f"sip:{user}@127.0.0.1:{t.bridge_port}"
    if method == "REGISTER":
        uri = f"sip:127.0.0.1:{t.bridge_port}"
    contact_port = t.contact_port or t.local_port
    tag = f"{rng.getrandbits(32):08x}"
    d = Draft(method, uri)
    d.headers = [
        ["Via", f"SIP/2.0/{t.transport} {t.local_host}:{t.local_port};branch={branch};rport"],
        ["Max-Forwards", "70"],
        ["From", f"\"Fuzz {index}\" <sip:fuzz@{t.local_host}:{contact_port}>;tag={tag}"],
        ["To", f"<sip:{user}@127.0.0.1:{t.bridge_port}>"],
        ["Call-ID", call_id],
        ["CSeq", f"{rng.randrange(1, 1000)} {method}"],
    ]
    if method in ("INVITE", "REGISTER", "OPTIONS"):
        d.headers.append(["Contact", f"<sip:fuzz@{t.local_host}:{contact_port}>"])
    if method in ("BYE", "ACK"):  # in-dialog requests carry the far end's tag
        d.headers[3][1] += f";tag={rng.getrandbits(32):08x}"
    if method == "REGISTER":
        d.headers.append(["Expires", str(rng.choice([0, 60, 3600]))])
    if method == "OPTIONS":
        d.headers.append(["Accept", "application/sdp"])
    d.headers.append(["User-Agent", "duplexline-torture"])
    if method == "INVITE":
        d.headers.append(["Content-Type", "application/sdp"])
        d.body = sdp_offer(t.local_host, 9, rng).encode()
    d.headers.append(["Content-Length", "0"])
    return d, call_id, branch


_QUAD = re.compile(rb"(?<![0-9.])(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?![0-9])")


def _loopback_only(data: bytes) -> bytes:
    """Every IPv4 literal off 127.0.0.0/8 replaced by 127.0.0.1 (same length or not)."""

    def fix(m: re.Match) -> bytes:
        if all(int(g) <= 255 for g in m.groups()) and m.group(1) != b"127":
            return b"127.0.0.1"
        return m.group(0)

    return _QUAD.sub(fix, data)


class SipFuzzer:
    """Case `index` of `seed`, rendered for `target`: `SipFuzzer(seed).case(index, target)`."""

    def __init__(self, seed: int, *, max_bytes: int = UDP_MAX) -> None:
        self.seed = seed
        self.max_bytes = max_bytes
        self._names = list(MUTATIONS)
        self._weights = [MUTATIONS[n][0] for n in self._names]
        self._raw_names = list(RAW_MUTATIONS)
        self._raw_weights = [RAW_MUTATIONS[n][0] for n in self._raw_names]

    def case(self, index: int, target: Target) -> Case:
        rng = random.Random(f"{self.seed}/{index}")
        method = rng.choices(TEMPLATES, _TEMPLATE_WEIGHTS)[0]
        draft, call_id, branch = _template(method, target, self.seed, index, rng)
        applied: list[str] = []
        if rng.random() >= _VALID_SHARE:
            count = 1 + min(3, int(rng.expovariate(1.2)))
            for name in rng.choices(self._names, self._weights, k=count):
                MUTATIONS[name][1](rng, draft, target)
                applied.append(name)
        data = draft.render()
        if applied and rng.random() < _RAW_SHARE:
            name = rng.choices(self._raw_names, self._raw_weights)[0]
            data = RAW_MUTATIONS[name][1](rng, data, target)
            applied.append(name)
        if len(data) > self.max_bytes:
            data = data[: self.max_bytes]
            applied.append("cut-to-max")
        guarded = _loopback_only(data)
        if guarded != data:  # a fold or a flipped byte made an address off loopback: put it back
            data = guarded
            applied.append("egress-guard")
        return Case(self.seed, index, method, tuple(applied), data, call_id, branch)
