"""SIP over TLS: the front door's server context and the stack's TLS settings.

The front door terminates TLS (`--sip-tls-listen`, `--sip-tls-cert`, `--sip-tls-key`) with
Python's ssl module: TLS 1.2 at least, the library's default ciphers (forward secrecy,
AEAD), no compression, no renegotiation. Callers are not asked for certificates: callers
are authenticated by `--sip-auth` and the allowlist, as over UDP and TCP.

The stack (baresip) speaks TLS on its own for what it sends out: registrations and calls
of accounts with `transport: tls`, and in-dialog requests to a caller whose Contact says
`transport=tls`. It always verifies the far end's certificate and host name, against
`--sip-tls-ca` or the system's CA bundle (`stack_tls_config`).

Everything here runs once, at the SIP leg's start; a bad file is a ConfigError naming the
option, before anything listens.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ..errors import ConfigError

__all__ = ["server_context", "stack_tls_config", "SYSTEM_CA_FILE"]

SYSTEM_CA_FILE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's bundle (ca-certificates)


def _readable(option: str, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            if b"-----BEGIN " not in f.read(1 << 20):
                raise ConfigError(option, str(path), "not a PEM file (no -----BEGIN line)")
    except OSError as exc:
        raise ConfigError(option, str(path), f"cannot read it: {exc.strerror}") from None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The front door's context. Raises ConfigError naming --sip-tls-cert or --sip-tls-key
    when a file is missing, unreadable, not PEM, or the key does not belong to the cert."""
    _readable("sip_tls_cert", cert)
    _readable("sip_tls_key", key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        # OpenSSL names the mismatch "KEY_VALUES_MISMATCH"; anything else is the cert's shape.
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise ConfigError("sip_tls_key", str(key), f"does not match the certificate {cert}") from None
        raise ConfigError("sip_tls_cert", str(cert), f"cannot load the certificate and key: {exc}") from None
    return ctx


def stack_tls_config(ca: Path | None) -> str:
    """The stack's configuration lines for the TLS it speaks outward: verify the server's
    certificate and name always, against `ca` or the system bundle. Raises ConfigError
    naming --sip-tls-ca when that file cannot be read."""
    if ca is not None:
        if any(ord(c) < 0x20 for c in str(ca)):  # one line of the stack's configuration text
            raise ConfigError("sip_tls_ca", str(ca), "control characters in the path")
        _readable("sip_tls_ca", ca)
    cafile = ca if ca is not None else (SYSTEM_CA_FILE if SYSTEM_CA_FILE.exists() else None)
    lines = ["sip_verify_server yes"]
    if cafile is not None:
        lines.append(f"sip_cafile {cafile.resolve()}")
    return "\n".join(lines) + "\n"
