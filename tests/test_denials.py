"""A principal's refusals share one budget per interval (issue 13): the interceptor's (`DenialLedger.record`) and
the service's own, which the audit writer hands to `DenialLedger.admit`. Fast: a fake log for the ledger, an
App on SQLite for the writer; the same over a real server is in tests/test_review_rules.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from clipstore.app import App
from clipstore.denials import MAX_TOKENS_PER_SUMMARY, DenialLedger
from clipstore.errors import NotFound, PermissionDenied, Unauthenticated
from clipstore.rows import Principal
from clipstore.store import schema
from clipstore.store.db import connection
from clipstore.unit import OPERATOR, RECORD_MAX_BYTES, SYSTEM, Actor, AuditRecord, Tx
from tests.conftest import make_config

REVIEWER = Principal(id="p_00000000000000aa", name="r", role="reviewer")
OTHER = Principal(id="p_00000000000000bb", name="o", role="reviewer")
BUDGET = 3


class _Log:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def append(self, record: AuditRecord) -> None:
        self.records.append(record)


def _ledger(log: _Log) -> DenialLedger:
    return DenialLedger(log, pseudonym=lambda peer: "pp_x", interval_s=3600, per_principal=BUDGET)  # type: ignore[arg-type]


def _refusal(who: Principal | Actor, action: str = "grant.deny", reason: str = "ASSIGNMENT_NOT_FOUND",
             outcome: str = "denied") -> AuditRecord:
    return AuditRecord(actor_id=who.id, actor_role=who.role, action=action, outcome=outcome, reason=reason,
                       request_id="r")


def _wrong_role(ledger: DenialLedger, principal: Principal) -> None:
    ledger.record(peer="ipv4:192.0.2.1:1", principal=principal,
                  error=PermissionDenied("no", reason="WRONG_ROLE"), request_id="r")


def test_past_the_budget_a_domain_refusal_is_counted_by_action_and_reason_into_one_summary() -> None:
    log = _Log()
    ledger = _ledger(log)
    asked = [ledger.admit(_refusal(REVIEWER)) for _ in range(BUDGET + 5)]
    asked += [ledger.admit(_refusal(REVIEWER, "session.deny", "BAD_CODE")) for _ in range(2)]
    assert asked == [True] * BUDGET + [False] * 7
    assert log.records == []  # nothing is appended before the interval ends
    assert ledger.flush() == 1
    [summary] = log.records
    assert (summary.actor_id, summary.actor_role, summary.action, summary.outcome) == (
        REVIEWER.id, "reviewer", "auth.deny_summary", "denied")
    assert summary.reason == "count=7 grant.deny/ASSIGNMENT_NOT_FOUND=5 session.deny/BAD_CODE=2"
    assert ledger.admit(_refusal(REVIEWER))  # a new interval: the budget is whole again


def test_a_principals_role_and_domain_refusals_share_one_budget_and_another_principals_is_its_own() -> None:
    log = _Log()
    ledger = _ledger(log)
    _wrong_role(ledger, REVIEWER)
    _wrong_role(ledger, REVIEWER)
    assert [ledger.admit(_refusal(REVIEWER)) for _ in range(3)] == [True, False, False]
    _wrong_role(ledger, REVIEWER)  # past the budget: counted too
    assert [ledger.admit(_refusal(OTHER)) for _ in range(BUDGET + 1)] == [True] * BUDGET + [False]
    assert [r.action for r in log.records] == ["auth.deny", "auth.deny"]
    ledger.flush()
    assert sorted((r.actor_id, r.reason) for r in log.records[2:]) == [
        (REVIEWER.id, "count=3 WRONG_ROLE=1 grant.deny/ASSIGNMENT_NOT_FOUND=2"),
        (OTHER.id, "count=1 grant.deny/ASSIGNMENT_NOT_FOUND=1")]


@pytest.mark.parametrize("record", [
    _refusal(OPERATOR), _refusal(SYSTEM), _refusal(Actor(id="anonymous", role=""), "enrolment.accept", outcome="ok"),
    _refusal(REVIEWER, "clip.fetch", "", outcome="ok"), _refusal(REVIEWER, "clip.fetch", "TAMPERED", outcome="failed"),
], ids=["operator", "system", "anonymous-ok", "ok", "failed"])
def test_no_principals_refusal_and_what_is_no_refusal_are_always_appended(record: AuditRecord) -> None:
    log = _Log()
    ledger = _ledger(log)
    assert all(ledger.admit(record) for _ in range(5 * BUDGET))
    assert ledger.admit(_refusal(REVIEWER))  # and took nothing of a principal's budget
    assert ledger.flush() == 0


def test_anonymous_refusals_of_the_domain_share_one_budget_then_count_under_peer_other() -> None:
    """A wrong enrolment code needs no credentials: without a budget, anyone could grow the log at RPC rate."""
    log = _Log()
    ledger = _ledger(log)
    anonymous = Actor(id="anonymous", role="")
    asked = [ledger.admit(_refusal(anonymous, "enrolment.deny", "ENROLMENT_CODE_INVALID")) for _ in range(BUDGET + 4)]
    assert asked == [True] * BUDGET + [False] * 4
    assert ledger.admit(_refusal(REVIEWER))  # a principal's budget is its own
    ledger.flush()
    [summary] = log.records
    assert (summary.actor_id, summary.actor_role, summary.action) == ("anonymous", "", "auth.deny_summary")
    assert summary.reason == "count=4 peer=other enrolment.deny/ENROLMENT_CODE_INVALID=4"


def test_past_the_token_limit_and_for_what_is_no_code_the_rest_count_as_other_and_the_entry_fits() -> None:
    log = _Log()
    ledger = _ledger(log)
    for _ in range(BUDGET):
        ledger.admit(_refusal(REVIEWER))
    action, reason = "a" * 40, "R" * 56  # the longest token a summary writes
    for i in range(MAX_TOKENS_PER_SUMMARY + 10):
        for _ in range(3):
            assert not ledger.admit(_refusal(REVIEWER, f"{action[:-3]}{i:03d}", reason))
    assert not ledger.admit(_refusal(REVIEWER, "grant.deny", "not a code=1 x"))
    ledger.flush()
    [summary] = log.records
    tokens = summary.reason.split()
    assert tokens[0] == f"count={3 * (MAX_TOKENS_PER_SUMMARY + 10) + 1}"
    assert len(tokens) == 1 + MAX_TOKENS_PER_SUMMARY + 1 and tokens[-1] == f"other={3 * 10 + 1}"
    assert len(summary.reason) < RECORD_MAX_BYTES // 2


def test_after_close_a_refusal_is_appended_as_no_flush_would_come_for_its_count() -> None:
    log = _Log()
    ledger = _ledger(log)
    for _ in range(BUDGET):
        ledger.admit(_refusal(REVIEWER))
    ledger.close()
    assert ledger.admit(_refusal(REVIEWER))


def test_counting_is_exact_under_threads() -> None:
    log = _Log()
    ledger = _ledger(log)
    barrier = threading.Barrier(8)
    admitted: list[bool] = []

    def hammer() -> None:
        barrier.wait(10)
        admitted.extend([ledger.admit(_refusal(REVIEWER)) for _ in range(500)])

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert admitted.count(True) == BUDGET
    ledger.flush()
    assert log.records[0].reason == f"count={8 * 500 - BUDGET} grant.deny/ASSIGNMENT_NOT_FOUND={8 * 500 - BUDGET}"


# -- the writer: where every refusal passes ----------------------------------------------------------------
ACTOR = Actor(id=REVIEWER.id, role="reviewer", request_id="req")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    app = App(make_config(tmp_path / "data"))
    yield app
    app.close()


def _entries(app: App) -> list[str]:
    return [e.decode() for e in app.audit.reader.entries(0, 1000)]


def _note_failure(tx: Tx) -> None:
    """A state change a refusal commits (a stand-in for a failed TOTP count)."""
    connection(tx).execute(schema.principals.insert().values(id=f"p_{len(tx.records):016x}", name="n",
                                                             role="admin", created_at=tx.now, disabled=False))


def test_the_writer_asks_once_per_refusal_of_a_refused_unit_and_commits_the_rest_of_it(app: App) -> None:
    asked: list[AuditRecord] = []

    def admit(record: AuditRecord) -> bool:
        asked.append(record)
        return False

    app.audit.admit_denial = admit
    hold, started = threading.Event(), threading.Event()
    runs: list[int] = []

    def blocker(tx: Tx) -> None:
        started.set()
        hold.wait(10)

    def refused(tx: Tx) -> None:
        runs.append(1)
        _note_failure(tx)
        tx.audit(ACTOR.record("reviewer.lockout"))
        raise tx.deny(ACTOR, "session.deny", Unauthenticated("wrong code", reason="BAD_CODE"))

    def bug(tx: Tx) -> None:
        raise RuntimeError("a bug: the batch runs again without this unit")

    first = app.audit.submit(blocker)
    assert started.wait(10)
    pending = [app.audit.submit(u) for u in (refused, bug)]  # one batch, run twice
    hold.set()
    first.result(10)
    with pytest.raises(Unauthenticated) as caught:
        pending[0].result(10)
    assert caught.value.reason == "BAD_CODE"  # the caller's answer is the refusal, counted or not
    with pytest.raises(RuntimeError):
        pending[1].result(10)
    app.audit.append(_refusal(REVIEWER, "auth.deny", "WRONG_ROLE"))  # the ledger's own: never asked
    app.audit.run(lambda tx: tx.audit(ACTOR.record("session.start")))  # no refusal: never asked
    assert len(runs) == 2
    assert [(r.action, r.reason) for r in asked] == [("session.deny", "BAD_CODE")]
    entries = _entries(app)
    assert not any('"session.deny"' in e for e in entries)
    assert sum('"reviewer.lockout"' in e for e in entries) == 1
    with app.db.read() as conn:  # the refused unit's state change committed
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.principals)) == 1


def test_a_refusal_the_port_admits_is_appended_with_its_request_id(app: App) -> None:
    app.audit.admit_denial = lambda record: True

    def refused(tx: Tx) -> None:
        raise tx.deny(ACTOR, "grant.deny", NotFound("no", reason="ASSIGNMENT_NOT_FOUND"))

    with pytest.raises(NotFound):
        app.audit.run(refused)
    [entry] = [e for e in _entries(app) if '"grant.deny"' in e]
    assert '"request_id":"req"' in entry
