"""The checkpoint signing key: an Ed25519 seed kept as a service key (wrapped by the KMS root)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from auditlog.note import NoteSigner
from clipstore.store import Database
from clipstore.store.service_keys import load_or_create_service_key
from kms import KeyProvider

SIGNING_KEY_NAME = "audit-checkpoint-signing"


def load_or_create_signer(db: Database, root: KeyProvider) -> NoteSigner:
    """The log's signer; its origin is derived from the public key, so it never changes."""
    key = Ed25519PrivateKey.from_private_bytes(load_or_create_service_key(db, root, SIGNING_KEY_NAME))
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return NoteSigner(f"clipstore-audit/{hashlib.sha256(public).hexdigest()[:16]}", key)
