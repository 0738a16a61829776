"""The audit log inside the service: appends, group commit, proofs, export, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from auditlog.access import AccountChains
from auditlog.checkpoint import open_checkpoint
from auditlog.merkle import (
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_hash,
    verify_consistency,
    verify_inclusion,
)
from auditlog.note import NoteVerifier
from auditlog.verify import check_chain
from clipstore.app import App
from clipstore.config import Config
from clipstore.server import ClipstoreServer
from clipstore.unit import AuditRecord
from clipstore.v1 import audit_pb2, audit_pb2_grpc, clip_pb2, clip_pb2_grpc
from tests.conftest import bearer, make_config
from tests.grpc_helpers import error_info


def _record(i: int) -> AuditRecord:
    return AuditRecord(actor_id="p_test", actor_role="ingest", action="clip.ingest", clip_id=f"c_{i}",
                       account_ref="acct_test", request_id=f"r{i}")


@pytest.fixture
def app(config: Config) -> Iterator[App]:
    app = App(config)
    yield app
    app.close()


def test_concurrent_appends_keep_one_chain_and_share_commits(app: App) -> None:
    threads, per_thread = 16, 100
    seqs: list[int] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        for i in range(per_thread):
            seq = app.audit.append(_record(t * per_thread + i))
            with lock:
                seqs.append(seq)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    total = threads * per_thread
    assert sorted(seqs) == list(range(total))
    entries = app.audit.reader.entries(0, total + 1)
    assert len(entries) == total
    leaves = check_chain(entries)
    assert app.audit.reader.root(total) == root_hash(leaves)
    assert app.audit.batches < total  # group commit: many appends per transaction


def test_stored_subtree_proofs_equal_proofs_from_all_leaves(app: App) -> None:
    for i in range(37):
        app.audit.append(_record(i))
    leaves = [leaf_hash(e) for e in app.audit.reader.entries(0, 37)]
    for size in (1, 2, 5, 8, 13, 32, 37):
        assert app.audit.reader.root(size) == root_hash(leaves[:size])
        for index in range(size):
            assert app.audit.reader.inclusion_proof(index, size) == inclusion_proof(leaves[:size], index)
        for old in range(1, size + 1):
            assert app.audit.reader.consistency_proof(old, size) == consistency_proof(leaves[:size], old)


def test_checkpoints_are_signed_every_n_entries(tmp_path: Path, database_url: str | None) -> None:
    app = App(make_config(tmp_path / "d", database_url=database_url, **{"audit.checkpoint_every_entries": 10}))
    try:
        for i in range(25):
            app.audit.append(_record(i))
        time.sleep(0.2)
        latest = app.audit.reader.latest_checkpoint()
        assert latest is not None and latest[0] >= 20
        cp = open_checkpoint(latest[1], app.audit.signer.verifier)
        assert cp.root == app.audit.reader.root(cp.size)
    finally:
        app.close()


def test_checkpoints_are_signed_after_t_seconds(tmp_path: Path, database_url: str | None) -> None:
    app = App(make_config(tmp_path / "d", database_url=database_url, **{"audit.checkpoint_every_s": 0.2}))
    try:
        app.audit.append(_record(0))
        deadline = time.monotonic() + 10
        while app.audit.reader.latest_checkpoint() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.audit.reader.latest_checkpoint() == (1, app.audit.reader.latest_checkpoint()[1])
    finally:
        app.close()


def test_auditor_reads_checkpoint_entries_and_proofs_over_grpc(
        server: ClipstoreServer, channel: grpc.Channel, keys: dict[str, str]) -> None:
    clips = clip_pb2_grpc.ClipServiceStub(channel)
    for _ in range(5):  # denials naming a principal are audited one by one: they grow the log
        with pytest.raises(grpc.RpcError):
            clips.GetClip(clip_pb2.GetClipRequest(clip_id="c"), metadata=bearer(keys["reviewer"]), timeout=5)
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    md = bearer(keys["auditor"])
    first = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md, timeout=5)
    verifier = NoteVerifier.from_key_string(first.verifier_key)
    server.app.audit.checkpoint()
    cp_resp = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=md, timeout=5)
    cp = open_checkpoint(cp_resp.signed_note, verifier)
    assert (cp.size, cp.root) == (cp_resp.tree_size, cp_resp.root_hash) and cp.size >= 10
    page = stub.ListEntries(audit_pb2.ListEntriesRequest(start_index=0, page_size=cp.size), metadata=md, timeout=5)
    leaves = check_chain(page.entries)
    assert len(leaves) == cp.size
    denials = [json.loads(e) for e in page.entries if json.loads(e)["action"] == "auth.deny"]
    assert len(denials) >= 5 and denials[0]["outcome"] == {"result": "denied", "reason": "WRONG_ROLE"}
    for index in range(cp.size):
        proof = stub.GetInclusionProof(audit_pb2.GetInclusionProofRequest(index=index, tree_size=cp.size),
                                       metadata=md, timeout=5)
        assert proof.leaf_hash == leaves[index]
        verify_inclusion(proof.leaf_hash, index, cp.size, list(proof.proof), cp.root)
    if first.tree_size:
        old = open_checkpoint(first.signed_note, verifier)
        resp = stub.GetConsistencyProof(audit_pb2.GetConsistencyProofRequest(old_size=old.size, new_size=cp.size),
                                        metadata=md, timeout=5)
        verify_consistency(old.size, cp.size, old.root, cp.root, list(resp.proof))


@pytest.mark.parametrize(("request_", "code", "field"), [
    (audit_pb2.GetInclusionProofRequest(index=0, tree_size=0), grpc.StatusCode.INVALID_ARGUMENT, "tree_size"),
    (audit_pb2.GetInclusionProofRequest(index=5, tree_size=5), grpc.StatusCode.INVALID_ARGUMENT, "index"),
    (audit_pb2.GetInclusionProofRequest(index=0, tree_size=10**9), grpc.StatusCode.OUT_OF_RANGE, "tree_size"),
    (audit_pb2.GetConsistencyProofRequest(old_size=0, new_size=1), grpc.StatusCode.INVALID_ARGUMENT, "old_size"),
    (audit_pb2.GetConsistencyProofRequest(old_size=1, new_size=10**9), grpc.StatusCode.OUT_OF_RANGE, "new_size"),
    (audit_pb2.ListEntriesRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT, "page_size"),
])
def test_bad_audit_requests_name_the_field(channel: grpc.Channel, keys: dict[str, str], request_: object,
                                           code: grpc.StatusCode, field: str) -> None:
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    method = {"GetInclusionProofRequest": stub.GetInclusionProof, "GetConsistencyProofRequest":
              stub.GetConsistencyProof, "ListEntriesRequest": stub.ListEntries}[type(request_).__name__]
    with pytest.raises(grpc.RpcError) as caught:
        method(request_, metadata=bearer(keys["auditor"]), timeout=5)
    assert caught.value.code() == code
    assert error_info(caught.value).metadata["field"] == field


def test_failed_append_fails_the_rpc(server: ClipstoreServer, channel: grpc.Channel, keys: dict[str, str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(batch: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(server.app.audit, "_write", broken)
    with pytest.raises(grpc.RpcError) as caught:
        audit_pb2_grpc.AuditServiceStub(channel).ListEntries(audit_pb2.ListEntriesRequest(),
                                                             metadata=bearer(keys["auditor"]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "AUDIT_UNAVAILABLE"


def _cli(*args: str, home: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSTORE_")}
    return subprocess.run([sys.executable, "-m", "clipstore", *args], env={**env, "HOME": str(home), **extra},
                          capture_output=True, text=True, timeout=120)


def test_export_then_auditlog_verify_ok_and_tamper_detected(tmp_path: Path) -> None:
    data = str(tmp_path / "d")
    for role in ("ingest", "auditor"):
        assert _cli("principals", "create", "--role", role, "--name", role, "--data-dir", data,
                    home=tmp_path).returncode == 0
    result = _cli("audit", "export", "--out", str(tmp_path / "x"), "--data-dir", data, home=tmp_path)
    assert result.returncode == 0, result.stderr
    vkey = (tmp_path / "x" / "verifier.key").read_text().strip()
    verify = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(tmp_path / "x"), "--key", vkey],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stdout.startswith("OK size=3 root="), verify
    lines = (tmp_path / "x" / "entries.jsonl").read_bytes().splitlines()
    lines[0] = lines[0].replace(b"principal.create", b"principal.delete")
    (tmp_path / "x" / "entries.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    verify = subprocess.run([sys.executable, "-m", "auditlog", "verify", str(tmp_path / "x"), "--key", vkey],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1 and verify.stdout.startswith("FAIL entry 0: edited")


def test_verify_against_a_running_server(server: ClipstoreServer, keys: dict[str, str], tmp_path: Path) -> None:
    vkey = server.app.audit.signer.verifier.key_string()
    result = _cli("audit", "verify", "--server", f"127.0.0.1:{server.port}", "--key", vkey, home=tmp_path,
                  CLIPSTORE_API_KEY=keys["auditor"])  # never in argv
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK size=")



def test_verify_against_a_running_server_with_a_witness_and_no_quorum_needs_its_cosignature(
        server: ClipstoreServer, keys: dict[str, str], tmp_path: Path) -> None:
    """No witness cosigns this server's checkpoints: naming one without --quorum was OK (quorum 0)."""
    from auditlog.cosignature import CosignatureSigner
    vkey = server.app.audit.signer.verifier.key_string()
    witness = CosignatureSigner.generate("w0.test").verifier.key_string()
    result = _cli("audit", "verify", "--server", f"127.0.0.1:{server.port}", "--key", vkey, "--witness", witness,
                  home=tmp_path, CLIPSTORE_API_KEY=keys["auditor"])
    assert result.returncode == 1 and "0 valid witness cosignatures, the quorum is 1" in result.stdout, result

