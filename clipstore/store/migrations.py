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


def _audit_log(conn: sa.Connection) -> None:
    _create(schema.audit_head, schema.audit_entries, schema.audit_nodes, schema.audit_checkpoints,
            schema.service_keys)(conn)
    conn.execute(schema.audit_head.insert().values(id=1, size=0, last_hash=GENESIS_PREV))


MIGRATIONS: list[Migration] = [
    (1, "principals", _create(schema.principals)),
    (2, "audit log", _audit_log),
    (3, "account keys", _create(schema.account_keys, schema.account_key_tombstones)),
    (4, "accounts and clips", _create(schema.accounts, schema.clips, schema.ingest_idempotency)),
    (5, "review", _create(schema.reviewers, schema.review_sessions, schema.review_queue, schema.assignments,
                          schema.grants, schema.escalations)),
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
