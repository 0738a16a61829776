# clipstore/store/schema.py and clipstore/store/migrations.py at commit 6792521, verbatim except: one
# module (so `schema.x` is this module's x) and one __future__ import. See tests/legacy/__init__.py.
"""Table definitions. Changes go through `migrations.py`, never edited in place
once released: a new migration adds what a new feature needs."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Float, nullable=False),
)

principals = sa.Table(
    "principals", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(20), nullable=False),
    # SHA-256 of the API key: keys are 256-bit random, so a fast hash suffices.
    sa.Column("key_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
)

# -- audit log (migration 2) ---------------------------------------------------
audit_head = sa.Table(
    "audit_head", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1: the row writers lock
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
)

audit_entries = sa.Table(
    "audit_entries", metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("entry", sa.LargeBinary, nullable=False),  # canonical JSON bytes
)

# Perfect subtree hashes: level 0 are leaf hashes; (level, idx) covers leaves
# [idx * 2**level, (idx + 1) * 2**level) and is stored under node_key(level, idx).
# Proofs read O(log n) of these.
audit_nodes = sa.Table(
    "audit_nodes", metadata,
    sa.Column("node_key", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)

NODE_LEVEL_SHIFT = 56  # idx < 2**56 leaves; level < 128


def node_key(level: int, idx: int) -> int:
    return level << NODE_LEVEL_SHIFT | idx


audit_checkpoints = sa.Table(
    "audit_checkpoints", metadata,
    sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("root", sa.LargeBinary(32), nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# The checkpoint signing key, shared by every replica, wrapped by the KMS root.
audit_signing_key = sa.Table(
    "audit_signing_key", metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # always 1
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("wrapped_seed", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# -- account keys (migration 3) ------------------------------------------------
account_keys = sa.Table(
    "account_keys", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("wrapped_kek", sa.LargeBinary, nullable=False),  # by the KMS root
    sa.Column("retired", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# A crypto-shredded account leaves only this: the random pseudonym and when.
account_key_tombstones = sa.Table(
    "account_key_tombstones", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("destroyed_at", sa.Float, nullable=False),
)


# ---- clipstore/store/migrations.py at 6792521 ----------------------------------------
import sys  # noqa: E402

schema = sys.modules[__name__]
"""Ordered schema migrations, applied at start inside one transaction each.

Append only: a released migration is never edited; add a new one instead.
"""


import time
from collections.abc import Callable

import sqlalchemy as sa

from auditlog.entry import GENESIS_PREV

Migration = tuple[int, str, Callable[[sa.Connection], None]]


def _create(*tables: sa.Table) -> Callable[[sa.Connection], None]:
    def apply(conn: sa.Connection) -> None:
        for table in tables:
            table.create(conn)
    return apply


def _audit_log(conn: sa.Connection) -> None:
    _create(schema.audit_head, schema.audit_entries, schema.audit_nodes, schema.audit_checkpoints,
            schema.audit_signing_key)(conn)
    conn.execute(schema.audit_head.insert().values(id=1, size=0, last_hash=GENESIS_PREV))


MIGRATIONS: list[Migration] = [
    (1, "principals", _create(schema.principals)),
    (2, "audit log", _audit_log),
    (3, "account keys", _create(schema.account_keys, schema.account_key_tombstones)),
]


def migrate(engine: sa.Engine) -> int:
    """Apply pending migrations; returns the schema version now in force."""
    schema.schema_migrations.create(engine, checkfirst=True)
    with engine.begin() as conn:
        applied = set(conn.scalars(sa.select(schema.schema_migrations.c.version)))
    known = {version for version, _, _ in MIGRATIONS}
    if applied - known:
        raise RuntimeError(
            f"database schema version {max(applied)} is newer than this clipstore "
            f"(knows up to {max(known)}); upgrade clipstore")
    for version, name, apply in MIGRATIONS:
        if version in applied:
            continue
        with engine.begin() as conn:
            apply(conn)
            conn.execute(schema.schema_migrations.insert().values(
                version=version, name=name, applied_at=time.time()))
    return max(known)
