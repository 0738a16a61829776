"""Principals (services and people) and their API-key hashes."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from clipstore.store import schema
from clipstore.store.db import Database


@dataclass(frozen=True, kw_only=True)
class Principal:
    id: str
    name: str
    role: str
    disabled: bool = False


class PrincipalRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, principal: Principal, *, key_hash: bytes, now: float) -> None:
        with self._db.transaction() as conn:
            conn.execute(schema.principals.insert().values(
                id=principal.id, name=principal.name, role=principal.role,
                key_hash=key_hash, created_at=now, disabled=principal.disabled))

    def by_key_hash(self, key_hash: bytes) -> Principal | None:
        return self._one(schema.principals.c.key_hash == key_hash)

    def get(self, principal_id: str) -> Principal | None:
        return self._one(schema.principals.c.id == principal_id)

    def _one(self, where: sa.ColumnElement[bool]) -> Principal | None:
        t = schema.principals
        with self._db.read() as conn:
            row = conn.execute(sa.select(t.c.id, t.c.name, t.c.role, t.c.disabled)
                               .where(where)).one_or_none()
        return None if row is None else Principal(id=row.id, name=row.name, role=row.role,
                                                  disabled=row.disabled)

    def set_disabled(self, principal_id: str, disabled: bool) -> bool:
        with self._db.transaction() as conn:
            result = conn.execute(schema.principals.update()
                                  .where(schema.principals.c.id == principal_id)
                                  .values(disabled=disabled))
        return result.rowcount == 1
