"""An idempotency key outlives its clip: once the clip is deleted, purged or erased with its account, a
retry with the key is refused (IDEMPOTENCY_KEY_SPENT) and the recording never comes back.

On SQLite and PostgreSQL, through a real server on loopback.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.unit import SYSTEM
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.grpc_helpers import error_info

AUDIO = secrets.token_bytes(100_000)
RACERS = 24


@dataclass
class Ingest:
    server: ClipstoreServer
    clock: FakeClock
    clips: clip_pb2_grpc.ClipServiceStub
    accounts: account_pb2_grpc.AccountServiceStub
    md: tuple[tuple[str, str], ...]

    def put(self, key: str, **meta: object) -> clip_pb2.Clip:
        return self.clips.PutClip(put_requests(metadata(idempotency_key=key, **meta), AUDIO), metadata=self.md,
                                  timeout=30).clip

    def refused(self, key: str) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            self.put(key)
        return caught.value

    def stored(self) -> dict[str, int]:
        """What the retry must not bring back: clip rows, accounts, queued clips, objects."""
        app = self.server.app
        with app.db.read() as conn:
            counts = {t.name: conn.scalar(sa.select(sa.func.count()).select_from(t))
                      for t in (schema.clips, schema.accounts, schema.review_queue)}
        return counts | {"objects": len(list(app.blobs.list_keys(older_than_s=-1)))}


@pytest.fixture
def ingest(tmp_path: Path, database_url: str | None, log_stream: io.StringIO) -> Iterator[Ingest]:
    clock = FakeClock()
    # Every wake-word clip is queued for review: a resurrected one would be handed to a reviewer.
    config = make_config(tmp_path / "data", database_url=database_url,
                         **{"review.default_allow": True, "review.sample_rate": 1.0})
    with running_server(config, clock=clock) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield Ingest(srv, clock, clip_pb2_grpc.ClipServiceStub(channel), account_pb2_grpc.AccountServiceStub(channel),
                     bearer(new_key(srv.app, "ingest")))


def _assert_spent(err: grpc.RpcError) -> None:
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "IDEMPOTENCY_KEY_SPENT"


def test_retry_after_delete_clip_is_refused_as_spent_and_recreates_nothing(ingest: Ingest) -> None:
    clip = ingest.put("device-7-upload-1")
    ingest.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip.clip_id), metadata=ingest.md, timeout=10)
    after_delete = ingest.stored()
    assert after_delete["clips"] == after_delete["objects"] == after_delete["review_queue"] == 0
    _assert_spent(ingest.refused("device-7-upload-1"))
    assert ingest.stored() == after_delete


def test_retry_after_retention_purge_is_refused_as_spent_and_recreates_nothing(ingest: Ingest) -> None:
    ingest.put("expires")
    ingest.clock.advance(181 * 86400)
    _assert_spent(ingest.refused("expires"))  # expired, not yet purged: already gone for callers
    assert ingest.server.app.clips.purge_expired() == 1
    after_purge = ingest.stored()
    _assert_spent(ingest.refused("expires"))
    assert ingest.stored() == after_purge and after_purge["clips"] == 0


def test_retry_after_an_accidental_activation_is_purged_is_refused_as_spent(ingest: Ingest) -> None:
    clip = ingest.put("wake-word-misheard")
    ingest.server.app.clips.expire_now(clip.clip_id, SYSTEM)  # what FlagClip(accidental) does
    assert ingest.server.app.clips.purge_expired() == 1
    _assert_spent(ingest.refused("wake-word-misheard"))
    assert ingest.stored()["clips"] == ingest.stored()["review_queue"] == 0


def test_retry_after_account_deletion_is_refused_and_does_not_recreate_the_account(ingest: Ingest) -> None:
    ingest.put("before-erasure")
    ingest.accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=ingest.md,
                                  timeout=10)
    _assert_spent(ingest.refused("before-erasure"))
    assert ingest.stored() == {"clips": 0, "accounts": 0, "review_queue": 0, "objects": 0}
    assert ingest.put("after-erasure").size_bytes == len(AUDIO)  # a new recording, with a new key, is stored


def test_parallel_retries_of_a_deleted_clip_are_all_refused(ingest: Ingest) -> None:
    clip = ingest.put("raced")
    ingest.clips.DeleteClip(clip_pb2.DeleteClipRequest(clip_id=clip.clip_id), metadata=ingest.md, timeout=10)
    with ThreadPoolExecutor(RACERS) as pool:
        errors = list(pool.map(lambda _: ingest.refused("raced"), range(RACERS)))
    for err in errors:
        _assert_spent(err)
    assert ingest.stored()["clips"] == ingest.stored()["objects"] == 0


def test_parallel_first_uploads_with_one_key_store_one_clip(ingest: Ingest) -> None:
    with ThreadPoolExecutor(RACERS) as pool:
        ids = set(pool.map(lambda _: ingest.put("one-recording").clip_id, range(RACERS)))
    assert len(ids) == 1
    stored = ingest.stored()
    assert (stored["clips"], stored["objects"], stored["review_queue"]) == (1, 1, 1)
