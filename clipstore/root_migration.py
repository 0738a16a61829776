"""Moving an installation to another root key provider (the local root key → an AWS KMS key).

Everything the root wraps is rewrapped under the new provider with the same
encryption context: every account key version, every service key (checkpoint
and grant signing, account lookup, …) and every reviewer's TOTP secret. Audio,
clip data keys and the audit log are untouched (they sit below the account keys).

Resumable: a row that no longer opens under the old root but opens under the
new one was moved by an earlier run and is skipped; each page of rows is one
transaction whose updates apply only if the row did not change meanwhile. Run
it with the service stopped, then set `kms.key_id` and start the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from clipstore.audit import AuditLog
from clipstore.review.sessions import totp_context
from clipstore.store import Database, schema
from clipstore.unit import Actor
from kms import DataKey, KeyProvider, KmsError
from kms.keyring import kek_context

PAGE_ROWS = 200
_NEITHER = "a wrapped key opens under neither root key: check that the old root key file belongs to this database"


class RootMigrationError(RuntimeError):
    """A wrapped key opens under neither root: the old root key or the database is not the pair expected."""


@dataclass(frozen=True, kw_only=True)
class _Kind:
    name: str
    table: sa.Table
    key: tuple[str, ...]  # the row's primary key columns
    blob: str  # the wrapped column
    context: Callable[[sa.Row[tuple[object, ...]]], dict[str, str]]


KINDS = (
    _Kind(name="account keys", table=schema.account_keys, key=("account_ref", "version"), blob="wrapped_kek",
          context=lambda r: kek_context(r.account_ref, r.version)),
    _Kind(name="service keys", table=schema.service_keys, key=("name",), blob="wrapped",
          context=lambda r: {"purpose": "service-key", "name": r.name}),
    _Kind(name="reviewer TOTP secrets", table=schema.reviewers, key=("principal_id",), blob="wrapped_totp_secret",
          context=lambda r: totp_context(r.principal_id)),
)


@dataclass(frozen=True, kw_only=True)
class Moved:
    kind: str
    moved: int
    already: int


def _pages(db: Database, kind: _Kind) -> Iterator[Sequence[sa.Row[Any]]]:
    t, order = kind.table, [kind.table.c[k] for k in kind.key]
    offset = 0
    while True:
        with db.read() as conn:
            page = conn.execute(sa.select(t).where(t.c[kind.blob].is_not(None)).order_by(*order)
                                .offset(offset).limit(PAGE_ROWS)).all()
        if not page:
            return
        yield page
        offset += len(page)


def _rewrap(old: KeyProvider, new: KeyProvider, blob: bytes, context: dict[str, str]) -> bytes | None:
    """The blob rewrapped under `new`, or None if it already is."""
    try:
        plaintext = old.decrypt(blob, context)
    except (KmsError, ValueError):
        try:
            new.decrypt(blob, context)
        except (KmsError, ValueError):
            raise RootMigrationError(_NEITHER) from None
        return None
    return new.encrypt(plaintext, context)


class EitherRoot:
    """During a migration a service key may be wrapped by either root: open with whichever does."""

    def __init__(self, old: KeyProvider, new: KeyProvider) -> None:
        self._old, self._new = old, new

    def encrypt(self, plaintext: bytes, context: Mapping[str, str]) -> bytes:
        return self._new.encrypt(plaintext, context)

    def generate_data_key(self, context: Mapping[str, str]) -> DataKey:
        return self._new.generate_data_key(context)

    def decrypt(self, blob: bytes, context: Mapping[str, str]) -> bytes:
        try:
            return self._old.decrypt(blob, context)
        except (KmsError, ValueError):
            try:
                return self._new.decrypt(blob, context)
            except (KmsError, ValueError):
                raise RootMigrationError(_NEITHER) from None


def migrate_root(db: Database, old: KeyProvider, new: KeyProvider, audit: AuditLog, actor: Actor, *,
                 dry_run: bool = False, progress: Callable[[str], None] = lambda line: None) -> list[Moved]:
    """Rewrap every root-wrapped key under `new`; returns what moved per kind. Audited at start and end."""
    if not dry_run:
        audit.append(actor.record("root.migrate", outcome="started", reason=f"to {type(new).__name__}"))
    report = []
    for kind in KINDS:
        moved = already = 0
        for page in _pages(db, kind):
            updates = []
            for row in page:
                blob = bytes(getattr(row, kind.blob))
                rewrapped = _rewrap(old, new, blob, kind.context(row))
                if rewrapped is None:
                    already += 1
                else:
                    updates.append((row, blob, rewrapped))
            if updates and not dry_run:
                t = kind.table
                with db.transaction() as conn:
                    for row, blob, rewrapped in updates:
                        where = [t.c[k] == getattr(row, k) for k in kind.key] + [t.c[kind.blob] == blob]
                        conn.execute(t.update().where(*where).values({kind.blob: rewrapped}))
            moved += len(updates)
            progress(f"{kind.name}: {moved} {'would move' if dry_run else 'moved'}, {already} already under the new "
                     "root")
        report.append(Moved(kind=kind.name, moved=moved, already=already))
    if not dry_run:
        summary = ", ".join(f"{m.kind} {m.moved}" for m in report)
        audit.append(actor.record("root.migrate", reason=f"to {type(new).__name__}: {summary}"))
    return report
