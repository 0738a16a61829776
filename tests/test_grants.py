"""The grant decoder accepts exactly one spelling of a grant (docs/grant-format.md)."""

from __future__ import annotations

import base64
import string

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clipstore.errors import PermissionDenied
from clipstore.grants import GrantClaims, decode_grant, encode_grant

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CLAIMS = GrantClaims(grant_id="g_1", reviewer_id="p_r", session_id="s_1", assignment_id="a_1",
                     review_clip_id="rc_1", issued_at=1_800_000_000, expires_at=1_800_000_120)
TOKEN = encode_grant(CLAIMS, KEY)
_, BODY, SIGNATURE = TOKEN.split(".")
B64URL = string.ascii_letters + string.digits + "-_"


def _lenient(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _same_bytes_spellings(text: str) -> list[str]:
    """Every last character a lenient decoder reads as the same bytes (its unused low bits differ)."""
    return [text[:-1] + c for c in B64URL if _lenient(text[:-1] + c) == _lenient(text)]


SIGNATURE_SPELLINGS = _same_bytes_spellings(SIGNATURE)


def test_a_64_byte_signature_has_16_lenient_spellings() -> None:
    assert len(SIGNATURE) == 86 and len(SIGNATURE_SPELLINGS) == 16


@pytest.mark.parametrize("spelling", SIGNATURE_SPELLINGS)
def test_only_the_canonical_signature_spelling_is_accepted(spelling: str) -> None:
    token = f"v1.{BODY}.{spelling}"
    if spelling == SIGNATURE:
        assert decode_grant(token, KEY.public_key()) == CLAIMS
        return
    with pytest.raises(PermissionDenied) as caught:
        decode_grant(token, KEY.public_key())
    assert caught.value.reason == "GRANT_INVALID"


@pytest.mark.parametrize("token", [
    *(f"v1.{spelling}.{SIGNATURE}" for spelling in _same_bytes_spellings(BODY) if spelling != BODY),
    f"v1.{BODY}.{SIGNATURE}==",                                  # padding
    f"v1.{BODY}=.{SIGNATURE}",
    f"v1.{BODY}.{SIGNATURE.replace('-', '+').replace('_', '/')}",  # the standard alphabet
    f"v1.{BODY}.{SIGNATURE[:40]}\n{SIGNATURE[40:]}",             # characters the lenient decoder skips
    f"v1.{BODY}.{SIGNATURE[:40]} {SIGNATURE[40:]}",
    f"v1.{BODY}.{SIGNATURE}A",                                   # a length no encoding produces
    f"v1.{BODY}.",
])
def test_non_canonical_encodings_are_grant_invalid(token: str) -> None:
    with pytest.raises(PermissionDenied) as caught:
        decode_grant(token, KEY.public_key())
    assert caught.value.reason == "GRANT_INVALID"
