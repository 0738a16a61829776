"""Dependencies failing at the worst moment, against a real server on loopback: nothing lost, nothing
resurrected, a precise retryable status.

PostgreSQL is reached through a relay that can cut one connection right after it forwarded the COMMIT of
a transaction that wrote a clip row: the database commits, the server never hears so (an ambiguous
commit, as a network drop or a failover gives one). S3 and KMS are moto's server behind an HTTP relay
that fails chosen requests (tests/http_faults.py)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import grpc
import pytest
import sqlalchemy as sa

from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.grpc_helpers import error_info
from tests.http_faults import FaultyRelay
from tests.test_review import World


class CommitCutter:
    """127.0.0.1:<port> -> PostgreSQL. Once `arm()`ed, the first connection that sends a COMMIT after a
    statement holding `pattern` (by default a clip row's INSERT) has that COMMIT forwarded, then is cut
    before the answer comes back."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._armed = threading.Event()
        self._pattern = b"INSERT INTO clips"
        self.delay_s = 0.0  # between cutting the server off and forwarding the COMMIT (a slow link or fsync)
        self.fired = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(32)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, pattern: bytes = b"INSERT INTO clips") -> None:
        self._pattern = pattern
        self.fired.clear()
        self._armed.set()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            threading.Thread(target=self._to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _to_server(self, src: socket.socket, dst: socket.socket) -> None:
        wrote_clip = False
        try:
            while data := src.recv(65536):
                wrote_clip = wrote_clip or self._pattern in data
                if wrote_clip and b"COMMIT" in data and self._armed.is_set():
                    self._armed.clear()
                    # The server's side goes first, so no answer can reach it; then the COMMIT goes on
                    # its way, and PostgreSQL commits though nobody hears its answer.
                    self._close(src)
                    time.sleep(self.delay_s)
                    dst.sendall(data)
                    dst.shutdown(socket.SHUT_WR)
                    self.fired.set()
                    break
                dst.sendall(data)
                if b"COMMIT" in data:
                    wrote_clip = False
        except OSError:
            pass
        self._close(src, dst)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        self._close(src, dst)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def cutter(pg_url: str) -> Iterator[tuple[CommitCutter, str]]:
    relay = CommitCutter(("127.0.0.1", 5432))
    try:
        yield relay, pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}", 1)
    finally:
        relay.close()


def test_a_putclip_whose_commit_answer_is_lost_keeps_its_object_and_its_retry_returns_the_clip(
        tmp_path: Path, cutter: tuple[CommitCutter, str], pg_url: str, log_stream: io.StringIO) -> None:
    relay, url = cutter
    config = make_config(tmp_path / "data", database_url=url)
    with running_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        clips.PutClip(put_requests(metadata(), b"\x00" * 1000), metadata=ingest, timeout=30)  # warm up
        audio, meta = bytes(range(256)) * 40, metadata(idempotency_key="ambiguous-commit")
        relay.arm()
        first = clips.PutClip(put_requests(meta, audio), metadata=ingest, timeout=30).clip  # the commit happened
        assert relay.fired.wait(10)

        # The row is there, and so is its object (before: the object was deleted as if nothing had
        # committed, and the call failed AUDIT_UNAVAILABLE).
        with sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1)).connect() as conn:
            committed = conn.execute(sa.text("SELECT clip_id FROM clips WHERE size_bytes = :n"),
                                     {"n": len(audio)}).scalars().all()
        assert committed == [first.clip_id]
        assert len(b"".join(server.app.blobs.get_stream(first.clip_id))) > len(audio)

        # A retry with the same key (a client that had given up on the first answer): the same clip, once
        # (before: NOT_FOUND / BLOB_NOT_FOUND, for good).
        again = clips.PutClip(put_requests(meta, audio), metadata=ingest, timeout=30).clip
        assert again.clip_id == first.clip_id
        got = clips.GetClip(clip_pb2.GetClipRequest(clip_id=first.clip_id), metadata=ingest, timeout=10)
        assert got.clip.size_bytes == len(audio)


