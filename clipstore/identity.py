"""Identity minimisation: raw account ids never reach the database.

Lookups use HMAC-SHA256(lookup key, account id); the lookup key is random,
kept wrapped by the KMS root. Identity fields are stored only as AES-GCM
ciphertext under the clip's DEK, so crypto-shredding the account erases them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from clipstore.errors import SealedBlobTampered

LOOKUP_KEY_NAME = "account-lookup-hmac"
NONCE_BYTES = 12


class AccountLookup:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "AccountLookup(<key hidden>)"

    def hmac(self, account_id: str) -> bytes:
        return hmac.new(self._key, account_id.encode("utf-8"), hashlib.sha256).digest()


def _seal(dek: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(dek).encrypt(nonce, plain, aad)


def _open(dek: bytes, sealed: bytes, aad: bytes, what: str) -> bytes:
    if len(sealed) < NONCE_BYTES + 16:
        raise SealedBlobTampered(f"{what} is {len(sealed)} bytes, shorter than a nonce and a tag")
    try:
        return AESGCM(dek).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealedBlobTampered(f"{what} does not open under its clip's data key") from None


def _identity_aad(clip_id: str) -> bytes:
    return b"clipstore/identity/v1\x00" + clip_id.encode()


def seal_identity(dek: bytes, clip_id: str, *, account_id: str, device_serial: str) -> bytes:
    plain = json.dumps({"account_id": account_id, "device_serial": device_serial}).encode()
    return _seal(dek, plain, _identity_aad(clip_id))


def open_identity(dek: bytes, clip_id: str, sealed: bytes) -> dict[str, str]:
    value: dict[str, str] = json.loads(_open(dek, sealed, _identity_aad(clip_id), f"identity of clip {clip_id}"))
    return value


def _note_aad(escalation_id: str) -> bytes:
    return b"clipstore/escalation-note/v1\x00" + escalation_id.encode()


def seal_note(dek: bytes, escalation_id: str, note: str) -> bytes:
    """A reviewer's note may quote the speaker: it lives and dies with the account's keys."""
    return _seal(dek, note.encode(), _note_aad(escalation_id))


def open_note(dek: bytes, escalation_id: str, sealed: bytes) -> str:
    return _open(dek, sealed, _note_aad(escalation_id), f"note of escalation {escalation_id}").decode()


def _review_text_aad(purpose: str, object_id: str) -> bytes:
    return f"clipstore/{purpose}/v1".encode() + b"\x00" + object_id.encode()


def seal_review_text(dek: bytes, purpose: str, object_id: str, text: str) -> bytes:
    """A reviewer's label or the safety team's resolution, bound to its purpose and row: it may quote
    the speaker, so it lives and dies with the account's keys, like the note."""
    return _seal(dek, text.encode(), _review_text_aad(purpose, object_id))


def open_review_text(dek: bytes, purpose: str, object_id: str, sealed: bytes) -> str:
    return _open(dek, sealed, _review_text_aad(purpose, object_id), f"{purpose} of {object_id}").decode()