_APPENDER = """
import sys
from clipstore.app import App
from clipstore.unit import AuditRecord
from tests.conftest import make_config
app = App(make_config(sys.argv[1], database_url=sys.argv[2] if len(sys.argv) > 2 else None))
i = 0
while True:
    seq = app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest", request_id=str(i)))
    print(seq, flush=True)
    i += 1
"""


def test_sigkill_between_appends_loses_no_acknowledged_entry(tmp_path: Path, database_url: str | None) -> None:
    data = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(data), *([database_url] if database_url else [])],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    acked: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(int(line))
        if len(acked) >= 300:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    app = App(make_config(data, database_url=database_url))
    try:
        size = app.audit.reader.size()
        assert size >= max(acked) + 1
        entries = app.audit.reader.entries(0, size)
        check_chain(entries)
        app.audit.append(_record(0))  # the log keeps growing after the crash
        assert app.audit.reader.size() == size + 1
        check_chain(app.audit.reader.entries(0, size + 1))
    finally:
        app.close()


_BOUNDED_APPENDER = """
import sys, time
from clipstore.app import App
from clipstore.unit import AuditRecord
from tests.conftest import make_config
app = App(make_config(sys.argv[1], database_url=sys.argv[2]))
time.sleep(max(0.0, float(sys.argv[5]) - time.time()))  # both replicas start appending together
for i in range(0, int(sys.argv[4]), 4):
    # every entry an access to one shared account: both replicas move its access chain
    batch = [app.audit.append_async(AuditRecord(actor_id=sys.argv[3], actor_role="reviewer", action="clip.fetch",
                                                account_ref="acct_shared", request_id=str(i + j)))
             for j in range(4)]
    for f in batch:
        f.result()
app.close()
"""


