"""Schema history: frozen Alembic revisions in `versions/`, applied at start.

A revision is never edited once released and never imports `schema.py`: it
spells out its own DDL, so the history a database went through stays what it
was. A change to `schema.py` ships with a new revision; a test builds the head
schema fresh and by upgrading from every earlier state and compares them.

Databases from before Alembic (a `schema_migrations` table) are adopted:
stamped with the revision of their last legacy migration, after which
revisions that ask before they convert (0009's oldest audit tree, 0010-0013)
bring whatever shape they have to head (old commits edited migrations in
place, so a migration number alone does not say it).

The data steps need the KMS (sealing plaintext escalation notes, labels and
resolutions under their clip's key, re-wrapping the legacy signing seed), so
they run as code between revisions 0012 and 0013 (`clipstore.store.legacy`),
not inside DDL.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

BEFORE_DATA_STEPS = "0012"  # the last revision the KMS-bound data steps need in place
# schema_migrations version → the revision that spells out what that migration created
LEGACY_REVISIONS = {v: f"{v:04d}" for v in range(1, 10)}
SIGNING_KEY_NAME = "audit-checkpoint-signing"


@dataclass(frozen=True)
class Plaintext:
    """A column that older commits wrote in clear, and the column that now holds it sealed."""
    purpose: str  # what the seal binds the text to (with the row id)
    table: str
    id_column: str
    plain: str
    sealed: str
    pending: str  # SQL: the rows still in clear
    cleared: str  # SQL: what the plaintext column holds once sealed


PLAINTEXT = [
    Plaintext("escalation-note", "escalations", "escalation_id", "note", "note_ct", "note_ct IS NULL", "''"),
    Plaintext("assignment-label", "assignments", "assignment_id", "label", "label_ct", "label IS NOT NULL", "NULL"),
    Plaintext("escalation-resolution", "escalations", "escalation_id", "resolution", "resolution_ct",
              "resolution IS NOT NULL", "NULL"),
]


def script() -> ScriptDirectory:
    return ScriptDirectory(str(Path(__file__).parent))


HEAD = script().get_current_head() or ""  # the newest file in versions/: a new revision needs no other edit


def run(conn: sa.Connection, destination: str) -> None:
    """Apply the revisions up to `destination` (no adoption, no data steps: see `upgrade`)."""
    scripts = script()
    with EnvironmentContext(Config(), scripts, destination_rev=destination,
                            fn=lambda rev, _ctx: scripts._upgrade_revs(destination, rev)) as env:
        env.configure(connection=conn)  # inside the caller's (locked) transaction
        env.run_migrations()


def legacy_version(conn: sa.Connection) -> int | None:
    """The last migration of the pre-Alembic `schema_migrations` table, or None if there is none."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("schema_migrations") or inspector.has_table("alembic_version"):
        return None
    return int(conn.scalar(sa.text("SELECT coalesce(max(version), 0) FROM schema_migrations")) or 0)


def _adopt(conn: sa.Connection) -> None:
    version = legacy_version(conn)
    if version is None:
        return
    if version > max(LEGACY_REVISIONS):
        raise RuntimeError(f"database schema version {version} is newer than this clipstore "
                           f"(knows up to {max(LEGACY_REVISIONS)}); upgrade clipstore")
    if version:
        MigrationContext.configure(conn).stamp(script(), LEGACY_REVISIONS[version])
    # Dropped in the same transaction: an older clipstore started on this database now
    # fails at once instead of running against a schema it does not know.
    conn.execute(sa.text("DROP TABLE schema_migrations"))


def current(conn: sa.Connection) -> str | None:
    """The revision the database is at (None: empty or not yet adopted)."""
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        try:
            script().get_revision(revision)
        except CommandError:
            raise RuntimeError(f"database schema revision {revision} is newer than this clipstore "
                               f"(knows up to {HEAD}); upgrade clipstore") from None
    return revision


def data_steps_pending(conn: sa.Connection) -> bool:
    """Whether plaintext (see PLAINTEXT) or the legacy signing seed is still waiting for the KMS."""
    if sa.inspect(conn).has_table("audit_signing_key"):
        unmoved = conn.scalar(sa.text(
            "SELECT count(*) FROM audit_signing_key WHERE NOT EXISTS "
            "(SELECT 1 FROM service_keys WHERE name = :name)"), {"name": SIGNING_KEY_NAME})
        if unmoved:
            return True
    return any(conn.scalar(sa.text(f"SELECT count(*) FROM {p.table} WHERE {p.pending}"))  # noqa: S608
               for p in PLAINTEXT)


def upgrade(conn: sa.Connection) -> str:
    """Adopt a legacy database, then upgrade it to head, or to BEFORE_DATA_STEPS when the
    KMS-bound data steps have work left; returns the revision now in force.

    The caller holds the migration lock and commits: see Database.upgrade."""
    _adopt(conn)
    revision = current(conn)
    if revision == HEAD:
        return HEAD
    if revision != BEFORE_DATA_STEPS:
        run(conn, BEFORE_DATA_STEPS)
    if data_steps_pending(conn):
        return BEFORE_DATA_STEPS
    run(conn, HEAD)
    return HEAD


def history() -> list[tuple[str, str]]:
    """(revision, one-line description), oldest first."""
    revisions = list(script().walk_revisions())
    return [(r.revision, (r.doc or "").splitlines()[0]) for r in reversed(revisions)]


def offline_sql(*, start: str | None = None, destination: str = "head", dialect: str = "postgresql") -> str:
    """The DDL from `start` (None: an empty database) to `destination`, for a DBA to review and apply."""
    scripts = script()
    out = io.StringIO()
    kwargs: dict[str, Any] = {"as_sql": True, "starting_rev": start, "destination_rev": destination,
                              "fn": lambda rev, _ctx: scripts._upgrade_revs(destination, rev)}
    with EnvironmentContext(Config(), scripts, **kwargs) as env:
        env.configure(url=f"{dialect}://", dialect_name=dialect, output_buffer=out, literal_binds=True)
        with env.begin_transaction():
            env.run_migrations()
    return out.getvalue()
