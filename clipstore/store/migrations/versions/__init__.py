"""Frozen Alembic revisions: each file spells out its own DDL and is never edited once released."""
