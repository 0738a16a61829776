"""The checkpoint signing key: one per database, its seed wrapped by the KMS root."""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from auditlog.note import NoteSigner
from clipstore.store import Database, schema
from kms import KeyProvider

SEED_BYTES = 32
_PURPOSE = "audit-checkpoint-signing"


def _context(name: str) -> dict[str, str]:
    return {"purpose": _PURPOSE, "origin": name}


def load_or_create_signer(db: Database, root: KeyProvider, *, now: float) -> NoteSigner:
    """The log's signer; created (with a random origin) on first use, shared by replicas."""
    t = schema.audit_signing_key
    with db.transaction() as conn:
        row = conn.execute(sa.select(t.c.name, t.c.wrapped_seed).where(t.c.id == 1)).one_or_none()
    if row is None:
        name = f"clipstore-audit/{secrets.token_hex(8)}"
        seed = secrets.token_bytes(SEED_BYTES)
        try:
            with db.transaction() as conn:
                conn.execute(t.insert().values(id=1, name=name, wrapped_seed=root.encrypt(seed, _context(name)),
                                               created_at=now))
            return NoteSigner(name, Ed25519PrivateKey.from_private_bytes(seed))
        except sa.exc.IntegrityError:  # another replica won the race; use its key
            with db.transaction() as conn:
                row = conn.execute(sa.select(t.c.name, t.c.wrapped_seed).where(t.c.id == 1)).one()
    seed = root.decrypt(row.wrapped_seed, _context(row.name))
    return NoteSigner(row.name, Ed25519PrivateKey.from_private_bytes(seed))
