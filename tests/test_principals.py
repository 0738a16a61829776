"""Principal lifecycle for every role, through PrincipalAdminService on a real server."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.audit import AuditLog
from clipstore.audit.signing import load_or_create_signer
from clipstore.auth import hash_api_key
from clipstore.clock import SystemClock
from clipstore.errors import FailedPrecondition
from clipstore.principals import LAST_ADMIN_MARGIN_S, PrincipalLifecycle, PrincipalPorts
from clipstore.rows import Principal
from clipstore.server import ClipstoreServer, running_server
from clipstore.store import Database, PrincipalRepository, schema
from clipstore.store.db import connection
from clipstore.store.principals import PrincipalRows
from clipstore.unit import Actor
from clipstore.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    common_pb2,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
)
from kms import LocalKms
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.grpc_helpers import error_info

RACERS = 24


@pytest.fixture
def channel(srv: ClipstoreServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        yield ch


@pytest.fixture
def admin(srv: ClipstoreServer) -> tuple[tuple[str, str], ...]:
    return bearer(new_key(srv.app, "admin", "root"))


@pytest.fixture
def stub(channel: grpc.Channel) -> principal_admin_pb2_grpc.PrincipalAdminServiceStub:
    return principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel)


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _create(stub: principal_admin_pb2_grpc.PrincipalAdminServiceStub, admin: tuple[tuple[str, str], ...],
            role: common_pb2.Role.ValueType = common_pb2.ROLE_INGEST, name: str = "asr",
            **fields: object) -> principal_admin_pb2.CreatePrincipalResponse:
    return stub.CreatePrincipal(principal_admin_pb2.CreatePrincipalRequest(role=role, name=name, **fields),
                                metadata=admin, timeout=10)


def _call_as(channel: grpc.Channel, key: str) -> grpc.RpcError | None:
    """One ordinary ingest call; the error if it was refused."""
    try:
        clip_pb2_grpc.ClipServiceStub(channel).ListClips(clip_pb2.ListClipsRequest(account_id="acct-1"),
                                                         metadata=bearer(key), timeout=10)
    except grpc.RpcError as err:
        return err
    return None


def _entries(srv: ClipstoreServer) -> list[dict]:
    return [json.loads(e) for e in srv.app.audit.reader.entries(0, 100_000)]


def _refused(srv: ClipstoreServer, err: grpc.RpcError | None, reason: str, principal_id: str) -> None:
    """Refused at authentication with its own reason, and the refusal is on record naming the principal."""
    assert err is not None, "the call was not refused"
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), err.details()
    last = [e for e in _entries(srv) if e["action"] == "auth.deny"][-1]
    assert last["outcome"] == {"result": "denied", "reason": reason}
    assert last["target"]["principal_id"] == principal_id
    assert principal_id not in err.details()  # the caller learns why, not whose


def test_admin_creates_lists_and_pages_principals_of_every_role(srv: ClipstoreServer, stub, admin) -> None:
    created = {role: _create(stub, admin, role, f"{common_pb2.Role.Name(role)[5:].lower()}-1")
               for role in (common_pb2.ROLE_INGEST, common_pb2.ROLE_SAFETY, common_pb2.ROLE_AUDITOR,
                            common_pb2.ROLE_ADMIN)}
    assert all(c.api_key.startswith("csk_") and c.principal.usable_keys == 1 for c in created.values())
    listed, token = [], ""
    while True:
        page = stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(page_size=2, page_token=token),
                                   metadata=admin, timeout=10)
        listed += page.principals
        token = page.next_page_token
        if not token:
            break
    assert {p.principal_id for p in listed} >= {c.principal.principal_id for c in created.values()}
    assert len(listed) == 5  # and the bootstrap admin
    auditors = stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(role=common_pb2.ROLE_AUDITOR),
                                   metadata=admin, timeout=10).principals
    assert [p.name for p in auditors] == ["auditor-1"]
    assert all(not p.disabled and not p.HasField("expires_at") for p in listed)


def test_disable_enable_and_expiry_answer_the_principal_with_its_usable_keys(srv: ClipstoreServer, stub,
                                                                             admin) -> None:
    """Each answer names the principal as ListPrincipals does: a rotated principal has two usable keys in the
    overlap, not the 0 these answers used to carry (`clipstore principals disable` printed usable_keys=0)."""
    pid = _create(stub, admin).principal.principal_id
    stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=pid), metadata=admin,
                            timeout=10)
    answers = [
        stub.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(principal_id=pid), metadata=admin,
                                timeout=10).principal,
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=pid), metadata=admin,
                              timeout=10).principal,
        stub.EnablePrincipal(principal_admin_pb2.EnablePrincipalRequest(principal_id=pid), metadata=admin,
                             timeout=10).principal,
    ]
    listed = {p.principal_id: p for p in stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(),
                                                             metadata=admin, timeout=10).principals}[pid]
    assert [a.usable_keys for a in answers] == [2, 2, 2] == [listed.usable_keys] * 3
    assert [a.disabled for a in answers] == [False, True, False]


def test_disabled_key_is_refused_and_audited_until_re_enabled(srv: ClipstoreServer, channel, stub, admin) -> None:
    created = _create(stub, admin)
    pid = created.principal.principal_id
    assert _call_as(channel, created.api_key) is None
    resp = stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=pid), metadata=admin,
                                 timeout=10)
    assert resp.principal.disabled
    _refused(srv, _call_as(channel, created.api_key), "PRINCIPAL_DISABLED", pid)
    stub.EnablePrincipal(principal_admin_pb2.EnablePrincipalRequest(principal_id=pid), metadata=admin, timeout=10)
    assert _call_as(channel, created.api_key) is None


def test_expired_key_is_refused_and_audited(srv: ClipstoreServer, channel, stub, admin, clock: FakeClock) -> None:
    created = _create(stub, admin, expires_at=_ts(clock.now() + 3600))
    assert created.principal.expires_at.seconds == int(clock.now() + 3600)
    assert _call_as(channel, created.api_key) is None
    clock.advance(3600)
    _refused(srv, _call_as(channel, created.api_key), "PRINCIPAL_EXPIRED", created.principal.principal_id)
    stub.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
        principal_id=created.principal.principal_id), metadata=admin, timeout=10)  # unset: never expires
    assert _call_as(channel, created.api_key) is None


def test_rotated_out_key_works_through_the_overlap_then_is_refused_and_audited(
        srv: ClipstoreServer, channel, stub, admin, clock: FakeClock) -> None:
    created = _create(stub, admin)
    pid = created.principal.principal_id
    rotated = stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
        principal_id=pid, overlap=Duration(seconds=600)), metadata=admin, timeout=10)
    assert rotated.api_key != created.api_key
    assert rotated.previous_keys_retire_at.seconds == int(clock.now() + 600)
    clock.advance(599)
    assert _call_as(channel, created.api_key) is None and _call_as(channel, rotated.api_key) is None
    clock.advance(1)
    _refused(srv, _call_as(channel, created.api_key), "KEY_ROTATED_OUT", pid)
    assert _call_as(channel, rotated.api_key) is None


def test_rotation_uses_the_configured_overlap_unless_told_and_zero_retires_at_once(
        srv: ClipstoreServer, channel, stub, admin, clock: FakeClock) -> None:
    created = _create(stub, admin)
    pid = created.principal.principal_id
    default = stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=pid),
                                      metadata=admin, timeout=10)
    assert default.previous_keys_retire_at.seconds == int(clock.now() + srv.app.config.key_overlap_s)
    now = stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
        principal_id=pid, overlap=Duration(seconds=0)), metadata=admin, timeout=10)
    for old in (created.api_key, default.api_key):
        _refused(srv, _call_as(channel, old), "KEY_ROTATED_OUT", pid)
    assert _call_as(channel, now.api_key) is None
    with pytest.raises(grpc.RpcError) as caught:
        stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
            principal_id=pid, overlap=Duration(seconds=8 * 86400)), metadata=admin, timeout=10)
    assert error_info(caught.value).metadata["field"] == "overlap"


def test_every_lifecycle_change_is_audited_with_the_admin_as_actor(srv: ClipstoreServer, stub, admin,
                                                                   clock: FakeClock) -> None:
    pid = _create(stub, admin).principal.principal_id
    stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=pid), metadata=admin, timeout=10)
    stub.EnablePrincipal(principal_admin_pb2.EnablePrincipalRequest(principal_id=pid), metadata=admin, timeout=10)
    stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=pid), metadata=admin,
                            timeout=10)
    stub.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
        principal_id=pid, expires_at=_ts(clock.now() + 60)), metadata=admin, timeout=10)
    mine = [e for e in _entries(srv) if e["target"]["principal_id"] == pid]
    assert [e["action"] for e in mine] == ["principal.create", "principal.disable", "principal.enable",
                                           "principal.key_rotate", "principal.expiry"]
    assert {e["actor"]["role"] for e in mine} == {"admin"}


def test_admins_never_receive_or_rotate_a_reviewers_key(srv: ClipstoreServer, stub, admin) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _create(stub, admin, common_pb2.ROLE_REVIEWER)
    assert (caught.value.code(), error_info(caught.value).metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "role")
    reviewer_key = new_key(srv.app, "reviewer", "legacy-reviewer")
    match = srv.app.principals.by_key_hash(hash_api_key(reviewer_key))
    assert match is not None
    with pytest.raises(grpc.RpcError) as caught:
        stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=match.principal.id),
                                metadata=admin, timeout=10)
    assert (caught.value.code(), error_info(caught.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "FACTORS_BELONG_TO_REVIEWER")


@pytest.mark.parametrize("role", ["ingest", "reviewer", "safety", "auditor"])
def test_only_admins_manage_principals(srv: ClipstoreServer, stub, role: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(), metadata=bearer(new_key(srv.app, role)),
                            timeout=10)
    assert error_info(caught.value).reason == "WRONG_ROLE"


def test_unknown_principal_is_not_found(stub, admin) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id="p_nobody"), metadata=admin,
                              timeout=10)
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.NOT_FOUND,
                                                                       "PRINCIPAL_NOT_FOUND")


@pytest.mark.parametrize("seconds, nanos", [(1 << 62, 0), (253_402_300_800, 0), (5, -1), (5, 1_000_000_000)])
def test_an_expiry_outside_timestamps_range_is_invalid_argument_not_internal(srv: ClipstoreServer, stub, admin,
                                                                              seconds: int, nanos: int) -> None:
    """The wire does not enforce Timestamp's range; past year 9999 or with nanos outside [0, 1e9) the expiry
    raised ValueError in ToNanoseconds and the admin saw INTERNAL."""
    pid = _create(stub, admin).principal.principal_id
    beyond = Timestamp(seconds=seconds, nanos=nanos)
    calls = [lambda: _create(stub, admin, name="later", expires_at=beyond),
             lambda: stub.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
                 principal_id=pid, expires_at=beyond), metadata=admin, timeout=10)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert (caught.value.code(), error_info(caught.value).reason, error_info(caught.value).metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "expires_at")
    assert [p.name for p in stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(), metadata=admin,
                                                timeout=10).principals].count("later") == 0


def test_an_overlap_with_nanos_outside_durations_range_is_invalid_argument(srv: ClipstoreServer, stub,
                                                                            admin) -> None:
    pid = _create(stub, admin).principal.principal_id
    with pytest.raises(grpc.RpcError) as caught:
        stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
            principal_id=pid, overlap=Duration(seconds=1, nanos=2_000_000_000)), metadata=admin, timeout=10)
    assert (caught.value.code(), error_info(caught.value).metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "overlap")


def test_24_concurrent_rotations_leave_exactly_one_current_key(srv: ClipstoreServer, channel, stub, admin) -> None:
    pid = _create(stub, admin).principal.principal_id

    def rotate(_: int) -> str:
        return stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=pid),
                                       metadata=admin, timeout=30).api_key

    with ThreadPoolExecutor(RACERS) as pool:
        keys = list(pool.map(rotate, range(RACERS)))
    k = schema.principal_keys
    with srv.app.db.read() as conn:
        current = conn.scalars(sa.select(k.c.key_hash).where(k.c.principal_id == pid, k.c.retires_at.is_(None))).all()
    assert len(set(keys)) == RACERS and len(current) == 1
    assert bytes(current[0]) in {hash_api_key(key) for key in keys}
    assert len([e for e in _entries(srv) if e["action"] == "principal.key_rotate"]) == RACERS


def test_a_database_from_before_key_rotation_keeps_its_keys(tmp_path: Path, database_url: str | None,
                                                           log_stream: io.StringIO) -> None:
    """Revision 0006 moves each principal's key hash to principal_keys; the key keeps working."""
    from clipstore.store import Database, migrations
    config = make_config(tmp_path / "data", database_url=database_url)
    (tmp_path / "data").mkdir(mode=0o700)
    db = Database(config.effective_database_url, upgrade=False)
    with db.migration_lock() as conn:
        migrations.run(conn, "0005")
    db.close()
    engine = sa.create_engine(config.effective_database_url.replace("postgresql://", "postgresql+psycopg://"))
    key = "csk_" + "A" * 43
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO principals (id, name, role, key_hash, created_at, disabled) "
                             "VALUES ('p_old', 'old-auditor', 'auditor', ?, 1.0, ?)"
                             if engine.dialect.name == "sqlite" else
                             "INSERT INTO principals (id, name, role, key_hash, created_at, disabled) "
                             "VALUES ('p_old', 'old-auditor', 'auditor', %s, 1.0, %s)", (hash_api_key(key), False))
    engine.dispose()
    for path in (tmp_path / "data").glob("clipstore.db*"):  # made under the test's umask, not the service's
        path.chmod(0o600)
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        checkpoint = audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(
            audit_pb2.GetCheckpointRequest(), metadata=bearer(key), timeout=10)
        assert checkpoint.verifier_key
        assert srv.app.principals.get("p_old") is not None


