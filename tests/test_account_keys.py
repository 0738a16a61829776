"""An account's key versions change only in a unit of work with their entry: a rotation's new version and
its `account.key_rotate` entry, a retirement and its `account.key_retire` entry, both there or neither.

On SQLite and PostgreSQL, through a real server on loopback.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from clipstore.app import App
from clipstore.errors import FailedPrecondition
from clipstore.store import schema
from clipstore.unit import OPERATOR
from clipstore.v1 import account_pb2, clip_pb2
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import bearer, new_key
from tests.grpc_helpers import error_info
from tests.test_idempotency import Ingest, ingest  # noqa: F401  # the fixture


def _versions(app: App, ref: str) -> list[tuple[int, bool]]:
    t = schema.account_keys
    with app.db.read() as conn:
        return [(r.version, bool(r.retired)) for r in
                conn.execute(sa.select(t.c.version, t.c.retired).where(t.c.account_ref == ref).order_by(t.c.version))]


def _actions(app: App) -> list[str]:
    reader = app.audit.reader
    return [json.loads(e)["action"] for e in reader.entries(0, reader.size())]


def _fail_entries_of(app: App, action: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The audit writer fails to store a batch holding an `action` entry (after the batch's units ran)."""
    store = app.audit._store

    def failing(cursor: Any, size: int, rows: list[tuple[bytes, bytes]], *args: Any) -> None:
        if any(f'"action":"{action}"'.encode() in data for data, _ in rows):
            raise RuntimeError("injected: the audit writer failed")
        store(cursor, size, rows, *args)

    monkeypatch.setattr(app.audit, "_store", failing)


def test_a_rotation_whose_entry_cannot_be_written_adds_no_key_version(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Before, the new version was committed on its own and the entry appended after it: an audit writer
    failing in between left an active key version no entry recorded."""
    ingest.put("k0")
    app = ingest.server.app
    ref = app.accounts.require(ACCOUNT_ID).account_ref
    _fail_entries_of(app, "account.key_rotate", monkeypatch)
    with pytest.raises(grpc.RpcError) as caught:
        ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                         metadata=ingest.md, timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"
    assert _versions(app, ref) == [(1, False)] and "account.key_rotate" not in _actions(app)
    monkeypatch.undo()
    rotated = ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                               metadata=ingest.md, timeout=30)
    assert (rotated.active_key_version, rotated.rewrapped_clips) == (2, 1)
    assert _versions(app, ref) == [(1, False), (2, False)] and _actions(app).count("account.key_rotate") == 1
    assert ingest.audio(ingest.put("k1").clip_id)  # a clip of the new version opens


def test_a_retirement_that_fails_leaves_no_entry_and_one_that_succeeds_leaves_both(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Before, `clipstore keys retire` appended its entry and then retired on its own: a database failure
    in between left an entry for a retirement that never happened."""
    ingest.put("k0")
    app = ingest.server.app
    ref = app.accounts.require(ACCOUNT_ID).account_ref
    app.accounts.rotate_key(ACCOUNT_ID, OPERATOR)

    def fail_retire(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE ACCOUNT_KEYS"):
            raise RuntimeError("injected: the database failed")

    sa.event.listen(app.db.engine, "before_cursor_execute", fail_retire)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR)
    finally:
        sa.event.remove(app.db.engine, "before_cursor_execute", fail_retire)
    assert _versions(app, ref) == [(1, False), (2, False)] and "account.key_retire" not in _actions(app)

    _fail_entries_of(app, "account.key_retire", monkeypatch)
    with pytest.raises(Exception, match="not performed"):
        app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR)
    assert _versions(app, ref) == [(1, False), (2, False)] and "account.key_retire" not in _actions(app)
    monkeypatch.undo()

    assert app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR) == 1
    assert _versions(app, ref) == [(1, True), (2, False)] and _actions(app).count("account.key_retire") == 1


def _keys_and_accounts(app: App) -> tuple[int, int]:
    with app.db.read() as conn:
        return tuple(conn.scalar(sa.select(sa.func.count()).select_from(t))  # type: ignore[return-value]
                     for t in (schema.account_keys, schema.accounts))


def test_an_account_whose_row_cannot_be_written_leaves_no_key_behind(ingest: Ingest) -> None:  # noqa: F811
    """Before, an account's first key was committed on its own before the account row: a database failure
    in between left a key row no account owns, which nothing swept."""
    app = ingest.server.app

    def fail_account_row(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO ACCOUNTS"):
            raise RuntimeError("injected: the database failed")

    sa.event.listen(app.db.engine, "before_cursor_execute", fail_account_row)
    try:
        with pytest.raises(grpc.RpcError):
            ingest.put("k0")
    finally:
        sa.event.remove(app.db.engine, "before_cursor_execute", fail_account_row)
    assert _keys_and_accounts(app) == (0, 0)
    clip = ingest.put("k0")  # the retry makes the account and its key together
    assert _keys_and_accounts(app) == (1, 1) and ingest.audio(clip.clip_id)


def test_concurrent_first_clips_of_one_account_leave_one_account_and_one_key(ingest: Ingest) -> None:  # noqa: F811
    """The losers of the race to create the account roll back their key with their account row."""
    app = ingest.server.app
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        rows = list(pool.map(lambda _: app.accounts.find_or_create(ACCOUNT_ID), range(24)))
    assert len({r.account_ref for r in rows}) == 1
    assert _keys_and_accounts(app) == (1, 1)
    with app.db.read() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(schema.account_key_tombstones)) == 0


