"""Shared fixtures: a real server on an ephemeral loopback port, real stubs."""

from __future__ import annotations

import io
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from clipstore.app import App
from clipstore.auth import create_principal
from clipstore.config import Config, load_config
from clipstore.logs import configure_logging
from clipstore.server import ClipstoreServer, running_server

# Tests never reach AWS: fake credentials, no instance metadata, one region.
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_var, None)
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's server on an ephemeral loopback port, for code that takes an endpoint_url."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[attr-defined]
    finally:
        server.stop()


def make_config(data_dir: Path, **overrides: object) -> Config:
    # Off unless a test turns it on: most tests fetch made-up bytes and compare them with what they stored.
    return load_config(env={}, overrides={"data_dir": str(data_dir), "listen": "127.0.0.1:0",
                                          "review.watermark": "off", **overrides})


# -- PostgreSQL: the local server when it answers; under CI=true it must --------------
PG_ADMIN = os.environ.get("CLIPSTORE_TEST_PG", "host=127.0.0.1 port=5432 dbname=test user=postgres")


def _pg_available() -> str | None:
    try:
        import psycopg
        with psycopg.connect(PG_ADMIN, connect_timeout=3):
            return None
    except Exception as exc:  # why it is unavailable, for the skip message
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@pytest.fixture(scope="session")
def pg_problem() -> str | None:
    problem = _pg_available()
    if problem and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but PostgreSQL is not reachable ({problem}); .ci/run should have started it")
    return problem


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh schema on the PostgreSQL server (as a URL whose search_path is that schema), dropped afterwards."""
    import psycopg
    conninfo = psycopg.conninfo.conninfo_to_dict(PG_ADMIN)
    schema = "cs_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    user = conninfo.get("user", "postgres")
    host, port, db = conninfo.get("host", "127.0.0.1"), conninfo.get("port", "5432"), conninfo.get("dbname", "test")
    try:
        yield f"postgresql://{user}@{host}:{port}/{db}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def pg_url(pg_problem: str | None) -> Iterator[str]:
    """A fresh schema on the PostgreSQL server, dropped afterwards."""
    if pg_problem:
        pytest.skip(f"no PostgreSQL at {PG_ADMIN!r} ({pg_problem}); set CLIPSTORE_TEST_PG to a libpq "
                    "connection string of a server where this user may create schemas")
    with pg_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """Run the test on the embedded SQLite file and on PostgreSQL."""
    return None if request.param == "sqlite" else request.getfixturevalue("pg_url")


@pytest.fixture
def config(tmp_path: Path, database_url: str | None) -> Config:
    return make_config(tmp_path / "data", database_url=database_url)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything structlog writes during the test, as JSON lines."""
    stream = io.StringIO()
    configure_logging(stream)
    yield stream
    configure_logging()


@pytest.fixture
def server(config: Config, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    with running_server(config) as srv:
        yield srv


@pytest.fixture
def channel(server: ClipstoreServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def new_key(app: App, role: str, name: str = "test") -> str:
    _, key = create_principal(app.principals, app.audit, role=role, name=name)
    return key


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
def keys(server: ClipstoreServer) -> dict[str, str]:
    """One API key per role, created through the real principal store."""
    return {role: new_key(server.app, role, f"{role}-svc")
            for role in ("ingest", "reviewer", "safety", "auditor", "admin")}


class FakeClock:
    """An injected clock tests move by hand."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> FakeClock:
    """The injected clock of a test's server (`srv`); modules override `srv` for their own config."""
    return FakeClock()


@pytest.fixture
def srv(tmp_path: Path, database_url: str | None, clock: FakeClock, log_stream: io.StringIO
        ) -> Iterator[ClipstoreServer]:
    """A server on loopback driven by `clock`, on SQLite and PostgreSQL."""
    with running_server(make_config(tmp_path / "data", database_url=database_url), clock=clock) as server:
        yield server
