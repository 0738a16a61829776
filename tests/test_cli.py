"""`clipstore` as a user runs it: subprocesses, real signals, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipstore.config import ConfigError, default, load_config


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "XDG_"))}
    return {**env, "HOME": str(home), **extra}


def _clipstore(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clipstore", *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_defaults_are_embedded_on_loopback_under_home(tmp_path: Path) -> None:
    config = load_config(env={"HOME": str(tmp_path)})
    assert config.listen == default("listen") == "127.0.0.1:50051"
    assert config.effective_database_url.startswith("sqlite:///")
    assert config.s3 is None and config.kms is None


def test_serve_with_no_config_creates_data_dir_and_answers_health_then_exits_0_on_sigterm(
        tmp_path: Path) -> None:
    # No flags and no config file; only the port is made ephemeral so tests can run in parallel.
    env = _env(tmp_path, CLIPSTORE_LISTEN="127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        started = json.loads(proc.stderr.readline())
        assert started["event"] == "server.started"
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        data_dir = tmp_path / ".local" / "share" / "clipstore"
        assert (data_dir / "root.key").stat().st_mode & 0o777 == 0o600
        assert (data_dir / "clipstore.db").is_file() and (data_dir / "blobs").is_dir()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        events = [json.loads(line)["event"] for line in proc.stderr.read().splitlines()]
        assert events[-1] == "server.stopped"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(("toml", "key"), [
    ('[s3]\nendpoint_url = "http://127.0.0.1:5000"\n', "s3.bucket"),
    ('listen = "0.0.0.0:7000"\n', "listen"),
    ('listen = "nonsense"\n', "listen"),
    ('max_message_bytes = "lots"\n', "max_message_bytes"),
    ('database_url = "mysql://x"\n', "database_url"),
    ('colour = "blue"\n', "colour"),
    ("this is = not toml [\n", "config"),
])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    config_file = tmp_path / "clipstore.toml"
    config_file.write_text(toml)
    result = _clipstore("serve", "--config", str(config_file), "--data-dir", str(tmp_path / "d"),
                        env=_env(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # a server's stderr is JSON lines
    event = json.loads(line)
    assert event["setting"] == key and event["error"].startswith(f"config error: {key}: ")


@pytest.mark.parametrize("command", [("audit", "export", "--out", "export"), ("db", "current"), ("purge",),
                                     ("principals", "create", "--role", "ingest", "--name", "x")])
def test_local_commands_with_the_database_down_exit_2_with_one_line_naming_it(tmp_path: Path,
                                                                               command: tuple[str, ...]) -> None:
    """Nothing listens on port 1: one line naming database_url and the fix, never a traceback or the password."""
    result = _clipstore(*command, "--data-dir", str(tmp_path / "d"), "--database-url",
                        "postgresql://clipstore:s3cret-pw@127.0.0.1:1/clipstore", env=_env(tmp_path))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("config error: database_url: cannot connect") and "CLIPSTORE_DATABASE_URL" in line
    assert "s3cret-pw" not in result.stderr + result.stdout


def test_db_current_on_a_data_dir_without_a_database_says_so_and_creates_nothing(tmp_path: Path) -> None:
    """It created an empty clipstore.db (and the dir) and answered 'empty: no revision applied', so a mistyped
    --data-dir looked like a blank database."""
    result = _clipstore("db", "current", "--data-dir", str(tmp_path / "typo"), env=_env(tmp_path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: no database at {tmp_path / 'typo'}/clipstore.db; give the server's --data-dir, " \
                            "--database-url or --config\n"
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("command", [("audit", "export", "--out", "{tmp}/export"), ("purge",), ("purge", "--dry-run"),
                                     ("keys", "retire", "--account-id", "a", "--below", "2"),
                                     ("keys", "migrate-root", "--to-kms-key-id", "alias/x", "--dry-run")])
def test_maintenance_commands_on_a_data_dir_without_a_database_make_no_fresh_deployment(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    """A mistyped --data-dir made a new root key, database and audit log: `audit export` then printed a brand-new
    verifier key (the one the README tells security teams to pin) for a log of its own export entry."""
    result = _clipstore(*(c.format(tmp=tmp_path) for c in command), "--data-dir", str(tmp_path / "typo"),
                        env=_env(tmp_path))
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == f"error: no database at {tmp_path / 'typo'}/clipstore.db; give the server's --data-dir, " \
                            "--database-url or --config\n"
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("flags", [("--to", "9999"), ("--from", "nope")])
def test_db_sql_with_an_unknown_revision_is_one_line_not_a_traceback(tmp_path: Path, flags: tuple[str, ...]) -> None:
    result = _clipstore("db", "sql", *flags, env=_env(tmp_path))
    assert result.returncode == 2 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result
    assert result.stderr.startswith("error: ") and "(clipstore db history)" in result.stderr


def test_env_var_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"CLIPSTORE_SHUTDOWN_GRACE_S": "-1"})
    assert caught.value.key == "shutdown_grace_s"


def test_principal_key_is_printed_once_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    result = _clipstore("principals", "create", "--role", "ingest", "--name", "asr-backend",
                        "--data-dir", str(data_dir), env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    key = result.stdout.split("api_key=")[1].split()[0]
    assert key.startswith("csk_") and len(key) >= 40
    assert key not in result.stderr
    for path in data_dir.rglob("clipstore.db*"):
        assert key.encode() not in path.read_bytes()


def test_review_sample_rate_0_switches_review_off(tmp_path: Path) -> None:
    from clipstore.server import running_server
    from clipstore.v1 import clip_pb2_grpc
    from tests.clip_helpers import metadata, put_requests
    from tests.conftest import bearer, new_key
    assert load_config(env={"CLIPSTORE_REVIEW_SAMPLE_RATE": "0"}).review_sample_rate == 0
    config = load_config(env={}, overrides={"data_dir": str(tmp_path / "d"), "listen": "127.0.0.1:0",
                                            "review.sample_rate": 0, "review.default_allow": True})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        key = new_key(srv.app, "ingest")
        for _ in range(5):  # eligible: account allows review, wake word heard, not expired
            clips.PutClip(put_requests(metadata(), b"a" * 1000), metadata=bearer(key), timeout=10)
        assert srv.app.review.queue_depth() == 0


@pytest.mark.parametrize("value", ["-0.1", "nan", "inf", "1.5"])
def test_review_sample_rate_outside_0_to_1_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"CLIPSTORE_REVIEW_SAMPLE_RATE": value})
    assert caught.value.key == "review.sample_rate"


def test_every_file_the_service_writes_is_private_even_under_a_permissive_umask(tmp_path: Path) -> None:
    from clipstore.app import App
    from clipstore.auth import create_principal
    data_dir = tmp_path / "d"
    previous = os.umask(0o022)  # what most shells hand a service
    try:
        app = App(load_config(env={}, overrides={"data_dir": str(data_dir)}))
        try:
            create_principal(app.principals, app.audit, role="ingest", name="writer")  # -wal and -shm exist now
            files = {p.name: p.stat().st_mode & 0o777 for p in data_dir.iterdir()}
        finally:
            app.close()
    finally:
        os.umask(previous)
    assert {"root.key", "clipstore.db", "clipstore.db-wal", "clipstore.db-shm", "blobs"} <= set(files)
    assert files == {name: 0o700 if name == "blobs" else 0o600 for name in files}
    assert data_dir.stat().st_mode & 0o777 == 0o700


def _make_data_dir(tmp_path: Path) -> Path:
    data_dir = tmp_path / "d"
    result = _clipstore("principals", "create", "--role", "ingest", "--name", "x", "--data-dir", str(data_dir),
                        env=_env(tmp_path))
    assert result.returncode == 0, result.stderr
    return data_dir


def _link_root_key(data_dir: Path) -> str:
    (data_dir / "root.key").rename(data_dir / "elsewhere.key")
    (data_dir / "root.key").symlink_to(data_dir / "elsewhere.key")
    return "replace it with the key file itself"


@pytest.mark.parametrize(("spoil", "key", "says"), [
    (lambda d: d.chmod(0o755) or "chmod 700", "data_dir", "{d} is accessible to group or others (mode 755)"),
    (lambda d: (d / "clipstore.db").chmod(0o644) or "chmod 600", "database_url", "{d}/clipstore.db is accessible"),
    (lambda d: (d / "clipstore.db").chmod(0o660) or "chmod 600", "database_url", "{d}/clipstore.db is accessible"),
    (lambda d: os.chown(d, 65534, 65534) or "chown", "data_dir", "{d} is owned by uid 65534"),
    (lambda d: os.chown(d / "clipstore.db", 65534, 65534) or "chown", "database_url", "{d}/clipstore.db is owned"),
    (lambda d: (d / "root.key").chmod(0o640) or "chmod 600", "data_dir", "{d}/root.key is readable by others"),
    (_link_root_key, "data_dir", "{d}/root.key is a symbolic link"),
], ids=["dir-world-readable", "db-world-readable", "db-group-writable", "dir-other-owner", "db-other-owner",
        "root-key-group-readable", "root-key-symlink"])
def test_serve_refuses_a_data_dir_others_can_reach_with_one_line_and_exit_2(
        tmp_path: Path, spoil: object, key: str, says: str) -> None:
    if os.geteuid() != 0 and "owned" in says:
        pytest.skip("changing a file's owner needs root")
    data_dir = _make_data_dir(tmp_path)
    fix = spoil(data_dir)  # type: ignore[operator]
    result = _clipstore("serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0", env=_env(tmp_path))
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # a server's stderr is JSON lines
    event = json.loads(line)
    assert event["setting"] == key and event["error"].startswith(f"config error: {key}: {says.format(d=data_dir)}")
    assert (f"; run: {fix}" if fix.startswith("ch") else fix) in event["error"]  # one form (root.key said "run chmod")


def test_one_principal_may_not_be_allowed_every_worker() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env={"CLIPSTORE_SERVER_MAX_WORKERS": "16", "CLIPSTORE_SERVER_MAX_CALLS_PER_PRINCIPAL": "16"})
    assert caught.value.key == "server.max_calls_per_principal"


def test_version_prints_the_package_version() -> None:
    from clipstore import __version__
    out = subprocess.run([sys.executable, "-m", "clipstore", "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == f"clipstore {__version__}"


def test_purge_and_retire_dry_runs_count_and_change_nothing(tmp_path: Path) -> None:
    from clipstore.app import App
    from clipstore.clips import NewClip
    from clipstore.unit import OPERATOR
    from tests.clip_helpers import Chunks
    from tests.conftest import FakeClock, make_config
    clock = FakeClock()
    data = tmp_path / "data"
    app = App(make_config(data), clock=clock)
    try:
        new = NewClip(account_id="acct-dry", device_serial="S", device_type="", locale="en-US", captured_at=None,
                      wake_word=False, content_type="audio/opus", idempotency_key="k1", duration_ms=10)
        app.clips.ingest(new, Chunks([b"audio"]), OPERATOR)
        clock.advance(30 * 86400)  # past the accidental-activation retention
        assert app.clips.purge_plan(older_than_s=-1) == (1, 0, 0)
        ref = app.accounts.require("acct-dry").account_ref
        app.accounts.rotate_key("acct-dry", OPERATOR)  # version 2; the clip is rewrapped to it
        assert app.accounts.retire_key_versions("acct-dry", 2, OPERATOR, dry_run=True) == 1
        assert [r.retired for r in app.keyring.versions(ref)] == [False, False]  # nothing changed
        assert app.clips.purge_plan(older_than_s=-1) == (1, 0, 0)
    finally:
        app.close()
    out = subprocess.run([sys.executable, "-m", "clipstore", "purge", "--dry-run", "--data-dir", str(data)],
                         capture_output=True, text=True, check=True).stdout
    assert "dry run: nothing changed" in out


def _anonymous_calls(port: int, calls: int) -> None:
    from clipstore.v1 import clip_pb2, clip_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for _ in range(calls):
            with pytest.raises(grpc.RpcError):
                clip_pb2_grpc.ClipServiceStub(channel).GetClip(clip_pb2.GetClipRequest(clip_id="c_x"), timeout=10)


def test_audit_peer_pseudonym_prints_what_the_server_wrote_for_an_address_in_any_form(tmp_path: Path) -> None:
    from clipstore.server import running_server
    from tests.conftest import make_config
    data = tmp_path / "data"
    with running_server(make_config(data, **{"audit.denial_summary_s": 3600})) as srv:
        _anonymous_calls(srv.port, 3)
        srv.denials.flush()
        [summary] = [json.loads(e) for e in srv.app.audit.reader.entries(0, 10_000) if b'"auth.deny_summary"' in e]
    written = summary["outcome"]["reason"].split()[1]
    assert written.startswith("peer=pp_")
    env = _env(tmp_path)
    for form in ("127.0.0.1", "ipv4:127.0.0.1", "ipv4:127.0.0.1:53122", "::ffff:127.0.0.1"):
        out = _clipstore("audit", "peer-pseudonym", form, "--data-dir", str(data), env=env)
        assert (out.returncode, out.stdout, out.stderr) == (0, f"{written}\n", ""), form
    other = _clipstore("audit", "peer-pseudonym", "ipv6:[::1]", "--data-dir", str(data), env=env)
    assert other.returncode == 0 and other.stdout.startswith("peer=pp_") and other.stdout != f"{written}\n"


def test_audit_peer_pseudonym_refuses_a_non_address_and_creates_nothing_where_no_server_ran(tmp_path: Path) -> None:
    env = _env(tmp_path)
    bad = _clipstore("audit", "peer-pseudonym", "example.org", "--data-dir", str(tmp_path / "d"), env=env)
    assert bad.returncode == 2 and "not an IPv4 or IPv6 address: 'example.org'" in bad.stderr
    wrong = _clipstore("audit", "peer-pseudonym", "203.0.113.7", "--data-dir", str(tmp_path / "typo"), env=env)
    assert wrong.returncode == 2 and "no root key at" in wrong.stderr and wrong.stdout == ""
    assert not (tmp_path / "typo").exists()  # no root key, no database made for a pseudonym nobody wrote
    from clipstore.store import Database
    from kms import LocalKms
    (tmp_path / "old").mkdir(mode=0o700)
    LocalKms.from_file(tmp_path / "old" / "root.key")
    Database(f"sqlite:///{tmp_path / 'old' / 'clipstore.db'}").close()  # a schema, but no server has started
    (tmp_path / "old" / "clipstore.db").chmod(0o600)  # as the service would have made it
    keyless = _clipstore("audit", "peer-pseudonym", "203.0.113.7", "--data-dir", str(tmp_path / "old"), env=env)
    assert keyless.returncode == 1 and "no peer pseudonym key" in keyless.stderr and keyless.stdout == ""


def test_audit_peer_pseudonym_creates_no_database_where_only_a_root_key_is(tmp_path: Path) -> None:
    # A data dir with the root key but another (or no) database: reading must not leave an empty SQLite file
    # there, which a later `serve` with this data dir would take for the deployment's database.
    from kms import LocalKms
    (tmp_path / "keyonly").mkdir(mode=0o700)
    LocalKms.from_file(tmp_path / "keyonly" / "root.key")
    out = _clipstore("audit", "peer-pseudonym", "203.0.113.7", "--data-dir", str(tmp_path / "keyonly"),
                     env=_env(tmp_path))
    assert out.returncode == 2 and "no database at" in out.stderr and out.stdout == ""
    assert sorted(p.name for p in (tmp_path / "keyonly").iterdir()) == ["root.key"]


@pytest.mark.parametrize("command", [("audit", "export", "--out", "{tmp}/export"), ("purge", "--dry-run"),
                                     ("keys", "retire", "--account-id", "a", "--below", "2")])
def test_maintenance_commands_on_an_empty_server_database_make_no_fresh_deployment(
        tmp_path: Path, pg_url: str, command: tuple[str, ...]) -> None:
    """The check for a data dir without a database covered SQLite only: a --database-url naming a PostgreSQL
    database (or schema) clipstore never set up (a mistyped name that exists, the server's default database)
    got a fresh deployment made in it, and `audit export` printed a brand-new verifier key."""
    result = _clipstore(*(c.format(tmp=tmp_path) for c in command), "--data-dir", str(tmp_path / "d"),
                        "--database-url", pg_url, env=_env(tmp_path))
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.startswith("error: no clipstore database at postgresql://"), result.stderr
    engine = sa.create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == []  # nothing made there
    finally:
        engine.dispose()
    current = _clipstore("db", "current", "--data-dir", str(tmp_path / "d"), "--database-url", pg_url,
                         env=_env(tmp_path))
    assert (current.returncode, current.stdout) == (0, "empty: no revision applied\n"), current