def _pid(srv: ClipstoreServer, key: str) -> str:
    match = srv.app.principals.by_key_hash(hash_api_key(key))
    assert match is not None
    return match.principal.id


def _last_admin_refused(srv: ClipstoreServer, err: grpc.RpcError, principal_id: str) -> None:
    """FAILED_PRECONDITION LAST_ADMIN, saying what to do, and on record as a denial naming the admin."""
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LAST_ADMIN"), err.details()
    assert "create or enable another admin first" in err.details()
    last = [e for e in _entries(srv) if e["action"] == "principal.deny"][-1]
    assert last["outcome"] == {"result": "denied", "reason": "LAST_ADMIN"}
    assert last["target"]["principal_id"] == principal_id


def test_the_last_admin_cannot_be_disabled_not_even_by_itself(srv: ClipstoreServer, channel, stub, admin) -> None:
    root = _pid(srv, admin[0][1].removeprefix("Bearer "))
    with pytest.raises(grpc.RpcError) as caught:
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=root), metadata=admin,
                              timeout=10)
    _last_admin_refused(srv, caught.value, root)
    assert not srv.app.principals.get(root).disabled  # type: ignore[union-attr]
    second = _create(stub, admin, common_pb2.ROLE_ADMIN, "second")
    resp = stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=root), metadata=admin,
                                 timeout=10)  # another admin stands: allowed
    assert resp.principal.disabled
    with pytest.raises(grpc.RpcError) as caught:
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(
            principal_id=second.principal.principal_id), metadata=bearer(second.api_key), timeout=10)
    _last_admin_refused(srv, caught.value, second.principal.principal_id)
    rotated = stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
        principal_id=second.principal.principal_id, overlap=Duration(seconds=0)), metadata=bearer(second.api_key),
        timeout=10)  # a rotation hands the caller the new key: it never leaves the service without an admin
    stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(), metadata=bearer(rotated.api_key), timeout=10)


