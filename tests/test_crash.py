"""SIGKILL during a live workload: after restart, nothing acknowledged is lost and no unit of work is half there."""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auditlog.__main__ import verify_dir
from auditlog.verify import check_chain
from clipstore.app import App
from clipstore.audit.export import export_log
from clipstore.store import schema
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


# A process that runs units of work from 8 threads as fast as the writer takes them and prints each
# acknowledged unit: its effect is a principal row, its entry names that row.
_UNIT_WORKLOAD = """
import sys, threading
from clipstore.app import App
from clipstore.store.db import connection
from clipstore.unit import Actor
from clipstore.config import load_config
from clipstore.store import schema

app = App(load_config(env={}, overrides={"data_dir": sys.argv[1], "listen": "127.0.0.1:0",
                                         "database_url": sys.argv[2] or None}))
actor, printing = Actor(id="crash-test", role="admin"), threading.Lock()

def unit_for(pid):
    def unit(tx):
        connection(tx).execute(schema.principals.insert().values(id=pid, name="crash", role="admin", created_at=tx.now,
                                                             disabled=False))
        tx.audit(actor.record("crash.unit", principal_id=pid))
    return unit

def worker(n):
    for i in range(10**9):
        pid = f"p_crash_{sys.argv[3]}_{n}_{i}"
        app.audit.run(unit_for(pid))
        with printing:
            print(pid, flush=True)

for n in range(8):
    threading.Thread(target=worker, args=(n,), daemon=True).start()
threading.Event().wait()
"""


def _run_units_until_killed(data: Path, database_url: str | None, round_: int) -> set[str]:
    """Start the workload, let it run at full speed, SIGKILL it at a random point; the units it acknowledged."""
    proc = subprocess.Popen([sys.executable, "-c", _UNIT_WORKLOAD, str(data), database_url or "", str(round_)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None
    acked: set[str] = set()
    deadline = time.monotonic() + 60
    while len(acked) < 100 and time.monotonic() < deadline:  # the writer is never idle from here on
        line = proc.stdout.readline()
        assert line, "the workload died on its own"
        acked.add(line.strip())
    time.sleep(random.uniform(0, 0.02))  # out of step with the acknowledgements: anywhere in a batch
    os.kill(proc.pid, signal.SIGKILL)
    acked |= {line.strip() for line in proc.stdout.read().splitlines() if line.strip()}  # printed before the kill
    proc.wait()
    assert len(acked) >= 100
    return acked


def test_sigkill_mid_batch_leaves_every_unit_with_both_its_effect_and_its_entry_or_neither(
        tmp_path: Path, database_url: str | None) -> None:
    acked = set().union(*(_run_units_until_killed(tmp_path / "data", database_url, i) for i in range(3)))
    app = App(make_config(tmp_path / "data", database_url=database_url))
    try:
        with app.db.read() as conn:
            effects = {pid for pid in conn.scalars(sa.select(schema.principals.c.id))
                       if pid.startswith("p_crash_")}
        entries = app.audit.reader.entries(0, app.audit.reader.size())
        check_chain(entries)
        recorded = [json.loads(e)["target"]["principal_id"] for e in entries
                    if json.loads(e)["action"] == "crash.unit"]
        assert effects == set(recorded)  # no effect without its entry, no entry without its effect
        assert len(recorded) == len(effects)  # and no unit recorded twice
        assert acked <= effects  # nothing acknowledged was lost
    finally:
        app.close()
