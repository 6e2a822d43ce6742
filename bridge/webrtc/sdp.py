"""Checking a browser's offer before anything is built for it.

The offer endpoint takes `{"type": "offer", "sdp": "v=0..."}` (JSON, at most
`MAX_BODY_BYTES`). `parse_offer` decides, from the text alone, whether the leg can answer
it, and raises `OfferRejected` naming what is wrong otherwise:

    400 bad-json          not a JSON object with string "sdp" and "type"
    400 not-an-offer      "type" is not "offer"
    413 too-large         body or SDP over the limits, too many lines or sections
    400 bad-sdp           not SDP (v=0 first, `x=value` lines), no ICE credentials or
                          DTLS fingerprint, a line that is not plain text
    422 no-audio          no active audio section
    415 unsupported-media a video (or other non-audio, non-data) section, or two audio ones
    415 unsupported-codec the audio section offers no Opus 48 kHz

It never raises anything else for any input (tests feed it hostile text). What aiortc
would reject beyond this (e.g. a malformed fingerprint) is caught where aiortc runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import OfferRejected

__all__ = ["Offer", "parse_offer", "check_sdp", "announce_public_address", "MAX_BODY_BYTES", "MAX_SDP_BYTES"]

MAX_BODY_BYTES = 64 * 1024  # the HTTP app's client_max_size too
MAX_SDP_BYTES = 32 * 1024  # a browser's audio + data offer is 2-6 KiB; 32 leaves room
_MAX_LINES = 1000
_MAX_SECTIONS = 4  # audio, data, and room for a browser that adds one more
_MAX_LINE = 4096


@dataclass(frozen=True)
class Offer:
    sdp: str
    has_data_channel: bool
    audio_codecs: tuple[str, ...]  # "opus/48000/2", "PCMU/8000", ... as offered, in order


def _reject(status: int, code: str, message: str) -> OfferRejected:
    return OfferRejected(status, code, message)


def parse_offer(body: bytes) -> Offer:
    """The request body -> a checked `Offer`; `OfferRejected` for anything else."""
    if len(body) > MAX_BODY_BYTES:
        raise _reject(413, "too-large", f"the offer is {len(body)} bytes; at most {MAX_BODY_BYTES} are taken")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _reject(400, "bad-json", 'the body must be JSON: {"type": "offer", "sdp": "..."}') from None
    if not isinstance(data, dict) or not isinstance(data.get("sdp"), str) or not isinstance(data.get("type"), str):
        raise _reject(400, "bad-json", 'the body must be a JSON object with string fields "type" and "sdp"')
    if data["type"] != "offer":
        raise _reject(400, "not-an-offer", f'"type" must be "offer", got {data["type"][:40]!r}')
    return check_sdp(data["sdp"])


def check_sdp(sdp: str) -> Offer:
    if len(sdp) > MAX_SDP_BYTES:
        raise _reject(413, "too-large", f"the SDP is {len(sdp)} characters; at most {MAX_SDP_BYTES} are taken")
    lines = sdp.replace("\r\n", "\n").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > _MAX_LINES:
        raise _reject(413, "too-large", f"the SDP has {len(lines)} lines; at most {_MAX_LINES} are taken")
    if not lines or lines[0] != "v=0":
        raise _reject(400, "bad-sdp", 'the SDP must start with "v=0"')
    sections: list[list[str]] = [[]]  # [0] is the session level
    for number, line in enumerate(lines, 1):
        if len(line) > _MAX_LINE or len(line) < 3 or line[1] != "=" or not line[0].isalpha():
            raise _reject(400, "bad-sdp", f"line {number} is not an SDP `x=value` line")
        if not line.isprintable() or not line.isascii():
            raise _reject(400, "bad-sdp", f"line {number} holds a control or non-ASCII character")
        if line[0] == "m":
            if len(sections) > _MAX_SECTIONS:
                raise _reject(413, "too-large", f"more than {_MAX_SECTIONS} media sections")
            sections.append([])
        sections[-1].append(line)
    session, media = sections[0], sections[1:]
    audio = []
    has_data = False
    for section in media:
        fields = section[0][2:].split()
        if len(fields) < 4 or not fields[1].isdigit():
            raise _reject(400, "bad-sdp", f"malformed media line {section[0][:80]!r}")
        kind, port = fields[0], int(fields[1])
        if kind == "audio":
            if port != 0:  # port 0: a rejected/stopped section, which is fine to carry
                audio.append(section)
        elif kind == "application" and "webrtc-datachannel" in fields[3:]:
            has_data = True
        elif port != 0:
            raise _reject(415, "unsupported-media",
                          f"a {kind[:20]} section was offered; this line takes audio (and a data channel) only")
    if not audio:
        raise _reject(422, "no-audio", "the offer has no audio section: call with a microphone track")
    if len(audio) > 1:
        raise _reject(415, "unsupported-media", "two audio sections were offered; one is taken")
    section = audio[0]
    for attr, what in (("a=ice-ufrag:", "ICE credentials (a=ice-ufrag)"), ("a=ice-pwd:", "ICE credentials (a=ice-pwd)"),
                       ("a=fingerprint:", "a DTLS fingerprint (a=fingerprint)")):
        if not any(line.startswith(attr) for line in section + session):
            raise _reject(400, "bad-sdp", f"the offer has no {what}")
    codecs = tuple(line.split(" ", 1)[1] for line in section if line.startswith("a=rtpmap:") and " " in line)
    if not any(c.lower().startswith("opus/48000") for c in codecs):
        offered = ", ".join(c[:24] for c in codecs[:8]) or "none"
        raise _reject(415, "unsupported-codec", f"the audio section offers no Opus 48 kHz (offered: {offered})")
    return Offer(sdp=sdp, has_data_channel=has_data, audio_codecs=codecs)


def announce_public_address(sdp: str, address: str) -> str:
    """Add, for every IPv4 host candidate of the answer, a server-reflexive twin on the
    configured public address and the same port (1:1 NAT: the public address maps each
    port to the host's). The host candidates stay for callers on the same LAN; the twin
    has a lower priority so a direct path wins where there is one."""
    out = []
    for line in sdp.split("\r\n"):
        out.append(line)
        if not line.startswith("a=candidate:"):
            continue
        parts = line[len("a=candidate:"):].split()
        # foundation component transport priority address port "typ" host ...
        if len(parts) < 8 or parts[6] != "typ" or parts[7] != "host" or ":" in parts[4]:
            continue
        foundation, component, transport, priority, host, port = parts[:6]
        if host == address:
            continue
        twin_priority = max(int(priority) - (1 << 24), 1) if priority.isdigit() else 1
        out.append(f"a=candidate:{foundation}n {component} {transport} {twin_priority} {address} {port} "
                   f"typ srflx raddr {host} rport {port}")
    return "\r\n".join(out)