def test_an_expiry_that_would_leave_no_admin_standing_is_refused(srv: ClipstoreServer, stub, admin,
                                                                 clock: FakeClock) -> None:
    root = _pid(srv, admin[0][1].removeprefix("Bearer "))

    def expire(at: float | None) -> principal_admin_pb2.SetPrincipalExpiryResponse:
        request = principal_admin_pb2.SetPrincipalExpiryRequest(principal_id=root)
        if at is not None:
            request.expires_at.CopyFrom(_ts(at))
        return stub.SetPrincipalExpiry(request, metadata=admin, timeout=10)

    for at in (clock.now() - 1, clock.now(), clock.now() + 60, clock.now() + LAST_ADMIN_MARGIN_S):
        with pytest.raises(grpc.RpcError) as caught:
            expire(at)
        _last_admin_refused(srv, caught.value, root)
    assert srv.app.principals.get(root).expires_at is None  # type: ignore[union-attr]
    expire(clock.now() + 2 * LAST_ADMIN_MARGIN_S)  # still an hour and more to act
    clock.advance(1.5 * LAST_ADMIN_MARGIN_S)
    expire(clock.now() + 0.9 * LAST_ADMIN_MARGIN_S)  # extending it, even to a near time, is never refused
    with pytest.raises(grpc.RpcError) as caught:
        expire(clock.now() + 0.5 * LAST_ADMIN_MARGIN_S)  # bringing it nearer is
    _last_admin_refused(srv, caught.value, root)
    _create(stub, admin, common_pb2.ROLE_ADMIN, "second")
    assert expire(clock.now() + 60).principal.expires_at.seconds == int(clock.now() + 60)


