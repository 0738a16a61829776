"""Identity minimisation: raw account ids never reach the database.

Lookups use HMAC-SHA256(lookup key, account id); the lookup key is random,
kept wrapped by the KMS root. Identity fields are stored only as AES-GCM
ciphertext under the clip's DEK, so crypto-shredding the account erases them.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from clipstore.clipkey import ClipKey, Purpose

LOOKUP_KEY_NAME = "account-lookup-hmac"


class AccountLookup:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "AccountLookup(<key hidden>)"

    def hmac(self, account_id: str) -> bytes:
        return hmac.new(self._key, account_id.encode("utf-8"), hashlib.sha256).digest()


def seal_identity(key: ClipKey, clip_id: str, *, account_id: str, device_serial: str) -> bytes:
    plain = json.dumps({"account_id": account_id, "device_serial": device_serial}).encode()
    return key.seal(Purpose.IDENTITY, clip_id, plain)


def open_identity(key: ClipKey, clip_id: str, sealed: bytes) -> dict[str, str]:
    value: dict[str, str] = json.loads(key.open(Purpose.IDENTITY, clip_id, sealed))
    return value
