"""The frame: health, reflection, auth, role checks, errors, drain, logs."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from clipstore.config import Config
from clipstore.rows import KeyMatch
from clipstore.server import SERVICE_NAMES, ClipstoreServer, running_server
from clipstore.v1 import audit_pb2, audit_pb2_grpc, clip_pb2, clip_pb2_grpc, review_pb2, review_pb2_grpc
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info


def test_health_reports_serving_overall_and_per_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_every_clipstore_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = {s.name for s in next(iter(responses)).list_services_response.service}
    assert set(SERVICE_NAMES) <= listed
    assert {"clipstore.v1.ClipService", "clipstore.v1.ReviewService", "clipstore.v1.AuditService",
            "clipstore.v1.AccountService", "clipstore.v1.ReviewerAdminService",
            "clipstore.v1.SafetyService"} <= listed


def _get_clip(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    stub = clip_pb2_grpc.ClipServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetClip(clip_pb2.GetClipRequest(clip_id="c_x"), metadata=metadata, timeout=5)
    return caught.value


def test_call_without_key_is_unauthenticated(channel: grpc.Channel) -> None:
    err = _get_clip(channel)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err).reason == "MISSING_CREDENTIALS"
    assert "Bearer" in err.details()


def test_call_with_unknown_key_is_unauthenticated(channel: grpc.Channel) -> None:
    err = _get_clip(channel, bearer("csk_" + "A" * 43))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err).reason == "INVALID_CREDENTIALS"


def test_malformed_authorization_header_is_unauthenticated(channel: grpc.Channel) -> None:
    err = _get_clip(channel, (("authorization", "Basic dXNlcjpwYXNz"),))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err).reason == "MALFORMED_CREDENTIALS"


@pytest.mark.parametrize("order", ["valid last", "valid first", "both valid"])
def test_two_authorization_headers_are_refused_whichever_comes_last(channel: grpc.Channel, keys: dict[str, str],
                                                                    order: str) -> None:
    """The last header used to decide who was calling: a valid key after an unknown one (or another role's)
    was accepted. Two credentials are ambiguous; neither is used."""
    valid, other = bearer(keys["ingest"])[0], ("authorization", f"Bearer {keys['admin']}")
    unknown = ("authorization", "Bearer csk_" + "A" * 43)
    headers = {"valid last": (unknown, valid), "valid first": (valid, unknown), "both valid": (other, valid)}[order]
    err = _get_clip(channel, headers)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.UNAUTHENTICATED, "MALFORMED_CREDENTIALS")
    assert "exactly one" in err.details()


def test_call_with_wrong_role_is_permission_denied(channel: grpc.Channel, keys: dict[str, str]) -> None:
    err = _get_clip(channel, bearer(keys["reviewer"]))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(err)
    assert info.reason == "WRONG_ROLE" and info.domain == "clipstore.v1"
    assert "ingest" in err.details()


@pytest.mark.parametrize("role", ["ingest", "safety", "admin", "auditor"])
def test_reviewer_rpcs_refuse_every_other_role(channel: grpc.Channel, keys: dict[str, str], role: str) -> None:
    stub = review_pb2_grpc.ReviewServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.StartReviewSession(review_pb2.StartReviewSessionRequest(totp_code="123456"),
                                metadata=bearer(keys[role]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_disabled_principal_is_unauthenticated(server: ClipstoreServer, channel: grpc.Channel,
                                               keys: dict[str, str]) -> None:
    from clipstore.auth import hash_api_key
    match = server.app.principals.by_key_hash(hash_api_key(keys["ingest"]))
    assert match is not None
    server.app.principals.set_disabled(match.principal.id, True)
    err = _get_clip(channel, bearer(keys["ingest"]))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(err).reason == "PRINCIPAL_DISABLED"


def test_request_id_is_echoed_and_put_in_error_info(channel: grpc.Channel) -> None:
    rid = "3f2b8c1e-9d4a-4e7b-8a1c-5b6d7e8f9a0b"
    err = _get_clip(channel, (("x-request-id", rid),))
    assert tuple(err.initial_metadata()) == ()  # Trailers-Only: a retry policy may retry it
    assert ("x-request-id", rid) in tuple(err.trailing_metadata())
    assert error_info(err).metadata["request_id"] == rid
    health = health_pb2_grpc.HealthStub(channel)
    _, call = health.Check.with_call(health_pb2.HealthCheckRequest(), metadata=(("x-request-id", rid),), timeout=10)
    assert ("x-request-id", rid) in tuple(call.initial_metadata())  # a success carries it in its headers


@pytest.mark.parametrize("incoming", ["bad id with spaces", "acct-12345-jane-doe", "x" * 32])
def test_request_id_is_generated_unless_uuid_shaped(channel: grpc.Channel, incoming: str) -> None:
    """Request ids reach the audit log: a client cannot smuggle a name or account number in."""
    err = _get_clip(channel, (("x-request-id", incoming),))
    rid = error_info(err).metadata["request_id"]
    assert rid != incoming and len(rid) == 32


def test_every_access_log_line_is_json_without_the_bearer_key(
        channel: grpc.Channel, keys: dict[str, str], log_stream: io.StringIO) -> None:
    audit = audit_pb2_grpc.AuditServiceStub(channel)
    for key in (keys["auditor"], keys["reviewer"], "csk_" + "Z" * 43):
        with contextlib.suppress(grpc.RpcError):
            audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=bearer(key), timeout=5)
    text = log_stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    rpc_lines = [line for line in lines if line["event"] == "rpc"]
    assert len(rpc_lines) >= 3
    assert {"method", "principal", "role", "status", "duration_ms", "request_id"} <= set(rpc_lines[0])
    for key in (*keys.values(), "Z" * 43):
        assert key not in text


def test_sigterm_path_drains_in_flight_call_and_refuses_new_ones(
        config: Config, log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """stop() is what the SIGTERM handler runs (tests/test_cli.py sends the signal itself).

    The in-flight call is held inside authentication (the principal lookup)
    until the server has begun stopping; it must still finish normally.
    """
    with running_server(config) as srv:
        key = new_key(srv.app, "ingest")
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        undisturbed = _get_clip(channel, bearer(key)).code()
        entered, release = threading.Event(), threading.Event()
        lookup = srv.app.principals.by_key_hash

        def held_lookup(key_hash: bytes) -> KeyMatch | None:
            entered.set()
            release.wait(10)
            return lookup(key_hash)

        monkeypatch.setattr(srv.app.principals, "by_key_hash", held_lookup)
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        future = stub.GetClip.future(clip_pb2.GetClipRequest(clip_id="c_x"), metadata=bearer(key), timeout=20)
        assert entered.wait(5)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 10})
        stopper.start()
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{srv.port}")).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        assert future.exception(timeout=10).code() == undisturbed  # ran to its normal end
        stopper.join(10)
        assert not stopper.is_alive()


def _rpc_lines(log_stream: io.StringIO, method: str, *, at_least: int = 1, wait_s: float = 10) -> list[dict]:
    """The access-log lines of `method`, waiting for calls the server may still be finishing."""
    deadline = time.monotonic() + wait_s
    while True:
        lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
        found = [line for line in lines if line["event"] == "rpc" and line["method"] == method]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _unhandled(log_stream: io.StringIO) -> list[str]:
    return [line for line in log_stream.getvalue().splitlines() if "unhandled_exception" in line]


PUT_CLIP = "/clipstore.v1.ClipService/PutClip"


def test_client_cancel_mid_stream_is_recorded_as_cancelled_not_internal(
        server: ClipstoreServer, channel: grpc.Channel, log_stream: io.StringIO) -> None:
    from tests.clip_helpers import metadata
    key = new_key(server.app, "ingest")
    release = threading.Event()

    def upload() -> Iterator[clip_pb2.PutClipRequest]:
        yield clip_pb2.PutClipRequest(metadata=metadata())
        yield clip_pb2.PutClipRequest(audio_chunk=b"a" * 1000)
        release.wait(10)  # the server now waits inside the request iterator

    call = clip_pb2_grpc.ClipServiceStub(channel).PutClip.future(upload(), metadata=bearer(key), timeout=20)
    time.sleep(0.5)
    call.cancel()
    release.set()
    [line] = _rpc_lines(log_stream, PUT_CLIP)
    assert line["status"] == "CANCELLED"
    assert _unhandled(log_stream) == []
    samples = server.metrics.registry
    assert samples.get_sample_value("clipstore_rpcs_total", {"method": PUT_CLIP, "code": "CANCELLED"}) == 1
    assert samples.get_sample_value("clipstore_rpcs_total", {"method": PUT_CLIP, "code": "INTERNAL"}) is None


def test_message_the_transport_refuses_is_recorded_as_cancelled_not_internal(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    from tests.clip_helpers import metadata
    with running_server(make_config(tmp_path / "d", max_message_bytes=1 << 20)) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        key = new_key(srv.app, "ingest")
        too_big = [clip_pb2.PutClipRequest(metadata=metadata()), clip_pb2.PutClipRequest(audio_chunk=b"a" * (2 << 20))]
        with pytest.raises(grpc.RpcError) as caught:
            clip_pb2_grpc.ClipServiceStub(channel).PutClip(iter(too_big), metadata=bearer(key), timeout=20)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # what the transport told the client
        [line] = _rpc_lines(log_stream, PUT_CLIP)
        assert line["status"] == "CANCELLED"
        assert _unhandled(log_stream) == []
        assert srv.metrics.registry.get_sample_value(
            "clipstore_rpcs_total", {"method": PUT_CLIP, "code": "INTERNAL"}) is None
        # a unary request too large: grpcio never called the handler, so nothing was recorded at all
        with pytest.raises(grpc.RpcError) as caught:
            clip_pb2_grpc.ClipServiceStub(channel).GetClip(clip_pb2.GetClipRequest(clip_id="c" * (2 << 20)),
                                                           metadata=bearer(key), timeout=20)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        [line] = _rpc_lines(log_stream, "/clipstore.v1.ClipService/GetClip")
        assert line["status"] == "CANCELLED"


def test_request_body_that_does_not_parse_is_invalid_argument(channel: grpc.Channel, keys: dict[str, str]) -> None:
    get_clip = channel.unary_unary("/clipstore.v1.ClipService/GetClip")
    with pytest.raises(grpc.RpcError) as caught:
        get_clip(b"\xff\xff\xff", metadata=bearer(keys["ingest"]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "MALFORMED_REQUEST"
    assert error_info(caught.value).metadata["field"] == "request"


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_as_v1_and_v1alpha(channel: grpc.Channel, version: str) -> None:
    """Current tools (grpcurl, buf curl, Postman) ask v1 first; older ones only know v1alpha."""
    info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="clipstore.v1.ReviewService")]
    listed, v1_file, review_file = list(info(iter(asks), timeout=5))
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
            *SERVICE_NAMES} <= {s.name for s in listed.list_services_response.service}
    for answer in (v1_file, review_file):
        assert not answer.HasField("error_response"), answer.error_response
        assert answer.file_descriptor_response.file_descriptor_proto
