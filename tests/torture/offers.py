"""Hostile WebRTC offers for POST /webrtc/offer, seeded like the SIP fuzzer: a fixed set of
known-bad bodies (not JSON, deep JSON, wrong types, huge), requests with the wrong content
type, Chromium's own offer bent by SDP mutations, and raw-socket requests plain clients
cannot make (a Content-Length far over the limit, a chunked body that never ends being
large). Offers that are fine but never connect are the test's own (see test_webrtc_offers).

Candidates a mutation adds name only the namespace's own addresses (10.231.x.x, 127.x):
aiortc checks every candidate it is given, and the test's namespace would drop anything
else anyway.
"""

from __future__ import annotations

import json
import random
import socket
from dataclasses import dataclass

from tests.integration.test_webrtc_offers import CHROME_OFFER

__all__ = ["HttpCase", "hostile_cases", "raw_cases", "CHROME_OFFER", "offer_body", "raw_exchange"]

_UNICODE_DIGITS = ("²", "٣", "５", "𝟕")


@dataclass(frozen=True)
class HttpCase:
    index: int
    name: str
    body: bytes
    headers: dict

    def describe(self) -> str:
        return f"offer case {self.index}: {self.name} ({len(self.body)} bytes)"


def offer_body(sdp: str, kind: str = "offer") -> bytes:
    return json.dumps({"type": kind, "sdp": sdp}).encode()


_JSON = {"Content-Type": "application/json"}

