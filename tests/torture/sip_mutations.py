"""The fuzzer's mutations (tests/torture/sip_fuzz.py), each named, each aimed at a part of
SIP's grammar the front door or the stack behind it must survive:

- structure: drop, duplicate, reorder headers; compact names; folded lines; odd spacing;
- the dialog identifiers: From without tag (the native heap corruption), To with a tag
  (the in-dialog path), Call-IDs with spaces, control characters, over 256 characters;
- numbers the parsers read: CSeq, Max-Forwards, Content-Length, Via port and rport, with
  out-of-range values and non-ASCII digits ('²'.isdigit() is True in Python);
- Via: many of them, comma-joined, without branch, bad transport, `received=` naming the
  canary (a front that trusts it sends its answer there), `rport=` naming the canary's port;
- Contact: '*', missing, unclosed, huge, another scheme (an INVITE without a usable Contact
  corrupted the stack's heap after the first round of fixes);
- sizes: huge header values, thousands of headers, huge Request-URIs;
- bodies: malformed SDP, wrong Content-Type, random bytes;
- bytes (after rendering): flipped, truncated, NULs, LF-only endings, no blank line, two
  messages in one datagram, pure noise.

A grammar mutation is `(rng, draft, target) -> None` and edits a `Draft` (start line,
header list, body); a byte mutation is `(rng, data, target) -> bytes`. Addresses they
write are on loopback or the target's canary.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Draft", "MUTATIONS", "RAW_MUTATIONS", "sdp_offer"]

_UNICODE_DIGITS = ("²", "³", "¹", "٣", "٧", "۵", "५", "５", "𝟕", "①", "⁹", "½")


@dataclass
class Draft:
    """A request being built: start line, headers in wire order, body."""

    method: str
    uri: str
    version: str = "SIP/2.0"
    headers: list[list[str]] = field(default_factory=list)  # [name, value], wire order
    body: bytes = b""
    auto_length: bool = True  # Content-Length follows the body unless a mutation set it

    def find(self, name: str) -> list[int]:
        key = name.lower()
        compact = _COMPACT_OF.get(key)
        return [i for i, (n, _) in enumerate(self.headers) if n.lower() in (key, compact)]

    def get(self, name: str) -> str | None:
        idx = self.find(name)
        return self.headers[idx[0]][1] if idx else None

    def set(self, name: str, value: str) -> None:
        idx = self.find(name)
        if idx:
            self.headers[idx[0]][1] = value
        else:
            self.headers.append([name, value])

    def render(self) -> bytes:
        lines = [f"{self.method} {self.uri} {self.version}" if self.version else f"{self.method} {self.uri}"]
        has_length = bool(self.find("Content-Length"))
        for name, value in self.headers:
            if self.auto_length and name.lower() in ("content-length", "l"):
                value = str(len(self.body))
            lines.append(f"{name}: {value}" if name else value)  # name "" = a raw line
        if self.auto_length and not has_length:
            lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body


_COMPACT_OF = {"via": "v", "from": "f", "to": "t", "call-id": "i", "contact": "m", "content-length": "l",
               "content-type": "c", "supported": "k", "subject": "s"}
_KEY_HEADERS = ("Via", "From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length", "Contact",
                "Content-Type")


def sdp_offer(host: str, port: int, rng: random.Random) -> str:
    codecs = rng.choice([["0"], ["0", "8"], ["8", "0", "101"], ["9", "0"], ["0", "101"]])
    lines = ["v=0", f"o=fuzz {rng.randrange(1, 1 << 31)} 1 IN IP4 {host}", "s=-", f"c=IN IP4 {host}", "t=0 0",
             f"m=audio {port} RTP/AVP {' '.join(codecs)}"]
    names = {"0": "PCMU/8000", "8": "PCMA/8000", "9": "G722/8000", "101": "telephone-event/8000"}
    lines += [f"a=rtpmap:{pt} {names[pt]}" for pt in codecs]
    if "101" in codecs:
        lines.append("a=fmtp:101 0-16")
    lines += ["a=ptime:20", "a=sendrecv"]
    return "\r\n".join(lines) + "\r\n"


# ---- grammar-aware mutations: (rng, draft, target) -> None -----------------------------------------


def _pick_header(rng: random.Random, d: Draft) -> int | None:
    if not d.headers:
        return None
    if rng.random() < 0.7:
        key = [i for i, (n, _) in enumerate(d.headers) if n in _KEY_HEADERS]
        if key:
            return rng.choice(key)
    return rng.randrange(len(d.headers))


def m_drop_header(rng, d, t):
    i = _pick_header(rng, d)
    if i is not None:
        if d.headers[i][0].lower() in ("content-length", "l"):
            d.auto_length = False
        del d.headers[i]


def m_duplicate_header(rng, d, t):
    i = _pick_header(rng, d)
    if i is None:
        return
    name, value = d.headers[i]
    if name == "Content-Length":
        d.auto_length = False
        d.headers[i][1] = str(len(d.body))
        value = str(rng.choice([0, len(d.body) + 7, len(d.body) // 2]))
    elif name in ("Call-ID", "CSeq", "From", "To") and rng.random() < 0.6:
        value = value + "x" if name != "CSeq" else f"{rng.randrange(1, 99)} {d.method}"
    d.headers.insert(rng.randrange(len(d.headers) + 1), [name, value])


def m_reorder_headers(rng, d, t):
    rng.shuffle(d.headers)


def m_from_no_tag(rng, d, t):
    for i in d.find("From"):
        d.headers[i][1] = d.headers[i][1].split(";tag=", 1)[0]


def m_from_tag_odd(rng, d, t):
    for i in d.find("From"):
        base = d.headers[i][1].split(";tag=", 1)[0]
        d.headers[i][1] = base + rng.choice([";tag=", ";tag", ";tag=" + "x" * 600, ";tag=a;tag=b", ";TAG=1",
                                             ";tag=\"q\"", ";tag=²"])


def m_to_tag(rng, d, t):
    for i in d.find("To"):
        if ";tag=" not in d.headers[i][1]:
            d.headers[i][1] += f";tag={rng.getrandbits(24):06x}"


def m_call_id_bad(rng, d, t):
    choices = [
        lambda: "has a space",
        lambda: "tab\there",
        lambda: "ctl\x01char",
        lambda: "del\x7fchar",
        lambda: "esc\x1b[31mred",
        lambda: "",
        lambda: "@",
        lambda: "a@b@c",
        lambda: "☎-call",
        lambda: "x" * rng.choice([257, 300, 1024, 4096, 20000]),
        lambda: " leading-and-trailing ",
        lambda: "\"quoted\"",
        lambda: "semi;colon=1",
    ]
    value = rng.choice(choices)()
    for i in d.find("Call-ID"):
        d.headers[i][1] = value


def m_cseq_weird(rng, d, t):
    m = d.method
    value = rng.choice([f"abc {m}", f"-1 {m}", f"0 {m}", f"99999999999999999999 {m}", f"{2 ** 31} {m}",
                        "1 BYE" if m != "BYE" else "1 INVITE", "1", "", f"1 {m} extra", f"² {m}",
                        f"0x10 {m}", f"1{m}", f"  7   {m}  ", f"1 {m.lower()}", f"1.5 {m}", f"1 {'X' * 300}"])
    for i in d.find("CSeq"):
        d.headers[i][1] = value


def _via_parts(value: str) -> tuple[str, str, str]:
    """('SIP/2.0/UDP', 'host:port', ';params')"""
    proto, _, rest = value.partition(" ")
    hostport, sep, params = rest.partition(";")
    return proto, hostport, sep + params


def m_via_port(rng, d, t):
    idx = d.find("Via")
    if not idx:
        return
    proto, hostport, params = _via_parts(d.headers[idx[0]][1])
    host = hostport.rsplit(":", 1)[0]
    port = rng.choice(["²", "٣٠٠٠", "５０６０", "0", "65536", "99999", "-1", "", "abc", "5060x", "1e3",
                       " 5060", "0x13c4", "00000000000000005060", "4294967296"])
    d.headers[idx[0]][1] = f"{proto} {host}:{port}{params}"


def m_via_received(rng, d, t):
    idx = d.find("Via")
    if not idx:
        return
    value = rng.choice([t.canary_host, t.canary_host, "bogus", "::1", "127.0.0.1.1", "²²²", "", "999.1.1.1"])
    params = d.headers[idx[0]][1]
    if rng.random() < 0.7 and value == t.canary_host:  # aim the whole answer at the canary
        params = params.replace(";rport", f";rport={t.canary_port}", 1)
        if ";rport=" not in params:
            params += f";rport={t.canary_port}"
    d.headers[idx[0]][1] = params + f";received={value}"


def m_via_rport(rng, d, t):
    idx = d.find("Via")
    if not idx:
        return
    value = rng.choice(["²", "0", "70000", "-5", "abc", str(t.canary_port), "٥٠٦٠", "", "1" * 30])
    params = d.headers[idx[0]][1].replace(";rport", "", 1)
    d.headers[idx[0]][1] = params + f";rport={value}"


def m_via_many(rng, d, t):
    idx = d.find("Via")
    first = d.headers[idx[0]][1] if idx else f"SIP/2.0/{t.transport} 127.0.0.1:{t.local_port};branch=z9hG4bKx"
    n = rng.choice([2, 11, 50, 200, 1000])
    extra = [f"SIP/2.0/UDP 127.0.0.{(k % 250) + 2}:{5060 + k};branch=z9hG4bKm{k}" for k in range(n)]
    pos = idx[0] if idx else 0
    if rng.random() < 0.5:  # comma-joined into the first Via
        d.headers[pos:pos + (1 if idx else 0)] = [["Via", ", ".join([first] + extra)]]
    else:
        d.headers[pos + 1:pos + 1] = [["Via", v] for v in extra]


def m_via_garbage(rng, d, t):
    idx = d.find("Via")
    if not idx:
        return
    proto, hostport, params = _via_parts(d.headers[idx[0]][1])
    choice = rng.randrange(9)
    if choice == 0:
        d.headers[idx[0]][1] = f"SIP/2.0/FOO {hostport}{params}"
    elif choice == 1:
        d.headers[idx[0]][1] = f"SIP/3.0/UDP {hostport}{params}"
    elif choice == 2:
        d.headers[idx[0]][1] = f"{proto} {hostport};rport"  # no branch
    elif choice == 3:
        d.headers[idx[0]][1] = f"{proto} {hostport};branch=;rport"
    elif choice == 4:
        d.headers[idx[0]][1] = f"{proto} {hostport};branch=z9hG4bK{'b' * 3000};rport"
    elif choice == 5:
        d.headers[idx[0]][1] = f"{proto} [::1{params}"
    elif choice == 6:
        d.headers[idx[0]][1] = ""
    elif choice == 7:
        d.headers[idx[0]][1] = f"{proto}{params}"  # no sent-by
    else:
        d.headers[idx[0]][1] = f"{proto} {hostport}" + ";x" * 500 + params


def m_max_forwards(rng, d, t):
    value = rng.choice(["²", "0", "-1", "256", "", "70 70", "٧٠", "99999999999999999999", "abc", "1.0", "７０"])
    d.set("Max-Forwards", value)


def m_content_length(rng, d, t):
    n = len(d.body)
    value = rng.choice(["²", "-5", "99999", "0", str(n + 1), str(max(0, n - 10)), "abc", " 1 2", "１２", "٣",
                        "4294967296", "+5", "5 ", "0x20", str(n) + ";x"])
    d.auto_length = False
    idx = d.find("Content-Length")
    if idx:
        d.headers[idx[0]][1] = value
    else:
        d.headers.append(["Content-Length", value])


def m_huge_header(rng, d, t):
    size = rng.choice([3000, 8192, 16385, 40000, 60000])
    name = rng.choice(["Subject", "X-Fuzz", "User-Agent", "To", "From", "Contact", "Call-ID"])
    filler = rng.choice(string.ascii_letters) * size
    if name in ("To", "From", "Contact"):
        filler = f"<sip:{filler}@127.0.0.1>"
    idx = d.find(name)
    if idx and name != "X-Fuzz":
        d.headers[idx[0]][1] = filler
    else:
        d.headers.append([name, filler])


def m_many_headers(rng, d, t):
    n = rng.choice([65, 200, 1000, 3000])
    at = rng.randrange(len(d.headers) + 1)
    d.headers[at:at] = [[f"X-Fuzz-{k}", str(k)] for k in range(n)]


def m_huge_uri(rng, d, t):
    size = rng.choice([257, 1000, 8000, 30000])
    where = rng.randrange(3)
    if where == 0:
        d.uri = f"sip:{'u' * size}@127.0.0.1:{t.bridge_port}"
    elif where == 1:
        d.uri = f"sip:bot@127.0.0.1:{t.bridge_port};{'p=' + 'v' * size}"
    else:
        d.uri = f"sip:bot@127.0.0.1:{t.bridge_port}?{'h=' + 'q' * size}"


def m_uri_weird(rng, d, t):
    d.uri = rng.choice(["sip:", "sip:@", "http://127.0.0.1/", f"sip:bot@[::1:{t.bridge_port}",
                        "sip:bot@127.0.0.1:99999", "sip:%00@127.0.0.1", "sip:bot@127.0.0.1;transport=tcp;;;",
                        "tel:+", f"<sip:bot@127.0.0.1:{t.bridge_port}>", "sip:bot@127.0.0.1:²", "*",
                        "sip:bot@", "sip:b%ot@127.0.0.1", "sip:bot:secret@127.0.0.1", "sips:bot@127.0.0.1",
                        "sip:bot@127.0.0.1:0", "sip:ＢＯＴ@127.0.0.1", "sip:bot@localhost"])


def m_request_line(rng, d, t):
    choice = rng.randrange(8)
    if choice == 0:
        d.method = d.method.lower()
    elif choice == 1:
        d.method = rng.choice(["FOO", "INVITEX", "INV1TE", "PRACK", "SUBSCRIBE", "MESSAGE", "REFER", "INFO",
                               "UPDATE", "PUBLISH", "NOTIFY", "I" * 300])
    elif choice == 2:
        d.version = rng.choice(["SIP/1.0", "SIP/2.1", "HTTP/1.1", "sip/2.0", "SIP/2.0 extra", ""])
    elif choice == 3:
        d.uri = d.uri + "  "
    elif choice == 4:
        d.method = d.method + "\t"
    elif choice == 5:
        d.uri = ""
    elif choice == 6:
        d.method = "SIP/2.0"
        d.uri = "200"
        d.version = "OK"  # a response line where a request is expected
    else:
        d.method = ""


def m_compact_forms(rng, d, t):
    for h in d.headers:
        short = _COMPACT_OF.get(h[0].lower())
        if short and rng.random() < 0.7:
            h[0] = short if rng.random() < 0.8 else short.upper()


def m_folded_line(rng, d, t):
    i = _pick_header(rng, d)
    if i is None:
        return
    value = d.headers[i][1]
    cut = rng.randrange(len(value) + 1)
    ws = rng.choice([" ", "\t", "  \t"])
    d.headers[i][1] = value[:cut] + "\r\n" + ws + value[cut:]


def m_header_spacing(rng, d, t):
    i = _pick_header(rng, d)
    if i is None:
        return
    name, value = d.headers[i]
    style = rng.randrange(5)
    if style == 0:
        d.headers[i] = ["", f"{name} :{value}"]
    elif style == 1:
        d.headers[i] = ["", f"{name}:\t\t{value}"]
    elif style == 2:
        d.headers[i] = ["", f"{name}:{value}"]
    elif style == 3:
        d.headers[i][0] = rng.choice([name.upper(), name.lower(), name.swapcase()])
    else:
        d.headers[i] = ["", f"{name}{value}"]  # no colon


def m_unicode_digits(rng, d, t):
    targets = []
    for name in ("CSeq", "Max-Forwards", "Content-Length", "Expires", "Via"):
        targets += d.find(name)
    if not targets:
        return
    i = rng.choice(targets)
    name, value = d.headers[i]
    digits = [k for k, ch in enumerate(value) if ch in "0123456789"]
    if name.lower() in ("via", "v"):
        # the sent-by port, or the rport value
        proto, hostport, params = _via_parts(value)
        host, _, port = hostport.rpartition(":")
        if rng.random() < 0.5 and port:
            port = "".join(rng.choice(_UNICODE_DIGITS) if rng.random() < 0.5 else c for c in port) or "²"
            d.headers[i][1] = f"{proto} {host}:{port}{params}"
        else:
            d.headers[i][1] = value.replace(";rport", f";rport={rng.choice(_UNICODE_DIGITS)}", 1)
        return
    if name.lower() in ("content-length", "l"):
        d.auto_length = False
        if not digits:
            value = str(len(d.body))
            digits = list(range(len(value)))
    if not digits:
        d.headers[i][1] = rng.choice(_UNICODE_DIGITS) + value
        return
    chars = list(value)
    for k in rng.sample(digits, rng.randint(1, len(digits))):
        chars[k] = rng.choice(_UNICODE_DIGITS)
    d.headers[i][1] = "".join(chars)


def m_non_ascii(rng, d, t):
    i = _pick_header(rng, d)
    if i is None:
        return
    junk = rng.choice(["é", "☎", "\u202e", "\ufeff", "\udcff\udcfe", "\u0000", "🙂" * 20, "\udcc3("])
    value = d.headers[i][1]
    cut = rng.randrange(len(value) + 1)
    d.headers[i][1] = value[:cut] + junk + value[cut:]


def m_sdp(rng, d, t):
    sdp = (d.body or sdp_offer(t.local_host, 9, rng).encode()).decode("utf-8", "surrogateescape")
    lines = sdp.split("\r\n")
    choice = rng.randrange(16)
    if choice == 0:
        lines = [ln for ln in lines if not ln.startswith("v=")]
    elif choice == 1:
        lines = [ln for ln in lines if not ln.startswith("c=")]
    elif choice == 2:
        lines = [ln.replace("m=audio 9", f"m=audio {rng.choice(['²', '-1', '70000', 'x', ''])}") for ln in lines]
    elif choice == 3:
        lines = [ln.replace("m=audio 9", "m=audio 0") for ln in lines]
    elif choice == 4:
        lines = [ln for ln in lines if not ln.startswith(("m=", "a=rtpmap"))] + ["m=audio 9 RTP/AVP 96",
                                                                               "a=rtpmap:96 FOO/8000"]
    elif choice == 5:
        lines += ["m=audio 9 RTP/AVP 0"] * rng.choice([2, 20, 200])
    elif choice == 6:
        lines += [f"a=x{k}:y" for k in range(rng.choice([100, 1000, 4000]))]
    elif choice == 7:
        lines += ["a=rtpmap:1000 PCMU/8000", "a=rtpmap:-1 PCMA/0", "a=rtpmap:0 PCMU/0"]
    elif choice == 8:
        lines = [ln.replace("c=IN IP4 127.0.0.1", rng.choice(["c=IN IP4 127.0.0.1/255", "c=IN IP6 ::1",
                                                              "c=IN IP4 ²²².0.0.1", "c=IN IP4", "c=XX"]))
                 for ln in lines]
    elif choice == 9:
        lines = [ln.replace("RTP/AVP", rng.choice(["RTP/SAVP", "UDP/TLS/RTP/SAVPF", "RTP/AVP/TCP", ""]))
                 for ln in lines]
    elif choice == 10:
        lines.append("a=ptime:" + rng.choice(["0", "100000", "-20", "²"]))
    elif choice == 11:
        lines.append("a=fmtp:101 " + "9" * 5000)
    elif choice == 12:
        lines = [ln.replace("=", "", 1) for ln in lines]
    elif choice == 13:
        lines = lines[: rng.randrange(len(lines) + 1)]
    elif choice == 14:
        lines = ["v=0", "m=audio 9 RTP/AVP " + " ".join(str(k) for k in range(128))]
    else:
        lines = [ln + "\x00" if ln else ln for ln in lines]
    d.body = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    if not d.find("Content-Type"):
        d.headers.append(["Content-Type", "application/sdp"])


def m_content_type(rng, d, t):
    value = rng.choice(["text/plain", "", "application/sdp; charset=🙂", "multipart/mixed;boundary=x",
                        "application/SDP", "application/sdp, application/sdp", "application/json", "a" * 500])
    if value.startswith("multipart") and d.body:
        d.body = b"--x\r\nContent-Type: application/sdp\r\n\r\n" + d.body + b"\r\n--x--\r\n"
    d.set("Content-Type", value)


def m_body_random(rng, d, t):
    d.body = rng.randbytes(rng.choice([1, 16, 300, 3000, 20000]))
    if rng.random() < 0.7:
        d.set("Content-Type", "application/sdp")


def m_contact_weird(rng, d, t):
    value = rng.choice(["*", "", "<sip:fuzz@127.0.0.1:99999>", f"<sip:fuzz@127.0.0.1:{t.local_port}>" + ";x" * 400,
                        "<sip:fuzz@[::1]:5060>", "<>", "sip:fuzz@127.0.0.1:²", "<sip:fuzz@127.0.0.1", "<tel:+1>",
                        ", ".join(f"<sip:f{k}@127.0.0.{k % 250 + 2}>" for k in range(100))])
    d.set("Contact", value)


def m_authorization(rng, d, t):
    value = rng.choice([
        "Digest", "Digest ", "Basic dXNlcjpwYXNz", 'Digest username="bob", realm="duplexline", nonce="',
        'Digest username="bob",,,,,realm=', "Digest " + ",".join(f"k{k}=v" for k in range(2000)),
        'Digest username="' + "b" * 5000 + '"', 'Digest username=bob, nonce=x, uri="sip:x", response="z", nc=²',
        'Digest nonce="' + "0" * 100 + '", nc=00000001, qop=auth, cnonce="c", response="00"',
    ])
    d.set("Authorization", value)


def m_expires_weird(rng, d, t):
    d.set("Expires", rng.choice(["-1", "²", "99999999999999999999", "abc", "", "3600 3600"]))


def m_empty_body_with_type(rng, d, t):
    d.body = b""
    d.set("Content-Type", "application/sdp")


def m_add_sdp(rng, d, t):
    """An SDP body on a request that should have none."""
    d.body = sdp_offer(t.local_host, 9, rng).encode()
    d.set("Content-Type", "application/sdp")


MUTATIONS: dict[str, tuple[int, Callable]] = {  # name -> (weight, mutate)
    "drop-header": (8, m_drop_header),
    "duplicate-header": (6, m_duplicate_header),
    "reorder-headers": (3, m_reorder_headers),
    "from-no-tag": (6, m_from_no_tag),
    "from-tag-odd": (3, m_from_tag_odd),
    "to-tag": (3, m_to_tag),
    "call-id-bad": (7, m_call_id_bad),
    "cseq-weird": (5, m_cseq_weird),
    "via-port": (5, m_via_port),
    "via-received": (5, m_via_received),
    "via-rport": (4, m_via_rport),
    "via-many": (3, m_via_many),
    "via-garbage": (4, m_via_garbage),
    "max-forwards": (4, m_max_forwards),
    "content-length": (6, m_content_length),
    "huge-header": (3, m_huge_header),
    "many-headers": (2, m_many_headers),
    "huge-uri": (3, m_huge_uri),
    "uri-weird": (4, m_uri_weird),
    "request-line": (4, m_request_line),
    "compact-forms": (4, m_compact_forms),
    "folded-line": (4, m_folded_line),
    "header-spacing": (4, m_header_spacing),
    "unicode-digits": (7, m_unicode_digits),
    "non-ascii": (4, m_non_ascii),
    "sdp": (8, m_sdp),
    "content-type": (3, m_content_type),
    "body-random": (3, m_body_random),
    "contact-weird": (3, m_contact_weird),
    "authorization": (3, m_authorization),
    "expires-weird": (1, m_expires_weird),
    "empty-sdp": (2, m_empty_body_with_type),
    "unexpected-sdp": (1, m_add_sdp),
}


# ---- byte-level damage: (rng, data, target) -> bytes --------------------------------------------------


def r_flip(rng, data, t):
    if not data:
        return data
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def r_truncate(rng, data, t):
    return data[: rng.randrange(len(data) + 1)]


def r_nul(rng, data, t):
    at = rng.randrange(len(data) + 1)
    return data[:at] + b"\x00" * rng.randint(1, 4) + data[at:]


def r_lf_only(rng, data, t):
    return data.replace(b"\r\n", b"\n") if rng.random() < 0.7 else data.replace(b"\r\n", b"\r")


def r_no_blank_line(rng, data, t):
    return data.replace(b"\r\n\r\n", b"\r\n", 1)


def r_double(rng, data, t):
    return data + data


def r_noise(rng, data, t):
    return rng.randbytes(rng.choice([1, 4, 64, 512, 1400, 9000]))


def r_keepalive(rng, data, t):
    return rng.choice([b"", b"\r\n", b"\r\n\r\n", b"\x00", b"\r\n" * 500, b" "])


RAW_MUTATIONS: dict[str, tuple[int, Callable]] = {
    "raw-flip": (6, r_flip),
    "raw-truncate": (5, r_truncate),
    "raw-nul": (3, r_nul),
    "raw-lf-only": (3, r_lf_only),
    "raw-no-blank-line": (2, r_no_blank_line),
    "raw-double": (2, r_double),
    "raw-noise": (2, r_noise),
    "raw-keepalive": (1, r_keepalive),
}
