# clipstore/store/schema.py and clipstore/store/migrations.py at commit c04bea2, verbatim except: one
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

# Perfect subtree hashes above the leaves: (level ≥ 1, idx) covers leaves
# [idx * 2**level, (idx + 1) * 2**level) and is stored under node_key(level, idx), its
# post-order position. Leaf hashes are not stored: leaf i is SHA-256(0x00 ‖ entry i).
# Proofs read O(log n) of these.
audit_nodes = sa.Table(
    "audit_nodes", metadata,
    sa.Column("node_key", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("hash", sa.LargeBinary(32), nullable=False),
)


def node_key(level: int, idx: int) -> int:
    """The node's post-order position: the nodes an append completes come right after each other,
    so a commit writes them to one or two pages, not to one page per tree level (a 16-entry commit
    wrote 19 pages, now 6)."""
    first = idx << level
    return 2 * first - first.bit_count() + (2 << level) - 2


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

# A retried PutClip with the same key returns the same clip. A row outlives its clip (deletion,
# purge, account deletion) as a tombstone: the retry is refused and never re-creates the recording.
# It holds no PII: the ingest principal, SHA-256 of the key, a random clip id, a time.
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
    # By the KMS root. NULL until the reviewer redeems their enrolment code (migration 8): the admin who
    # creates a reviewer never sees a factor.
    sa.Column("wrapped_totp_secret", sa.LargeBinary, nullable=True),
    sa.Column("last_totp_step", sa.BigInteger, nullable=False),  # a step is accepted once
    sa.Column("failed_attempts", sa.Integer, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("lockouts", sa.Integer, nullable=False, server_default="0"),  # migration 7: escalating lockouts
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
    sa.Column("label", sa.String(64), nullable=True),  # before migration 7; now always NULL
    sa.Column("label_ct", sa.LargeBinary, nullable=True),  # migration 7: sealed under the clip's key
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
    sa.Column("resolution", sa.Text, nullable=True),  # before migration 7; now always NULL
    sa.Column("resolution_ct", sa.LargeBinary, nullable=True),  # migration 7: sealed under the clip's key
)

# -- self-enrolment (migration 8) ---------------------------------------------
# One-time codes an admin hands a reviewer, who redeems one for factors only they see. Only the
# code's SHA-256 is kept (codes are 128-bit random); redeemed_at is set exactly once.
enrolment_codes = sa.Table(
    "enrolment_codes", metadata,
    sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("principal_id", sa.String(40), nullable=False, index=True),
    sa.Column("purpose", sa.String(20), nullable=False),
    sa.Column("created_by", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("redeemed_at", sa.Float, nullable=True),
)


# ---- clipstore/store/migrations.py at c04bea2 ----------------------------------------
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


def _seal_review_text(conn: sa.Connection) -> None:
    """Escalating lockouts; reviewer labels and safety resolutions sealed under the clip's key.
    Spelled out as DDL (not from the live tables), guarded because migration 5 created its tables from
    the live definitions, which already carry these columns on a fresh database."""
    blob = sa.LargeBinary().compile(dialect=conn.dialect)
    present = {(t, c["name"]) for t in ("reviewers", "assignments", "escalations")
               for c in sa.inspect(conn).get_columns(t)}
    for table, column, ddl in (("reviewers", "lockouts", "INTEGER NOT NULL DEFAULT 0"),
                               ("assignments", "label_ct", blob), ("escalations", "resolution_ct", blob)):
        if (table, column) not in present:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
    # Labels and resolutions written in clear before this migration stay until their clip is deleted
    # (`ReviewRows.forget_clip`); sealing them needs the clip keys, so it is a job, not DDL.


def _self_enrolment(conn: sa.Connection) -> None:
    """Reviewers without a TOTP secret until they redeem a code; the codes themselves."""
    _rebuild(conn, sa.Table("reviewers", sa.MetaData(),
                            sa.Column("principal_id", sa.String(40), primary_key=True),
                            sa.Column("locales", sa.String(400), nullable=False),
                            sa.Column("wrapped_totp_secret", sa.LargeBinary, nullable=True),
                            sa.Column("last_totp_step", sa.BigInteger, nullable=False),
                            sa.Column("failed_attempts", sa.Integer, nullable=False),
                            sa.Column("locked_until", sa.Float, nullable=False),
                            sa.Column("created_at", sa.Float, nullable=False),
                            sa.Column("lockouts", sa.Integer, nullable=False, server_default="0")),
             "principal_id, locales, wrapped_totp_secret, last_totp_step, failed_attempts, locked_until, "
             "created_at, lockouts", migration=8)
    sa.Table("enrolment_codes", sa.MetaData(),
             sa.Column("code_hash", sa.LargeBinary(32), primary_key=True),
             sa.Column("principal_id", sa.String(40), nullable=False, index=True),
             sa.Column("purpose", sa.String(20), nullable=False),
             sa.Column("created_by", sa.String(40), nullable=False),
             sa.Column("created_at", sa.Float, nullable=False),
             sa.Column("expires_at", sa.Float, nullable=False),
             sa.Column("redeemed_at", sa.Float, nullable=True)).create(conn)


def _post_order_nodes(conn: sa.Connection) -> None:
    """Audit subtree hashes under their post-order position (a commit's new nodes share a page or two,
    where level-major keys put each tree level on its own page); leaf hashes are no longer stored.
    The key formula is spelled out here, frozen, as migration 9 wrote it."""
    nodes = sa.table("audit_nodes", sa.column("node_key", sa.BigInteger), sa.column("hash", sa.LargeBinary))
    staging = sa.Table("audit_nodes_m9", sa.MetaData(),
                       sa.Column("node_key", sa.BigInteger, primary_key=True, autoincrement=False),
                       sa.Column("hash", sa.LargeBinary(32), nullable=False))
    staging.create(conn)
    level_shift = 56  # the keys before: level << 56 | index

    def post_order(key: int) -> int:
        level, first = key >> level_shift, (key & ((1 << level_shift) - 1)) << (key >> level_shift)
        return 2 * first - first.bit_count() + (2 << level) - 2

    after = (1 << level_shift) - 1  # level 0 (the leaves) is dropped
    while rows := conn.execute(sa.select(nodes.c.node_key, nodes.c.hash).where(nodes.c.node_key > after)
                               .order_by(nodes.c.node_key).limit(10_000)).all():
        conn.execute(staging.insert(), [{"node_key": post_order(k), "hash": h} for k, h in rows])
        after = rows[-1][0]
    conn.execute(sa.text("DROP TABLE audit_nodes"))
    conn.execute(sa.text("ALTER TABLE audit_nodes_m9 RENAME TO audit_nodes"))


MIGRATIONS: list[Migration] = [
    (1, "principals", _principals_v1),
    (2, "audit log", _audit_log),
    (3, "account keys", _create(schema.account_keys, schema.account_key_tombstones)),
    (4, "accounts and clips", _create(schema.accounts, schema.clips, schema.ingest_idempotency)),
    (5, "review", _create(schema.reviewers, schema.review_sessions, schema.review_queue, schema.assignments,
                          schema.grants, schema.escalations)),
    (6, "principal lifecycle: keys with rotation, expiry, SPIFFE ids", _principal_lifecycle),
    (7, "sealed review text, escalating lockouts", _seal_review_text),
    (8, "self-enrolment: enrolment codes; reviewers without a TOTP secret until they redeem one",
     _self_enrolment),
    (9, "audit subtree hashes in post-order, leaves not stored", _post_order_nodes),
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
