"""A PostgreSQL outage, for real: the server reaches the database through a TCP relay the test cuts and
restores. Every authenticated call reads its principal on a pooled DBAPI connection first
(`clipstore.store.plain.fetch_one_pooled`); during the outage each must answer UNAVAILABLE /
DATABASE_UNAVAILABLE (retryable, no driver text), and once the database is back the same calls succeed on
fresh connections (no dead or half-finished connection left in the pool)."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from clipstore.interceptors import translate
from clipstore.server import running_server
from clipstore.store import Database
from clipstore.v1 import (
    clip_pb2,
    clip_pb2_grpc,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
)
from tests.clip_helpers import metadata, put_requests
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info


class Relay:
    """127.0.0.1:<port> -> PostgreSQL's port; `cut()` closes the listener and every relayed connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(32)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._listener = self._listen(self.port)


@pytest.fixture
def relay(pg_url: str) -> Iterator[tuple[Relay, str]]:
    relay = Relay(("127.0.0.1", 5432))
    try:
        yield relay, pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}", 1)
    finally:
        relay.cut()


def test_every_authenticated_path_answers_database_unavailable_during_an_outage_and_recovers_after(
        tmp_path: Path, relay: tuple[Relay, str], log_stream: io.StringIO) -> None:
    link, url = relay
    assert "127.0.0.1:5432" not in url
    config = make_config(tmp_path / "data", database_url=url)
    with running_server(config) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        ingest, reviewer, admin = (bearer(new_key(server.app, role)) for role in ("ingest", "reviewer", "admin"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        clip = clips.PutClip(put_requests(metadata(), b"\x01" * 1000), metadata=ingest, timeout=30).clip
        calls: dict[str, Callable[[], Any]] = {
            "GetClip": lambda: clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=ingest,
                                             timeout=10),
            "PutClip": lambda: clips.PutClip(put_requests(metadata(idempotency_key="k2"), b"\x02" * 1000),
                                             metadata=ingest, timeout=10),
            "StartReviewSession": lambda: review_pb2_grpc.ReviewServiceStub(channel).StartReviewSession(
                review_pb2.StartReviewSessionRequest(totp_code="000000"), metadata=reviewer, timeout=10),
            "ListPrincipals": lambda: principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).ListPrincipals(
                principal_admin_pb2.ListPrincipalsRequest(), metadata=admin, timeout=10),
        }
        for name, call in calls.items():  # the pool holds live connections to the relay
            try:
                call()
            except grpc.RpcError as err:
                assert err.code() != grpc.StatusCode.UNAVAILABLE, name

        link.cut()
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            down = caught.value
            assert (down.code(), error_info(down).reason) == \
                (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"), (name, down.details())
            assert "psycopg" not in (down.details() or "") and "SELECT" not in (down.details() or ""), name

        link.restore()
        # Answered at once (a denial is an answer): the pool pings what it hands out, and the audit writer,
        # whose connection died while it was idle, runs its batch again on a new one.
        for name, call in calls.items():
            _answered(name, call)
        assert clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=ingest,
                             timeout=10).clip.clip_id == clip.clip_id


def _answered(name: str, call: Callable[[], Any]) -> None:
    """Answered by the service: OK, or a denial; never UNAVAILABLE."""
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() != grpc.StatusCode.UNAVAILABLE, (name, err.details())


def test_postgresql_connections_notice_a_vanished_peer_and_the_url_may_say_otherwise(pg_url: str) -> None:
    """Keepalives both ways, a TCP user timeout and an idle-in-transaction timeout (a client gone mid-transaction
    gives its locks back in minutes, not after the server's 2 h keepalive), each a default the URL may override,
    its own `options` (here the test schema's search_path) kept."""
    def settings(url: str) -> tuple[dict[str, str], dict[str, str]]:
        db = Database(url)
        try:
            with db.read() as conn:
                shown = {name: str(conn.exec_driver_sql(f"SHOW {name}").scalar())
                         for name in ("idle_in_transaction_session_timeout", "tcp_keepalives_idle", "search_path")}
                return shown, conn.connection.dbapi_connection.info.get_parameters()
        finally:
            db.engine.dispose()

    shown, params = settings(pg_url)
    assert shown["idle_in_transaction_session_timeout"] == "5min" and shown["tcp_keepalives_idle"] == "30"
    assert shown["search_path"].startswith("cs_")
    assert (params["keepalives"], params["keepalives_idle"], params["tcp_user_timeout"]) == ("1", "30", "60000")

    schema = shown["search_path"]
    own = pg_url.split("?")[0] + (f"?keepalives_idle=7&options=-csearch_path%3D{schema}%20"
                                  "-cidle_in_transaction_session_timeout%3D1s")
    shown, params = settings(own)
    assert shown["idle_in_transaction_session_timeout"] == "1s" and shown["search_path"] == schema
    assert params["keepalives_idle"] == "7"
    db = Database(own)
    try:  # and the server enforces it: a transaction left idle loses its connection
        with db.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            time.sleep(1.5)
            with pytest.raises(sa.exc.DBAPIError, match="idle-in-transaction") as caught:
                conn.exec_driver_sql("SELECT 1")
        # psycopg names it an InternalError (SQLSTATE 25P03); the connection is gone all the same: retryable
        answer = translate(caught.value)
        assert answer is not None and answer.reason == "DATABASE_UNAVAILABLE"
    finally:
        db.engine.dispose()
