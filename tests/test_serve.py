"""`clipstore serve` for operators: dependencies checked at start (one JSON line naming the setting and the
fix, exit 2), a development-mode banner, and per-service health that follows the dependencies."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health, health_pb2

from clipstore.cli import main
from clipstore.client import ClipstoreClient
from clipstore.config import Config, load_config
from clipstore.dependencies import DependencyError, DependencyMonitor, check_at_start, database_probe, root_key_probe
from clipstore.logs import configure_logging
from clipstore.server import SERVICE_NAMES, ClipstoreServer, running_server
from kms import AwsKms, LocalKms
from tests.conftest import make_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def bucket(moto_endpoint: str) -> str:
    name = f"clips-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def kms_key(moto_endpoint: str) -> str:
    return boto3.client("kms", endpoint_url=moto_endpoint).create_key()["KeyMetadata"]["KeyId"]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, bucket: str, kms_key: str) -> dict[str, str]:
    """The whole stack on moto, configured the way an operator would: environment variables."""
    env = {"CLIPSTORE_S3_BUCKET": bucket, "CLIPSTORE_S3_ENDPOINT_URL": moto_endpoint,
           "CLIPSTORE_KMS_KEY_ID": kms_key, "CLIPSTORE_KMS_ENDPOINT_URL": moto_endpoint}
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")  # what `serve` sets; restored after the test
    return env


@pytest.fixture
def stderr_lines(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[], list[str]]]:
    yield lambda: capsys.readouterr().err.splitlines()
    configure_logging()


def _serve(tmp_path: Path) -> int:
    return main(["serve", "--data-dir", str(tmp_path / "data"), "--listen", "127.0.0.1:0"])


def _one_line(lines: list[str]) -> dict[str, str]:
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert event["event"] == "server.start_failed" and event["level"] == "error"
    return event


@pytest.mark.parametrize(("change", "setting", "says"), [
    ({"CLIPSTORE_S3_BUCKET": "no-such-bucket"}, "s3.bucket",
     "bucket no-such-bucket does not exist; create it (aws s3 mb s3://no-such-bucket) or fix s3.bucket"),
    ({"CLIPSTORE_KMS_KEY_ID": "alias/no-such-key"}, "kms.key_id",
     "KMS key 'alias/no-such-key' does not exist in us-east-1; create it (aws kms create-key) or fix kms.key_id"),
    ({"AWS_DEFAULT_REGION": None}, "kms.region",
     "no AWS region is configured; set kms.region (CLIPSTORE_KMS_REGION) or AWS_DEFAULT_REGION"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
      "AWS_CONFIG_FILE": "/nonexistent"}, "kms", "no AWS credentials found; set AWS_PROFILE"),
    ({"CLIPSTORE_DATABASE_URL": "postgresql://svc:hunter2@127.0.0.1:1/clipstore"}, "database_url",
     "cannot connect to postgresql://svc:***@127.0.0.1:1/clipstore"),
], ids=["bucket", "key", "region", "credentials", "database"])
def test_serve_stops_at_start_with_one_line_naming_the_setting_and_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aws_env: dict[str, str], stderr_lines: Callable[[], list[str]],
        change: dict[str, str | None], setting: str, says: str) -> None:
    for var, value in change.items():
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert _serve(tmp_path) == 2
    event = _one_line(stderr_lines())
    assert event["setting"] == setting and says in event["error"], event
    assert "hunter2" not in json.dumps(event)
    assert not (tmp_path / "data").exists()  # nothing was created before the dependencies answered


def test_a_tiles_bucket_without_object_lock_is_refused_when_tiles_are_to_be_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_endpoint: str, bucket: str,
        stderr_lines: Callable[[], list[str]]) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)  # how the publisher's S3 client finds moto
    monkeypatch.setenv("GRPC_VERBOSITY", "NONE")
    monkeypatch.setenv("CLIPSTORE_AUDIT_TILES", f"s3://{bucket}/log")
    monkeypatch.setenv("CLIPSTORE_AUDIT_TILES_RETAIN_DAYS", "2555")
    assert _serve(tmp_path) == 2
    event = _one_line(stderr_lines())
    assert event["setting"] == "audit.tiles_retain_days" and "has no Object Lock" in event["error"]

    locked = f"tiles-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    monkeypatch.setenv("CLIPSTORE_AUDIT_TILES", f"s3://{locked}/log")
    check_at_start(load_config(overrides={"data_dir": str(tmp_path / "data")}))  # versioned and lockable: fine
    monkeypatch.setenv("CLIPSTORE_AUDIT_TILES", "s3://no-such-tiles/log")
    with pytest.raises(DependencyError, match="audit.tiles: bucket no-such-tiles does not exist"):
        check_at_start(load_config(overrides={"data_dir": str(tmp_path / "data")}))


def test_serve_answers_with_exactly_one_line_on_its_real_stderr(tmp_path: Path, aws_env: dict[str, str]) -> None:
    env = {**os.environ, "CLIPSTORE_S3_BUCKET": "no-such-bucket"}
    env.pop("GRPC_VERBOSITY")  # serve must quiet gRPC's C core itself
    done = subprocess.run([sys.executable, "-m", "clipstore", "serve", "--data-dir", str(tmp_path / "d"),
                           "--listen", "127.0.0.1:0"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert _one_line(done.stderr.splitlines())["setting"] == "s3.bucket"


def test_the_stack_on_moto_passes_the_start_checks(aws_env: dict[str, str], tmp_path: Path) -> None:
    config = load_config(overrides={"data_dir": str(tmp_path / "data")})  # the environment names bucket and key
    assert config.s3 is not None and config.kms is not None
    check_at_start(config)


def test_serve_stderr_is_json_only_even_when_grpc_core_has_something_to_say(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "GRPC_"))}
    with taken:  # gRPC's C core reports a failed bind on stderr in its own format, unless told not to
        done = subprocess.run([sys.executable, "-m", "clipstore", "serve", "--data-dir", str(tmp_path / "d"),
                               "--listen", f"127.0.0.1:{taken.getsockname()[1]}"], env=env, capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert _one_line(done.stderr.splitlines())["setting"] == "listen"


def test_dev_mode_banner_says_where_it_listens_where_the_data_is_and_what_to_run_next(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "GRPC_"))}
    env["CLIPSTORE_LOG_LEVEL"] = "warning"  # and the log level setting holds back the info lines
    proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve", "--data-dir", str(data), "--listen",
                             "127.0.0.1:0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        banner = [proc.stdout.readline() for _ in range(6)]
        listening, data_line, _, next_line, command, _ = banner
        assert listening.startswith("clipstore ") and "development mode" in listening
        address = listening.split(" serving on ")[1].split()[0]
        assert str(data.resolve()) in data_line
        assert next_line.startswith("next:")
        argv = command.split()
        assert argv[:3] == ["clipstore", "principals", "create"] and argv[argv.index("--data-dir") + 1] == str(data)
        created = subprocess.run([sys.executable, "-m", "clipstore", *argv[1:]], env=env, capture_output=True,
                                 text=True, timeout=60, check=True)
        key = created.stdout.split("api_key=")[1].split()[0]
        with ClipstoreClient(address, api_key=key) as client:  # the next command's key works on that address
            assert client.health() == "SERVING"
            assert list(client.list_clips("acct-1")) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert stderr == ""  # started, served two calls, stopped: nothing at warning or above


# -- health follows the dependencies ----------------------------------------------------------------------

def _statuses(server: ClipstoreServer) -> dict[str, str]:
    with ClipstoreClient(f"127.0.0.1:{server.port}") as client:
        return {name: client.health(name) for name in ("", *SERVICE_NAMES)}


def test_health_is_not_serving_for_the_services_that_need_a_missing_bucket(
        tmp_path: Path, moto_endpoint: str, bucket: str, kms_key: str, log_stream: io.StringIO) -> None:
    config: Config = make_config(tmp_path / "data", **{"s3.bucket": bucket, "s3.endpoint_url": moto_endpoint,
                                                       "kms.key_id": kms_key, "kms.endpoint_url": moto_endpoint})
    with running_server(config) as server:
        assert set(_statuses(server).values()) == {"SERVING"}
        boto3.client("s3", endpoint_url=moto_endpoint).delete_bucket(Bucket=bucket)
        assert server.dependencies.check() == {"blob_store": "BlobNotFound"}
        down = {name for name, status in _statuses(server).items() if status == "NOT_SERVING"}
        assert down == {"", "clipstore.v1.ClipService", "clipstore.v1.AccountService", "clipstore.v1.ReviewService"}
        boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=bucket)
        assert server.dependencies.check() == {}
        assert set(_statuses(server).values()) == {"SERVING"}
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [(e["event"], e["dependency"]) for e in events if e["event"].startswith("dependency.")] == \
        [("dependency.down", "blob_store"), ("dependency.up", "blob_store")]


def test_an_unreachable_root_key_or_database_takes_down_every_service_that_needs_it(tmp_path: Path) -> None:
    servicer = health.HealthServicer()
    unreachable_kms = AwsKms("alias/root", endpoint_url="http://127.0.0.1:1", region="us-east-1", retry_attempts=1)
    kms_down = DependencyMonitor({"root_key": root_key_probe(unreachable_kms)}, servicer, SERVICE_NAMES)
    assert kms_down.check() == {"root_key": "KmsUnavailable"}
    up = {name for name in SERVICE_NAMES if _status(servicer, name) == "SERVING"}
    assert up == {"clipstore.v1.AuditService", "clipstore.v1.PrincipalAdminService"}

    local = LocalKms.from_file(tmp_path / "root.key")
    db_down = DependencyMonitor({"root_key": root_key_probe(local),
                                 "database": database_probe(sa.create_engine("postgresql+psycopg://x@127.0.0.1:1/x"))},
                                servicer, SERVICE_NAMES)
    assert set(db_down.check()) == {"database"}
    assert {_status(servicer, name) for name in ("", *SERVICE_NAMES)} == {"NOT_SERVING"}


def _status(servicer: health.HealthServicer, service: str) -> str:
    response = servicer.Check(health_pb2.HealthCheckRequest(service=service), None)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def test_dev_mode_banner_names_where_the_root_key_database_and_blobs_are(
        tmp_path: Path, moto_endpoint: str, bucket: str, kms_key: str) -> None:
    # The banner said "(root key, database, blobs)" after the data dir whatever the configuration: with the
    # root in AWS KMS there is no root key there, and "root key: AWS KMS" did not say which key.
    from clipstore.cli import _banner_where
    local = _banner_where(make_config(tmp_path / "data"))
    assert "(root key, database, blobs)" in local and "root key: local file; blobs: files" in local
    aws = _banner_where(make_config(tmp_path / "data", **{
        "s3.bucket": bucket, "s3.endpoint_url": moto_endpoint, "kms.key_id": kms_key,
        "kms.endpoint_url": moto_endpoint}))
    data_line, where_line = aws.splitlines()
    assert data_line.endswith("(database)") and "root key" not in data_line
    assert f"root key: AWS KMS key {kms_key}; blobs: s3://{bucket}" in where_line


def test_dev_mode_banner_never_prints_the_database_password(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The next-command hint repeated database_url as it was, password included (from a config file or the
    # environment, where it was kept out of sight), to stdout.
    import argparse
    from types import SimpleNamespace

    from clipstore.cli import _banner
    config = make_config(tmp_path / "data", database_url="postgresql://clipstore:s3cret-pw@127.0.0.1:5432/cs")
    _banner(SimpleNamespace(app=SimpleNamespace(config=config), port=50051), argparse.Namespace(config=None))
    out = capsys.readouterr().out
    assert "s3cret-pw" not in out
    assert "--database-url 'postgresql://clipstore:<redacted>@127.0.0.1:5432/cs'" in out
