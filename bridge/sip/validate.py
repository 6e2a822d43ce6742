"""Grammar and size checks on a parsed SIP request, before the SIP stack sees it.

The stack (baresip) trusts its input: an otherwise valid INVITE whose From has no tag
corrupted its native heap, a Call-ID with a space rang for two minutes, a Via port of
'²' raised inside the front. So every request the front forwards, or answers, passes
`check_request` first (RFC 3261 §7, §8.1.1, §20, §25; RFC 4566 for the SDP). It returns
None for a request that is fine, or a `Malformed` whose `reason` is one of `REASONS`
(a bounded metric label) and whose `detail` says what was wrong, for the log.

Limits are deliberately tight for a phone line (real INVITEs are 1-3 KB): see the
constants below; docs/security.md lists them.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .message import MAX_MESSAGE, SipMessage, header_param

__all__ = ["Malformed", "check_request", "REASONS", "MAX_MESSAGE", "MAX_URI", "MAX_CALL_ID",
           "MAX_HEADERS", "MAX_HEADER", "MAX_VIAS", "MAX_BODY", "ascii_int", "valid_host"]

MAX_HEADER = 2048  # characters of one header value
MAX_HEADERS = 64  # header lines
MAX_VIAS = 10
MAX_URI = 256  # characters of the Request-URI and the URIs in From/To/Contact
MAX_CALL_ID = 128
MAX_BODY = 8 * 1024
MAX_SDP_LINES = 64

REASONS = ("parse", "size", "request-line", "uri", "via", "from", "to", "call-id", "cseq",
           "max-forwards", "content-length", "content-type", "sdp", "header")

_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+\Z")  # RFC 3261 §25.1 token
_CALL_ID = re.compile(r"[A-Za-z0-9.!%*_+`'~()<>:\\\"/\[\]?{}@-]+\Z")  # word ["@" word]
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VIA = re.compile(r"SIP\s*/\s*2\.0\s*/\s*(UDP|TCP|TLS|SCTP|WS|WSS)\s+([^;\s]+)\s*(;.*)?\Z", re.I)
_URI_SCHEMES = ("sip:", "sips:", "tel:")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*\.?\Z")
_SDP_LINE = re.compile(r"[a-z]=")


@dataclass(frozen=True)
class Malformed:
    reason: str  # one of REASONS
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


def ascii_int(text: str | None, *, low: int = 0, high: int = 2**31 - 1) -> int | None:
    """An ASCII decimal within [low, high], or None ('²'.isdigit() is True in Python)."""
    if text is None:
        return None
    text = text.strip()
    if not text or len(text) > 10 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if low <= value <= high else None


def valid_host(host: str) -> bool:
    """A hostname, an IPv4 address or a bracketed IPv6 address."""
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
            return True
        except ValueError:
            return False
    if len(host) > 253 or not host.isascii():
        return False
    return bool(_HOSTNAME.match(host))


def split_hostport(hostport: str) -> tuple[str, int | None] | None:
    """'host', 'host:port', '[v6]:port' -> (host, port or None); None when malformed."""
    if hostport.startswith("["):
        host, bracket, rest = hostport.partition("]")
        host += bracket
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = hostport.partition(":")
        port_text = port_text if colon else None
    if not valid_host(host):
        return None
    if port_text is None:
        return host, None
    port = ascii_int(port_text, low=1, high=65535)
    return (host, port) if port is not None else None


def _uri_ok(uri: str) -> bool:
    if not uri or len(uri) > MAX_URI or _CONTROL.search(uri) or " " in uri:
        return False
    low = uri.lower()
    if not low.startswith(_URI_SCHEMES):
        return False
    if low.startswith("tel:"):
        return len(uri) > 4
    rest = uri.split(":", 1)[1]
    hostport = rest.rsplit("@", 1)[-1].split(";", 1)[0].split("?", 1)[0]
    return split_hostport(hostport) is not None


def _addr_uri(value: str) -> str:
    """The URI of a name-addr (`"x" <sip:...>;tag=`) or addr-spec (`sip:...;tag=`)."""
    if "<" in value:
        inner = value.split("<", 1)[1]
        if ">" not in inner:
            return ""
        return inner.split(">", 1)[0]
    return value.split(";", 1)[0].strip()


def _check_via(via: str) -> str | None:
    m = _VIA.match(via.strip())
    if m is None:
        return f"not SIP/2.0/TRANSPORT host[:port]: {via[:60]!r}"
    if split_hostport(m.group(2)) is None:
        return f"bad sent-by {m.group(2)[:60]!r}"
    params = m.group(3) or ""
    if not header_param(params, "branch"):
        return "no branch parameter"
    rport = header_param(params, "rport")
    if rport not in (None, "") and ascii_int(rport, low=1, high=65535) is None:
        return f"bad rport {rport[:20]!r}"
    received = header_param(params, "received")
    if received is not None:
        try:
            ipaddress.ip_address(received)
        except ValueError:
            return f"received is not an IP address: {received[:40]!r}"
    return None


def _check_sdp(body: bytes) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    if len(lines) > MAX_SDP_LINES:
        return f"{len(lines)} lines (most {MAX_SDP_LINES})"
    if not lines or lines[0].strip() != "v=0":
        return "does not start with v=0"
    audio = 0
    for line in lines:
        if not _SDP_LINE.match(line) or _CONTROL.search(line.rstrip("\r")):
            return f"bad line {line[:40]!r}"
        kind, value = line[0], line[2:].strip()
        if kind == "c":
            parts = value.split()
            if len(parts) != 3 or parts[0] != "IN" or parts[1] not in ("IP4", "IP6"):
                return f"bad connection line {line[:60]!r}"
            try:
                ipaddress.ip_address(parts[2].split("/", 1)[0])
            except ValueError:
                return f"bad connection address {parts[2][:40]!r}"
        elif kind == "m":
            parts = value.split()
            if len(parts) < 4 or ascii_int(parts[1].split("/", 1)[0], high=65535) is None:
                return f"bad media line {line[:60]!r}"
            if parts[0] == "audio":
                audio += 1
    if audio == 0:
        return "no audio stream"
    return None


def check_request(msg: SipMessage, size: int) -> Malformed | None:
    """None when `msg` (a parsed request of `size` bytes) may go on to the stack."""
    if size > MAX_MESSAGE:
        return Malformed("size", f"{size} bytes (most {MAX_MESSAGE})")
    if len(msg.headers) > MAX_HEADERS:
        return Malformed("size", f"{len(msg.headers)} headers (most {MAX_HEADERS})")
    for name, value in msg.headers:
        if len(value) > MAX_HEADER:
            return Malformed("size", f"{name} is {len(value)} characters (most {MAX_HEADER})")
        if not _TOKEN.match(name) or _CONTROL.search(value):
            return Malformed("header", f"bad header {name[:40]!r}")
    if not _TOKEN.match(msg.method):
        return Malformed("request-line", f"bad method {msg.method[:20]!r}")
    if not _uri_ok(msg.uri):
        return Malformed("uri", f"bad Request-URI {msg.uri[:60]!r}")
    vias = [v for n, v in msg.headers if n == "Via"]
    if len(vias) > MAX_VIAS:
        return Malformed("via", f"{len(vias)} Via headers (most {MAX_VIAS})")
    for via in vias:
        problem = _check_via(via)
        if problem:
            return Malformed("via", problem)
    sender = msg.get("From")
    if sender is None or not _uri_ok(_addr_uri(sender)):
        return Malformed("from", "missing or bad From")
    if not header_param(sender, "tag"):
        return Malformed("from", "From has no tag")  # RFC 3261 §8.1.1.3: MUST
    to = msg.get("To")
    if to is None or not _uri_ok(_addr_uri(to)):
        return Malformed("to", "missing or bad To")
    contact = msg.get("Contact")
    if msg.method == "INVITE" and contact is None:
        return Malformed("header", "an INVITE without Contact")  # RFC 3261 §8.1.1.8: MUST
    if contact is not None and not (contact.strip() == "*" and msg.method == "REGISTER") \
            and not _uri_ok(_addr_uri(contact)):
        # '*' is REGISTER's alone: on an INVITE it corrupted the stack's native heap
        return Malformed("header", f"bad Contact {contact[:60]!r}")
    call_id = msg.call_id.strip()
    if len(call_id) > MAX_CALL_ID or not _CALL_ID.match(call_id):
        return Malformed("call-id", f"bad Call-ID {call_id[:40]!r} ({len(call_id)} characters)")
    cseq = (msg.get("CSeq") or "").split()
    if len(cseq) != 2 or ascii_int(cseq[0]) is None or cseq[1].upper() != msg.method:
        return Malformed("cseq", f"bad CSeq {(msg.get('CSeq') or '')[:40]!r} for {msg.method}")
    mf = msg.get("Max-Forwards")
    if mf is not None and ascii_int(mf, high=255) is None:
        return Malformed("max-forwards", f"bad Max-Forwards {mf[:20]!r}")
    length = msg.get("Content-Length")
    declared = ascii_int(length) if length is not None else len(msg.body)
    if declared is None or declared != len(msg.body):
        return Malformed("content-length", f"Content-Length {str(length)[:20]!r} for a {len(msg.body)}-byte body")
    if len(msg.body) > MAX_BODY:
        return Malformed("size", f"body of {len(msg.body)} bytes (most {MAX_BODY})")
    if msg.body:
        ctype = (msg.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if not ctype:
            return Malformed("content-type", "a body without Content-Type")
        if msg.method == "INVITE":
            if ctype != "application/sdp":
                return Malformed("content-type", f"an INVITE body of type {ctype[:40]!r}")
            problem = _check_sdp(msg.body)
            if problem:
                return Malformed("sdp", problem)
    return None
