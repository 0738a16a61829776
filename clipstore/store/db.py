"""Engine setup and the transaction helper: the only owner of connections."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from clipstore.store import migrations
from clipstore.unit import Tx

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers wait rather than fail under contention
MIGRATION_LOCK = 0x636C6970  # "clip": PostgreSQL advisory lock class, per schema


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA secure_delete=ON")  # crypto-shred: deleted key rows are zeroed in the file
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _sqlite_autocommit_driver(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record)
    dbapi_conn.isolation_level = None


def connection(tx: Tx) -> sa.Connection:
    """The transaction a unit of work runs in: `AuditLog` opened it, the domain only carried it (as `Tx.conn`,
    typed opaque so that the domain loads no database driver)."""
    if not isinstance(tx.conn, sa.Connection):
        raise TypeError(f"Tx.conn must be the AuditLog's sa.Connection, got {type(tx.conn).__name__}")
    return tx.conn


class Database:
    """One database (SQLite file or PostgreSQL), migrated on open (see `upgrade`)."""

    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self._write_lock = threading.Lock() if self.is_sqlite else None
        if self.is_sqlite:
            path = url.removeprefix("sqlite:///")
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"check_same_thread": False},
                                           pool_size=8, max_overflow=8)
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise RuntimeError("PostgreSQL needs psycopg: pip install 'clipstore[postgres]'") from None
            self.engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1),
                                           pool_size=8, max_overflow=8, pool_pre_ping=True)
        self.commits = 0  # committed read-write transactions: `transaction()` and the audit writer's
        self._commits_lock = threading.Lock()
        self.revision: str | None = self.upgrade() if upgrade else None

    def count_commit(self) -> None:
        """Count one committed read-write transaction (each is a durable write, an fsync)."""
        with self._commits_lock:
            self.commits += 1

    def upgrade(self) -> str:
        """Bring the schema to head (or to where the KMS-bound data steps must run first, see
        clipstore.store.migrations); replicas starting together take turns."""
        with self.migration_lock() as conn:
            self.revision = migrations.upgrade(conn)
        return self.revision

    @contextmanager
    def migration_lock(self) -> Iterator[sa.Connection]:
        """One transaction that no other process's migration overlaps: a PostgreSQL advisory lock
        (per schema, released at commit), or SQLite's own write lock taken up front (BEGIN
        IMMEDIATE), so the version check and the DDL after it are one atomic step."""
        if not self.is_sqlite:
            with self.engine.begin() as conn:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:lock, hashtext(current_schema()))"),
                             {"lock": MIGRATION_LOCK})
                yield conn
            return
        engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool)
        # pysqlite would run DDL outside any transaction; take over BEGIN so DDL is transactional too.
        sa.event.listen(engine, "connect", _sqlite_autocommit_driver)
        sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with self.write_lock(), engine.begin() as conn:
                yield conn
        finally:
            engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """A connection inside one read-write transaction: commit on success, roll back on error."""
        with self.write_lock(), self.engine.begin() as conn:
            yield conn
        self.count_commit()

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for reads only (WAL readers never wait for writers)."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """SQLite has one writer: queue this process's writers on a lock rather than in SQLite's
        sleeping busy handler. PostgreSQL needs no such lock."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    def truncate_wal(self) -> bool:
        """SQLite: copy the write-ahead log into the database file and truncate it to zero bytes, so rows
        just deleted (with secure_delete, zeroed in the file) no longer survive in old WAL frames.
        False if a reader kept it from completing. PostgreSQL: nothing to do here (see README)."""
        if not self.is_sqlite:
            return True
        with self.write_lock(), self.engine.connect() as conn:
            busy, _, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        return bool(busy == 0)

    def close(self) -> None:
        self.engine.dispose()
