"""Access reports: the account holder's verifiable list of every human access to their clips.

Through the real server and stubs: a report verifies offline with `auditlog verify-report`; removing,
adding or altering any entry, proof, checkpoint or binding fails with a message naming the part;
an omitted access is detected even when the proof is rebuilt for what is left; another account's
entries never appear; the request itself is audited."""

# ruff: noqa: F811  (the World fixtures of tests/test_review.py, imported by name)
from __future__ import annotations

import base64
import json
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from auditlog.__main__ import main as auditlog_main
from auditlog.__main__ import verify_report_file
from auditlog.access import AccountChains
from auditlog.entry import entry_hash
from auditlog.errors import EntryError
from auditlog.multiproof import multiproof_ranges
from auditlog.note import NoteSigner, sign_note
from auditlog.report import MAX_REPORT_BYTES, ReportError, verify_report
from clipstore.server import running_server
from clipstore.unit import AuditRecord
from clipstore.v1 import account_pb2, account_pb2_grpc, clip_pb2, clip_pb2_grpc, common_pb2, review_pb2, safety_pb2
from tests.clip_helpers import ACCOUNT_ID, SERIAL, metadata, put_requests
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info
from tests.test_review import World, review_config, srv, w  # noqa: F401 (fixtures)

OTHER_ID = "amzn1.account.OTHEREXAMPLE7"
Report = dict[str, Any]


def _reviewed(w: World) -> str:
    """Both accounts' clips granted, heard; one flagged, the flag read and resolved. The reviewer's id."""
    w.opt_in()
    w.opt_in(OTHER_ID)
    captured = Timestamp(seconds=int(w.clock.now()) - 5)
    w.put(captured_at=captured)
    w.put(identity=clip_pb2.ClipIdentity(account_id=OTHER_ID, device_serial=SERIAL), captured_at=captured)
    r = w.enroll()
    token = w.session(r)
    for flag in (True, False):
        assignment = w.next(r, token)
        grant = w.grant(r, token, assignment.assignment_id)
        w.fetch(r, token, grant.grant, grant.review_clip_id)
        if flag:
            r.stub.FlagClip(review_pb2.FlagClipRequest(session_token=token, assignment_id=assignment.assignment_id,
                                                       category=common_pb2.FLAG_CATEGORY_DISTRESS, note="crying"),
                            metadata=r.md, timeout=10)
    listed = w.safety.ListEscalations(safety_pb2.ListEscalationsRequest(), metadata=w.safety_md, timeout=10)
    w.safety.ResolveEscalation(safety_pb2.ResolveEscalationRequest(
        escalation_id=listed.escalations[0].escalation_id, resolution="referred"), metadata=w.safety_md, timeout=10)
    return r.id


def _ask(w: World, account_id: str = ACCOUNT_ID, nonce: str = "n0nce", **window: Timestamp
         ) -> account_pb2.GetAccessReportResponse:
    return w.accounts.GetAccessReport(account_pb2.GetAccessReportRequest(account_id=account_id, nonce=nonce,
                                                                         **window), metadata=w.ingest, timeout=30)


def _ref(w: World, account_id: str) -> str:
    account = w.server.app.accounts.find(account_id)
    assert account is not None
    return account.account_ref


