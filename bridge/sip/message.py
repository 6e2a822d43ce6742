"""SIP messages as the front door (bridge/sip/front.py) needs them: parse, edit headers,
serialize, and build a response to a request (RFC 3261 §7, §8.2.6).

Deliberately small: the front only routes and refuses, so it reads the start line, the
headers it acts on (Via, From, To, Call-ID, CSeq, Max-Forwards, Authorization, Content-
Length) and carries the body through untouched. Header order is kept; compact header names
(`v`, `f`, `t`, `i`, `l`, ...) are expanded on parse. A message that cannot be parsed raises
`SipParseError` and is dropped by the caller (a proxy never answers garbage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BridgeError

__all__ = ["SipParseError", "SipMessage", "parse", "uri_user", "header_param",
           "split_frames", "MAX_MESSAGE"]

_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID", "m": "Contact", "l": "Content-Length",
            "c": "Content-Type", "k": "Supported", "s": "Subject", "e": "Content-Encoding",
            "o": "Event", "r": "Refer-To", "b": "Referred-By", "x": "Session-Expires"}
_CANONICAL = {n.lower(): n for n in ("Via", "From", "To", "Call-ID", "CSeq", "Contact", "Content-Length",
                                     "Content-Type", "Max-Forwards", "Authorization", "WWW-Authenticate",
                                     "Retry-After", "User-Agent", "Server", "Allow", "Supported",
                                     "Record-Route", "Route")}
MAX_MESSAGE = 16 * 1024  # real INVITEs are 1-3 KB; a TCP buffer never grows past this


class SipParseError(BridgeError, ValueError):
    """The bytes are not a SIP message the front can act on; they were dropped."""


@dataclass
class SipMessage:
    """A request (`method` set) or a response (`status` set). Headers are (name, value)
    pairs in wire order, names in canonical case."""

    method: str = ""
    uri: str = ""
    status: int = 0
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return bool(self.method)

    def get(self, name: str) -> str | None:
        key = name.lower()
        for n, v in self.headers:
            if n.lower() == key:
                return v
        return None

    def set(self, name: str, value: str) -> None:
        """Replace the first header of that name (or append it)."""
        key = name.lower()
        for i, (n, _) in enumerate(self.headers):
            if n.lower() == key:
                self.headers[i] = (n, value)
                return
        self.headers.append((name, value))

    def prepend(self, name: str, value: str) -> None:
        """Put a header above every other one (a proxy's own Via goes on top)."""
        self.headers.insert(0, (name, value))

    def remove_first(self, name: str) -> str | None:
        key = name.lower()
        for i, (n, v) in enumerate(self.headers):
            if n.lower() == key:
                del self.headers[i]
                return v
        return None

    @property
    def cseq_method(self) -> str:
        parts = (self.get("CSeq") or "").split()
        return parts[1].upper() if len(parts) == 2 else ""

    @property
    def call_id(self) -> str:
        return self.get("Call-ID") or ""

    def to_tag(self) -> str | None:
        return header_param(self.get("To") or "", "tag")

    def top_via(self) -> str:
        return self.get("Via") or ""

    def branch(self) -> str:
        return header_param(self.top_via(), "branch") or ""

    def encode(self) -> bytes:
        if self.method:
            start = f"{self.method} {self.uri} SIP/2.0"
        else:
            start = f"SIP/2.0 {self.status} {self.reason}"
        lines = [start]
        lines.extend(f"{n}: {v}" for n, v in self.headers if n.lower() != "content-length")
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "replace") + self.body

    def response(self, status: int, reason: str, *, to_tag: str | None = None,
                 extra: list[tuple[str, str]] | None = None) -> "SipMessage":
        """A response to this request: Vias, From, To (+ our tag), Call-ID and CSeq copied
        (RFC 3261 §8.2.6.2)."""
        headers: list[tuple[str, str]] = [(n, v) for n, v in self.headers if n == "Via"]
        to = self.get("To") or ""
        if to_tag and header_param(to, "tag") is None:
            to = f"{to};tag={to_tag}"
        headers += [("From", self.get("From") or ""), ("To", to), ("Call-ID", self.call_id),
                    ("CSeq", self.get("CSeq") or "")]
        headers += extra or []
        headers.append(("Server", "duplexline"))
        return SipMessage(status=status, reason=reason, headers=headers)