def test_an_admin_no_credential_of_this_service_names_does_not_stand_for_the_last_one(
        srv: ClipstoreServer, stub, admin, clock: FakeClock) -> None:
    """An admin named only by a certificate, on a service that takes none, cannot sign in: it does not count.
    Nor does one whose every API key retires within the margin."""
    root = _pid(srv, admin[0][1].removeprefix("Bearer "))
    cert_only = _create(stub, admin, common_pb2.ROLE_ADMIN, "certonly",
                        spiffe_id=f"spiffe://{srv.app.config.trust_domain}/admin/certonly")
    assert not cert_only.api_key and srv.app.config.tls is None
    with pytest.raises(grpc.RpcError) as caught:
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=root), metadata=admin,
                              timeout=10)
    _last_admin_refused(srv, caught.value, root)
    keyed = _create(stub, admin, common_pb2.ROLE_ADMIN, "keyed")
    with srv.app.db.engine.begin() as conn:  # its key retires within the margin, as an overlap ending soon
        conn.execute(sa.update(schema.principal_keys).where(
            schema.principal_keys.c.principal_id == keyed.principal.principal_id).values(
            retires_at=clock.now() + LAST_ADMIN_MARGIN_S / 2))
    with pytest.raises(grpc.RpcError) as caught:
        stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=root), metadata=admin,
                              timeout=10)
    _last_admin_refused(srv, caught.value, root)
    stub.RotatePrincipalKey(principal_admin_pb2.RotatePrincipalKeyRequest(
        principal_id=keyed.principal.principal_id), metadata=admin, timeout=10)  # a key that stays: it stands
    assert stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=root), metadata=admin,
                                 timeout=10).principal.disabled


