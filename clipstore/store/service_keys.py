"""Service secrets: created once per database, wrapped by the KMS root, shared by replicas."""

from __future__ import annotations

import secrets
import time

import sqlalchemy as sa

from clipstore.store import schema
from clipstore.store.db import Database
from kms import KeyProvider

KEY_BYTES = 32


def _context(name: str) -> dict[str, str]:
    return {"purpose": "service-key", "name": name}


def load_service_key(db: Database, root: KeyProvider, name: str) -> bytes | None:
    """The service secret `name`, or None if no server of this database has created it yet (read only:
    for the operator's commands that must not create what the service would then use)."""
    t = schema.service_keys
    with db.read() as conn:
        wrapped = conn.scalar(sa.select(t.c.wrapped).where(t.c.name == name))
    return None if wrapped is None else root.decrypt(bytes(wrapped), _context(name))


def load_or_create_service_key(db: Database, root: KeyProvider, name: str) -> bytes:
    """A 256-bit service secret, created once per database, wrapped by the root; replicas share it."""
    key = load_service_key(db, root, name)
    if key is not None:
        return key
    key = secrets.token_bytes(KEY_BYTES)
    try:
        with db.transaction() as conn:
            conn.execute(schema.service_keys.insert().values(name=name, wrapped=root.encrypt(key, _context(name)),
                                                             created_at=time.time()))
        return key
    except sa.exc.IntegrityError:  # another replica created it first
        key = load_service_key(db, root, name)
    assert key is not None, f"service key {name} vanished"
    return key