def parse(data: bytes) -> SipMessage:
    """One whole message (a UDP datagram, or a frame cut by `split_frames`)."""
    if len(data) > MAX_MESSAGE:
        raise SipParseError("message too large")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise SipParseError("no blank line after the headers")
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    msg = SipMessage()
    first = lines[0].strip()
    if first.startswith("SIP/2.0 "):
        parts = first.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit() or len(parts[1]) != 3:
            raise SipParseError(f"bad status line {first[:60]!r}")
        msg.status, msg.reason = int(parts[1]), parts[2] if len(parts) > 2 else ""
    else:
        parts = first.split(" ")
        if len(parts) != 3 or parts[2] != "SIP/2.0" or not parts[0].isalpha():
            raise SipParseError(f"bad request line {first[:60]!r}")
        msg.method, msg.uri = parts[0].upper(), parts[1]
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and msg.headers:  # folded continuation line
            n, v = msg.headers[-1]
            msg.headers[-1] = (n, v + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise SipParseError(f"bad header line {line[:60]!r}")
        name = name.strip()
        name = _COMPACT.get(name, name) if len(name) == 1 else name
        name = _CANONICAL.get(name.lower(), name)
        value = value.strip()
        if name == "Via" and "," in value:
            # Comma-joined Vias are separate entries; a proxy must see each one.
            for item in _split_commas(value):
                msg.headers.append((name, item))
            continue
        msg.headers.append((name, value))
    length = msg.get("Content-Length")
    if length is not None:
        length = length.strip()
        # isascii: '²'.isdigit() is True and int('²') raises
        if not (length.isascii() and length.isdigit()) or len(length) > 6:
            raise SipParseError("bad Content-Length")
        body = body[:int(length)]
    msg.body = body
    if msg.is_request and not msg.call_id:
        raise SipParseError("request without Call-ID")
    if not msg.top_via():
        raise SipParseError("message without Via")
    return msg


def split_frames(buffer: bytearray) -> list[bytes]:
    """Cut whole messages off the front of a TCP stream buffer (in place); keep the rest.
    Keep-alive CRLFs between messages are skipped. Raises SipParseError on a stream that
    cannot be framed (no Content-Length over a stream is an error, RFC 3261 §18.3)."""
    out: list[bytes] = []
    while True:
        while buffer[:2] == b"\r\n":
            del buffer[:2]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_MESSAGE:
                raise SipParseError("header block too large")
            return out
        head = bytes(buffer[:end]).decode("utf-8", "replace")
        m = re.search(r"^(?:content-length|l)[ \t]*:[ \t]*([0-9]{1,6})[ \t]*$", head, re.I | re.M)
        if m is None:
            raise SipParseError("stream message without Content-Length")
        total = end + 4 + int(m.group(1))
        if total > MAX_MESSAGE:
            raise SipParseError("message too large")
        if len(buffer) < total:
            return out
        out.append(bytes(buffer[:total]))
        del buffer[:total]


def _split_commas(value: str) -> list[str]:
    items, depth, quoted, start = [], 0, False, 0
    for i, ch in enumerate(value):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "<":
            depth += 1
        elif not quoted and ch == ">":
            depth -= 1
        elif not quoted and depth == 0 and ch == ",":
            items.append(value[start:i].strip())
            start = i + 1
    items.append(value[start:].strip())
    return [i for i in items if i]


def header_param(value: str, name: str) -> str | None:
    """`;name=value` of a header (outside any <...> URI); '' for a flag parameter."""
    tail = value.rsplit(">", 1)[1] if ">" in value else value
    for part in tail.split(";")[1:]:
        key, eq, val = part.partition("=")
        if key.strip().lower() == name:
            return val.strip() if eq else ""
    return None


def uri_user(uri: str) -> str:
    """The user part of `sip:user@host...` (or of a name-addr `"x" <sip:...>`); ''."""
    if "<" in uri:
        uri = uri.split("<", 1)[1].split(">", 1)[0]
    scheme, colon, rest = uri.partition(":")
    if not colon or scheme.lower() not in ("sip", "sips", "tel"):
        return ""
    if scheme.lower() == "tel":
        return rest.split(";", 1)[0]
    userinfo, at, _ = rest.partition("@")
    if not at:
        return ""
    return userinfo.split(":", 1)[0].split(";", 1)[0]


def addr_uri(value: str) -> str:
    """The URI of a From/To value (`"x" <sip:a@b>;tag=1` -> `sip:a@b`); ''."""
    if "<" in value:
        return value.split("<", 1)[1].split(">", 1)[0].strip()
    return value.split(";", 1)[0].strip()


_STATIC_PT = {"0": "pcmu", "8": "pcma", "9": "g722"}


def sdp_codec(body: bytes) -> str | None:
    """The first audio codec of an SDP answer (what the call speaks), lower case; None
    when the body holds no audio line. Cheap: once per answered call."""
    text = body.decode("ascii", "replace")
    lines = [line.strip() for line in text.splitlines()]
    media = next((line.split() for line in lines if line.startswith("m=audio ")), None)
    if media is None or len(media) < 4:
        return None
    pt = media[3]
    prefix = f"a=rtpmap:{pt} "
    name = next((line[len(prefix):].split("/", 1)[0] for line in lines if line.startswith(prefix)), None)
    return name.lower() if name else _STATIC_PT.get(pt)
