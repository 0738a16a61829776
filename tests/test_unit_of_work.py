"""Units of work: checks, state change and audit entries commit in one transaction, or not at all."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clipstore.app import App
from clipstore.audit import AuditUnavailable
from clipstore.errors import PermissionDenied
from clipstore.store import schema
from clipstore.store.db import connection
from clipstore.unit import Actor, Tx
from tests.conftest import make_config

ACTOR = Actor(id="p_test", role="admin")


@pytest.fixture
def app(tmp_path: Path, database_url: str | None) -> Iterator[App]:
    app = App(make_config(tmp_path / "data", database_url=database_url))
    yield app
    app.close()


def _add_principal(tx: Tx, pid: str) -> None:
    connection(tx).execute(schema.principals.insert().values(id=pid, name="n", role="admin", created_at=tx.now,
                                                         disabled=False))


def _principal_ids(app: App) -> set[str]:
    with app.db.read() as conn:
        return set(conn.scalars(sa.select(schema.principals.c.id)))


def _actions(app: App) -> list[str]:
    return [e.decode() for e in app.audit.reader.entries(0, 1000)]


def test_a_unit_commits_its_effect_and_its_entry_together(app: App) -> None:
    def unit(tx: Tx) -> str:
        _add_principal(tx, "p_one")
        tx.audit(ACTOR.record("principal.create", principal_id="p_one"))
        return "done"

    assert app.audit.run(unit) == "done"
    assert "p_one" in _principal_ids(app)
    assert any('"principal_id":"p_one"' in e for e in _actions(app))


def test_a_failing_unit_is_rolled_back_and_its_batch_neighbours_still_commit(app: App) -> None:
    hold, started = threading.Event(), threading.Event()

    def blocker(tx: Tx) -> None:
        started.set()
        hold.wait(10)

    def good(pid: str):  # noqa: ANN202
        def unit(tx: Tx) -> None:
            _add_principal(tx, pid)
            tx.audit(ACTOR.record("principal.create", principal_id=pid))
        return unit

    def bad(tx: Tx) -> None:
        _add_principal(tx, "p_bad")
        tx.audit(ACTOR.record("principal.create", principal_id="p_bad"))
        raise RuntimeError("a bug after a write")

    first = app.audit.submit(blocker)
    assert started.wait(10)
    pending = [app.audit.submit(u) for u in (good("p_a"), bad, good("p_b"))]  # queue up as one batch
    hold.set()
    first.result(10)
    pending[0].result(10), pending[2].result(10)
    with pytest.raises(RuntimeError):
        pending[1].result(10)
    assert {"p_a", "p_b"} <= _principal_ids(app) and "p_bad" not in _principal_ids(app)
    assert not any("p_bad" in e for e in _actions(app))


def test_a_denial_keeps_what_the_unit_wrote_and_its_entry(app: App) -> None:
    def unit(tx: Tx) -> None:
        _add_principal(tx, "p_counted")  # e.g. a failure counter the refusal must keep
        raise tx.deny(ACTOR, "session.deny", PermissionDenied("no", reason="REVIEWER_LOCKED"))

    with pytest.raises(PermissionDenied):
        app.audit.run(unit)
    assert "p_counted" in _principal_ids(app)
    assert any('"reason":"REVIEWER_LOCKED"' in e for e in _actions(app))


def test_a_unit_whose_caller_gave_up_waiting_never_runs(app: App) -> None:
    hold, started, ran = threading.Event(), threading.Event(), threading.Event()
    first = app.audit.submit(lambda tx: (started.set(), hold.wait(10)))
    assert started.wait(10)

    def late(tx: Tx) -> None:
        ran.set()
        _add_principal(tx, "p_late")

    with pytest.raises(AuditUnavailable):
        app.audit.run(late, timeout_s=0.05)  # the caller is told "not performed" ...
    hold.set()
    first.result(10)
    app.audit.append(ACTOR.record("probe"))  # the writer has moved past the withdrawn unit
    assert not ran.is_set() and "p_late" not in _principal_ids(app)  # ... and it never is


def test_a_unit_of_work_hands_the_store_only_the_audit_logs_own_connection() -> None:
    with pytest.raises(TypeError, match="Tx.conn must be the AuditLog's sa.Connection, got NoneType"):
        connection(Tx(None, 0.0))
