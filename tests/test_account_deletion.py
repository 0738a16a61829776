"""Deleting an account is a unit of work (shred, withdrawal, mapping, entry), then pages of clip rows:
no transaction is held for long, and a deletion that stopped half-way is finished by the purge loop.

On SQLite and PostgreSQL, through a real server on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from clipstore import accounts
from clipstore.audit.log import AuditUnavailable
from clipstore.store.clips import ClipRows
from clipstore.store.db import connection
from clipstore.store.keys import destroy_keks
from clipstore.store.review import ReviewRows
from clipstore.unit import OPERATOR, Tx
from clipstore.v1 import account_pb2, clip_pb2
from tests.clip_helpers import ACCOUNT_ID
from tests.grpc_helpers import error_info
from tests.test_idempotency import Ingest, ingest  # noqa: F401  # the fixture


def _purges(ingest: Ingest, reason: str) -> int:  # noqa: F811
    reader = ingest.server.app.audit.reader
    entries = [json.loads(e) for e in reader.entries(0, reader.size())]
    return sum(e["action"] == "clip.purge" and e["outcome"]["reason"] == reason for e in entries)


def test_a_deletion_that_stopped_after_the_shred_is_finished_by_the_purge(ingest: Ingest) -> None:  # noqa: F811
    for n in range(3):
        ingest.put(f"k{n}")
    app = ingest.server.app
    ref = app.accounts.require(ACCOUNT_ID).account_ref

    def shred_only(tx: Tx) -> None:  # what DeleteAccount's first unit commits before a crash
        destroy_keks(connection(tx), ref, tx.now)
        ReviewRows(connection(tx)).withdraw_from_review(account_ref=ref)
        ClipRows(connection(tx)).delete_account(ref)
        tx.audit(OPERATOR.record("account.delete", account_ref=ref))

    app.audit.run(shred_only)
    app.keyring.forget(ref)
    assert ingest.stored()["clips"] == 3  # noise now: the keys are gone
    assert app.clips.purge_expired() == 3
    assert ingest.stored() == {"clips": 0, "accounts": 0, "review_queue": 0, "objects": 0}
    assert _purges(ingest, "account_deleted") == 3


def test_an_account_with_more_clips_than_a_page_is_deleted_a_page_per_unit(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(accounts, "DELETE_PAGE_CLIPS", 2)
    for n in range(5):
        ingest.put(f"k{n}")
    batches_before = ingest.server.app.audit.batches
    deleted = ingest.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID),
                                            metadata=ingest.md, timeout=30)
    assert deleted.deleted_clips == 5
    assert ingest.stored() == {"clips": 0, "accounts": 0, "review_queue": 0, "objects": 0}
    assert ingest.server.app.audit.batches - batches_before >= 4  # the shred, then 3 pages (+ the empty probe)


def test_a_rotation_cut_short_by_its_deadline_resumes_without_adding_another_version(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(accounts, "REWRAP_PAGE_CLIPS", 2)
    for n in range(5):
        ingest.put(f"k{n}")
    app = ingest.server.app
    first = app.accounts.rotate_key(ACCOUNT_ID, OPERATOR, budget_s=0)  # the deadline is already near
    assert first == (2, 2, 3)  # one page done, then it answered
    resumed = ingest.accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID),
                                               metadata=ingest.md, timeout=60)
    assert (resumed.active_key_version, resumed.rewrapped_clips, resumed.remaining_clips) == (2, 3, 0)
    ref = app.accounts.require(ACCOUNT_ID).account_ref
    for clip in app.clips._clips.all_for_account(ref):  # every clip is on the new version and still opens
        assert clip.key_version == 2 and b"".join(app.clips.audio(clip))
    again = app.accounts.rotate_key(ACCOUNT_ID, OPERATOR)  # nothing left behind: a new rotation
    assert again == (3, 5, 0)


def test_a_deletion_whose_commit_answer_was_lost_leaves_no_key_of_the_account_cached(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """DeleteAccount's shred committed but its answer was lost (AUDIT_UNAVAILABLE, unconfirmed): before, the
    key ring forgot the account only after a confirmed commit, so this process kept the shredded account's
    key cached and went on opening its clips (GetClip answered, identity and all) until the cache's TTL
    (300 s) ran out; a retried DeleteAccount (ACCOUNT_NOT_FOUND) did not drop it either."""
    clip = ingest.put("k0")
    app = ingest.server.app
    assert ingest.audio(clip.clip_id)  # the account's key is cached
    run = app.audit.run

    def answer_lost(unit: Callable[[Tx], Any], **kwargs: Any) -> Any:
        value = run(unit, **kwargs)
        if unit.__name__ == "shred":  # committed; then the connection drops before the answer
            lost = AuditUnavailable("the database did not confirm the commit")
            lost.unconfirmed = True
            raise lost
        return value

    monkeypatch.setattr(app.audit, "run", answer_lost)
    with pytest.raises(grpc.RpcError) as caught:
        ingest.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=ingest.md,
                                      timeout=30)
    assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"
    monkeypatch.undo()
    with pytest.raises(grpc.RpcError) as caught:
        ingest.clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=ingest.md, timeout=10)
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_DELETED")



def test_a_putclip_that_lost_the_race_to_create_its_account_to_a_deleted_one_makes_a_new_one(
        ingest: Ingest, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A PutClip found no account, another request created it first (this one's insert lost), and a
    DeleteAccount erased it before this one read the winner back: before, an assertion failed and the
    PutClip answered INTERNAL; now it makes the account anew, as a PutClip after the deletion does."""
    app = ingest.server.app
    ingest.put("k0")  # the other request's account
    repository = app.accounts._accounts
    by_lookup = repository.by_lookup
    reads: list[object] = []

    def racing(lookup_hmac: bytes) -> Any:
        reads.append(lookup_hmac)
        if len(reads) == 1:  # read before the other request created the account
            return None
        if len(reads) == 2:  # this one's insert lost; the deletion lands before the winner is read back
            app.accounts.delete_account(ACCOUNT_ID, OPERATOR)
        return by_lookup(lookup_hmac)

    monkeypatch.setattr(repository, "by_lookup", racing)
    clip = ingest.put("k1")
    monkeypatch.undo()
    assert ingest.audio(clip.clip_id)
    assert app.clips.get(clip.clip_id).account_ref == app.accounts.require(ACCOUNT_ID).account_ref
