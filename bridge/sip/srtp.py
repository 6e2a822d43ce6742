"""SRTP with SDES keys (RFC 4568 `a=crypto`, RFC 3711): the policy a route or an account
sets, and the SDP facts the front door judges an offer by.

The stack (baresip's `srtp` module, loaded by baresip-python) does the encryption; the
catch-all inbound identity runs it best-effort (`mediaenc=srtp`): an offer with keys gets
an answer with keys and SRTP, an offer without gets plain RTP. Each route narrows that at
the front door, before the stack sees the INVITE:

    required   the offer must carry SDES keys in a suite the stack speaks, and must have
               come over TLS: keys sent in clear protect nothing (anyone who can read the
               RTP can read the SIP) -> otherwise 488 Not Acceptable Here
    optional   whatever the caller offers (the default)
    off        an offer that insists on SRTP (RTP/SAVP, RTP/SAVPF) gets 488; keys in a
               best-effort RTP/AVP offer are removed, so the call is plain RTP

An account's policy maps to the stack's own account parameter (`ACCOUNT_MEDIAENC`).
Pure functions: no I/O, no state.
"""

from __future__ import annotations

__all__ = ["SRTP_POLICIES", "ACCOUNT_MEDIAENC", "SUITES", "offer_refusal", "strip_crypto", "answer_suite",
           "parse_policy"]

SRTP_POLICIES = ("required", "optional", "off")
# What the stack's account parameter `mediaenc` takes for each policy (None: no parameter).
ACCOUNT_MEDIAENC = {"required": "srtp-mand", "optional": "srtp", "off": None}
# The SDES suites baresip's srtp module speaks (its sdes.c); an offer of only others fails.
SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32", "AES_256_CM_HMAC_SHA1_80",
          "AES_256_CM_HMAC_SHA1_32", "AEAD_AES_128_GCM", "AEAD_AES_256_GCM")
_SECURE_PROFILES = ("RTP/SAVP", "RTP/SAVPF")


def parse_policy(value: object) -> str:
    """A route's or account's `srtp` value; ValueError names the choices."""
    if value not in SRTP_POLICIES:
        raise ValueError(f"'srtp' must be one of {', '.join(SRTP_POLICIES)}, not {value!r}")
    return str(value)


def _audio(body: bytes) -> tuple[str, list[str]]:
    """The first audio stream's profile and its attribute lines (stripped)."""
    profile, attrs, inside = "", [], False
    for raw in body.decode("utf-8", "replace").splitlines():
        line = raw.strip()
        if line.startswith("m="):
            if inside:
                break  # only the first audio stream: the one the stack answers for the call
            parts = line[2:].split()
            inside = bool(parts) and parts[0] == "audio"
            profile = parts[2] if inside and len(parts) > 2 else ""
        elif inside and line.startswith("a="):
            attrs.append(line)
    return profile, attrs


def _suites(attrs: list[str]) -> list[str]:
    """`a=crypto:<tag> <suite> inline:...` -> the suites, in the offer's order."""
    out = []
    for a in attrs:
        if a.startswith("a=crypto:"):
            parts = a.split()
            if len(parts) >= 3:
                out.append(parts[1].upper())
    return out


def offer_refusal(policy: str, body: bytes, wire: str) -> str | None:
    """Why an INVITE's SDP offer breaks the route's policy (the 488's reason and the CDR's
    end detail), or None when the front may forward it."""
    profile, attrs = _audio(body)
    suites = _suites(attrs)
    if policy == "required":
        if not suites:
            return "srtp-required"  # a plain RTP offer
        if not any(s in SUITES for s in suites):
            return "srtp-suite"
        if wire != "tls":
            return "srtp-needs-tls"
    elif policy == "off" and profile in _SECURE_PROFILES:
        return "srtp-off"
    return None


def strip_crypto(body: bytes) -> bytes:
    """The offer without its `a=crypto` lines (an `off` route: best-effort keys are not
    taken up, so the stack answers plain RTP)."""
    lines = body.split(b"\r\n") if b"\r\n" in body else body.split(b"\n")
    sep = b"\r\n" if b"\r\n" in body else b"\n"
    return sep.join(line for line in lines if not line.strip().startswith(b"a=crypto:"))


def answer_suite(body: bytes) -> str | None:
    """The suite the stack's SDP answer chose (its one `a=crypto` line); None: plain RTP."""
    suites = _suites(_audio(body)[1])
    return suites[0] if suites else None
