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
