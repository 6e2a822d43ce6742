"""Throwaway TLS certificates for tests: self-signed, for 127.0.0.1 and localhost, made
with the `cryptography` package in the test's own folder (never the network)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["SelfSigned", "self_signed"]


@dataclass(frozen=True)
class SelfSigned:
    cert: Path  # the certificate alone (also the CA that trusts it)
    key: Path
    combined: Path  # certificate and key in one PEM: what baresip's sip_certificate takes


def self_signed(folder: Path, name: str = "sip") -> SelfSigned:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    folder.mkdir(parents=True, exist_ok=True)
    out = SelfSigned(folder / f"{name}-cert.pem", folder / f"{name}-key.pem", folder / f"{name}-combined.pem")
    out.cert.write_bytes(cert_pem)
    out.key.write_bytes(key_pem)
    out.combined.write_bytes(cert_pem + key_pem)
    for path in (out.key, out.combined):
        path.chmod(0o600)
    return out
