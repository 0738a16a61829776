# clipstore/store/schema.py and clipstore/store/migrations.py at commit 3fde5c3, verbatim except: one
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


# ---- clipstore/store/migrations.py at 3fde5c3 ----------------------------------------
import sys  # noqa: E402

schema = sys.modules[__name__]
"""Ordered schema migrations, applied at start inside one transaction each.

Append only: a released migration is never edited; add a new one instead.
"""


import time
from collections.abc import Callable

import sqlalchemy as sa


Migration = tuple[int, str, Callable[[sa.Connection], None]]


def _create(*tables: sa.Table) -> Callable[[sa.Connection], None]:
    def apply(conn: sa.Connection) -> None:
        for table in tables:
            table.create(conn)
    return apply


MIGRATIONS: list[Migration] = [
    (1, "principals", _create(schema.principals)),
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
