"""Ordered schema migrations, applied at start inside one transaction each.

Append only: a released migration is never edited; add a new one instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

from auditlog.entry import GENESIS_PREV
from clipstore.store import schema

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