def test_a_report_verifies_offline_and_lists_every_access_by_pseudonym(
        w: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reviewer_id = _reviewed(w)
    response = _ask(w)
    path = tmp_path / "report.json"
    path.write_bytes(response.report)
    key = w.server.app.audit.signer.verifier.key_string()
    argv = ["verify-report", str(path), "--key", key, "--account-id", ACCOUNT_ID, "--nonce", "n0nce"]
    assert auditlog_main([*argv, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["result"] == "OK" and result["account_ref"] == _ref(w, ACCOUNT_ID)
    assert result["tree_size"] == response.tree_size and result["from_first_access"] is True
    accesses = result["accesses"]
    mine = [a for a in accesses if a["action"] != "account.access_report"]
    assert {a["action"] for a in mine} >= {"grant.issue", "clip.fetch"}
    reviewers = {a["who"] for a in mine if a["role"] == "reviewer"}
    assert len(reviewers) == 1 and reviewer_id not in reviewers and next(iter(reviewers)).startswith("rv_")
    assert all(a["captured_at"].endswith("Z") for a in mine)
    assert accesses[-1]["action"] == "account.access_report"  # asking is an access too, and on record
    assert auditlog_main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith(f"OK account={_ref(w, ACCOUNT_ID)} ") and "listened" in table and reviewer_id not in table


def test_the_request_is_audited_in_the_accounts_own_chain(w: World) -> None:
    _reviewed(w)
    _ask(w, nonce="first")
    _ask(w, nonce="second")
    requests = [e for e in w.entries() if e["action"] == "account.access_report"]
    assert [(e["target"]["account_ref"], e["outcome"]["reason"]) for e in requests] == [
        (_ref(w, ACCOUNT_ID), "nonce=first"), (_ref(w, ACCOUNT_ID), "nonce=second")]
    assert requests[1]["target"]["account_seq"] == requests[0]["target"]["account_seq"] + 1


def test_another_accounts_entries_never_appear(w: World) -> None:
    _reviewed(w)
    mine, theirs = _ref(w, ACCOUNT_ID), _ref(w, OTHER_ID)
    other_clips = {e["target"]["clip_id"] for e in w.entries() if e["target"]["account_ref"] == theirs} - {""}
    report = _ask(w).report.decode()
    assert other_clips and theirs not in report and not any(c in report for c in other_clips)
    entries = [json.loads(e["entry"]) for e in json.loads(report)["entries"]]
    assert {e["target"]["account_ref"] for e in entries} == {mine}


def test_the_window_hides_earlier_accesses_and_still_proves_completeness(w: World) -> None:
    _reviewed(w)
    w.clock.advance(3600)
    since = Timestamp(seconds=int(w.clock.now()) - 60)
    data = _ask(w, since=since).report
    report = verify_report(data, w.server.app.audit.signer.verifier, account_id=ACCOUNT_ID, nonce="n0nce")
    assert [a.action for a in report.accesses] == ["account.access_report"]
    assert not report.chain_start  # it starts at the fence: the last entry before the window


def test_unknown_account_and_bad_arguments_are_refused(w: World) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _ask(w, account_id="amzn1.account.NOBODY")
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    w.opt_in()
    with pytest.raises(grpc.RpcError) as caught:
        _ask(w, nonce="no spaces")
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                      "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError) as caught:
        w.accounts.GetAccessReport(account_pb2.GetAccessReportRequest(account_id=ACCOUNT_ID), metadata=w.admin,
                                   timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED  # the account-facing backend asks, not staff


# -- tampering: each part, and omission with a rebuilt proof ------------------------------------------

def _reprove(w: World, report: Report) -> Report:
    """What a dishonest server would do: a valid multiproof for whatever entries it chose to keep."""
    size = int(report["checkpoint"].split("\n")[1])
    indices = [e["index"] for e in report["entries"]]
    proof = w.server.app.audit.reader.range_roots(multiproof_ranges(indices, size))
    return {**report, "proof": [base64.b64encode(h).decode() for h in proof]}


def _entry(report: Report, n: int) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(report["entries"][n]["entry"])
    return value


def _set_entry(report: Report, n: int, entry: dict[str, Any]) -> Report:
    entries = list(report["entries"])
    entries[n] = {"index": entries[n]["index"], "entry": json.dumps(entry, sort_keys=True, separators=(",", ":"))}
    return {**report, "entries": entries}


def _without(report: Report, n: int) -> Report:
    return {**report, "entries": [e for i, e in enumerate(report["entries"]) if i != n]}


def _note_line(note: str, old: str, new: str) -> str:
    assert old in note
    return note.replace(old, new, 1)


def test_every_tampering_fails_with_a_message_naming_the_part(w: World) -> None:
    _reviewed(w)
    _ask(w, nonce="older")  # so the chain has a request entry in the middle too
    good: Report = json.loads(_ask(w).report)
    assert len(good["entries"]) >= 4  # grant, fetch, two requests (and the flag, if this account got it)
    key = w.server.app.audit.signer.verifier
    mine, theirs = _ref(w, ACCOUNT_ID), _ref(w, OTHER_ID)
    stranger = next(i for i, e in enumerate(w.server.app.audit.reader.entries(0, 10_000))
                    if json.loads(e)["target"].get("account_ref") == theirs and b'"account_seq"' in e)
    forger = NoteSigner.generate(key.name)

    def add_stranger(r: Report) -> Report:
        entries = [*r["entries"], {"index": stranger, "entry": w.server.app.audit.reader.entries(stranger, 1)[0]
                                   .decode()}]
        return _reprove(w, {**r, "entries": sorted(entries, key=lambda e: e["index"])})

    def alter_time(r: Report) -> Report:
        return _set_entry(r, 1, {**_entry(r, 1), "time": "2000-01-01T00:00:00.000Z"})

    def flip_proof(r: Report) -> Report:
        proof = list(r["proof"])
        proof[0] = base64.b64encode(bytes(32)).decode()
        return {**r, "proof": proof}

    cases: dict[str, tuple[Callable[[Report], Report], str]] = {
        "entry altered": (alter_time, "proof: computed root does not match"),
        "entry removed, proof unchanged": (lambda r: _without(r, 2), "proof: "),
        "proof hash altered": (flip_proof, "proof: computed root does not match"),
        "proof hash removed": (lambda r: {**r, "proof": r["proof"][:-1]}, "proof: proof is too short"),
        "index altered": (lambda r: {**r, "entries": [{**r["entries"][0], "index": r["entries"][0]["index"] + 1},
                                                      *r["entries"][1:]]}, "carries seq"),
        "middle access omitted, proof rebuilt": (lambda r: _reprove(w, _without(r, 2)),
                                                 "completeness: entry"),
        "newest accesses omitted, proof rebuilt": (lambda r: _reprove(w, {**r, "entries": r["entries"][:-1]}),
                                                   "completeness: the last entry"),
        "first access omitted, proof rebuilt": (lambda r: _reprove(w, _without(r, 0)),
                                                "completeness: the report starts at account_seq 2"),
        "another account's entry added": (add_stranger, "belongs to another account than the one bound"),
        "checkpoint size altered": (lambda r: {**r, "checkpoint": _note_line(
            r["checkpoint"], f"\n{r['checkpoint'].split(chr(10))[1]}\n", "\n1\n")}, "checkpoint: invalid signature"),
        "checkpoint signed by another key": (lambda r: {**r, "checkpoint": sign_note(
            r["checkpoint"].split("\n\n")[0] + "\n", forger)}, "checkpoint: note has no valid signature by the log"),
        "binding altered": (lambda r: {**r, "binding": _note_line(r["binding"], f"account-ref {mine}",
                                                                  f"account-ref {theirs}")},
                            "binding: invalid signature"),
        "binding for another request": (lambda r: {**r, "request_id": "r_other"},
                                        "binding: names another request than the report"),
    }
    assert verify_report(json.dumps(good).encode(), key, account_id=ACCOUNT_ID, nonce="n0nce")
    for name, (tamper, expected) in cases.items():
        with pytest.raises(ReportError) as caught:
            verify_report(json.dumps(tamper(good)).encode(), key, account_id=ACCOUNT_ID, nonce="n0nce")
        assert expected in str(caught.value), f"{name}: {caught.value}"
    with pytest.raises(ReportError, match="binding: binds the report to another account id"):
        verify_report(json.dumps(good).encode(), key, account_id=OTHER_ID)
    with pytest.raises(ReportError, match="completeness: the request entry .* does not carry the nonce given"):
        verify_report(json.dumps(good).encode(), key, nonce="replayed")


def test_an_omission_the_log_itself_hides_is_caught_by_the_auditors_chain_check(w: World) -> None:
    """A server that forks an account's chain (writes an access, then links the next entry past it) can
    give a report that leaves the access out; verifying the whole log names the fork."""
    _reviewed(w)
    entries = w.server.app.audit.reader.entries(0, 10_000)
    chains = AccountChains()
    for i, data in enumerate(entries):
        chains.check(data, i)  # the real log is linear
    ref = _ref(w, ACCOUNT_ID)
    last = max(i for i, e in enumerate(entries) if json.loads(e)["target"].get("account_ref") == ref
               and b'"account_seq"' in e)
    head = json.loads(entries[last])["target"]
    forged = AuditRecord(actor_id="p_x", actor_role="ingest", action="account.access_report", account_ref=ref)
    from clipstore.audit.log import entry_bytes
    skipping = entry_bytes(forged, seq=len(entries), prev=entry_hash(entries[-1]), time="2030-01-01T00:00:00.000Z",
                           account=(head["account_seq"], head["account_prev"]))  # reuses the head's seq: a fork
    with pytest.raises(EntryError, match="account chain: account_seq is .* expected"):
        chains.check(skipping, len(entries))
    unchained = entry_bytes(AuditRecord(actor_id="p_x", actor_role="reviewer", action="clip.fetch", account_ref=ref),
                            seq=len(entries), prev=entry_hash(entries[-1]), time="2030-01-01T00:00:00.000Z")
    with pytest.raises(EntryError, match="outside its account's chain"):
        chains.check(unchained, len(entries))


def test_the_python_clients_fetch_a_report_that_verifies(w: World) -> None:
    import asyncio

    from clipstore.client import AsyncClipstoreClient, ClipstoreClient
    w.opt_in()
    key = next(v for k, v in w.ingest if k == "authorization").removeprefix("Bearer ")
    target = f"127.0.0.1:{w.server.port}"
    with ClipstoreClient(target, api_key=key) as client:
        sync = client.access_report(ACCOUNT_ID, since=w.clock.now() - 60, nonce="sync")

    async def fetch() -> bytes:
        async with AsyncClipstoreClient(target, api_key=key) as client:
            return (await client.access_report(ACCOUNT_ID, nonce="async")).report

    verifier = w.server.app.audit.signer.verifier
    assert verify_report(sync.report, verifier, account_id=ACCOUNT_ID, nonce="sync").chain_start
    assert [a.action for a in verify_report(asyncio.run(fetch()), verifier, nonce="async").accesses] == [
        "account.access_report", "account.access_report"]


def test_concurrent_accesses_to_many_accounts_keep_every_chain_linear(w: World) -> None:
    """Units run on one writer: accesses committed together in a batch, for one account or many, never
    share an account_seq (the heads are read once per batch, under the writer's lock, and moved in it)."""
    import threading
    audit = w.server.app.audit

    def worker(t: int) -> None:
        for i in range(60):
            audit.append(AuditRecord(actor_id=f"p_{t}", actor_role="reviewer", action="clip.fetch",
                                     account_ref=f"acct_{(t * 60 + i) % 7}", clip_id=f"c_{t}_{i}"))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chains = AccountChains()
    entries = audit.reader.entries(0, 100_000)
    for i, data in enumerate(entries):
        chains.check(data, i)
    seqs = [json.loads(e)["target"]["account_seq"] for e in entries if b'"acct_3"' in e]
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 60
    assert audit.batches < len(entries)  # they did share batches


def test_a_window_narrowed_after_signing_fails_and_a_window_is_always_printed(
        w: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # since/until sat outside every signature: whoever relayed a report could set until before the accesses
    # (or since after them, dropping the entries before the new fence) and it still printed OK with
    # complete_through=<request time>, the window nowhere in the text.
    _reviewed(w)
    good: Report = json.loads(_ask(w).report)
    key = w.server.app.audit.signer.verifier
    first = _entry(good, 0)["time"]
    for narrowed in ({**good, "until": "2000-01-01T00:00:00.000Z"}, {**good, "since": first}):
        with pytest.raises(ReportError) as failed:
            verify_report(json.dumps(narrowed).encode(), key, account_id=ACCOUNT_ID)
        assert failed.value.where == "binding" and "window" in failed.value.reason
    until = Timestamp(seconds=int(w.clock.now()))
    path = tmp_path / "report.json"
    path.write_bytes(_ask(w, until=until).report)
    assert auditlog_main(["verify-report", str(path), "--key", key.key_string(), "--account-id", ACCOUNT_ID]) == 0
    assert " until=" in capsys.readouterr().out.splitlines()[0]


@pytest.mark.parametrize("field", ["since", "until"])
@pytest.mark.parametrize("bad", [Timestamp(seconds=10**15), Timestamp(seconds=-10**12), Timestamp(nanos=-1)])
def test_a_time_outside_the_timestamp_range_is_invalid_and_appends_nothing(w: World, field: str,
                                                                           bad: Timestamp) -> None:
    # Was INTERNAL (datetime's year range, in rfc3339) after the request entry was already appended.
    w.opt_in()
    before = len(w.entries())
    with pytest.raises(grpc.RpcError) as caught:
        _ask(w, **{field: bad})
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                                      "INVALID_ARGUMENT")
    assert field in caught.value.details() and len(w.entries()) == before


def test_a_clip_captured_in_year_30000000_is_refused_so_it_cannot_break_the_accounts_reports(w: World) -> None:
    # Stored as given, its capture time made every later report of the account fail (INTERNAL) in rfc3339.
    from tests.clip_helpers import metadata, put_requests
    meta = metadata(content_type="audio/wav", locale="en-US")
    meta.captured_at.CopyFrom(Timestamp(seconds=10**15))
    with pytest.raises(grpc.RpcError) as caught:
        w.clips.PutClip(put_requests(meta, b"RIFF" + bytes(100)), metadata=w.ingest, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "captured_at" in caught.value.details()


def test_without_account_id_the_ok_line_says_the_account_was_not_checked(
        w: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The backend asks on the holder's behalf and may ask for any account: with the holder's nonce, another
    # account's (clean) report verified OK, its acct_ pseudonym meaning nothing to the holder.
    _reviewed(w)
    path = tmp_path / "other.json"
    path.write_bytes(_ask(w, account_id=OTHER_ID, nonce="mine").report)
    argv = ["verify-report", str(path), "--key", w.server.app.audit.signer.verifier.key_string(), "--nonce", "mine"]
    assert auditlog_main(argv) == 0
    assert "account_id=UNCHECKED" in capsys.readouterr().out.splitlines()[0]
    assert auditlog_main([*argv, "--account-id", ACCOUNT_ID]) == 1
    assert "another account id" in capsys.readouterr().out


def test_a_report_file_past_the_size_limit_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    """A hostile 'report' of 1 GiB (sparse here) is refused after reading one byte past the limit."""
    huge = tmp_path / "report.json"
    with huge.open("wb") as fh:
        fh.truncate(1 << 30)
    signer = NoteSigner.generate("clipstore-audit/test")
    tracemalloc.start()
    try:
        code, result = verify_report_file(huge, signer.verifier.key_string())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == 1 and result["where"] == "report"
    assert f"at most {MAX_REPORT_BYTES} allowed" in str(result["reason"])
    assert peak < 2 * MAX_REPORT_BYTES  # the 1 GiB was never read


def test_a_report_larger_than_one_message_is_refused_with_advice_and_a_window_still_works(tmp_path: Path) -> None:
    """The server cannot send more than max_message_bytes: instead of a transport error after the request was
    recorded, REPORT_TOO_LARGE says to ask for a window; one starting after the accesses then verifies."""
    with running_server(make_config(tmp_path / "d", max_message_bytes=256 << 10)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        md = bearer(new_key(srv.app, "ingest"))
        clip_pb2_grpc.ClipServiceStub(channel).PutClip(iter(put_requests(metadata(), b"a" * 1000)), metadata=md,
                                                       timeout=20)
        ref = srv.app.accounts.require(ACCOUNT_ID).account_ref
        futures = [srv.app.audit.append_async(AuditRecord(actor_id="p_0123456789abcdef", actor_role="reviewer",
                                                          action="clip.fetch", account_ref=ref, clip_id=f"c_{i}"))
                   for i in range(600)]
        futures[-1].result(timeout=60)
        accounts = account_pb2_grpc.AccountServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            accounts.GetAccessReport(account_pb2.GetAccessReportRequest(account_id=ACCOUNT_ID), metadata=md,
                                     timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "REPORT_TOO_LARGE"
        assert "since" in (caught.value.details() or "")
        since = Timestamp(seconds=int(time.time()) + 1)
        time.sleep(1.1)  # the window starts after every access above; its fence is the refused request
        report = accounts.GetAccessReport(account_pb2.GetAccessReportRequest(account_id=ACCOUNT_ID, since=since),
                                          metadata=md, timeout=60)
        assert report.entries <= 3
        path = tmp_path / "report.json"
        path.write_bytes(report.report)
        assert auditlog_main(["verify-report", str(path), "--key", srv.app.audit.signer.verifier.key_string(),
                              "--account-id", ACCOUNT_ID]) == 0
