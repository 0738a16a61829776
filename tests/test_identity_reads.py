"""Reads that tie a clip to a person are audited (issue 11, item 11): GetClip and ListClips(include_identity)
append one durable `clip.identity_read` entry per clip before the identity leaves; ListClips without the
flag returns no identity and appends nothing. On SQLite and PostgreSQL, through a real server.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from clipstore.server import ClipstoreServer
from clipstore.v1 import clip_pb2, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, SERIAL, metadata, put_requests
from tests.conftest import bearer
from tests.grpc_helpers import error_info

OTHER_ACCOUNT = "amzn1.account.OTHERPERSON77"


def _entries(server: ClipstoreServer, since: int) -> list[dict[str, Any]]:
    return [json.loads(e) for e in server.app.audit.reader.entries(since, 10_000)]


def _size(server: ClipstoreServer) -> int:
    return len(server.app.audit.reader.entries(0, 100_000))


def _put(stub: clip_pb2_grpc.ClipServiceStub, md: tuple, account_id: str = ACCOUNT_ID) -> clip_pb2.Clip:
    meta = metadata(identity=clip_pb2.ClipIdentity(account_id=account_id, device_serial=SERIAL))
    return stub.PutClip(put_requests(meta, b"turn on the lights"), metadata=md, timeout=30).clip


def _assert_identity_reads(server: ClipstoreServer, since: int, clip_ids: list[str], role: str) -> None:
    reads = [e for e in _entries(server, since) if e["action"] == "clip.identity_read"]
    ref = server.app.accounts.find(ACCOUNT_ID).account_ref
    assert [(e["target"]["clip_id"], e["target"]["account_ref"]) for e in reads] == [(c, ref) for c in clip_ids]
    assert {(e["actor"]["role"], e["outcome"]["result"]) for e in reads} == {(role, "ok")}
    for entry in reads:
        assert ACCOUNT_ID not in json.dumps(entry) and SERIAL not in json.dumps(entry)


@pytest.mark.parametrize("role", ["ingest", "admin"])
def test_get_clip_audits_the_identity_read_before_answering(server: ClipstoreServer, channel: grpc.Channel,
                                                            keys: dict[str, str], role: str) -> None:
    stub = clip_pb2_grpc.ClipServiceStub(channel)
    clip = _put(stub, bearer(keys["ingest"]))
    before = _size(server)
    got = stub.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=bearer(keys[role]), timeout=10).clip
    assert (got.identity.account_id, got.identity.device_serial) == (ACCOUNT_ID, SERIAL)
    _assert_identity_reads(server, before, [clip.clip_id], role)  # durable by the time the answer arrived


def test_list_clips_returns_identity_only_on_request_and_audits_each_clip(
        server: ClipstoreServer, channel: grpc.Channel, keys: dict[str, str]) -> None:
    stub, md = clip_pb2_grpc.ClipServiceStub(channel), bearer(keys["ingest"])
    made = sorted(_put(stub, md).clip_id for _ in range(3))
    _put(stub, md, account_id=OTHER_ACCOUNT)  # another person's clip is neither listed nor audited

    before = _size(server)
    plain = stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID), metadata=md, timeout=10)
    assert [c.clip_id for c in plain.clips] == made
    assert not any(c.HasField("identity") for c in plain.clips)
    assert _size(server) == before  # metadata only: nothing to audit

    listed = stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID, include_identity=True), metadata=md,
                            timeout=10)
    assert [(c.clip_id, c.identity.account_id, c.identity.device_serial) for c in listed.clips] == \
        [(c, ACCOUNT_ID, SERIAL) for c in made]
    _assert_identity_reads(server, before, made, "ingest")


def test_paged_list_with_identity_audits_each_page_it_returns(server: ClipstoreServer, channel: grpc.Channel,
                                                              keys: dict[str, str]) -> None:
    stub, md = clip_pb2_grpc.ClipServiceStub(channel), bearer(keys["ingest"])
    made = sorted(_put(stub, md).clip_id for _ in range(3))
    before = _size(server)
    first = stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID, include_identity=True, page_size=2),
                           metadata=md, timeout=10)
    _assert_identity_reads(server, before, made[:2], "ingest")  # only what this page returned
    stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID, include_identity=True, page_size=2,
                                             page_token=first.next_page_token), metadata=md, timeout=10)
    _assert_identity_reads(server, before, made, "ingest")


@pytest.mark.parametrize("call", ["GetClip", "ListClips"])
def test_no_identity_leaves_when_its_read_cannot_be_audited(server: ClipstoreServer, channel: grpc.Channel,
                                                            keys: dict[str, str], monkeypatch: pytest.MonkeyPatch,
                                                            call: str) -> None:
    stub, md = clip_pb2_grpc.ClipServiceStub(channel), bearer(keys["ingest"])
    clip = _put(stub, md)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(server.app.audit, "_write", disk_full)
    with pytest.raises(grpc.RpcError) as caught:
        if call == "GetClip":
            stub.GetClip(clip_pb2.GetClipRequest(clip_id=clip.clip_id), metadata=md, timeout=10)
        else:
            stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID, include_identity=True), metadata=md,
                           timeout=10)
    assert (caught.value.code(), error_info(caught.value).reason) == (grpc.StatusCode.UNAVAILABLE,
                                                                      "AUDIT_UNAVAILABLE")
    assert ACCOUNT_ID not in (caught.value.details() or "")
