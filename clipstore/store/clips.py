"""Accounts, clips and ingest idempotency rows."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Collection, Iterable, Iterator
from typing import Any

import sqlalchemy as sa

from clipstore.rows import AccountRow, ClipRow
from clipstore.store import schema
from clipstore.store.db import Database
from clipstore.store.keys import KekRows
from clipstore.store.plain import PlainRows, fetch_one_pooled
from kms import KekRecord

HELD_QUERY_REFS = 500  # account refs per IN (...) list: well inside every driver's parameter limit


_CLIP_FIELDS = tuple(field.name for field in dataclasses.fields(ClipRow))
CLIP_COLUMNS = ", ".join(_CLIP_FIELDS)
_INSERT_CLIP = f"INSERT INTO clips ({CLIP_COLUMNS}) VALUES ({', '.join('?' * len(_CLIP_FIELDS))})"  # noqa: S608
# A ClipRow's values in column order (dataclasses.astuple deep-copies every field: ~2 % of the server's CPU
# in a 32 KiB PutClip)
_CLIP_VALUES = operator.attrgetter(*_CLIP_FIELDS)


def clip_row(row: sa.Row[tuple[object, ...]]) -> ClipRow:
    values = {column.name: row._mapping[column] for column in schema.clips.columns}
    values["wrapped_dek"], values["identity_ct"] = bytes(values["wrapped_dek"]), bytes(values["identity_ct"])
    return ClipRow(**values)


class AccountRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def by_lookup(self, lookup_hmac: bytes) -> AccountRow | None:
        return _account(fetch_one_pooled(self._db.engine, _ACCOUNT_BY_LOOKUP, (lookup_hmac,)))

    def get(self, account_ref: str) -> AccountRow | None:
        return _account(fetch_one_pooled(self._db.engine, _ACCOUNT_BY_REF, (account_ref,)))

    def insert(self, account_ref: str, lookup_hmac: bytes, *, allow_review: bool, now: float,
               key: KekRecord) -> bool:
        """The account and its first key version, in one transaction. False (and neither stored) when
        another request created the account first."""
        try:
            with self._db.transaction() as conn:
                KekRows(conn).add(account_ref, key, now)
                conn.execute(schema.accounts.insert().values(account_ref=account_ref, lookup_hmac=lookup_hmac,
                                                             allow_review=allow_review, created_at=now))
        except sa.exc.IntegrityError:
            return False
        return True

    def flush_erasure(self) -> bool:
        """Make the deletions so far leave the live database files (SQLite's WAL); False if not yet."""
        return self._db.truncate_wal()

    def still_held(self, account_refs: Iterable[str]) -> set[str]:
        """Those of `account_refs` that still have a key, a pseudonym mapping or a clip."""
        refs, held = sorted(set(account_refs)), set[str]()
        with self._db.read() as conn:
            for i in range(0, len(refs), HELD_QUERY_REFS):
                chunk = refs[i:i + HELD_QUERY_REFS]
                for column in (schema.account_keys.c.account_ref, schema.accounts.c.account_ref,
                               schema.clips.c.account_ref):
                    held.update(conn.scalars(sa.select(column).distinct().where(column.in_(chunk))))
        return held


# Every PutClip reads its account and its idempotency key: plain SQL (see clipstore.store.plain).
_SELECT_ACCOUNT = "SELECT account_ref, allow_review, retention_days FROM accounts WHERE "
_ACCOUNT_BY_LOOKUP = _SELECT_ACCOUNT + "lookup_hmac = ?"
_ACCOUNT_BY_REF = _SELECT_ACCOUNT + "account_ref = ?"
_ACCOUNT_EXISTS = "SELECT 1 FROM accounts WHERE account_ref = ?"
_OWNER = "SELECT clip_id FROM ingest_idempotency WHERE principal_id = ? AND key_hash = ?"
_KEY_LIVE = "SELECT 1 FROM account_keys WHERE account_ref = ? AND version = ? AND NOT retired"
_OWNER_ACCOUNT_KEY = f"SELECT ({_OWNER}), EXISTS ({_ACCOUNT_EXISTS}), EXISTS ({_KEY_LIVE})"
_USES_VERSION_BELOW = "SELECT 1 FROM clips WHERE account_ref = ? AND key_version < ? LIMIT 1"


def _account(row: tuple[Any, ...] | None) -> AccountRow | None:
    return None if row is None else AccountRow(account_ref=row[0], allow_review=bool(row[1]), retention_days=row[2])


def _clip_id(row: tuple[Any, ...] | None) -> str | None:
    return None if row is None else str(row[0])


class ClipRows(PlainRows):
    """Accounts, clips and idempotency rows on one connection: inside a unit of work, or a read."""

    def owner(self, principal_id: str, key_hash: bytes) -> str | None:
        """The clip an idempotency key belongs to (perhaps deleted since: the key is then a tombstone)."""
        return _clip_id(self._fetch(_OWNER, (principal_id, key_hash)))

    def owner_account_key(self, principal_id: str, key_hash: bytes, account_ref: str, key_version: int
                          ) -> tuple[str | None, bool, bool]:
        """`owner`, `account_exists` of `account_ref`, and whether its `key_version` is there and not retired,
        in one statement (one round trip in the writer's unit of every PutClip)."""
        row = self._fetch(_OWNER_ACCOUNT_KEY, (principal_id, key_hash, account_ref, account_ref, key_version))
        assert row is not None
        return (None if row[0] is None else str(row[0])), bool(row[1]), bool(row[2])

    def uses_version_below(self, account_ref: str, min_version: int) -> bool:
        """Whether a clip of the account still has its data key wrapped under a version below `min_version`."""
        return self._fetch(_USES_VERSION_BELOW, (account_ref, min_version)) is not None

    def account_exists(self, account_ref: str) -> bool:
        """Whether the account's pseudonym mapping is still there (a deletion removes it with the shred)."""
        return self._fetch(_ACCOUNT_EXISTS, (account_ref,)) is not None

    def insert(self, clip: ClipRow, *, principal_id: str, idempotency_hash: bytes) -> None:
        self._exec("INSERT INTO ingest_idempotency (principal_id, key_hash, clip_id, created_at) VALUES (?, ?, ?, ?)",
                   (principal_id, idempotency_hash, clip.clip_id, clip.created_at))
        self._exec(_INSERT_CLIP, _CLIP_VALUES(clip))

    def get(self, clip_id: str) -> ClipRow | None:
        row = self._conn.execute(sa.select(schema.clips).where(schema.clips.c.clip_id == clip_id)).one_or_none()
        return None if row is None else clip_row(row)

    def delete(self, clip_id: str) -> bool:
        """Delete the row and its wrapped DEK. Its idempotency row stays as a tombstone, so a device's
        retry is told the key is spent instead of storing the recording again."""
        return self._conn.execute(schema.clips.delete().where(schema.clips.c.clip_id == clip_id)).rowcount == 1

    def of_account(self, account_ref: str, limit: int) -> list[ClipRow]:
        t = schema.clips
        return [clip_row(r) for r in self._conn.execute(
            sa.select(t).where(t.c.account_ref == account_ref).order_by(t.c.clip_id).limit(limit))]

    def set_allow_review(self, account_ref: str, allow: bool) -> None:
        a = schema.accounts
        self._conn.execute(a.update().where(a.c.account_ref == account_ref).values(allow_review=allow))

    def rewrapped(self, clip: ClipRow, key_version: int, wrapped: bytes) -> bool:
        """Store a DEK rewrapped under `key_version`, unless the row changed since it was read."""
        t = schema.clips
        return self._conn.execute(t.update().where(t.c.clip_id == clip.clip_id, t.c.key_version == clip.key_version)
                                  .values(key_version=key_version, wrapped_dek=wrapped)).rowcount == 1

    def delete_account(self, account_ref: str) -> None:
        """The pseudonym mapping: after it, the account id leads nowhere."""
        self._conn.execute(schema.accounts.delete().where(schema.accounts.c.account_ref == account_ref))


class ClipRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def by_idempotency(self, principal_id: str, key_hash: bytes) -> str | None:
        return _clip_id(fetch_one_pooled(self._db.engine, _OWNER, (principal_id, key_hash)))

    def get(self, clip_id: str) -> ClipRow | None:
        with self._db.read() as conn:  # a read: no write lock, no commit
            row = conn.execute(sa.select(schema.clips).where(schema.clips.c.clip_id == clip_id)).one_or_none()
        return None if row is None else clip_row(row)

    def captured_at(self, clip_ids: Collection[str]) -> dict[str, float]:
        """Capture time of each clip still stored that has one (an access report's table)."""
        t, ids, found = schema.clips, sorted(clip_ids), dict[str, float]()
        with self._db.read() as conn:
            for start in range(0, len(ids), HELD_QUERY_REFS):
                found.update((c, float(at)) for c, at in conn.execute(sa.select(t.c.clip_id, t.c.captured_at).where(
                    t.c.clip_id.in_(ids[start:start + HELD_QUERY_REFS]), t.c.captured_at.is_not(None))))
        return found

    def list_by_account(self, account_ref: str, *, after: str, limit: int) -> list[ClipRow]:
        t = schema.clips
        with self._db.read() as conn:
            rows = conn.execute(sa.select(t).where(t.c.account_ref == account_ref, t.c.clip_id > after)
                                .order_by(t.c.clip_id).limit(limit))
            return [clip_row(r) for r in rows]

    def all_for_account(self, account_ref: str, *, page_rows: int = 500) -> Iterator[ClipRow]:
        """Every clip of the account, read a page at a time."""
        after = ""
        while page := self.list_by_account(account_ref, after=after, limit=page_rows):
            yield from page
            after = page[-1].clip_id

    def expired(self, now: float, limit: int) -> list[ClipRow]:
        t = schema.clips
        with self._db.read() as conn:
            return [clip_row(r) for r in conn.execute(sa.select(t).where(t.c.expires_at <= now)
                                                   .order_by(t.c.expires_at).limit(limit))]

    def count_purgeable(self, now: float) -> tuple[int, int]:
        """How many clips a purge would remove now: (expired, of crypto-shredded accounts)."""
        t, tomb = schema.clips, schema.account_key_tombstones
        with self._db.read() as conn:
            expired = conn.scalar(sa.select(sa.func.count()).select_from(t).where(t.c.expires_at <= now))
            shredded = conn.scalar(sa.select(sa.func.count()).select_from(
                t.join(tomb, tomb.c.account_ref == t.c.account_ref)))
        return int(expired or 0), int(shredded or 0)

    def shredded(self, limit: int) -> list[ClipRow]:
        """Clips whose account keys are destroyed but whose rows remain (an account deletion that stopped
        half-way): noise, to be removed like expired clips."""
        t, tomb = schema.clips, schema.account_key_tombstones
        with self._db.read() as conn:
            return [clip_row(r) for r in conn.execute(
                sa.select(t).join(tomb, tomb.c.account_ref == t.c.account_ref).limit(limit))]

    def sealed_blobs_before(self, magic: bytes, limit: int) -> list[tuple[str, str, str, str, bytes, ClipRow]]:
        """Blobs sealed under a clip's key in an older format than `magic` marks: (table, key column, blob
        column, row id, blob, clip), for the reseal job; a page at a time, oldest format first."""
        c, e, a = schema.clips, schema.escalations, schema.assignments
        found: list[tuple[str, str, str, str, bytes, ClipRow]] = []
        with self._db.read() as conn:
            for row in conn.execute(sa.select(c).where(sa.func.substr(c.c.identity_ct, 1, len(magic)) != magic)
                                    .limit(limit)):
                clip = clip_row(row)
                found.append(("clips", "clip_id", "identity_ct", clip.clip_id, clip.identity_ct, clip))
            for table, key, column in ((e, "escalation_id", "note_ct"), (e, "escalation_id", "resolution_ct"),
                                       (a, "assignment_id", "label_ct")):
                blob = table.c[column]
                stmt = (sa.select(c, table.c[key].label("_row_id"), blob.label("_blob"))
                        .join(c, c.c.clip_id == table.c.clip_id)
                        .where(blob.is_not(None), sa.func.length(blob) > 0,
                               sa.func.substr(blob, 1, len(magic)) != magic).limit(limit))
                found += [(table.name, key, column, r._row_id, bytes(r._blob), clip_row(r)) for r in conn.execute(stmt)]
        return found[:limit]

    def replace_blob(self, table: str, key: str, column: str, row_id: str, old: bytes, new: bytes) -> bool:
        """Swap one sealed blob for its resealed twin, unless it changed in the meantime."""
        t = schema.metadata.tables[table]
        with self._db.transaction() as conn:
            return conn.execute(t.update().where(t.c[key] == row_id, t.c[column] == old)
                                .values({column: new})).rowcount == 1

    def exists(self, clip_id: str) -> bool:
        with self._db.read() as conn:
            return conn.scalar(sa.select(schema.clips.c.clip_id).where(schema.clips.c.clip_id == clip_id)) \
                is not None

    def below_version(self, account_ref: str, version: int, limit: int) -> list[ClipRow]:
        """Clips of the account whose DEK is still wrapped under an older key version."""
        t = schema.clips
        with self._db.read() as conn:
            return [clip_row(r) for r in conn.execute(
                sa.select(t).where(t.c.account_ref == account_ref, t.c.key_version < version)
                .order_by(t.c.clip_id).limit(limit))]
