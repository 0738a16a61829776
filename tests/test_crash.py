"""SIGKILL during a live ingest workload: after restart, nothing acknowledged is lost."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auditlog.__main__ import verify_dir
from auditlog.verify import check_chain
from clipstore.app import App
from clipstore.audit.export import export_log
from clipstore.v1 import clip_pb2_grpc
from tests.clip_helpers import metadata, put_requests
from tests.conftest import bearer, make_config

REPO = Path(__file__).parent.parent


def _env(data: Path, database_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSTORE_")}
    env.update({"CLIPSTORE_DATA_DIR": str(data), "CLIPSTORE_LISTEN": "127.0.0.1:0"})
    if database_url:
        env["CLIPSTORE_DATABASE_URL"] = database_url
    return env


def _start(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve"], env=env, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stderr is not None
    started = json.loads(proc.stderr.readline())
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, int(started["port"])


def test_sigkill_mid_workload_loses_no_acknowledged_clip_and_the_chain_verifies(
        tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "data"
    env = _env(data, database_url)
    created = subprocess.run([sys.executable, "-m", "clipstore", "principals", "create", "--role", "ingest",
                              "--name", "crash-test"], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    key = created.stdout.split("api_key=")[1].split()[0]
    proc, port = _start(env)
    acked: dict[str, int] = {}
    lock, stop = threading.Lock(), threading.Event()

    def client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = clip_pb2_grpc.ClipServiceStub(channel)
            while not stop.is_set():
                audio = secrets.token_bytes(secrets.randbelow(200_000) + 1000)
                try:
                    clip = stub.PutClip(put_requests(metadata(), audio, chunk=16_384), metadata=bearer(key),
                                        timeout=10).clip
                except grpc.RpcError:
                    return  # the server died under us: this clip was never acknowledged
                with lock:
                    acked[clip.clip_id] = len(audio)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 25 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # mid-stream: clients are in the middle of uploads
    proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 25

    app = App(make_config(data, database_url=database_url))
    try:
        for clip_id, size in acked.items():  # every acknowledged clip is there and decrypts
            row = app.clips.find(clip_id)
            assert row is not None, f"acknowledged clip {clip_id} lost"
            assert len(b"".join(app.clips.audio(row))) == size
        rows = app.clips._clips.list_by_account(row.account_ref, after="", limit=100_000)
        for r in rows:  # no row without its object
            assert app.blobs.size(r.clip_id) == r.sealed_bytes
        entries = app.audit.reader.entries(0, app.audit.reader.size())
        check_chain(entries)
        ingested = {json.loads(e)["target"]["clip_id"] for e in entries
                    if json.loads(e)["action"] == "clip.ingest" and b'"result":"ok"' in e}
        assert set(acked) <= ingested
        app.clips.sweep_orphans(older_than_s=-1)  # objects of uploads the crash cut off
        assert {k for k in app.blobs.list_keys(older_than_s=-1)} == {r.clip_id for r in rows}
        size = export_log(app.audit, tmp_path / "export", actor_id="test", actor_role="auditor")
        assert verify_dir(tmp_path / "export", app.audit.signer.verifier.key_string(), None)[0] == 0
        assert size >= len(acked)
    finally:
        app.close()

    proc, port = _start(env)  # and the service comes back
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            clip_pb2_grpc.ClipServiceStub(channel).PutClip(put_requests(metadata(), b"after the crash"),
                                                           metadata=bearer(key), timeout=10)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
