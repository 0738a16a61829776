"""mTLS identities: a development CA, and the principal a client certificate names.

A client certificate names its principal in a SAN URI
`spiffe://clipstore/<role>/<name>`; the server takes role and name from it,
after gRPC has verified the chain against the configured client CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clipstore.auth import ROLES
from clipstore.store.principals import Principal

SPIFFE_PREFIX = "spiffe://clipstore/"
_URI_RE = re.compile(r"^spiffe://clipstore/(?P<role>[a-z]+)/(?P<name>[A-Za-z0-9._-]{1,64})$")
DEV_CERT_DAYS = 365


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def cert_pem(obj: x509.Certificate) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name | None, public_key: ec.EllipticCurvePublicKey, *,
             not_before: dt.datetime, not_after: dt.datetime) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after))


def load_issuer(cert_file: Path, key_file: Path) -> Issuer:
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_file} is not an EC private key")
    return Issuer(x509.load_pem_x509_certificate(cert_file.read_bytes()), key)


def new_ca(name: str = "clipstore dev CA", *, days: int = DEV_CERT_DAYS) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (_builder(name, None, key.public_key(), not_before=now - dt.timedelta(minutes=5),
                     not_after=now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return Issuer(cert, key)


def issue(ca: Issuer, *, common_name: str, sans: list[x509.GeneralName], server: bool,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (_builder(common_name, ca.cert.subject, key.public_key(),
                     not_before=not_before or now - dt.timedelta(minutes=5),
                     not_after=not_after or now + dt.timedelta(days=DEV_CERT_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return Issuer(cert, key)


def client_sans(role: str, name: str) -> list[x509.GeneralName]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return [x509.UniformResourceIdentifier(f"{SPIFFE_PREFIX}{role}/{name}")]


def write_dev_certs(out: Path, clients: list[tuple[str, str]]) -> list[Path]:
    """A CA, a server certificate for localhost/127.0.0.1, and one client certificate per (name, role)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = new_ca()
    server = issue(ca, common_name="localhost", server=True,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    written = []
    for stem, pair in [("ca", ca), ("server", server)] + [
            (f"client-{name}", issue(ca, common_name=name, server=False, sans=client_sans(role, name)))
            for name, role in clients]:
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        cert_path.write_bytes(cert_pem(pair.cert))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem(pair.key))
        written += [cert_path, key_path]
    return written


def principal_from_cert(pem: bytes) -> Principal | None:
    """The principal a verified client certificate names, or None if it names none."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        match = _URI_RE.match(uri)
        if match and match["role"] in ROLES:
            return Principal(id=f"cert:{match['name']}", name=match["name"], role=match["role"])
    return None
