"""Moving an installation from its local root key to an AWS KMS key (moto), resumable and audited."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import boto3
import grpc
import sqlalchemy as sa

from clipstore.app import App
from clipstore.review.sessions import totp_context
from clipstore.server import running_server
from clipstore.store import schema
from clipstore.unit import OPERATOR
from clipstore.v1 import clip_pb2_grpc
from kms import AwsKms
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import bearer, make_config, new_key

REPO = Path(__file__).resolve().parent.parent


def _migrate(data: Path, database_url: str | None, key_id: str, endpoint: str,
             *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "clipstore", "keys", "migrate-root", "--data-dir", str(data),
           "--to-kms-key-id", key_id, "--kms-endpoint-url", endpoint, *flags]
    if database_url:
        cmd += ["--database-url", database_url]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=120, check=False)


def test_a_local_installation_moves_to_aws_kms_and_keeps_every_clip_and_secret(
        tmp_path: Path, database_url: str | None, moto_endpoint: str) -> None:
    data = tmp_path / "data"
    config = make_config(data, database_url=database_url)
    audio = secrets.token_bytes(5000)
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        md = bearer(new_key(srv.app, "ingest"))
        clip_id = clip_pb2_grpc.ClipServiceStub(channel).PutClip(put_requests(metadata(), audio), metadata=md,
                                                                 timeout=30).clip.clip_id
        totp = secrets.token_bytes(20)
        with srv.app.db.transaction() as conn:  # a reviewer's TOTP secret, wrapped by the root
            conn.execute(schema.reviewers.insert().values(
                principal_id="p_rev", locales="", wrapped_totp_secret=srv.app.root.encrypt(totp, totp_context("p_rev")),
                last_totp_step=-1, failed_attempts=0, locked_until=0.0, created_at=0.0))
    key_id = boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["KeyId"]

    dry = _migrate(data, database_url, key_id, moto_endpoint, "--dry-run")  # said "1 rewrapped", changing nothing
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == "account keys: 1 would be rewrapped, 0 already under the KMS key"
    assert dry.stdout.splitlines()[-1] == "every key opens (dry run: nothing changed)"
    assert "would move" in dry.stderr and " moved" not in dry.stderr and "next: set kms.key_id" not in dry.stdout
    first = _migrate(data, database_url, key_id, moto_endpoint)
    assert first.returncode == 0, first.stderr
    assert "account keys: 1 rewrapped" in first.stdout and "reviewer TOTP secrets: 1 rewrapped" in first.stdout
    again = _migrate(data, database_url, key_id, moto_endpoint)  # resumable: what moved stays moved
    assert again.returncode == 0 and "account keys: 0 rewrapped, 1 already" in again.stdout

    moved = make_config(data, database_url=database_url, **{"kms.key_id": key_id, "kms.endpoint_url": moto_endpoint})
    app = App(moved)
    try:
        assert isinstance(app.root, AwsKms)
        clip = app.clips.find(clip_id)
        assert clip is not None and b"".join(app.clips.audio(clip)) == audio
        assert app.clips.identities([clip], OPERATOR)[0]["account_id"] == ACCOUNT_ID  # an audited read
        with app.db.read() as conn:
            wrapped = conn.scalar(sa.select(schema.reviewers.c.wrapped_totp_secret))
        assert app.root.decrypt(bytes(wrapped), totp_context("p_rev")) == totp
        entries = [json.loads(e) for e in app.audit.reader.entries(0, app.audit.reader.size())]
        assert [e["outcome"]["result"] for e in entries if e["action"] == "root.migrate"] == \
            ["started", "ok", "started", "ok"]
    finally:
        app.close()


def test_migrating_with_a_root_key_that_is_not_this_databases_changes_nothing(
        tmp_path: Path, moto_endpoint: str) -> None:
    data = tmp_path / "data"
    App(make_config(data)).close()  # service keys wrapped by this root
    (data / "root.key").unlink()
    App(make_config(tmp_path / "other")).close()
    (tmp_path / "other" / "root.key").rename(data / "root.key")  # a root key from another installation
    key_id = boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["KeyId"]
    result = _migrate(data, None, key_id, moto_endpoint)
    assert result.returncode == 1 and "opens under neither root key" in result.stderr
