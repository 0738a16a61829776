"""Principals (services and people), their API-key hashes and their SPIFFE ids.

`PrincipalRows` works on one connection: a unit of work's transaction
(`AuditLog.run`) or a read connection. `PrincipalRepository` is the same on a
`Database`, for authentication (reads) and the local bootstrap.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from clipstore.rows import KeyMatch, Principal, PrincipalListing
from clipstore.store import schema
from clipstore.store.db import Database
from clipstore.store.plain import PlainRows, fetch_one_pooled

_P, _K = schema.principals, schema.principal_keys
_COLUMNS = (_P.c.id, _P.c.name, _P.c.role, _P.c.disabled, _P.c.expires_at, _P.c.spiffe_id, _P.c.created_at)


def _principal(row: Any) -> Principal:
    return Principal(id=row.id, name=row.name, role=row.role, disabled=row.disabled, expires_at=row.expires_at,
                     spiffe_id=row.spiffe_id, created_at=row.created_at)


# Every call authenticates: its reads are plain SQL (see clipstore.store.plain).
_SELECT = "SELECT p.id, p.name, p.role, p.disabled, p.expires_at, p.spiffe_id, p.created_at"
_BY_KEY_HASH = f"{_SELECT}, k.retires_at FROM principals p JOIN principal_keys k ON k.principal_id = p.id " \
               "WHERE k.key_hash = ?"
_BY_SPIFFE_ID = f"{_SELECT} FROM principals p WHERE p.spiffe_id = ?"  # noqa: S608
_BY_ID = f"{_SELECT} FROM principals p WHERE p.id = ?"  # noqa: S608


def _plain_principal(row: tuple[Any, ...]) -> Principal:
    return Principal(id=row[0], name=row[1], role=row[2], disabled=bool(row[3]), expires_at=row[4],
                     spiffe_id=row[5], created_at=row[6])


def _key_match(row: tuple[Any, ...] | None) -> KeyMatch | None:
    return None if row is None else KeyMatch(principal=_plain_principal(row), retires_at=row[7])


def _maybe_principal(row: tuple[Any, ...] | None) -> Principal | None:
    return None if row is None else _plain_principal(row)


def _listing_query(now: float) -> sa.Select[Any]:
    """Principals' columns and `usable_keys`: the keys that authenticate at `now` (current, or in their overlap)."""
    usable = (sa.select(sa.func.count()).select_from(_K)
              .where(_K.c.principal_id == _P.c.id, sa.or_(_K.c.retires_at.is_(None), _K.c.retires_at > now))
              .scalar_subquery())
    return sa.select(*_COLUMNS, usable.label("usable_keys"))


