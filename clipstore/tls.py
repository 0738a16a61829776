"""TLS for the server: its certificate, the client CA and the revocation list, reloadable; and a development CA.

A client certificate names its principal in its one SAN URI, a SPIFFE id
`spiffe://<trust domain>/<role>/<name>` (`clipstore.spiffe`); gRPC verifies the
chain against the client CA, then authentication maps the id to a principal row
and checks the certificate against the CRL. `ServerTls.reload()` (SIGHUP) swaps
the server certificate, client CA and CRL together, or nothing if any of them
does not load: connections made after it use the new ones, calls in flight go
on undisturbed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clipstore.auth import ROLES
from clipstore.config import ConfigError, TlsConfig
from clipstore.logs import get_logger
from clipstore.spiffe import SpiffeId

DEV_CERT_DAYS = 365
log = get_logger("clipstore.tls")


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


def client_sans(role: str, name: str, trust_domain: str = "clipstore") -> list[x509.GeneralName]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return [x509.UniformResourceIdentifier(str(SpiffeId(trust_domain=trust_domain, role=role, name=name)))]


def write_dev_certs(out: Path, clients: list[tuple[str, str]], *, trust_domain: str = "clipstore") -> list[Path]:
    """A CA, a server certificate for localhost/127.0.0.1, and one client certificate per (name, role)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = new_ca()
    server = issue(ca, common_name="localhost", server=True,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    written = []
    for stem, pair in [("ca", ca), ("server", server)] + [
            (f"client-{name}", issue(ca, common_name=name, server=False,
                                     sans=client_sans(role, name, trust_domain)))
            for name, role in clients]:
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
        cert_path.write_bytes(cert_pem(pair.cert))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem(pair.key))
        written += [cert_path, key_path]
    return written


def revoke(ca: Issuer, serials: list[int], *, days: int = 7) -> bytes:
    """A CRL (PEM) from `ca` listing `serials`: for tests and small deployments without a PKI."""
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=days)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class RevocationList:
    """Serial numbers revoked by each issuer, from a CRL whose signature checked out against a client CA."""

    revoked: frozenset[tuple[bytes, int]]  # (issuer name DER, serial)

    def __contains__(self, cert: x509.Certificate) -> bool:
        return (cert.issuer.public_bytes(), cert.serial_number) in self.revoked


NOTHING_REVOKED = RevocationList(frozenset())


def load_crl(data: bytes, client_cas: list[x509.Certificate], *, source: str) -> RevocationList:
    """Parse a CRL (PEM or DER) and check that a client CA signed it; ValueError naming `source` if not."""
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise ValueError(f"{source} is not a CRL: {exc}") from None
    issuers = [ca for ca in client_cas if ca.subject == crl.issuer]
    if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
        raise ValueError(f"{source} is not signed by a client CA")
    if crl.next_update_utc is not None and crl.next_update_utc < dt.datetime.now(dt.UTC):
        # Still used: its entries stay revoked. A fresher CRL is the operator's to publish.
        log.warning("tls.crl_stale", next_update=crl.next_update_utc.isoformat())
    return RevocationList(frozenset((crl.issuer.public_bytes(), r.serial_number) for r in crl))


def _certificates(data: bytes, key: str, path: Path | None) -> list[x509.Certificate]:
    """The PEM certificates in a configured file; ConfigError naming the setting if there are none."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(key, f"{path} holds no PEM certificate")
    return certs


def _check_pair(*, key: bytes, chain: bytes, tls: TlsConfig) -> None:
    """The server certificate and key parse and belong together: gRPC would take them as they are and fail
    every handshake (or, at start, report a failure to bind), so a bad pair is refused here, naming the file."""
    leaf = _certificates(chain, "tls.cert_file", tls.cert_file)[0]
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("tls.key_file", f"{tls.key_file} holds no unencrypted PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ConfigError("tls.key_file", f"{tls.key_file} is not the key of the certificate in {tls.cert_file}")


@dataclass(frozen=True)
class _Material:
    config: grpc.ServerCertificateConfiguration
    crl: RevocationList


class ServerTls:
    """The server's TLS material, read from the configured files and swapped as a whole on `reload()`."""

    def __init__(self, tls: TlsConfig) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._material = self._load()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def requires_client_certificates(self) -> bool:
        return self._tls.client_ca_file is not None

    def _load(self) -> _Material:
        tls = self._tls
        try:
            pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
            root_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
            crl_data = tls.crl_file.read_bytes() if tls.crl_file else None
        except OSError as exc:
            raise ConfigError("tls", f"cannot read {exc.filename}: {exc.strerror}") from None
        _check_pair(key=pair[0], chain=pair[1], tls=tls)
        client_cas = _certificates(root_ca, "tls.client_ca_file", tls.client_ca_file) if root_ca is not None else []
        crl = NOTHING_REVOKED
        if crl_data is not None:
            try:
                crl = load_crl(crl_data, client_cas, source=str(tls.crl_file))
            except ValueError as exc:
                raise ConfigError("tls.crl_file", str(exc)) from None
        return _Material(grpc.ssl_server_certificate_configuration([pair], root_certificates=root_ca), crl)

    def credentials(self) -> grpc.ServerCredentials:
        # The fetcher returns None for "keep the current certificates", which gRPC accepts; its stub does not say so.
        return grpc.dynamic_ssl_server_credentials(self._material.config, self._next_config,  # type: ignore[arg-type]
                                                   require_client_authentication=self.requires_client_certificates)

    def _next_config(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC asks before every new connection's handshake: a config once after a reload, else None."""
        with self._lock:
            config, self._pending = self._pending, None
        return config

    def reload(self) -> bool:
        """Re-read certificate, key, client CA and CRL; on any problem keep the current ones (and say why)."""
        try:
            material = self._load()
        except ConfigError as exc:
            log.error("tls.reload_failed", problem=str(exc))
            return False
        with self._lock:
            self._material, self._pending = material, material.config
        log.info("tls.reloaded", revoked=len(material.crl.revoked))
        return True

    def revoked(self, cert: x509.Certificate) -> bool:
        return cert in self._material.crl
