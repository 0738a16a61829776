"""Wrapped account KEKs: the metadata store's side of `kms.KekStore`."""

from __future__ import annotations

import sqlalchemy as sa

from clipstore.store import schema
from clipstore.store.db import Database
from kms import KekRecord


class SqlKekStore:
    """What `kms.KeyRing` reads. Key rows are written only in units of work (`KekRows`, `destroy_keks`)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def keks(self, account_ref: str) -> list[KekRecord]:
        t = schema.account_keys
        with self._db.read() as conn:
            rows = conn.execute(sa.select(t.c.version, t.c.wrapped_kek, t.c.retired)
                                .where(t.c.account_ref == account_ref).order_by(t.c.version))
            return [KekRecord(version=r.version, wrapped=bytes(r.wrapped_kek), retired=r.retired) for r in rows]

    def is_destroyed(self, account_ref: str) -> bool:
        t = schema.account_key_tombstones
        with self._db.read() as conn:
            return conn.execute(sa.select(t.c.account_ref).where(t.c.account_ref == account_ref)).first() is not None


class KekRows:
    """An account's key versions in the caller's transaction (a unit of work's: `clipstore.ports.KekWrites`)."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    def newest_version(self, account_ref: str) -> int | None:
        t = schema.account_keys
        newest = self._conn.execute(sa.select(sa.func.max(t.c.version)).where(t.c.account_ref == account_ref)).scalar()
        return None if newest is None else int(newest)

    def add(self, account_ref: str, record: KekRecord, now: float) -> None:
        self._conn.execute(schema.account_keys.insert().values(
            account_ref=account_ref, version=record.version, wrapped_kek=record.wrapped, retired=record.retired,
            created_at=now))

    def retire_below(self, account_ref: str, min_version: int) -> int:
        t = schema.account_keys
        return int(self._conn.execute(t.update().where(t.c.account_ref == account_ref, t.c.version < min_version,
                                                       t.c.retired.is_(False)).values(retired=True)).rowcount)


def destroy_keks(conn: sa.Connection, account_ref: str, now: float) -> int:
    """Crypto-shred in the caller's transaction: every KEK version goes, a tombstone records when."""
    t, tombstones = schema.account_keys, schema.account_key_tombstones
    deleted = conn.execute(t.delete().where(t.c.account_ref == account_ref)).rowcount
    if conn.execute(sa.select(tombstones.c.account_ref).where(tombstones.c.account_ref == account_ref)).first() \
            is None:
        conn.execute(tombstones.insert().values(account_ref=account_ref, destroyed_at=now))
    return int(deleted)