_FIXED = [
    ("not-json", b"this is not json", _JSON),
    ("json-array", b"[1, 2, 3]", _JSON),
    ("json-null", b"null", _JSON),
    ("no-sdp", b'{"type": "offer"}', _JSON),
    ("sdp-not-string", b'{"type": "offer", "sdp": 42}', _JSON),
    ("sdp-list", b'{"type": "offer", "sdp": ["v=0"]}', _JSON),
    ("type-answer", offer_body(CHROME_OFFER, "answer"), _JSON),
    ("type-missing", json.dumps({"sdp": CHROME_OFFER}).encode(), _JSON),
    ("deep-json", b"[" * 100_000, _JSON),
    ("deep-object", b'{"a":' * 5_000 + b"1" + b"}" * 5_000, _JSON),
    ("huge-body-200k", b"x" * (200 * 1024), _JSON),
    ("huge-sdp", offer_body(CHROME_OFFER + "a=x:" + "y" * 60_000 + "\r\n"), _JSON),
    ("empty-body", b"", _JSON),
    ("empty-sdp", offer_body(""), _JSON),
    ("utf16-body", offer_body(CHROME_OFFER).decode().encode("utf-16"), _JSON),
    ("invalid-utf8", b'{"type": "offer", "sdp": "v=0\xff\xfe"}', _JSON),
    ("nul-in-sdp", offer_body(CHROME_OFFER.replace("a=mid:0", "a=mid:\x00")), _JSON),
    ("text-plain", offer_body(CHROME_OFFER), {"Content-Type": "text/plain"}),
    ("form-urlencoded", b"type=offer&sdp=v%3D0", {"Content-Type": "application/x-www-form-urlencoded"}),
    ("multipart", b"--b\r\nContent-Disposition: form-data; name=sdp\r\n\r\nv=0\r\n--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}),
    ("no-content-type", offer_body(CHROME_OFFER), {}),
    ("json-charset-odd", offer_body(CHROME_OFFER), {"Content-Type": "application/json; charset=ebcdic"}),
    ("bearer-garbage", offer_body(CHROME_OFFER), {**_JSON, "Authorization": "Bearer " + "\u00e9" * 10}),
    ("duplicate-keys", b'{"type": "offer", "sdp": "v=0", "sdp": 1}', _JSON),
    ("float-overflow", b'{"type": "offer", "sdp": "v=0", "x": 1e999999}', _JSON),
]


def _mutate_sdp(rng: random.Random) -> tuple[str, str]:
    lines = CHROME_OFFER.split("\r\n")
    choice = rng.randrange(18)
    if choice == 0:
        name = "drop-lines"
        for _ in range(rng.randint(1, 6)):
            if len(lines) > 1:
                del lines[rng.randrange(len(lines))]
    elif choice == 1:
        name = "duplicate-lines"
        for _ in range(rng.randint(1, 20)):
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
    elif choice == 2:
        name = "shuffle"
        rng.shuffle(lines)
    elif choice == 3:
        name = "unicode-digits"
        lines = ["".join(rng.choice(_UNICODE_DIGITS) if c.isdigit() and rng.random() < 0.2 else c for c in ln)
                 for ln in lines]
    elif choice == 4:
        name = "huge-ufrag"
        lines = [ln.split(":", 1)[0] + ":" + "u" * rng.choice([300, 3000]) if ln.startswith("a=ice-ufrag") else ln
                 for ln in lines]
    elif choice == 5:
        name = "fingerprint-odd"
        algo = rng.choice(["sha-999", "md5", "", "sha-256 ZZ", "sha-256"])
        lines = [f"a=fingerprint:{algo} {'AB:' * rng.choice([0, 1, 31, 500])}CD" if ln.startswith("a=fingerprint")
                 else ln for ln in lines]
    elif choice == 6:
        name = "candidates"
        port = rng.choice([9, 1, 65535, 40000])
        host = rng.choice(["10.231.1.2", "127.0.0.1", "10.231.250.9", "::1", "not-an-address", "²²²"])
        at = lines.index("a=rtcp-mux") if "a=rtcp-mux" in lines else len(lines)
        lines[at:at] = [f"a=candidate:{k} 1 udp {2130706431 - k} {host} {port + k % 3} typ host"
                        for k in range(rng.choice([1, 5, 50, 400]))]
    elif choice == 7:
        name = "many-ssrc"
        lines += [f"a=ssrc:{k} cname:x" for k in range(rng.choice([100, 900]))]
    elif choice == 8:
        name = "extmap-ids"
        lines += [f"a=extmap:{rng.choice([0, 15, 256, 99999, -1])} urn:x:{k}" for k in range(10)]
    elif choice == 9:
        name = "rtpmap-odd"
        lines = [ln.replace("opus/48000/2", rng.choice(["opus/48000/99", "opus/0/2", "opus/48000/²", "opus"]))
                 for ln in lines]
    elif choice == 10:
        name = "m-line-odd"
        lines = [rng.choice(["m=audio 9 UDP/TLS/RTP/SAVPF", "m=audio -1 UDP/TLS/RTP/SAVPF 111", "m=audio",
                             "m=audio 9 UDP/TLS/RTP/SAVPF " + " ".join(str(k) for k in range(300)),
                             "m=audio 9 RTP/AVP 0"]) if ln.startswith("m=audio") else ln for ln in lines]
    elif choice == 11:
        name = "setup-odd"
        lines = [f"a=setup:{rng.choice(['active', 'passive', 'holdconn', '', 'x' * 100])}"
                 if ln.startswith("a=setup") else ln for ln in lines]
    elif choice == 12:
        name = "bundle-odd"
        lines = [rng.choice(["a=group:BUNDLE", "a=group:BUNDLE 7 8 9", "a=group:BUNDLE " + "0 " * 500])
                 if ln.startswith("a=group") else ln for ln in lines]
    elif choice == 13:
        name = "control-chars"
        i = rng.randrange(len(lines))
        lines[i] = lines[i] + rng.choice(["\x01", "\x1b[2J", "\x7f", "\u202e"])
    elif choice == 14:
        name = "lf-only"
        return "lf-only", "\n".join(lines)
    elif choice == 15:
        name = "truncated"
        text = "\r\n".join(lines)
        return name, text[:rng.randrange(len(text))]
    elif choice == 16:
        name = "random-bytes"
        return name, rng.randbytes(rng.choice([10, 500, 5000])).decode("latin-1")
    else:
        name = "no-ice-credentials"
        lines = [ln for ln in lines if not ln.startswith(("a=ice-ufrag", "a=ice-pwd"))]
    return name, "\r\n".join(lines)


def hostile_cases(seed: int, count: int) -> list[HttpCase]:
    """The fixed bodies first, then SDP mutations of Chromium's offer, `count` in all."""
    out = [HttpCase(i, name, body, headers) for i, (name, body, headers) in enumerate(_FIXED[:count])]
    for i in range(len(out), count):
        rng = random.Random(f"{seed}/offer/{i}")
        name, sdp = _mutate_sdp(rng)
        out.append(HttpCase(i, f"sdp-{name}", offer_body(sdp), dict(_JSON)))
    return out


def raw_exchange(port: int, request: bytes, *, then: bytes = b"", read_timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw HTTP/1.1 to 127.0.0.1:`port` (call it on a thread inside the namespace):
    the status line's code (0: the connection closed without one) and the first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        try:
            sock.sendall(request)
            if then:
                sock.sendall(then)
        except OSError:  # the server may answer and close while we still send: that is fine
            pass
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    parts = data.split(b" ", 2)
    code = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    return code, data[:200]


def raw_cases() -> list[tuple[str, bytes, bytes]]:
    """(name, request head, body bytes sent after it) that urllib would not send."""
    head = "POST /webrtc/offer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    return [
        ("declared-100MB", (head + "Content-Length: 104857600\r\n\r\n").encode(), b"x" * (256 * 1024)),
        ("chunked-2MB", (head + "Transfer-Encoding: chunked\r\n\r\n").encode(),
         b"".join(b"10000\r\n" + b"x" * 0x10000 + b"\r\n" for _ in range(32)) + b"0\r\n\r\n"),
        ("negative-length", (head + "Content-Length: -1\r\n\r\n").encode(), b"{}"),
        ("two-lengths", (head + "Content-Length: 2\r\nContent-Length: 200\r\n\r\n").encode(), b"{}"),
        ("huge-header", (head + "X-Junk: " + "j" * 200_000 + "\r\nContent-Length: 2\r\n\r\n").encode(), b"{}"),
        ("many-headers", (head + "".join(f"X-{k}: v\r\n" for k in range(5000)) + "Content-Length: 2\r\n\r\n")
         .encode(), b"{}"),
        ("get-offer", b"GET /webrtc/offer HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b""),
        ("http-0.9", b"POST /webrtc/offer\r\n\r\n", b""),
    ]
