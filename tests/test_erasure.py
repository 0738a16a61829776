"""What DeleteAccount leaves in the live database files (issue 11, item 3): nothing of the account's keys.

SQLite keeps old page images in its write-ahead log until a checkpoint resets it; deleted key rows must not
survive there (nor, with secure_delete, in the database file's free pages).
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import sqlalchemy as sa

from clipstore.server import ClipstoreServer, running_server
from clipstore.store import schema
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import bearer, make_config, new_key
from tests.db_helpers import database_bytes


def _column(server: ClipstoreServer, column: sa.Column) -> list[bytes]:  # type: ignore[type-arg]
    with server.app.db.read() as conn:
        return [bytes(v) for v in conn.scalars(sa.select(column))]


def test_after_account_deletion_no_sqlite_file_holds_its_wrapped_keys(tmp_path: Path,
                                                                     log_stream: io.StringIO) -> None:
    with running_server(make_config(tmp_path / "data")) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        md = bearer(new_key(server.app, "ingest"))
        clips, accounts = clip_pb2_grpc.ClipServiceStub(channel), account_pb2_grpc.AccountServiceStub(channel)
        for _ in range(3):
            clips.PutClip(put_requests(metadata(), b"voice" * 1000), metadata=md, timeout=30)
        accounts.RotateAccountKey(account_pb2.RotateAccountKeyRequest(account_id=ACCOUNT_ID), metadata=md,
                                  timeout=10)  # two key versions, every DEK rewrapped
        secrets = {"wrapped account key": _column(server, schema.account_keys.c.wrapped_kek),
                   "account lookup HMAC": _column(server, schema.accounts.c.lookup_hmac),
                   "wrapped clip key": _column(server, schema.clips.c.wrapped_dek)}
        assert len(secrets["wrapped account key"]) == 2 and len(secrets["wrapped clip key"]) == 3
        files = dict(database_bytes(server))
        assert any(k in files["clipstore.db-wal"] for k in secrets["wrapped account key"])  # where it used to stay

        accounts.DeleteAccount(account_pb2.DeleteAccountRequest(account_id=ACCOUNT_ID), metadata=md, timeout=10)
        files = dict(database_bytes(server))
        assert {"clipstore.db", "clipstore.db-wal"} <= set(files)
        for name, data in files.items():
            for what, values in secrets.items():
                for value in values:
                    assert value not in data, f"a {what} survives in {name}"
