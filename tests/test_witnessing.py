"""The service publishes its log as tiles and a checkpoint cosigned by a quorum of real witnesses
(in-process `auditlog` witnesses on loopback); GetCheckpoint serves the cosigned note."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from auditlog.checkpoint import Checkpoint, sign_checkpoint
from auditlog.cosignature import CosignatureSigner, open_cosigned_checkpoint
from auditlog.merkle import consistency_proof, leaf_hash, root_hash
from auditlog.note import NoteSigner
from auditlog.witness import SIZE_CONTENT_TYPE, Witness, WitnessServer
from clipstore.app import App
from clipstore.audit.witnessing import Cosigner, WitnessEndpoint
from clipstore.server import running_server
from clipstore.unit import AuditRecord
from clipstore.v1 import audit_pb2, audit_pb2_grpc
from tests.conftest import make_config, new_key


def _wait_published(app: App, size: int, timeout_s: float = 30) -> tuple[int, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert app.publishing is not None
        app.publishing.poke()
        if app.publishing.latest and app.publishing.latest[0] >= size:
            return app.publishing.latest
        time.sleep(0.05)
    raise AssertionError(f"nothing of size >= {size} was published in {timeout_s} s")


@pytest.fixture
def log_key(tmp_path: Path, database_url: str | None) -> str:
    app = App(make_config(tmp_path / "data", database_url=database_url))
    try:
        return app.audit.signer.verifier.key_string()
    finally:
        app.close()


@pytest.fixture
def witnesses(tmp_path: Path, log_key: str) -> Iterator[list[WitnessServer]]:
    from auditlog.note import NoteVerifier
    with ExitStack() as stack:
        servers = []
        for i in range(3):
            witness = Witness.for_log_keys(CosignatureSigner.generate(f"w{i}.test"),
                                           [NoteVerifier.from_key_string(log_key)], tmp_path / f"w{i}.state")
            servers.append(stack.enter_context(WitnessServer(("127.0.0.1", 0), witness, quiet=True)))
        yield servers


def _config(tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer]) -> object:
    spec = ", ".join(f"{w.url} {w.witness.signer.verifier.key_string()}" for w in witnesses)
    return make_config(tmp_path / "data", database_url=database_url, **{
        "audit.tiles": str(tmp_path / "tiles"), "audit.witnesses": spec, "audit.witness_quorum": 2,
        "audit.publish_every_s": 0.2})


def test_checkpoints_are_published_as_tiles_only_with_a_witness_quorum(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer], log_key: str) -> None:
    wkeys = [w.witness.signer.verifier for w in witnesses]
    config = _config(tmp_path, database_url, witnesses)
    with running_server(config) as server:  # type: ignore[arg-type]
        app = server.app
        for i in range(300):
            app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest", request_id=str(i)))
        size, _ = app.audit.checkpoint()
        _, note = _wait_published(app, size)
        _, cosigs = open_cosigned_checkpoint(note, app.audit.signer.verifier, wkeys, quorum=3)
        assert len(cosigs) == 3
        # GetCheckpoint hands auditors the cosigned note.
        auditor = new_key(app, "auditor", "auditor-svc")
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            got = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(),
                                     metadata=[("authorization", f"Bearer {auditor}")], timeout=30)
        assert got.signed_note == note and got.tree_size >= size
        # Two witnesses go away: the next checkpoint is signed but not published.
        witnesses[1].shutdown()
        witnesses[2].shutdown()
        app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest"))
        newer, _ = app.audit.checkpoint()
        app.publishing.poke()  # type: ignore[union-attr]
        time.sleep(1.5)
        assert app.publishing.latest[0] < newer  # type: ignore[union-attr]
    keys = [arg for k in wkeys for arg in ("--witness", k.key_string())]
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify", "--tiles", str(tmp_path / "tiles"),
                             "--key", log_key, *keys, "--quorum", "2", "--state", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"OK size={size} "), result
    assert "witnesses=w0.test@" in result.stdout


def test_a_restarted_service_learns_each_witness_size_from_409_and_continues(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer]) -> None:
    config = _config(tmp_path, database_url, witnesses)
    for round_ in range(2):  # the second process starts knowing nothing of the witnesses' sizes
        with running_server(config) as server:  # type: ignore[arg-type]
            app = server.app
            for i in range(10):
                app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest",
                                             request_id=f"{round_}-{i}"))
            size, _ = app.audit.checkpoint()
            _wait_published(app, size)
            assert [w.witness.cosigned_size(app.audit.signer.name) for w in witnesses] == [size] * 3


def test_an_access_report_carries_the_witness_quorum_and_fails_without_it(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer], log_key: str) -> None:
    from clipstore.audit import AuditUnavailable
    from clipstore.unit import Actor
    wkeys = [arg for w in witnesses for arg in ("--witness", w.witness.signer.verifier.key_string())]
    with running_server(_config(tmp_path, database_url, witnesses)) as server:  # type: ignore[arg-type]
        app = server.app
        ref = app.accounts.find_or_create("acct-1").account_ref
        app.audit.append(AuditRecord(actor_id="p_rev", actor_role="reviewer", action="clip.fetch", account_ref=ref,
                                     clip_id="c_1"))
        report = app.access_reports.build("acct-1", Actor(id="p_app", role="ingest", request_id="req-1"),
                                          nonce="fresh")
        (tmp_path / "report.json").write_bytes(report.report)
        for w in witnesses[1:]:
            w.shutdown()
        with pytest.raises(AuditUnavailable, match="witnesses did not cosign"):
            app.access_reports.build("acct-1", Actor(id="p_app", role="ingest", request_id="req-2"))
    result = subprocess.run([sys.executable, "-m", "auditlog", "verify-report", str(tmp_path / "report.json"),
                             "--key", log_key, *wkeys, "--quorum", "2", "--nonce", "fresh", "--account-id", "acct-1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"OK account={ref} accesses=2 "), result
    assert "witnesses=w0.test@" in result.stdout and "listened" in result.stdout


class _SizeAnswer(BaseHTTPRequestHandler):
    """A witness that answers every submission 409 with `body` as its tlog size."""

    body = b""

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(409)
        self.send_header("Content-Type", SIZE_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        pass


@pytest.mark.parametrize("reported", ["\u00b2", "\u0661"], ids=["superscript-two", "arabic-indic-one"])
def test_a_witness_reporting_its_size_in_non_ascii_digits_is_skipped_and_the_others_still_cosign(
        tmp_path: Path, reported: str) -> None:
    """Before, str.isdigit() let '²' through to int(), whose ValueError ended the whole round: one witness
    could stop every checkpoint from being published; '١' was read as size 1."""
    log = NoteSigner.generate("clipstore-audit/size-answer")
    honest = CosignatureSigner.generate("witness.test/honest")
    odd = CosignatureSigner.generate("witness.test/odd")
    handler = type("Handler", (_SizeAnswer,), {"body": reported.encode() + b"\n"})
    leaves = [leaf_hash(b"%d" % i) for i in range(3)]
    note = sign_checkpoint(Checkpoint(origin=log.name, size=3, root=root_hash(leaves)), log)
    with WitnessServer(("127.0.0.1", 0), Witness.for_log_keys(honest, [log.verifier], tmp_path / "state"),
                       quiet=True) as good, ThreadingHTTPServer(("127.0.0.1", 0), handler) as bad:
        threading.Thread(target=bad.serve_forever, daemon=True).start()
        try:
            cosigner = Cosigner(log.verifier, [WitnessEndpoint(good.url, honest.verifier),
                                               WitnessEndpoint(f"http://127.0.0.1:{bad.server_address[1]}",
                                                               odd.verifier, last_size=1)],
                                1, lambda old, new: consistency_proof(leaves[:new], old))
            cosigned = cosigner.cosign(note)
            cosigner.close()
        finally:
            bad.shutdown()
    _, cosignatures = open_cosigned_checkpoint(cosigned, log.verifier, [honest.verifier, odd.verifier], 1)
    assert [c.witness for c in cosignatures] == ["witness.test/honest"]


def _count_submissions(witnesses: list[WitnessServer]) -> list[int]:
    """A counter of the add-checkpoint requests the witnesses answered, all together."""
    seen = [0]
    lock = threading.Lock()
    for server in witnesses:
        original = server.witness.add_checkpoint

        def counted(body: bytes, original: Any = original) -> Any:
            with lock:
                seen[0] += 1
            return original(body)
        server.witness.add_checkpoint = counted  # type: ignore[method-assign]
    return seen


def test_concurrent_access_reports_share_one_checkpoint_and_witness_round(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer], log_key: str) -> None:
    """Before, every GetAccessReport signed and stored a checkpoint and sent it to every witness: 24 calls
    in flight (one principal's limit) made 24 checkpoints and 72 witness requests, at request rate."""
    from concurrent.futures import ThreadPoolExecutor

    from auditlog.note import NoteVerifier
    from auditlog.report import verify_report
    from clipstore.v1 import account_pb2, account_pb2_grpc
    from tests.conftest import bearer

    config = make_config(tmp_path / "data", database_url=database_url, **{
        "audit.witnesses": ", ".join(f"{w.url} {w.witness.signer.verifier.key_string()}" for w in witnesses),
        "audit.witness_quorum": 2, "audit.publish_every_s": 3600, "audit.report_checkpoint_min_interval_s": 2.0})
    wkeys = [w.witness.signer.verifier for w in witnesses]
    with running_server(config) as server:
        app = server.app
        app.accounts.find_or_create("acct-1")
        ingest = new_key(app, "ingest", "app")

        def stored_checkpoints() -> int:
            with app.db.read() as conn:
                return int(conn.exec_driver_sql("SELECT count(*) FROM audit_checkpoints").scalar() or 0)

        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = account_pb2_grpc.AccountServiceStub(channel)

            def ask(i: int) -> bytes:
                return bytes(stub.GetAccessReport(account_pb2.GetAccessReportRequest(
                    account_id="acct-1", nonce=f"n{i}"), metadata=bearer(ingest), timeout=60).report)

            ask(0)  # the first report of a quiet service waits for no interval
            time.sleep(2.1)  # the interval has passed: the next report starts its round at once
            started = time.monotonic()
            ask(1)
            assert time.monotonic() - started < 1.9  # had it waited for an interval, >= 2 s (a round: ~0.1 s)
            before, submissions = stored_checkpoints(), _count_submissions(witnesses)
            with ThreadPoolExecutor(24) as pool:
                reports = list(pool.map(ask, range(2, 26)))
            rounds, sent = stored_checkpoints() - before, submissions[0]
    for i, report in enumerate(reports, start=2):
        verified = verify_report(report, NoteVerifier.from_key_string(log_key), witnesses=wkeys, quorum=2,
                                 account_id="acct-1", nonce=f"n{i}")
        assert len(verified.cosignatures) >= 2
    assert 1 <= rounds <= 3, rounds
    assert sent <= 3 * len(witnesses), sent
