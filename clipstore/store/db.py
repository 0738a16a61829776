"""Engine setup and the transaction helper: the only owner of connections."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from clipstore.logs import get_logger
from clipstore.store import migrations
from clipstore.unit import Tx

SQLITE_BUSY_TIMEOUT_MS = 30_000  # writers wait rather than fail under contention
MIGRATION_LOCK = 0x636C6970  # "clip": PostgreSQL advisory lock class, per schema
log = get_logger("clipstore.store")
# SQLite's own WAL checkpoint (each 1,000 pages of WAL) runs inside the commit that crosses the mark: the
# audit writer copied pages into the database file and fsynced it while every unit behind it waited
# (measured at 30 reviews/s: one writer commit in ~80, 2.8 ms median instead of 1.1 ms, up to 9.5 ms).
# A background thread checkpoints instead (WalCheckpointer); the automatic one stays only as a bound.
WAL_CHECKPOINT_EVERY_S = 0.5
WAL_RESTART_FRAMES = 1_000  # a WAL this long is copied to its end (see WalCheckpointer), so that it restarts
WAL_AUTOCHECKPOINT_PAGES = 25_000  # ~100 MB of WAL at 4 KiB pages: only if the background checkpoints stall
WAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024  # the WAL file is cut back to this when it restarts


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")  # see WalCheckpointer
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}")
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


class WalCheckpointer:
    """Copies SQLite's write-ahead log into the database file off the writers' path: a PASSIVE checkpoint,
    which never waits for (nor blocks) a writer, on a thread of its own, `every_s` after the first commit
    since the last one. The pages copied and the file's fsync then cost no commit any time (synchronous=FULL
    still makes each commit durable in the WAL first).

    The WAL restarts from its beginning only at a write that begins after a checkpoint copied all of it,
    which one running beside a stream of commits never does: it grew without bound (26 MB in 1,500 appends).
    So once it holds WAL_RESTART_FRAMES, a second checkpoint copies the few frames committed during the
    first one with this process's writers held off (`Database.write_lock`): one short wait for the
    writer, and the next write restarts the WAL (then also rewriting blocks the file has, which an fsync
    makes durable faster than a growing file)."""

    def __init__(self, db: Database, every_s: float | None = None) -> None:
        self._db = weakref.ref(db)  # a database nobody closed still goes away with its last reference
        self._every_s = WAL_CHECKPOINT_EVERY_S if every_s is None else every_s
        self._written = threading.Event()
        self._stopping = threading.Event()
        self.checkpoints = 0  # completed (for tests and metrics)
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
        weakref.finalize(db, self._stop)
        self._thread.start()

    def wrote(self) -> None:
        self._written.set()

    def _run(self) -> None:
        while True:
            self._written.wait()
            # let the commits of the next moments join this checkpoint
            if self._stopping.wait(self._every_s) or (db := self._db()) is None:
                return
            self._written.clear()
            try:
                _, frames, _ = db.checkpoint_wal("PASSIVE")
                if frames >= WAL_RESTART_FRAMES:
                    db.checkpoint_wal("PASSIVE", hold_writers=True)
                self.checkpoints += 1
            except Exception as exc:  # the next commit retries; SQLite's automatic checkpoint is the bound
                log.warning("db.wal_checkpoint_failed", exc_type=type(exc).__name__)
            del db

    def _stop(self) -> None:
        self._stopping.set()
        self._written.set()

    def stop(self) -> None:
        self._stop()
        if self._thread is not threading.current_thread():
            self._thread.join()


# PostgreSQL connections notice a peer that vanished (a network cut, a host gone) in about a minute: without
# these a client waited ~15 min for the kernel to give up retransmitting (the audit writer blocked, holding
# this process's writes), and the server kept a dead client's backend for the 2 h of its keepalive default,
# with its locks (the audit head's row lock holds every replica's writes). Each is a default: a parameter
# the database URL sets wins, and its `options` come after these, so its `-c` settings win too.
PG_CONNECT_DEFAULTS: dict[str, int] = {
    "connect_timeout": 10,  # s
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,  # s, s, probes
    "tcp_user_timeout": 60_000,  # ms: data unacknowledged this long drops the connection
}
PG_SESSION_DEFAULTS: dict[str, str] = {  # server-side, per session (`options`)
    "idle_in_transaction_session_timeout": "5min",  # a client gone mid-transaction releases its locks
    "tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3",
}


def pg_connect_args(url: str) -> dict[str, object]:
    """psycopg's connection parameters: PG_CONNECT_DEFAULTS and PG_SESSION_DEFAULTS under what `url` sets."""
    query = sa.engine.make_url(url).query
    args: dict[str, object] = {key: value for key, value in PG_CONNECT_DEFAULTS.items() if key not in query}
    given = query.get("options", "")
    given = " ".join(given) if isinstance(given, tuple) else given
    args["options"] = " ".join([*(f"-c {key}={value}" for key, value in PG_SESSION_DEFAULTS.items()), given]).strip()
    return args


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
                                           connect_args=pg_connect_args(url), pool_size=8, max_overflow=8,
                                           pool_pre_ping=True)
        self.commits = 0  # committed read-write transactions: `transaction()` and the audit writer's
        self._commits_lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()  # one WAL checkpoint at a time in this process
        self.wal_checkpointer: WalCheckpointer | None = None  # SQLite: started by the first commit
        self.revision: str | None = self.upgrade() if upgrade else None

    def count_commit(self) -> None:
        """Count one committed read-write transaction (each is a durable write, an fsync); on SQLite, the
        WAL grew: the background checkpoint is due."""
        with self._commits_lock:
            self.commits += 1
            if self.is_sqlite and self.wal_checkpointer is None:
                self.wal_checkpointer = WalCheckpointer(self)
        if self.wal_checkpointer is not None:
            self.wal_checkpointer.wrote()

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
        busy, _, _ = self.checkpoint_wal("TRUNCATE", hold_writers=True)
        return bool(busy == 0)

    def checkpoint_wal(self, mode: str, *, hold_writers: bool = False) -> tuple[int, int, int]:
        """SQLite `PRAGMA wal_checkpoint(mode)`: (busy, frames in the WAL, frames copied to the database).
        `hold_writers`: with this process's writers held off (`write_lock`), taken only once a connection
        is out of the pool: waiting for one (a pool emptied by readers, perhaps waiting for the audit
        writer) must not hold every writer off meanwhile."""
        assert mode in ("PASSIVE", "TRUNCATE"), mode
        with self.engine.connect() as conn, self.write_lock() if hold_writers else contextlib.nullcontext(), \
                self._checkpoint_lock:
            busy, frames, copied = conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").one()
        return int(busy), int(frames), int(copied)

    def close(self) -> None:
        with self._commits_lock:
            checkpointer, self.wal_checkpointer = self.wal_checkpointer, None
        if checkpointer is not None:
            checkpointer.stop()
        self.engine.dispose()