def test_concurrent_rotations_add_one_version_each_with_its_entry_or_ask_for_a_retry(
        ingest: Ingest) -> None:  # noqa: F811
    """Rotations racing for one version: one adds it with its entry; the others add nothing, and answer
    UNAVAILABLE or resume that rotation (before, a loser's key insert failed as a bug: INTERNAL)."""
    ingest.put("k0")
    app = ingest.server.app
    ref = app.accounts.require(ACCOUNT_ID).account_ref
    app.keyring.versions(ref)  # every rotation starts from the same cached version list

    def rotate(_: int) -> str:
        try:
            ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                             metadata=ingest.md, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc.details()
            return error_info(exc).reason
        return "OK"

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(rotate, range(24)))
    assert set(outcomes) <= {"OK", "UNAVAILABLE"} and "OK" in outcomes
    versions = _versions(app, ref)
    assert [v for v, _ in versions] == list(range(1, len(versions) + 1))
    rotations = [json.loads(e) for e in app.audit.reader.entries(0, app.audit.reader.size())]
    reasons = [e["outcome"]["reason"] for e in rotations if e["action"] == "account.key_rotate"]
    assert len(reasons) == outcomes.count("OK")  # one entry per answered rotation (those after the first resume)
    assert sum(r.startswith("new version") for r in reasons) == len(versions) - 1  # one per version added


@pytest.mark.parametrize("end", ["after_the_retirement", "during_its_check"])
def test_uploads_under_way_across_a_rotation_and_retirement_are_stored_under_a_live_key(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch, end: str) -> None:  # noqa: F811
    """24 PutClips took their data key under version 1, then RotateAccountKey added version 2 and `clipstore
    keys retire --below 2` retired version 1, then the uploads ended: after the retirement, or between its
    check that no clip uses version 1 and its unit. Before, each was acknowledged and stored under the
    retired version: a clip that never opened again (FAILED_PRECONDITION KEY_VERSION_UNAVAILABLE) and that a
    rotation could not rewrap, so every later RotateAccountKey of the account failed too. Now an upload ending
    after the retirement wraps its data key anew under version 2; one ending during the check makes the
    retirement refuse (KEY_VERSION_IN_USE) until a rotation rewrapped it."""
    ingest.put("k0")
    app = ingest.server.app
    ref = app.accounts.require(ACCOUNT_ID).account_ref
    release = threading.Event()

    def held(key: str, audio: bytes) -> Iterator[clip_pb2.PutClipRequest]:
        requests = list(put_requests(metadata(idempotency_key=key), audio))
        yield from requests[:-1]
        release.wait(30)
        yield requests[-1]  # the trailer

    uploads = {f"held-{i}": bytes([i + 1]) * 70_000 for i in range(24)}
    calls: dict[str, concurrent.futures.Future[clip_pb2.PutClipResponse]] = {}
    if end == "during_its_check":
        catalog = app.accounts._clips
        check = catalog.all_for_account

        def checked_then_uploads_end(account_ref: str, **kwargs: Any) -> Iterator[Any]:
            found = list(check(account_ref, **kwargs))  # no clip below version 2 yet ...
            release.set()
            for call in calls.values():  # ... then the uploads commit, before the retirement's unit
                call.result()
            return iter(found)

        monkeypatch.setattr(catalog, "all_for_account", checked_then_uploads_end)
    with concurrent.futures.ThreadPoolExecutor(len(uploads)) as pool:
        calls.update({key: pool.submit(ingest.clips.PutClip, held(key, audio), metadata=ingest.md, timeout=60)
                      for key, audio in uploads.items()})
        deadline = time.monotonic() + 30  # every upload has its data key and writes its object
        while len(list(Path(app.blobs.root).glob("*/*.partial"))) < len(uploads):  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other = bearer(new_key(app, "ingest"))  # the uploads take all the calls one principal may have in flight
        rotated = ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                                   metadata=other, timeout=30)
        assert (rotated.active_key_version, rotated.rewrapped_clips) == (2, 1)
        if end == "during_its_check":
            with pytest.raises(FailedPrecondition) as refused:
                app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR)
            assert refused.value.reason == "KEY_VERSION_IN_USE"
            assert _versions(app, ref) == [(1, False), (2, False)] and "account.key_retire" not in _actions(app)
            monkeypatch.undo()
        else:
            assert app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR) == 1
        release.set()
        stored = {key: call.result().clip.clip_id for key, call in calls.items()}
    for key, clip_id in stored.items():
        assert ingest.audio(clip_id) == uploads[key]
    if end == "during_its_check":  # stored under version 1, still live: the rotation resumes, then it retires
        resumed = ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                                   metadata=ingest.md, timeout=30)
        assert (resumed.active_key_version, resumed.rewrapped_clips, resumed.remaining_clips) == (2, 24, 0)
        assert app.accounts.retire_key_versions(ACCOUNT_ID, 2, OPERATOR) == 1
    assert _versions(app, ref) == [(1, True), (2, False)]
    assert {app.clips.get(clip_id).key_version for clip_id in stored.values()} == {2}
    again = ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                             metadata=ingest.md, timeout=30)
    assert (again.active_key_version, again.rewrapped_clips, again.remaining_clips) == (3, 25, 0)
    assert _actions(app).count("clip.ingest") == 25
