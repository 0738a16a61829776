"""Data steps for databases from before commits ccae1d0, d9e6d48 and 0cb2999: they need the KMS,
so they run as code between schema revisions 0012 and 0013, never inside DDL.

Each step is idempotent and commits row by row, so a crash (or a replica doing the
same work at the same time) loses nothing: the next start resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from clipstore.store.db import Database
from clipstore.store.migrations import PLAINTEXT, SIGNING_KEY_NAME
from kms import KeyProvider

RESEAL_BATCH_ROWS = 100  # rows read per round; each row commits on its own


# Seals one text: (purpose, clip_id, row id, plaintext) -> ciphertext, or b"" when the clip's key is
# gone (clip purged, account shredded): the text is erased with its clip, as it would have been.
Sealer = Callable[[str, str, str, str], bytes]


def seal_plaintext(db: Database, seal: Sealer) -> int:
    """Seal every text an older commit stored in clear (notes before d9e6d48, labels and resolutions
    before 0cb2999); returns how many. The plaintext goes in the step that writes the ciphertext."""
    done = 0
    for column in PLAINTEXT:
        select = sa.text(f"SELECT {column.id_column}, clip_id, {column.plain} FROM {column.table} "  # noqa: S608
                         f"WHERE {column.pending} ORDER BY {column.id_column} LIMIT :n")
        update = sa.text(f"UPDATE {column.table} SET {column.sealed} = :ct, {column.plain} = {column.cleared} "  # noqa: S608
                         f"WHERE {column.id_column} = :id AND {column.pending}")
        while True:
            with db.read() as conn:
                rows = conn.execute(select, {"n": RESEAL_BATCH_ROWS}).all()
            if not rows:
                break
            for row_id, clip_id, text in rows:
                sealed = seal(column.purpose, clip_id, row_id, text)
                with db.transaction() as conn:
                    done += conn.execute(update, {"ct": sealed, "id": row_id}).rowcount
    return done


def move_signing_seed(db: Database, root: KeyProvider) -> bool:
    """Re-wrap the checkpoint signing seed of `audit_signing_key` (before ccae1d0) as the service key
    the signer loads now, so the log keeps its signing key; returns whether there was one to move."""
    with db.read() as conn:
        if not sa.inspect(conn).has_table("audit_signing_key"):
            return False
        row = conn.execute(sa.text("SELECT name, wrapped_seed, created_at FROM audit_signing_key WHERE id = 1")).first()
    if row is None:
        return False
    name, wrapped, created_at = row
    seed = root.decrypt(bytes(wrapped), {"purpose": "audit-checkpoint-signing", "origin": name})
    rewrapped = root.encrypt(seed, {"purpose": "service-key", "name": SIGNING_KEY_NAME})
    try:
        with db.transaction() as conn:
            conn.execute(sa.text("INSERT INTO service_keys (name, wrapped, created_at) VALUES (:n, :w, :t)"),
                         {"n": SIGNING_KEY_NAME, "w": rewrapped, "t": created_at})
    except sa.exc.IntegrityError:  # another replica moved it first
        pass
    return True


def scrub_plaintext(db: Database) -> None:
    """Rewrite the tables that held plaintext so it leaves the files too. PostgreSQL keeps old row
    versions and dropped columns on disk until a rewrite; SQLite (secure_delete) zeroes freed cells
    itself and folds the WAL into the file when the last connection closes."""
    if db.is_sqlite:
        return
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in sorted({p.table for p in PLAINTEXT}):
            conn.exec_driver_sql(f"VACUUM FULL {table}")
