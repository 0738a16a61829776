"""The whole review flow under mTLS: every party, the reviewer included, is a client certificate."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clipstore.auth import create_principal
from clipstore.server import ClipstoreServer, running_server
from clipstore.tls import write_dev_certs
from clipstore.totp import code_at
from clipstore.v1 import (
    account_pb2,
    account_pb2_grpc,
    clip_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
)
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import FakeClock, make_config
from tests.enrolment_helpers import create_reviewer, enrol, redeem, totp_secret_bytes
from tests.grpc_helpers import error_info

AUDIO = bytes(range(256)) * 300


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    write_dev_certs(out, [("asr", "ingest"), ("root", "admin"), ("alice", "reviewer")])
    return out


@pytest.fixture
def srv(tmp_path: Path, certs: Path, database_url: str | None, clock: FakeClock, log_stream: io.StringIO
        ) -> Iterator[ClipstoreServer]:
    config = make_config(tmp_path / "data", database_url=database_url, **{
        "tls.cert_file": str(certs / "server.pem"), "tls.key_file": str(certs / "server.key"),
        "tls.client_ca_file": str(certs / "ca.pem"), "review.sample_rate": 1.0})
    with running_server(config, clock=clock) as server:
        for role, name in (("ingest", "asr"), ("admin", "root")):  # the operator's bootstrap, by SPIFFE id
            create_principal(server.app.principals, server.app.audit, role=role, name=name,
                             spiffe_id=f"spiffe://clipstore/{role}/{name}")
        yield server


def _channel(server: ClipstoreServer, certs: Path, stem: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(),
                                         private_key=(certs / f"{stem}.key").read_bytes(),
                                         certificate_chain=(certs / f"{stem}.pem").read_bytes())
    return grpc.secure_channel(f"localhost:{server.port}", creds)


def test_review_flow_runs_end_to_end_over_mtls(srv: ClipstoreServer, certs: Path, clock: FakeClock) -> None:
    with _channel(srv, certs, "client-asr") as ingest, _channel(srv, certs, "client-root") as admin, \
            _channel(srv, certs, "client-alice") as alice:
        account_pb2_grpc.AccountServiceStub(ingest).SetReviewPreference(account_pb2.SetReviewPreferenceRequest(
            account_id=ACCOUNT_ID, allow_human_review=True), timeout=10)
        clip_pb2_grpc.ClipServiceStub(ingest).PutClip(put_requests(metadata(), AUDIO), timeout=30)
        created, factors = enrol(admin, (), "Alice", spiffe_id="spiffe://clipstore/reviewer/alice",
                                 redeem_on=alice)  # the reviewer redeems the code under her own certificate
        assert factors.api_key == ""  # a certificate reviewer has no bearer key
        secret = totp_secret_bytes(factors.totp_secret)

        review = review_pb2_grpc.ReviewServiceStub(alice)
        token = review.StartReviewSession(review_pb2.StartReviewSessionRequest(
            totp_code=code_at(secret, clock.now())), timeout=10).session_token
        assignment = review.NextAssignment(review_pb2.NextAssignmentRequest(session_token=token), timeout=10)
        grant = review.RequestGrant(review_pb2.RequestGrantRequest(
            session_token=token, assignment_id=assignment.assignment_id), timeout=10)
        fetched = list(review.FetchClip(review_pb2.FetchClipRequest(
            session_token=token, grant=grant.grant, review_clip_id=grant.review_clip_id), timeout=10))
    assert b"".join(m.audio_chunk for m in fetched[1:]) == AUDIO
    entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 1000)]
    reviewer = {"id": created.reviewer_id, "role": "reviewer"}
    assert [e["action"] for e in entries if e["actor"] == reviewer] == [
        "enrolment.redeem", "session.start", "assignment.issue", "grant.issue", "clip.fetch"]
    assert not [e for e in entries if e["outcome"]["result"] == "denied"]


def test_a_code_presented_under_another_reviewers_certificate_is_refused_and_void(srv: ClipstoreServer,
                                                                                 certs: Path) -> None:
    with _channel(srv, certs, "client-root") as admin, _channel(srv, certs, "client-alice") as alice:
        enrol(admin, (), "Alice", spiffe_id="spiffe://clipstore/reviewer/alice", redeem_on=alice)
        bob = create_reviewer(admin, (), "Bob", spiffe_id="spiffe://clipstore/reviewer/bob")
        for expected in ("ENROLMENT_CODE_WRONG_REVIEWER", "ENROLMENT_CODE_USED"):  # void once another tried it
            with pytest.raises(grpc.RpcError) as caught:
                redeem(alice, bob.reviewer_id, bob.enrolment.code)  # Alice's certificate, Bob's code and id
            assert error_info(caught.value).reason == expected
    denials = [e for e in map(json.loads, srv.app.audit.reader.entries(0, 1000)) if e["action"] == "enrolment.deny"]
    assert denials[0]["actor"]["id"] == srv.app.principals.by_spiffe_id("spiffe://clipstore/reviewer/alice").id
