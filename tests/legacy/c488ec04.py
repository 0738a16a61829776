# clipstore/store/schema.py and clipstore/store/migrations.py at commit 488ec04, verbatim except: one
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
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    sa.Column("expires_at", sa.Float, nullable=True),  # NULL: never (migration 6)
    # spiffe://<trust domain>/<role>/<name> of the client certificate naming this principal (migration 6)
    sa.Column("spiffe_id", sa.String(255), nullable=True, unique=True),
)

# API keys (migration 6; before it, one key_hash column on principals). A principal has at most one
# current key (retires_at NULL); a rotated key keeps working until retires_at, then is refused with
# its own reason, so a caller still using it learns why.
principal_keys = sa.Table(
    "principal_keys", metadata,
    # SHA-256 of the API key: keys are 256-bit random, so a fast hash suffices.
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("principal_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retires_at", sa.Float, nullable=True),
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

# Secrets the service keeps for itself (the checkpoint signing seed, the
# account-lookup HMAC key), wrapped by the KMS root and shared by every replica.
service_keys = sa.Table(
    "service_keys", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
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

# -- accounts and clips (migration 4) ------------------------------------------
# The only link from an account id to its pseudonym: a keyed HMAC, deleted with the account.
accounts = sa.Table(
    "accounts", metadata,
    sa.Column("account_ref", sa.String(64), primary_key=True),
    sa.Column("lookup_hmac", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("allow_review", sa.Boolean, nullable=False),
    sa.Column("retention_days", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
)

clips = sa.Table(
    "clips", metadata,
    sa.Column("clip_id", sa.String(64), primary_key=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sealed_bytes", sa.BigInteger, nullable=False),
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("locale", sa.String(35), nullable=False),
    sa.Column("device_type", sa.String(64), nullable=False),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("captured_at", sa.Float, nullable=True),
    sa.Column("wake_word", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False, index=True),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("wrapped_dek", sa.LargeBinary, nullable=False),
    # account id and device serial, AES-GCM under the clip's DEK: shredded with the account.
    sa.Column("identity_ct", sa.LargeBinary, nullable=False),
)

# A retried PutClip with the same key returns the same clip.
ingest_idempotency = sa.Table(
    "ingest_idempotency", metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

# -- review (migration 5) ------------------------------------------------------
reviewers = sa.Table(
    "reviewers", metadata,
    sa.Column("principal_id", sa.String(40), primary_key=True),
    sa.Column("locales", sa.String(400), nullable=False),  # comma-separated; empty = any
    sa.Column("wrapped_totp_secret", sa.LargeBinary, nullable=False),  # by the KMS root
    sa.Column("last_totp_step", sa.BigInteger, nullable=False),  # a step is accepted once
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

review_sessions = sa.Table(
    "review_sessions", metadata,
    sa.Column("session_id", sa.String(40), primary_key=True),
    sa.Column("token_hash", sa.LargeBinary(32), nullable=False, unique=True),
    sa.Column("reviewer_id", sa.String(40), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Column("ended", sa.Boolean, nullable=False),
)

# Sampled clips waiting for review; the reviewer sees only review_clip_id.
review_queue = sa.Table(
    "review_queue", metadata,
    sa.Column("clip_id", sa.String(64), primary_key=True),
    sa.Column("review_clip_id", sa.String(40), nullable=False, unique=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("locale", sa.String(35), nullable=False),
    sa.Column("enqueued_at", sa.Float, nullable=False),
    sa.Column("assignment_id", sa.String(40), nullable=True),
    sa.Column("assignment_expires_at", sa.Float, nullable=True),
)

assignments = sa.Table(
    "assignments", metadata,
    sa.Column("assignment_id", sa.String(40), primary_key=True),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("review_clip_id", sa.String(40), nullable=False),
    sa.Column("reviewer_id", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("label", sa.String(64), nullable=True),
    sa.Index("ix_assignments_reviewer_created", "reviewer_id", "created_at"),
)

grants = sa.Table(
    "grants", metadata,
    sa.Column("grant_id", sa.String(40), primary_key=True),
    sa.Column("reviewer_id", sa.String(40), nullable=False, index=True),
    sa.Column("session_id", sa.String(40), nullable=False, index=True),
    sa.Column("assignment_id", sa.String(40), nullable=False),
    sa.Column("clip_id", sa.String(64), nullable=False, index=True),
    sa.Column("account_ref", sa.String(64), nullable=False, index=True),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("redeemed_at", sa.Float, nullable=True),
    sa.Column("voided", sa.Boolean, nullable=False),
)

escalations = sa.Table(
    "escalations", metadata,
    sa.Column("escalation_id", sa.String(40), primary_key=True),
    sa.Column("review_clip_id", sa.String(40), nullable=False),
    sa.Column("clip_id", sa.String(64), nullable=False),
    sa.Column("category", sa.Integer, nullable=False),
    # What the reviewer wrote may quote the speaker: AES-GCM under the clip's DEK, shredded with the account.
    sa.Column("note_ct", sa.LargeBinary, nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float, nullable=True),
    sa.Column("resolution", sa.Text, nullable=True),
)


# ---- clipstore/store/migrations.py at 488ec04 ----------------------------------------
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


def _principals_v1(conn: sa.Connection) -> None:
    # The table as released in migration 1 (schema.principals has moved on since).
    sa.Table("principals", sa.MetaData(),
             sa.Column("id", sa.String(40), primary_key=True),
             sa.Column("name", sa.String(200), nullable=False),
             sa.Column("role", sa.String(20), nullable=False),
             sa.Column("key_hash", sa.LargeBinary(32), nullable=False, unique=True),
             sa.Column("created_at", sa.Float, nullable=False),
             sa.Column("disabled", sa.Boolean, nullable=False, default=False)).create(conn)


def _rebuild(conn: sa.Connection, new: sa.Table, columns: str, *, migration: int) -> None:
    """Replace table `new.name` by `new`'s shape, keeping `columns`. SQLite cannot drop a UNIQUE
    column or a NOT NULL constraint in place, so both databases copy into a fresh table. (The staging
    name carries the migration: PostgreSQL keeps it in constraint names, which must stay unique.)"""
    staging = new.to_metadata(sa.MetaData(), name=f"{new.name}_m{migration}")
    staging.create(conn)
    conn.exec_driver_sql(f"INSERT INTO {staging.name} ({columns}) SELECT {columns} FROM {new.name}")  # noqa: S608
    conn.exec_driver_sql(f"DROP TABLE {new.name}")
    conn.exec_driver_sql(f"ALTER TABLE {staging.name} RENAME TO {new.name}")


def _principal_lifecycle(conn: sa.Connection) -> None:
    keys = sa.Table("principal_keys", sa.MetaData(),
                    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
                    sa.Column("principal_id", sa.String(40), nullable=False, index=True),
                    sa.Column("created_at", sa.Float, nullable=False),
                    sa.Column("retires_at", sa.Float, nullable=True))
    keys.create(conn)
    conn.exec_driver_sql("INSERT INTO principal_keys (key_hash, principal_id, created_at) "
                         "SELECT key_hash, id, created_at FROM principals")
    _rebuild(conn, sa.Table("principals", sa.MetaData(),
                            sa.Column("id", sa.String(40), primary_key=True),
                            sa.Column("name", sa.String(200), nullable=False),
                            sa.Column("role", sa.String(20), nullable=False),
                            sa.Column("created_at", sa.Float, nullable=False),
                            sa.Column("disabled", sa.Boolean, nullable=False, default=False),
                            sa.Column("expires_at", sa.Float, nullable=True),
                            sa.Column("spiffe_id", sa.String(255), nullable=True, unique=True)),
             "id, name, role, created_at, disabled", migration=6)


def _audit_log(conn: sa.Connection) -> None:
    _create(schema.audit_head, schema.audit_entries, schema.audit_nodes, schema.audit_checkpoints,
            schema.service_keys)(conn)
    conn.execute(schema.audit_head.insert().values(id=1, size=0, last_hash=GENESIS_PREV))


MIGRATIONS: list[Migration] = [
    (1, "principals", _principals_v1),
    (2, "audit log", _audit_log),
    (3, "account keys", _create(schema.account_keys, schema.account_key_tombstones)),
    (4, "accounts and clips", _create(schema.accounts, schema.clips, schema.ingest_idempotency)),
    (5, "review", _create(schema.reviewers, schema.review_sessions, schema.review_queue, schema.assignments,
                          schema.grants, schema.escalations)),
    (6, "principal lifecycle: keys with rotation, expiry, SPIFFE ids", _principal_lifecycle),
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
