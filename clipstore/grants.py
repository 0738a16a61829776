"""Decryption grants: Ed25519-signed, short-lived, single-use tokens (docs/grant-format.md).

Verification here is pure (no IO): signature, then time. The review desk adds
the checks that need the database (binding, revocation, single use).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from clipstore.errors import PermissionDenied

GRANT_PREFIX = "v1"
SIGNING_CONTEXT = b"clipstore/grant/v1\x00"  # domain separation from every other Ed25519 use
MAX_GRANT_TTL_S = 300  # the grant format's limit; review.grant_ttl_s is checked against it
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True, kw_only=True)
class GrantClaims:
    grant_id: str
    reviewer_id: str
    session_id: str
    assignment_id: str
    review_clip_id: str
    issued_at: int
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict unpadded base64url: one spelling per byte string. The lenient decoder ignores the
    unused low bits of the last character (16 spellings of one signature) and skips stray characters."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not the canonical base64url spelling")
    return data


def encode_grant(claims: GrantClaims, key: Ed25519PrivateKey) -> str:
    if not 0 < claims.expires_at - claims.issued_at <= MAX_GRANT_TTL_S:
        raise ValueError(f"grant lifetime must be 1 to {MAX_GRANT_TTL_S} s")
    body = _b64(json.dumps(asdict(claims), sort_keys=True, separators=(",", ":")).encode())
    signature = key.sign(SIGNING_CONTEXT + f"{GRANT_PREFIX}.{body}".encode())
    return f"{GRANT_PREFIX}.{body}.{_b64(signature)}"


def _invalid(why: str) -> PermissionDenied:
    return PermissionDenied(f"the grant is not valid ({why}); request a new grant", reason="GRANT_INVALID")


def decode_grant(token: str, public_key: Ed25519PublicKey) -> GrantClaims:
    """Check form and signature; `PermissionDenied(GRANT_INVALID)` for anything forged or malformed."""
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2:
        raise _invalid("malformed")
    prefix, body, signature = token.split(".")
    if prefix != GRANT_PREFIX:
        raise _invalid("unknown version")
    try:
        public_key.verify(_unb64(signature), SIGNING_CONTEXT + f"{prefix}.{body}".encode())
        fields = json.loads(_unb64(body))
        claims = GrantClaims(**fields)
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        raise _invalid("bad signature or body") from None
    if not all(isinstance(v, str) for v in (claims.grant_id, claims.reviewer_id, claims.session_id,
                                            claims.assignment_id, claims.review_clip_id)):
        raise _invalid("bad field types")
    return claims


def check_grant_time(claims: GrantClaims, *, now: float) -> None:
    """Explicit-time check: expired grants are refused with how long ago they expired."""
    if now >= claims.expires_at:
        raise PermissionDenied(f"grant expired {now - claims.expires_at:.0f} s ago; request a new grant",
                               reason="GRANT_EXPIRED")
    if claims.issued_at > now + 5:  # small allowance for clock skew between replicas
        raise _invalid("issued in the future")