class PrincipalRows(PlainRows):

    def add(self, principal: Principal, *, key_hash: bytes | None, now: float) -> None:
        """Insert a principal and (unless it authenticates only by certificate, or not yet) its first key."""
        self._conn.execute(_P.insert().values(
            id=principal.id, name=principal.name, role=principal.role, created_at=now,
            disabled=principal.disabled, expires_at=principal.expires_at, spiffe_id=principal.spiffe_id))
        if key_hash is not None:
            self._conn.execute(_K.insert().values(key_hash=key_hash, principal_id=principal.id, created_at=now))

    def by_spiffe_id(self, spiffe_id: str) -> Principal | None:
        return _maybe_principal(self._fetch(_BY_SPIFFE_ID, (spiffe_id,)))

    def get(self, principal_id: str) -> Principal | None:
        return _maybe_principal(self._fetch(_BY_ID, (principal_id,)))

    def page(self, *, role: str | None, after: str, limit: int, now: float) -> list[PrincipalListing]:
        query = _listing_query(now).where(_P.c.id > after)
        if role is not None:
            query = query.where(_P.c.role == role)
        rows = self._conn.execute(query.order_by(_P.c.id).limit(limit)).all()
        return [PrincipalListing(principal=_principal(r), usable_keys=r.usable_keys) for r in rows]

    def listing(self, principal_id: str, *, now: float) -> PrincipalListing | None:
        """One principal as `page` lists it (with the keys that authenticate at `now`)."""
        row = self._conn.execute(_listing_query(now).where(_P.c.id == principal_id)).first()
        return None if row is None else PrincipalListing(principal=_principal(row), usable_keys=row.usable_keys)

    def set_disabled(self, principal_id: str, disabled: bool) -> bool:
        return self._update(principal_id, disabled=disabled)

    def set_expiry(self, principal_id: str, expires_at: float | None) -> bool:
        return self._update(principal_id, expires_at=expires_at)

    def standing_admins(self, *, other_than: str, until: float, by_certificate: bool) -> int:
        """Enabled admins but `other_than` that do not expire before `until` and can still sign in then: by
        an API key not retired by `until`, or (when `by_certificate`) by a certificate naming their SPIFFE id."""
        key_held = sa.exists().where(_K.c.principal_id == _P.c.id,
                                     sa.or_(_K.c.retires_at.is_(None), _K.c.retires_at > until))
        credential = sa.or_(key_held, _P.c.spiffe_id.is_not(None)) if by_certificate else key_held
        query = sa.select(sa.func.count()).select_from(_P).where(
            _P.c.role == "admin", _P.c.id != other_than, _P.c.disabled.is_(False),
            sa.or_(_P.c.expires_at.is_(None), _P.c.expires_at > until), credential)
        return int(self._conn.execute(query).scalar_one())

    def _update(self, principal_id: str, **values: object) -> bool:
        return self._conn.execute(_P.update().where(_P.c.id == principal_id).values(**values)).rowcount == 1

    def rotate_key(self, principal_id: str, key_hash: bytes, *, now: float, retires_at: float) -> bool:
        """Make `key_hash` the principal's one current key; every key still working now retires at
        `retires_at` (or earlier, if it already would). False if there is no such principal.

        The principal's row is locked first: concurrent rotations (on any replica) run one after
        another, so exactly one key is current whatever the interleaving."""
        if self._conn.execute(_P.update().where(_P.c.id == principal_id).values(id=_P.c.id)).rowcount != 1:
            return False
        self._conn.execute(_K.update().where(_K.c.principal_id == principal_id,
                                             sa.or_(_K.c.retires_at.is_(None), _K.c.retires_at > retires_at))
                           .values(retires_at=retires_at))
        self._conn.execute(_K.insert().values(key_hash=key_hash, principal_id=principal_id, created_at=now))
        return True


class PrincipalRepository:
    """`PrincipalRows` on a database: each call its own read or transaction."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @contextmanager
    def read(self) -> Iterator[PrincipalRows]:
        with self._db.read() as conn:
            yield PrincipalRows(conn)

    def add(self, principal: Principal, *, key_hash: bytes | None, now: float) -> None:
        with self._db.transaction() as conn:
            PrincipalRows(conn).add(principal, key_hash=key_hash, now=now)

    # Authentication's reads, one per call: each on a pooled connection of its own, read fresh every time
    # (a principal disabled or a key retired a moment ago is refused at the next call, on any replica).
    def by_key_hash(self, key_hash: bytes) -> KeyMatch | None:
        return _key_match(fetch_one_pooled(self._db.engine, _BY_KEY_HASH, (key_hash,)))

    def by_spiffe_id(self, spiffe_id: str) -> Principal | None:
        return _maybe_principal(fetch_one_pooled(self._db.engine, _BY_SPIFFE_ID, (spiffe_id,)))

    def get(self, principal_id: str) -> Principal | None:
        return _maybe_principal(fetch_one_pooled(self._db.engine, _BY_ID, (principal_id,)))

    def set_disabled(self, principal_id: str, disabled: bool) -> bool:
        with self._db.transaction() as conn:
            return PrincipalRows(conn).set_disabled(principal_id, disabled)

    def set_expiry(self, principal_id: str, expires_at: float | None) -> bool:
        with self._db.transaction() as conn:
            return PrincipalRows(conn).set_expiry(principal_id, expires_at)