def test_24_calls_of_two_admins_disabling_each_other_leave_exactly_one(srv: ClipstoreServer, channel,
                                                                       stub) -> None:
    keys = {"a": new_key(srv.app, "admin", "a"), "b": new_key(srv.app, "admin", "b")}
    ids = {name: _pid(srv, key) for name, key in keys.items()}
    start = threading.Barrier(RACERS)  # cyclic: all 24 start each round together

    def disable(i: int) -> str:
        me, other = ("a", "b") if i % 2 else ("b", "a")
        start.wait(10)
        try:
            stub.DisablePrincipal(principal_admin_pb2.DisablePrincipalRequest(principal_id=ids[other]),
                                  metadata=bearer(keys[me]), timeout=30)
        except grpc.RpcError as err:
            return error_info(err).reason
        return f"disabled {other}"

    for _ in range(6):
        with ThreadPoolExecutor(RACERS) as pool:
            outcomes = list(pool.map(disable, range(RACERS)))
        enabled = [name for name, pid in ids.items() if not srv.app.principals.get(pid).disabled]  # type: ignore[union-attr]
        assert len(enabled) == 1, outcomes
        assert set(outcomes) <= {f"disabled {'b' if enabled == ['a'] else 'a'}", "LAST_ADMIN", "PRINCIPAL_DISABLED"}
        assert f"disabled {'b' if enabled == ['a'] else 'a'}" in outcomes
        for pid in ids.values():
            srv.app.principals.set_disabled(pid, False)