def test_two_processes_on_one_postgresql_keep_a_single_chain(tmp_path: Path, pg_url: str) -> None:
    data = tmp_path / "shared"  # replicas share the root key (in production: AWS KMS) and the database
    App(make_config(data, database_url=pg_url)).close()
    per_process = 400
    start = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", _BOUNDED_APPENDER, str(data), pg_url, f"replica-{n}",
                               str(per_process), start], cwd=Path(__file__).parent.parent) for n in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    app = App(make_config(data, database_url=pg_url))
    try:
        size = app.audit.reader.size()
        entries = app.audit.reader.entries(0, size)
        leaves = check_chain(entries)
        actors = [json.loads(e)["actor"]["id"] for e in entries]
        assert actors.count("replica-0") == actors.count("replica-1") == per_process
        assert app.audit.reader.root(size) == root_hash(leaves)
        chains = AccountChains()  # one account chain across both writers: neither reused a stale head
        for i, data in enumerate(entries):
            chains.check(data, i)
        assert [json.loads(e)["target"]["account_seq"] for e in entries if b"acct_shared" in e] == \
            list(range(1, 2 * per_process + 1))
        interleaved = sum(1 for a, b in zip(actors, actors[1:], strict=False) if a != b)
        assert interleaved > 1, "the two writers never overlapped; the test proved nothing"
    finally:
        app.close()
