"""The point reads every call makes outside a unit (authentication, ingest's lookups) run on a pooled
DBAPI connection of their own (`clipstore.store.plain.fetch_one_pooled`): they read fresh each time,
leave no transaction open, and fail as SQLAlchemy's errors do (so a caller sees DATABASE_UNAVAILABLE)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clipstore.auth import hash_api_key, new_principal
from clipstore.errors import Unavailable
from clipstore.interceptors import translate
from clipstore.store.db import Database
from clipstore.store.plain import PlainRows, fetch_one_pooled
from clipstore.store.principals import PrincipalRepository


@pytest.fixture
def db(tmp_path: Path, database_url: str | None) -> Iterator[Database]:
    database = Database(database_url or f"sqlite:///{tmp_path}/plain.db")
    yield database
    database.close()


def test_a_principal_disabled_between_two_reads_is_read_disabled_by_the_second(db: Database) -> None:
    repo = PrincipalRepository(db)
    principal, key = new_principal(role="ingest", name="svc")
    assert key is not None
    repo.add(principal, key_hash=hash_api_key(key), now=time.time())
    first = repo.by_key_hash(hash_api_key(key))
    assert first is not None and not first.principal.disabled
    assert repo.set_disabled(principal.id, True)
    second = repo.by_key_hash(hash_api_key(key))
    assert second is not None and second.principal.disabled
    assert repo.by_key_hash(hash_api_key(key + "x")) is None


def test_a_pooled_read_leaves_its_connection_outside_any_transaction(db: Database) -> None:
    assert fetch_one_pooled(db.engine, "SELECT id FROM principals WHERE id = ?", ("p_none",)) is None
    raw = db.engine.raw_connection()  # the pool's one idle connection: the one the read returned
    try:
        if db.is_sqlite:
            assert not raw.driver_connection.in_transaction  # type: ignore[union-attr]
        else:
            import psycopg
            assert raw.driver_connection.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # type: ignore[union-attr]
    finally:
        raw.close()


def test_a_driver_error_in_a_pooled_read_is_sqlalchemys_and_names_no_parameter(db: Database) -> None:
    with pytest.raises(sa.exc.DBAPIError) as caught:
        fetch_one_pooled(db.engine, "SELECT no_such_column FROM principals WHERE id = ?", ("p_secretish",))
    assert "p_secretish" not in str(caught.value)
    if db.is_sqlite:  # SQLite reports its failures (a locked or missing file too) as OperationalError
        assert isinstance(caught.value, sa.exc.OperationalError)
        assert isinstance(translate(caught.value), Unavailable)
    # the pool's connection is still usable after the failure
    assert fetch_one_pooled(db.engine, "SELECT id FROM principals WHERE id = ?", ("p_none",)) is None


def test_a_driver_error_in_a_plain_statement_on_a_connection_is_sqlalchemys_too(db: Database) -> None:
    """Reads outside units that use PlainRows (review reads, reports) answered a database failure with
    INTERNAL: the driver's own error reached the interceptor, which maps SQLAlchemy's."""
    with db.read() as conn, pytest.raises(sa.exc.DBAPIError) as caught:
        PlainRows(conn)._fetch("SELECT no_such_column FROM principals WHERE id = ?", ("p_secretish",))
    assert "p_secretish" not in str(caught.value)
    if db.is_sqlite:
        assert isinstance(caught.value, sa.exc.OperationalError)
        assert isinstance(translate(caught.value), Unavailable)
    with db.read() as conn:
        assert PlainRows(conn)._fetch("SELECT id FROM principals WHERE id = ?", ("p_none",)) is None


def test_a_read_that_waits_in_vain_for_a_pooled_connection_is_database_unavailable(tmp_path: Path) -> None:
    """Every connection checked out (a burst of calls): the read gives up after the pool's timeout, and the
    caller is told to retry (UNAVAILABLE DATABASE_UNAVAILABLE), not INTERNAL."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/pool.db", pool_size=1, max_overflow=0, pool_timeout=0.05)
    held = engine.raw_connection()
    try:
        with pytest.raises(sa.exc.TimeoutError) as caught:
            fetch_one_pooled(engine, "SELECT 1", ())
        status = translate(caught.value)
        assert isinstance(status, Unavailable) and status.reason == "DATABASE_UNAVAILABLE"
    finally:
        held.close()
    assert fetch_one_pooled(engine, "SELECT 1", ()) == (1,)
    engine.dispose()
