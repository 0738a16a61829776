"""Principals, roles and API keys; which role may call which RPC.

API keys are for backend services in development; production uses mTLS.
A key is shown once when created; only its SHA-256 is stored.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import pkgutil
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from cryptography import x509

import clipstore.v1
from clipstore.errors import PermissionDenied, PrincipalRefused, Unauthenticated
from clipstore.rows import KeyMatch, Principal
from clipstore.spiffe import parse_spiffe_id, spiffe_ids
from clipstore.unit import OPERATOR, Actor, AuditTrail
from clipstore.v1 import common_pb2, options_pb2

ROLES = ("ingest", "reviewer", "safety", "auditor", "admin")
PRINCIPAL_ID_PREFIX = "p_"  # every principal's id; no other actor's (system, cli, anonymous) starts so
PRINCIPAL_ID_RE = re.compile(r"p_[0-9a-f]{16}")  # the whole of every principal's id (new_principal), fullmatch
API_KEY_PREFIX = "csk_"
API_KEY_RANDOM_BYTES = 32
# What `request_metadata` puts in place of two or more `authorization` headers: a NUL, which no header value
# can carry, so no caller can send it.
AMBIGUOUS_CREDENTIALS = "\x00ambiguous"

def _method_rules() -> tuple[dict[str, frozenset[str]], tuple[str, ...]]:
    """The authorisation table, read from the `(clipstore.v1.roles)` / `(clipstore.v1.public)` options of
    every RPC in the API definition, so the two cannot drift."""
    roles_by_number = {v.number: v.name.removeprefix("ROLE_").lower() for v in common_pb2.Role.DESCRIPTOR.values}
    table: dict[str, frozenset[str]] = {}
    public: list[str] = []
    for info in pkgutil.iter_modules(clipstore.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"clipstore.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                path, options = f"/{service.full_name}/{method.name}", method.GetOptions()
                if options.Extensions[options_pb2.public]:
                    public.append(path)
                elif options.Extensions[options_pb2.roles]:
                    table[path] = frozenset(roles_by_number[r] for r in options.Extensions[options_pb2.roles])
    return table, tuple(public)


# Fail closed: a clipstore method without a roles option is denied to everyone.
METHOD_ROLES, _PUBLIC_METHODS = _method_rules()
# Health and reflection answer without credentials, as load balancers expect; a reviewer redeeming an
# enrolment code has no credential yet but the code (`clipstore.enrolment`).
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/", *_PUBLIC_METHODS)


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_api_key() -> str:
    raw = secrets.token_bytes(API_KEY_RANDOM_BYTES)
    return API_KEY_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def new_principal(*, role: str, name: str, spiffe_id: str | None = None, expires_at: float | None = None,
                  with_key: bool = True) -> tuple[Principal, str | None]:
    """A principal not yet stored, and its API key (to show once) unless a certificate names it (`spiffe_id`)
    or it is a reviewer, whose key only they receive, through an enrolment code (`with_key=False`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or len(name) > 200:
        raise ValueError("name must be 1 to 200 characters")
    principal = Principal(id=PRINCIPAL_ID_PREFIX + secrets.token_hex(8), name=name, role=role, spiffe_id=spiffe_id,
                          expires_at=expires_at)
    return principal, new_api_key() if with_key and spiffe_id is None else None


class PrincipalRecords(Protocol):
    """The principals as authentication reads them and the operator's bootstrap adds one
    (`clipstore.store.PrincipalRepository`)."""

    def add(self, principal: Principal, *, key_hash: bytes | None, now: float) -> None: ...
    def by_key_hash(self, key_hash: bytes) -> KeyMatch | None: ...
    def by_spiffe_id(self, spiffe_id: str) -> Principal | None: ...


def create_principal(repo: PrincipalRecords, audit: AuditTrail, *, role: str, name: str,
                     actor: Actor = OPERATOR, spiffe_id: str | None = None) -> tuple[Principal, str | None]:
    """Create a principal on the local database (the operator's bootstrap; audited first). It gets a fresh
    API key, returned once, unless a certificate names it (`spiffe_id`): then None is returned."""
    principal, key = new_principal(role=role, name=name, spiffe_id=spiffe_id)
    audit.append(actor.record("principal.create", reason=role, principal_id=principal.id))
    repo.add(principal, key_hash=hash_api_key(key) if key else None, now=time.time())
    return principal, key


def check_standing(principal: Principal, *, now: float) -> Principal:
    """Raise unless the principal may act now (not disabled, not expired): for keys and certificates alike."""
    if principal.disabled:
        raise PrincipalRefused(principal.id, "this principal was disabled by an admin", reason="PRINCIPAL_DISABLED")
    if principal.expires_at is not None and now >= principal.expires_at:
        raise PrincipalRefused(principal.id, "this principal expired; an admin may extend it",
                               reason="PRINCIPAL_EXPIRED")
    return principal


def request_metadata(pairs: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """A call's text metadata by key. A key sent twice keeps its last value, except `authorization`:
    two credentials (a proxy adding one in front of the caller's, a client sending a stale and a
    fresh key) would let whichever came last decide who is calling; both are refused instead."""
    metadata: dict[str, str] = {}
    for key, value in pairs:
        if isinstance(value, str):
            metadata[key] = AMBIGUOUS_CREDENTIALS if key == "authorization" and key in metadata else value
    return metadata


def authenticate(repo: PrincipalRecords, metadata: Mapping[str, str], *, now: float) -> Principal:
    """Resolve the bearer key in `authorization` metadata to a principal in good standing."""
    header = metadata.get("authorization")
    if header is None:
        raise Unauthenticated("no credentials; send 'authorization: Bearer <api key>'",
                              reason="MISSING_CREDENTIALS")
    if header == AMBIGUOUS_CREDENTIALS:
        raise Unauthenticated("more than one authorization header; send exactly one",
                              reason="MALFORMED_CREDENTIALS")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.startswith(API_KEY_PREFIX):
        raise Unauthenticated("malformed authorization header; expected 'Bearer csk_…'",
                              reason="MALFORMED_CREDENTIALS")
    match = repo.by_key_hash(hash_api_key(key.strip()))
    if match is None:
        raise Unauthenticated("API key is unknown; ask an admin for a key", reason="INVALID_CREDENTIALS")
    if match.retires_at is not None and now >= match.retires_at:
        raise PrincipalRefused(match.principal.id, "this API key was replaced and its overlap has ended; "
                                                   "use the new key", reason="KEY_ROTATED_OUT")
    return check_standing(match.principal, now=now)


def authenticate_certificate(repo: PrincipalRecords, pem: bytes, *, trust_domain: str,
                             revoked: Callable[[x509.Certificate], bool], now: float) -> Principal:
    """Resolve a client certificate gRPC has verified against the client CA to a principal in good
    standing: by its one SPIFFE id, in our trust domain, enrolled, not on the CRL."""
    cert = x509.load_pem_x509_certificate(pem)
    uris = spiffe_ids(cert)
    spiffe_id = parse_spiffe_id(uris[0]) if len(uris) == 1 else None
    if spiffe_id is None:  # an X.509-SVID carries exactly one SPIFFE id
        raise Unauthenticated("the client certificate must carry one SAN URI "
                              f"spiffe://{trust_domain}/<role>/<name>", reason="CERT_WITHOUT_PRINCIPAL")
    if spiffe_id.trust_domain != trust_domain:
        raise Unauthenticated(f"the certificate's SPIFFE id is not in trust domain {trust_domain!r}",
                              reason="WRONG_TRUST_DOMAIN")
    principal = repo.by_spiffe_id(str(spiffe_id))
    if revoked(cert):
        raise PrincipalRefused(principal.id if principal else "", "the client certificate was revoked; "
                                                                  "get a new one", reason="CERT_REVOKED")
    if principal is None:
        raise Unauthenticated("no principal is enrolled for this certificate's SPIFFE id; ask an admin to "
                              "enrol it", reason="UNKNOWN_SPIFFE_ID")
    return check_standing(principal, now=now)


def authorize(principal: Principal, method: str) -> None:
    """Raise `PermissionDenied` unless the principal's role may call `method`."""
    allowed = METHOD_ROLES.get(method, frozenset())
    if principal.role not in allowed:
        needed = " or ".join(sorted(allowed)) or "no role (unknown method)"
        raise PermissionDenied(f"role {principal.role!r} may not call {method}; it needs {needed}",
                               reason="WRONG_ROLE")