def test_replicas_on_one_database_cannot_both_disable_the_other_admin(tmp_path: Path,
                                                                      database_url: str | None) -> None:
    """Below the servers: two processes' writers (each its own Database and AuditLog) on one database, as
    replicas behind a load balancer; each unit's count is read in the transaction that writes."""
    url = database_url or f"sqlite:///{tmp_path / 'shared.db'}"
    root = LocalKms.from_file(tmp_path / "root.key")
    dbs = [Database(url) for _ in range(2)]
    logs = [AuditLog(db, load_or_create_signer(db, root), SystemClock(), checkpoint_every_entries=10**9,
                     checkpoint_every_s=3600) for db in dbs]
    try:
        replicas = [PrincipalLifecycle(PrincipalPorts(
            ledger=log, bind=lambda tx: PrincipalRows(connection(tx)), read=PrincipalRepository(db).read,
            sessions=lambda tx: pytest.fail("no reviewer here"), clock=SystemClock()),  # type: ignore[arg-type,return-value]
            trust_domain="clipstore", default_overlap_s=0) for db, log in zip(dbs, logs, strict=True)]
        repo = PrincipalRepository(dbs[0])
        a, b = Principal(id="p_admin_a", name="a", role="admin"), Principal(id="p_admin_b", name="b", role="admin")
        for p in (a, b):  # each with an API key: an admin with no credential does not stand
            repo.add(p, key_hash=hash_api_key(f"csk_{p.id}"), now=0.0)
        start = threading.Barrier(2)  # cyclic: both start each round together

        def disable(pair: tuple[int, Principal, Principal]) -> str:
            replica, me, other = pair
            start.wait(10)
            try:
                replicas[replica].disable(other.id, Actor(id=me.id, role="admin"))
            except FailedPrecondition as exc:
                return str(exc.reason)
            return "disabled"

        for _ in range(20):
            with ThreadPoolExecutor(2) as pool:
                outcomes = sorted(pool.map(disable, [(0, a, b), (1, b, a)]))
            assert outcomes == ["LAST_ADMIN", "disabled"]
            assert sum(not repo.get(p.id).disabled for p in (a, b)) == 1  # type: ignore[union-attr]
            for p in (a, b):
                repo.set_disabled(p.id, False)
    finally:
        for log in logs:
            log.close()
        for db in dbs:
            db.close()
