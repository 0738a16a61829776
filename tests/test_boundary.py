"""Every range and size field of the audit and paging RPCs is checked at the boundary: a bad value is
INVALID_ARGUMENT (or OUT_OF_RANGE past the log) naming the field, never INTERNAL."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipstore.server import running_server
from clipstore.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info

U32, U64 = (1 << 32) - 1, (1 << 64) - 1
EDGES = [0, 1, 2, 3, (1 << 31) - 1, 1 << 31, U32, (1 << 53) + 1, (1 << 63) - 1, 1 << 63, U64]
ACCEPTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


def _int(bits: int) -> st.SearchStrategy[int]:
    """Unsigned of `bits` bits; negative `bits` means a signed field (an enum is an int32)."""
    low, top = (-(1 << -bits), (1 << -bits) - 1) if bits < 0 else (0, (1 << bits) - 1)
    return st.one_of(st.sampled_from([e for e in (*EDGES, -1, low) if low <= e <= top]), st.integers(low, top))


# (stub, method, role, request type, integer fields with their widths, fixed fields)
RPCS = [
    (audit_pb2_grpc.AuditServiceStub, "ListEntries", "auditor", audit_pb2.ListEntriesRequest,
     {"start_index": 64, "page_size": 32}, {}),
    (audit_pb2_grpc.AuditServiceStub, "GetInclusionProof", "auditor", audit_pb2.GetInclusionProofRequest,
     {"index": 64, "tree_size": 64}, {}),
    (audit_pb2_grpc.AuditServiceStub, "GetConsistencyProof", "auditor", audit_pb2.GetConsistencyProofRequest,
     {"old_size": 64, "new_size": 64}, {}),
    (clip_pb2_grpc.ClipServiceStub, "ListClips", "ingest", clip_pb2.ListClipsRequest,
     {"page_size": 32}, {"account_id": "acct-1"}),
    (safety_pb2_grpc.SafetyServiceStub, "ListEscalations", "safety", safety_pb2.ListEscalationsRequest,
     {"page_size": 32}, {}),
    (principal_admin_pb2_grpc.PrincipalAdminServiceStub, "ListPrincipals", "admin",
     principal_admin_pb2.ListPrincipalsRequest, {"page_size": 32, "role": -31}, {}),
]


@st.composite
def _calls(draw: st.DrawFn) -> tuple[int, Message]:
    i = draw(st.integers(0, len(RPCS) - 1))
    _, _, _, request_type, ints, fixed = RPCS[i]
    return i, request_type(**fixed, **{name: draw(_int(bits)) for name, bits in ints.items()})


def test_integer_fields_of_audit_and_paging_rpcs_never_answer_internal(tmp_path: Path,
                                                                       log_stream: io.StringIO) -> None:
    with running_server(make_config(tmp_path / "d")) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        keys = {role: new_key(srv.app, role) for role in ("auditor", "ingest", "safety", "admin")}

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(_calls())
        def check(call: tuple[int, Message]) -> None:
            i, request = call
            stub_type, method, role, _, ints, _ = RPCS[i]
            try:
                getattr(stub_type(channel), method)(request, metadata=bearer(keys[role]), timeout=10)
            except grpc.RpcError as err:
                assert err.code() in ACCEPTED, (method, request, err.code(), err.details())
                assert error_info(err).metadata["field"] in ints, (method, request, err.details())

        check()


@pytest.mark.parametrize("start_index", [1 << 63, U64])
def test_list_entries_beyond_any_index_is_invalid_argument_naming_start_index(
        tmp_path: Path, log_stream: io.StringIO, start_index: int) -> None:
    with running_server(make_config(tmp_path / "d")) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            audit.ListEntries(audit_pb2.ListEntriesRequest(start_index=start_index),
                              metadata=bearer(new_key(srv.app, "auditor")), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "start_index"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


@pytest.mark.parametrize("token", [_b64(b"\x00"), _b64(b"c_\x00x"), _b64(b"\xff\xfe"), _b64(b"x" * 5000),
                                   "not base64!", _b64(b"c_1").rstrip("=") + "A", "Y18x\n"])
def test_forged_page_tokens_are_invalid_argument_on_every_database(
        tmp_path: Path, database_url: str | None, log_stream: io.StringIO, token: str) -> None:
    with running_server(make_config(tmp_path / "d", database_url=database_url)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        safety = safety_pb2_grpc.SafetyServiceStub(channel)
        admin = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel)
        calls = [lambda: clips.ListClips(clip_pb2.ListClipsRequest(account_id="acct-1", page_token=token),
                                         metadata=bearer(new_key(srv.app, "ingest")), timeout=10),
                 lambda: safety.ListEscalations(safety_pb2.ListEscalationsRequest(page_token=token),
                                                metadata=bearer(new_key(srv.app, "safety")), timeout=10),
                 lambda: admin.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(page_token=token),
                                              metadata=bearer(new_key(srv.app, "admin")), timeout=10)]
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value).metadata["field"] == "page_token"


def test_the_last_nanosecond_of_year_9999_is_taken_everywhere_a_time_is_given(tmp_path: Path,
                                                                              log_stream: io.StringIO) -> None:
    # Timestamp's own maximum, 9999-12-31T23:59:59.999999999Z, became the float 253402300800.0 (year 10000):
    # PutClip committed the clip, then answered INTERNAL, and every later ListClips of the account was
    # INTERNAL; CreatePrincipal committed a principal whose API key it never returned; GetAccessReport failed
    # after appending its request entry.
    from google.protobuf.timestamp_pb2 import Timestamp

    from clipstore.v1 import account_pb2, account_pb2_grpc, common_pb2
    from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
    last = Timestamp(seconds=253_402_300_799, nanos=999_999_999)
    with running_server(make_config(tmp_path / "d")) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest, admin = bearer(new_key(srv.app, "ingest")), bearer(new_key(srv.app, "admin"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        meta = metadata()
        meta.captured_at.CopyFrom(last)
        put = clips.PutClip(put_requests(meta, b"\0" * 100), metadata=ingest, timeout=30).clip
        assert put.captured_at.seconds == 253_402_300_799 and put.captured_at.nanos >= 998_000_000
        again = clips.PutClip(put_requests(meta, b"\0" * 100), metadata=ingest, timeout=30).clip  # the same key
        assert again.clip_id == put.clip_id
        [listed] = clips.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID), metadata=ingest,
                                   timeout=10).clips
        assert listed.captured_at == put.captured_at
        assert clips.GetClip(clip_pb2.GetClipRequest(clip_id=put.clip_id), metadata=ingest,
                             timeout=10).clip.captured_at == put.captured_at

        admins = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel)
        created = admins.CreatePrincipal(principal_admin_pb2.CreatePrincipalRequest(
            role=common_pb2.ROLE_INGEST, name="far", expires_at=last), metadata=admin, timeout=10)
        assert created.api_key and created.principal.expires_at.seconds == 253_402_300_799
        assert admins.SetPrincipalExpiry(principal_admin_pb2.SetPrincipalExpiryRequest(
            principal_id=created.principal.principal_id, expires_at=last), metadata=admin,
            timeout=10).principal.expires_at.seconds == 253_402_300_799

        reports = account_pb2_grpc.AccountServiceStub(channel)
        for window in ({"since": last}, {"until": last}):
            assert reports.GetAccessReport(account_pb2.GetAccessReportRequest(account_id=ACCOUNT_ID, **window),
                                           metadata=ingest, timeout=30).entries >= 1
    assert "unhandled_exception" not in log_stream.getvalue()


def test_a_time_stored_past_year_9999_before_the_boundary_checked_it_is_shown_clamped(
        tmp_path: Path, database_url: str | None, log_stream: io.StringIO) -> None:
    """Rows stored before the year-9999 fixes may hold captured_at / expires_at floats past 9999 (year 10000
    and later): ListClips, GetClip and GetAccessReport of that account answered INTERNAL for good. They are
    shown as the last instant a Timestamp holds now."""
    import sqlalchemy as sa

    from clipstore.store import schema
    from clipstore.unit import AuditRecord
    from clipstore.v1 import account_pb2, account_pb2_grpc
    from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
    with running_server(make_config(tmp_path / "d", database_url=database_url)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest = bearer(new_key(srv.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        put = clips.PutClip(put_requests(metadata(), b"\0" * 100), metadata=ingest, timeout=30).clip
        with srv.app.db.transaction() as conn:  # as an older release wrote it
            conn.execute(sa.update(schema.clips).where(schema.clips.c.clip_id == put.clip_id)
                         .values(captured_at=253_402_300_800.0, expires_at=1e13))
        [listed] = clips.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID), metadata=ingest,
                                   timeout=10).clips
        assert (listed.captured_at.seconds, listed.expires_at.seconds) == (253_402_300_799, 253_402_300_799)
        got = clips.GetClip(clip_pb2.GetClipRequest(clip_id=put.clip_id), metadata=ingest, timeout=10).clip
        assert got.captured_at == listed.captured_at
        ref = srv.app.accounts.find_or_create(ACCOUNT_ID).account_ref
        srv.app.audit.append(AuditRecord(actor_id="p_rev", actor_role="reviewer", action="clip.fetch",
                                         account_ref=ref, clip_id=put.clip_id))
        report = account_pb2_grpc.AccountServiceStub(channel).GetAccessReport(
            account_pb2.GetAccessReportRequest(account_id=ACCOUNT_ID), metadata=ingest, timeout=30)
        assert f"clip {put.clip_id} 9999-12-31T23:59:59.99" in json.loads(report.report)["binding"]
    assert "unhandled_exception" not in log_stream.getvalue()
