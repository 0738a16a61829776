"""Plain SQL on a SQLAlchemy connection's own DBAPI cursor, for the statements every call makes.

Through SQLAlchemy Core a statement costs 150-300 us of Python; the same statement on the DBAPI
cursor costs 10-40 us (the database caches its plan), and inside the writer's transaction every
one counts. Statements are written with `?` placeholders and rewritten for psycopg (`%s`)."""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa


@functools.lru_cache(maxsize=512)
def _pyformat(sql: str) -> str:
    return sql.replace("?", "%s")


def dialect_sql(sql: str, *, postgresql: bool) -> str:
    """A `?`-placeholder statement as the driver wants it (psycopg: `%s`)."""
    return _pyformat(sql) if postgresql else sql


def _driver_error(dialect: sa.Dialect, sql: str, params: tuple[Any, ...], exc: Exception) -> sa.exc.StatementError:
    """A driver's error as SQLAlchemy raises it (`OperationalError`...: the callers map those to
    DATABASE_UNAVAILABLE), its parameters left out of the message (key hashes, lookup HMACs)."""
    return sa.exc.DBAPIError.instance(sql, params, exc, dialect.loaded_dbapi.Error, hide_parameters=True)


def _run(dbapi_conn: Any, dialect: sa.Dialect, sql: str, params: tuple[Any, ...]) -> Any:
    """The DBAPI cursor that ran `sql` on `dbapi_conn`; the caller closes it. A driver error is raised as
    SQLAlchemy's."""
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(dialect_sql(sql, postgresql=dialect.name == "postgresql"), params)
    except dialect.loaded_dbapi.Error as exc:
        cursor.close()
        raise _driver_error(dialect, sql, params, exc) from exc
    except BaseException:
        cursor.close()
        raise
    return cursor


def _execute(conn: sa.Connection, sql: str, params: tuple[Any, ...]) -> Any:
    return _run(conn.connection, conn.dialect, sql, params)


def _first(cursor: Any) -> tuple[Any, ...] | None:
    """The cursor's first row, or None; the cursor is closed."""
    try:
        row = cursor.fetchone()
    finally:
        cursor.close()
    return None if row is None else tuple(row)


def fetch_one_pooled(engine: sa.Engine, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The first row of a plain-SQL read on a pooled DBAPI connection of its own, for the point reads made
    outside any unit (authentication, ingest's lookups): without a SQLAlchemy Connection around it a read
    costs ~30 us less (of ~75 us on SQLite). The pool checks the connection out and in as for
    `Database.read` (pre-ping; a rollback on return, which ends a PostgreSQL read's transaction), and a
    driver error (checking out included) is raised as SQLAlchemy's, as for every plain statement."""
    try:
        dbapi_conn = engine.raw_connection()
        try:
            return _first(_run(dbapi_conn, engine.dialect, sql, params))
        finally:
            dbapi_conn.close()
    except engine.dialect.loaded_dbapi.Error as exc:
        raise _driver_error(engine.dialect, sql, params, exc) from exc


def fetch_all(conn: sa.Connection, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Every row of a plain-SQL read on `conn`."""
    cursor = _execute(conn, sql, params)
    try:
        return [tuple(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


class PlainRows:
    """Rows read and written with plain SQL on one connection (in a unit of work, or a read connection)."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row, or None."""
        return _first(_execute(self._conn, sql, params))

    def _fetchall(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return fetch_all(self._conn, sql, params)

    def _exec(self, sql: str, params: tuple[Any, ...]) -> int:
        """A write; returns its row count."""
        cursor = _execute(self._conn, sql, params)
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()