def test_a_putclip_whose_lost_commit_lands_after_the_check_keeps_its_object(
        tmp_path: Path, cutter: tuple[CommitCutter, str], log_stream: io.StringIO) -> None:
    """The check for the row after a lost commit answer ran at once: a COMMIT still on its way (a slow link, a
    slow fsync, a commit waiting for a synchronous standby) was not visible yet, so the object was deleted,
    then the row committed: a clip without audio, whose every retry answered NOT_FOUND/BLOB_NOT_FOUND."""
    relay, url = cutter
    with running_server(make_config(tmp_path / "data", database_url=url)) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        clips.PutClip(put_requests(metadata(), b"\x00" * 1000), metadata=ingest, timeout=30)  # warm up
        audio, meta = bytes(range(256)) * 40, metadata(idempotency_key="late-commit")
        relay.delay_s = 1.0
        relay.arm()
        with pytest.raises(grpc.RpcError) as caught:
            clips.PutClip(put_requests(meta, audio), metadata=ingest, timeout=30)
        assert (caught.value.code(), error_info(caught.value).reason) == \
            (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert relay.fired.wait(10)
        time.sleep(1)  # the COMMIT lands
        again = clips.PutClip(put_requests(meta, audio), metadata=ingest, timeout=30).clip  # the retry
        assert again.size_bytes == len(audio)
        assert len(b"".join(server.app.blobs.get_stream(again.clip_id))) > len(audio)


def test_a_deletion_whose_commit_answer_is_lost_says_its_outcome_is_unknown(
        tmp_path: Path, cutter: tuple[CommitCutter, str], log_stream: io.StringIO) -> None:
    """Before, the call said the action "was not performed" (AUDIT_UNAVAILABLE), though the database had
    committed it: the clip was deleted and its entry written."""
    relay, url = cutter
    with running_server(make_config(tmp_path / "data", database_url=url)) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        clip = clips.PutClip(put_requests(metadata(), b"\x01" * 1000), metadata=ingest, timeout=30).clip
        relay.arm(b"DELETE FROM clips")
        delete = functools.partial(clips.DeleteClip, clip_pb2.DeleteClipRequest(clip_id=clip.clip_id),
                                   metadata=ingest, timeout=30)
        with pytest.raises(grpc.RpcError) as caught:
            delete()
        # The relay cuts the server off before it forwards the COMMIT, so the answer can come first.
        assert relay.fired.wait(10)
        assert (caught.value.code(), error_info(caught.value).reason) == \
            (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
        assert "may or may not have been performed" in (caught.value.details() or "")
        assert "was not performed" not in (caught.value.details() or "")
        deadline = time.monotonic() + 10  # it was: PostgreSQL commits the forwarded COMMIT as it arrives
        while server.app.clips.find(clip.clip_id) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.app.clips.find(clip.clip_id) is None
        with pytest.raises(grpc.RpcError) as again:
            delete()
        assert error_info(again.value).reason == "CLIP_NOT_FOUND"


@pytest.fixture
def kms_relay(moto_endpoint: str) -> Iterator[tuple[FaultyRelay, str]]:
    relay = FaultyRelay(moto_endpoint)
    key_id = boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["KeyId"]
    try:
        yield relay, key_id
    finally:
        relay.close()


@pytest.mark.parametrize("fault", ["cut_mid_body", "short_body"])
def test_a_kms_answer_cut_mid_body_is_kms_unavailable_and_writes_nothing(
        tmp_path: Path, kms_relay: tuple[FaultyRelay, str], fault: str, log_stream: io.StringIO) -> None:
    relay, key_id = kms_relay
    clock = FakeClock()
    config = make_config(tmp_path / "data", **{"kms.key_id": key_id, "kms.endpoint_url": relay.url})
    with running_server(config, clock=clock) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        old = clips.PutClip(put_requests(metadata(), b"\x01" * 1000), metadata=ingest, timeout=30).clip

        def held() -> tuple[int, int, int]:
            with server.app.db.read() as conn:
                return tuple(int(conn.scalar(sa.select(sa.func.count()).select_from(t)) or 0)  # type: ignore[return-value]
                             for t in (schema.accounts, schema.account_keys, schema.clips))

        before = held()
        new_account = metadata(identity=clip_pb2.ClipIdentity(account_id="acct-kms-cut", device_serial="S1"))
        # Account-key creation (Encrypt), rotation (Encrypt) and, once the key cache expired, unwrap (Decrypt).
        relay.rule = lambda request: fault if request.target in ("kms:Encrypt", "kms:Decrypt") else None
        calls = {
            "PutClip": lambda: clips.PutClip(put_requests(new_account, b"\x02" * 1000), metadata=ingest, timeout=30),
            "RotateAccountKey": lambda: accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(
                account_id=ACCOUNT_ID), metadata=ingest, timeout=30),
            "GetClip": lambda: (clock.advance(3600), clips.GetClip(clip_pb2.GetClipRequest(clip_id=old.clip_id),
                                                                   metadata=ingest, timeout=30)),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert (caught.value.code(), error_info(caught.value).reason) == \
                (grpc.StatusCode.UNAVAILABLE, "KMS_UNAVAILABLE"), (name, caught.value.details())  # was INTERNAL
        assert held() == before
        stored = server.app.clips.find(old.clip_id)
        assert stored is not None
        assert [v.version for v in server.app.keyring.versions(stored.account_ref)] == [1]

        relay.rule = lambda request: None
        for call in calls.values():
            call()
        assert held()[0] == before[0] + 1


def test_putclips_whose_upload_spans_a_deletion_of_their_account_store_nothing_and_say_so(
        srv: ClipstoreServer) -> None:
    """20 uploads to an account are under way when it is deleted; they end after the deletion answered.
    Before, each was acknowledged but stored under the shredded account: a clip its client thought stored,
    that could never be opened, later purged (and its idempotency key spent)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest = bearer(new_key(srv.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        identity = clip_pb2.ClipIdentity(account_id="acct-deleted-mid-upload", device_serial="S1")
        clips.PutClip(put_requests(metadata(identity=identity), b"\x01" * 1000), metadata=ingest, timeout=30)
        account = srv.app.accounts.find(identity.account_id)
        assert account is not None
        release = threading.Event()

        def held(meta: clip_pb2.ClipMetadata, audio: bytes) -> Iterator[clip_pb2.PutClipRequest]:
            requests = list(put_requests(meta, audio))
            yield from requests[:-1]
            release.wait(30)
            yield requests[-1]  # the trailer, after the deletion

        metas = [metadata(identity=identity, idempotency_key=f"mid-delete-{i}") for i in range(20)]
        with ThreadPoolExecutor(len(metas)) as pool:
            calls = [pool.submit(clips.PutClip, held(m, bytes([i]) * 100_000), metadata=ingest, timeout=60)
                     for i, m in enumerate(metas)]
            deadline = time.monotonic() + 30  # every upload has its account and key, and writes its object
            while len(list(Path(srv.app.blobs.root).glob("*/*.partial"))) < len(metas):  # type: ignore[attr-defined]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=identity.account_id),
                                   metadata=ingest, timeout=30)
            release.set()
            outcomes = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call.result()
                outcomes.append((caught.value.code(), error_info(caught.value).reason))
        assert set(outcomes) == {(grpc.StatusCode.NOT_FOUND, "ACCOUNT_DELETED")}
        with srv.app.db.read() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(schema.clips)
                               .where(schema.clips.c.account_ref == account.account_ref)) == 0
        assert list(srv.app.blobs.list_keys(-10)) == []  # no object left behind
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 100_000)]
        mine = [(e["action"], e["outcome"]["result"]) for e in entries  # type: ignore[index]
                if e.get("target", {}).get("account_ref") == account.account_ref]  # type: ignore[union-attr]
        # Nothing stored after the deletion; the refusals are entries (past the principal's denial budget,
        # counted into its summary entry).
        assert mine[mine.index(("account.delete", "ok")) + 1:] == [("clip.ingest", "denied")] * len(mine[2:])
        assert 0 < len(mine[2:]) <= len(metas)

        # The device retries with the same key: stored, under the account id's new pseudonym, readable.
        clip = clips.PutClip(put_requests(metas[0], bytes([0]) * 100_000), metadata=ingest, timeout=30).clip
        assert clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=ingest,
                             timeout=10).clip.size_bytes == 100_000


@pytest.fixture
def s3_relay(moto_endpoint: str) -> Iterator[tuple[FaultyRelay, dict[str, object]]]:
    relay = FaultyRelay(moto_endpoint)
    bucket = f"clips-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    try:
        yield relay, {"s3.bucket": bucket, "s3.endpoint_url": relay.url}
    finally:
        relay.close()


def test_an_empty_clip_is_invalid_argument_even_when_its_object_cannot_be_deleted_at_once(
        tmp_path: Path, s3_relay: tuple[FaultyRelay, dict[str, object]], log_stream: io.StringIO) -> None:
    relay, s3 = s3_relay
    with running_server(make_config(tmp_path / "data", **s3)) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        relay.rule = lambda request: "503" if request.method == "DELETE" else None
        with pytest.raises(grpc.RpcError) as caught:
            clip_pb2_grpc.ClipServiceStub(channel).PutClip(put_requests(metadata(), b""), metadata=ingest, timeout=30)
        # Before: UNAVAILABLE / BLOB_STORE_UNAVAILABLE, as if a retry could help.
        assert (caught.value.code(), error_info(caught.value).reason) == \
            (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), caught.value.details()
        relay.rule = lambda request: None
        # The object waits for the orphan sweep, which goes by the row: there is none.
        assert server.app.clips.sweep_orphans(older_than_s=-10) == 1
        assert list(server.app.blobs.list_keys(-10)) == []


@pytest.mark.parametrize("failing", ["s3:GET", "kms:Decrypt"])
def test_a_fetch_whose_audio_cannot_be_read_after_it_was_recorded_is_recorded_as_failed(
        tmp_path: Path, moto_endpoint: str, failing: str, log_stream: io.StringIO) -> None:
    """The clip.fetch entry is written before the first byte; if the blob store or the key service then
    fails, the log said the clip was heard, and nothing more. Now an audio_failure entry follows, naming
    the reason the reviewer got."""
    relay = FaultyRelay(moto_endpoint)
    bucket = f"clips-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
    key_id = boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["KeyId"]
    config = make_config(tmp_path / "data", **{"review.sample_rate": 1.0, "s3.bucket": bucket,
                                               "s3.endpoint_url": relay.url, "kms.key_id": key_id,
                                               "kms.endpoint_url": relay.url})
    clock = FakeClock()
    try:
        with running_server(config, clock=clock) as server, \
                grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            w = World(server, channel, clock)
            w.opt_in()
            w.put()
            clock.advance(3600)  # the account key is no longer cached: the fetch unwraps it through KMS
            r = w.enroll()
            token = w.session(r)
            assignment = w.next(r, token)
            grant = w.grant(r, token, assignment.assignment_id)
            relay.rule = lambda request: "503" if request.target.startswith(failing) else None
            with pytest.raises(grpc.RpcError) as caught:
                w.fetch(r, token, grant.grant, grant.review_clip_id)
            reason = error_info(caught.value).reason
            assert (caught.value.code(), reason) == \
                (grpc.StatusCode.UNAVAILABLE, "BLOB_STORE_UNAVAILABLE" if failing == "s3:GET" else "KMS_UNAVAILABLE")
            entries = [(e["action"], e["outcome"]) for e in w.entries()]
            fetched = entries.index(("clip.fetch", next(o for a, o in entries if a == "clip.fetch")))
            assert entries[fetched + 1:] == [("clip.audio_failure", {"result": "failed", "reason": reason})]
    finally:
        relay.close()


def test_a_file_store_that_cannot_read_an_object_is_unavailable_not_a_bug(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    """The embedded store on a file system that fails (an I/O error, a lost mount): here the object's path
    no longer names a file. Before: INTERNAL (only a missing file was mapped)."""
    clock = FakeClock()
    config = make_config(tmp_path / "data", **{"review.sample_rate": 1.0})
    with running_server(config, clock=clock) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        w = World(server, channel, clock)
        w.opt_in()
        meta = metadata()
        clip = w.clips.PutClip(put_requests(meta, b"\x07" * 5000), metadata=w.ingest, timeout=30).clip
        r = w.enroll()
        token = w.session(r)
        grant = w.grant(r, token, w.next(r, token).assignment_id)
        (path,) = Path(server.app.blobs.root).rglob(clip.clip_id)  # type: ignore[attr-defined]
        path.rename(path.with_name("moved"))
        path.mkdir()
        failures: list[grpc.RpcError] = []
        for call in (lambda: w.fetch(r, token, grant.grant, grant.review_clip_id),  # reads the object
                     lambda: w.clips.PutClip(put_requests(meta, b"\x07" * 5000), metadata=w.ingest, timeout=30)):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            failures.append(caught.value)
        assert [(f.code(), error_info(f).reason) for f in failures] == \
            [(grpc.StatusCode.UNAVAILABLE, "BLOB_STORE_UNAVAILABLE")] * 2, [f.details() for f in failures]


def test_concurrent_deletions_of_one_account_erase_it_once_with_one_entry(srv: ClipstoreServer) -> None:
    """12 DeleteAccount calls and 12 DeleteClip calls of its clips at once. Before, every DeleteAccount that
    had found the account before the first shred committed answered OK and appended its own
    account.delete entry (up to 7 for one deletion on PostgreSQL)."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest = bearer(new_key(srv.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        identity = clip_pb2.ClipIdentity(account_id="acct-deleted-twice", device_serial="S1")
        ids = [clips.PutClip(put_requests(metadata(identity=identity), bytes([i]) * 1000), metadata=ingest,
                             timeout=30).clip.clip_id for i in range(30)]
        account = srv.app.accounts.find(identity.account_id)
        assert account is not None

        def outcome(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
            try:
                call()
            except grpc.RpcError as err:
                return err.code(), error_info(err).reason
            return grpc.StatusCode.OK, ""

        delete_account = functools.partial(accounts.DeleteAccount, account_pb2.DeleteAccountRequest(
            account_id=identity.account_id), metadata=ingest, timeout=30)
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(outcome, [delete_account] * 12 + [
                functools.partial(clips.DeleteClip, clip_pb2.DeleteClipRequest(clip_id=c), metadata=ingest,
                                  timeout=30) for c in ids[:12]]))
        deletions = Counter(answers[:12])
        assert deletions[(grpc.StatusCode.OK, "")] == 1, deletions
        assert set(deletions) <= {(grpc.StatusCode.OK, ""), (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")}
        assert set(answers[12:]) <= {(grpc.StatusCode.OK, ""), (grpc.StatusCode.NOT_FOUND, "CLIP_NOT_FOUND")}
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 100_000)]
        mine = Counter(e["action"] for e in entries
                       if e.get("target", {}).get("account_ref") == account.account_ref)
        assert mine["account.delete"] == 1
        # every clip went exactly once: by its DeleteClip, or with the account
        assert mine["clip.delete"] == answers[12:].count((grpc.StatusCode.OK, ""))
        with srv.app.db.read() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(schema.clips)
                               .where(schema.clips.c.account_ref == account.account_ref)) == 0
        assert list(srv.app.blobs.list_keys(-10)) == []


def test_a_review_preference_set_while_its_account_is_deleted_is_never_left_on_the_erased_account(
        srv: ClipstoreServer) -> None:
    """23 SetReviewPreference(deny) calls around one DeleteAccount. Before, a call that found the account
    before the shred still answered OK and audited a preference on the erased account: the account id
    then had no account, the opt-out was lost (with review.default_allow = true, its next clips were
    reviewable). Now such a call sets it on the id's new account."""
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest = bearer(new_key(srv.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        for round_ in range(3):
            account_id = f"acct-preference-{round_}"
            identity = clip_pb2.ClipIdentity(account_id=account_id, device_serial="S1")
            for i in range(20):
                clips.PutClip(put_requests(metadata(identity=identity), bytes([i]) * 1000), metadata=ingest,
                              timeout=30)
            deny = functools.partial(accounts.SetReviewPreference, account_pb2.SetReviewPreferenceRequest(
                account_id=account_id, allow_human_review=False), metadata=ingest, timeout=30)
            delete = functools.partial(accounts.DeleteAccount, account_pb2.DeleteAccountRequest(
                account_id=account_id), metadata=ingest, timeout=30)
            with ThreadPoolExecutor(24) as pool:
                list(pool.map(lambda call: call(), [deny] * 12 + [delete] + [deny] * 11))
            erased: set[str] = set()
            for raw in srv.app.audit.reader.entries(0, 100_000):
                entry = json.loads(raw)
                ref = entry.get("target", {}).get("account_ref")
                if entry["action"] == "account.delete":
                    erased.add(ref)
                elif entry["action"] == "account.review_preference":
                    assert ref not in erased, "a preference was set on an erased account"
            live = srv.app.accounts.find(account_id)
            assert live is None or live.allow_review is False
