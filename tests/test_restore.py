"""Deletion survives restores: a database backup taken before DeleteAccount, restored and started, does not
bring the account back. The published log is outside the database; at start the service copies back the
published entries the backup lacks and replays every crypto-shred they record, audited, before serving."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from auditlog.report import verify_report
from clipstore.config import Config
from clipstore.server import ClipstoreServer, running_server
from clipstore.store.schema import metadata as tables
from clipstore.unit import Actor
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc
from kms import WrappedDek
from kms.errors import AccountKeysDestroyed
from tests.clip_helpers import metadata, put_requests
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info

GONE, KEPT = "acct-gone-4711", "acct-kept-0815"


def backup(config: Config) -> Callable[[], None]:
    """Back the database up now; the returned function restores it. SQLite: the database files, copied
    with the server stopped. PostgreSQL: every row of every table (a data-only dump)."""
    url = config.effective_database_url
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        saved = {p.name: p.read_bytes() for p in path.parent.glob(path.name + "*")}

        def restore_files() -> None:
            for p in path.parent.glob(path.name + "*"):
                p.unlink()
            for name, data in saved.items():
                fd = os.open(path.parent / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
        return restore_files
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = {t.name: [dict(r._mapping) for r in conn.execute(sa.select(t))] for t in tables.sorted_tables}

    def restore_rows() -> None:
        with engine.begin() as conn:
            for t in reversed(tables.sorted_tables):
                conn.execute(t.delete())
            for t in tables.sorted_tables:
                if rows[t.name]:
                    conn.execute(t.insert(), rows[t.name])
        engine.dispose()
    return restore_rows


def _published(server: ClipstoreServer) -> int:
    """Sign a checkpoint and wait until it is published; returns its size."""
    size, _ = server.app.audit.checkpoint()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.app.publishing is not None
        server.app.publishing.poke()
        if server.app.publishing.latest and server.app.publishing.latest[0] >= size:
            return size
        time.sleep(0.05)
    raise AssertionError(f"size {size} was not published")


def _entries(server: ClipstoreServer) -> list[dict[str, object]]:
    return [json.loads(e) for e in server.app.audit.reader.entries(0, 100_000)]


def test_a_restored_backup_cannot_bring_a_deleted_account_back(tmp_path: Path, database_url: str | None,
                                                               log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "data", database_url=database_url,
                         **{"audit.tiles": str(tmp_path / "tiles"), "audit.publish_every_s": 0.2})
    with running_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest = bearer(new_key(server.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        put: dict[str, list[str]] = {GONE: [], KEPT: []}
        for account in (GONE, GONE, KEPT):
            meta = metadata(identity=clip_pb2.ClipIdentity(account_id=account, device_serial="SN-1"))
            put[account].append(clips.PutClip(put_requests(meta, b"\x07" * 5000), metadata=ingest,
                                              timeout=30).clip.clip_id)
        rows = [server.app.clips.find(clip_id) for clip_id in put[GONE]]
        _published(server)
    restore = backup(config)

    with running_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        deleted = account_pb2_grpc.AccountServiceStub(channel).DeleteAccount(
            account_pb2.DeleteAccountRequest(account_id=GONE), metadata=ingest, timeout=30)
        assert deleted.deleted_clips == 2
        server.app.access_reports.build(KEPT, Actor(id="p_app", role="ingest", request_id="before-restore"))
        _published(server)

    restore()  # the backup still holds the account's keys, its pseudonym mapping and its clip rows
    ref = rows[0].account_ref
    engine = sa.create_engine(config.effective_database_url)
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM account_keys WHERE account_ref = :r"), {"r": ref}) == 1
    engine.dispose()

    with running_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        for clip_id in put[GONE]:
            with pytest.raises(grpc.RpcError) as err:
                clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip_id), metadata=ingest, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(err.value).reason in ("CLIP_NOT_FOUND", "ACCOUNT_DELETED")
        assert not clips.ListClips(clip_pb2.ListClipsRequest(account_id=GONE), metadata=ingest, timeout=10).clips
        kept = clips.GetClip(clip_pb2.GetClipRequest(clip_id=put[KEPT][0]), metadata=ingest, timeout=10).clip
        assert kept.identity.account_id == KEPT
        for row in rows:  # the backup's wrapped data keys open under nothing this service holds
            with pytest.raises(AccountKeysDestroyed):
                server.app.keyring.unwrap(WrappedDek(key_version=row.key_version, blob=row.wrapped_dek),
                                          account_ref=ref, clip_id=row.clip_id)
        assert server.app.accounts.find(GONE) is None
        entries = _entries(server)
        assert [e["target"]["account_ref"] for e in entries if e["action"] == "account.delete"] == [ref]
        replays = [e for e in entries if e["action"] == "account.delete_replay"]
        assert [(e["actor"], e["target"]["account_ref"]) for e in replays] == [
            ({"id": "system", "role": "startup"}, ref)]
        # The access chain's index is restored with the entries: the next report still runs from the
        # account's first chained entry (the request made after the backup).
        report = server.app.access_reports.build(KEPT, Actor(id="p_app", role="ingest", request_id="after"))
        verified = verify_report(report.report, server.app.audit.signer.verifier, account_id=KEPT)
        assert verified.chain_start and [a.action for a in verified.accesses] == [
            "account.access_report", "clip.identity_read", "account.access_report"]  # GetClip above read it
        size = _published(server)
    assert '"audit.restored_from_published"' in log_stream.getvalue()

    with running_server(config) as server:  # replayed once: a later start finds nothing left to erase
        assert [e for e in _entries(server) if e["action"] == "account.delete_replay"] == replays
    vkey = server.app.audit.signer.verifier.key_string()
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", "--tiles", str(tmp_path / "tiles"),
                             "--key", vkey], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"OK size={size} "), result
