"""Principals, roles and API keys; which role may call which RPC.

API keys are for backend services in development; production uses mTLS.
A key is shown once when created; only its SHA-256 is stored.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Mapping

from clipstore.audit import OPERATOR, Actor, AuditLog
from clipstore.errors import PermissionDenied, Unauthenticated
from clipstore.store.principals import Principal, PrincipalRepository

ROLES = ("ingest", "reviewer", "safety", "auditor", "admin")
API_KEY_PREFIX = "csk_"
API_KEY_RANDOM_BYTES = 32

_SVC = "/clipstore.v1."
# Fail closed: a clipstore method missing here is denied to everyone.
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    **{f"{_SVC}ClipService/{m}": frozenset({"ingest", "admin"})
       for m in ("PutClip", "GetClip", "ListClips", "DeleteClip")},
    **{f"{_SVC}AccountService/{m}": frozenset({"ingest", "admin"})
       for m in ("SetReviewPreference", "DeleteAccount", "RotateAccountKey")},
    **{f"{_SVC}ReviewerAdminService/{m}": frozenset({"admin"})
       for m in ("CreateReviewer", "DisableReviewer")},
    **{f"{_SVC}ReviewService/{m}": frozenset({"reviewer"})
       for m in ("StartReviewSession", "NextAssignment", "RequestGrant", "FetchClip",
                 "FlagClip", "CompleteAssignment", "EndReviewSession")},
    **{f"{_SVC}SafetyService/{m}": frozenset({"safety"})
       for m in ("ListEscalations", "ResolveEscalation")},
    **{f"{_SVC}AuditService/{m}": frozenset({"auditor"})
       for m in ("GetCheckpoint", "ListEntries", "GetInclusionProof", "GetConsistencyProof")},
}
# Health and reflection answer without credentials, as load balancers expect.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")


def hash_api_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_api_key() -> str:
    raw = secrets.token_bytes(API_KEY_RANDOM_BYTES)
    return API_KEY_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def create_principal(repo: PrincipalRepository, audit: AuditLog, *, role: str, name: str,
                     actor: Actor = OPERATOR) -> tuple[Principal, str]:
    """Create a principal with a fresh API key (audited first); returns the key, shown once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or len(name) > 200:
        raise ValueError("name must be 1 to 200 characters")
    principal = Principal(id="p_" + secrets.token_hex(8), name=name, role=role)
    audit.append(actor.record("principal.create", reason=role, principal_id=principal.id))
    key = new_api_key()
    repo.add(principal, key_hash=hash_api_key(key), now=time.time())
    return principal, key


def authenticate(repo: PrincipalRepository, metadata: Mapping[str, str]) -> Principal:
    """Resolve the bearer key in `authorization` metadata to an enabled principal."""
    header = metadata.get("authorization")
    if header is None:
        raise Unauthenticated("no credentials; send 'authorization: Bearer <api key>'",
                              reason="MISSING_CREDENTIALS")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.startswith(API_KEY_PREFIX):
        raise Unauthenticated("malformed authorization header; expected 'Bearer csk_…'",
                              reason="MALFORMED_CREDENTIALS")
    principal = repo.by_key_hash(hash_api_key(key.strip()))
    if principal is None:
        raise Unauthenticated("API key is unknown; ask an admin for a key", reason="INVALID_CREDENTIALS")
    if principal.disabled:
        raise Unauthenticated("this principal was disabled by an admin", reason="PRINCIPAL_DISABLED")
    return principal


def authorize(principal: Principal, method: str) -> None:
    """Raise `PermissionDenied` unless the principal's role may call `method`."""
    allowed = METHOD_ROLES.get(method, frozenset())
    if principal.role not in allowed:
        needed = " or ".join(sorted(allowed)) or "no role (unknown method)"
        raise PermissionDenied(f"role {principal.role!r} may not call {method}; it needs {needed}",
                               reason="WRONG_ROLE")
