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

LOOKUP_KEY_NAME = "account-lookup-hmac"
NONCE_BYTES = 12


class AccountLookup:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "AccountLookup(<key hidden>)"

    def hmac(self, account_id: str) -> bytes:
        return hmac.new(self._key, account_id.encode("utf-8"), hashlib.sha256).digest()


def _aad(clip_id: str) -> bytes:
    return b"clipstore/identity/v1\x00" + clip_id.encode()


def seal_identity(dek: bytes, clip_id: str, *, account_id: str, device_serial: str) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    plain = json.dumps({"account_id": account_id, "device_serial": device_serial}).encode()
    return nonce + AESGCM(dek).encrypt(nonce, plain, _aad(clip_id))


def open_identity(dek: bytes, clip_id: str, sealed: bytes) -> dict[str, str]:
    try:
        plain = AESGCM(dek).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(clip_id))
    except InvalidTag:
        raise ValueError(f"identity of clip {clip_id} does not open under its data key") from None
    value: dict[str, str] = json.loads(plain)
    return value
