"""Serving that an anonymous client cannot starve (issue 13 item 5).

Attacks run against a real server on loopback: callers that open calls and never send their
message, floods of unauthenticated calls. Health and authenticated callers must still be answered.
"""

from __future__ import annotations

import gc
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipstore.interceptors import STREAM_CUT_GRACE_S
from clipstore.server import running_server
from clipstore.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)
from tests.clip_helpers import ACCOUNT_ID, metadata
from tests.conftest import bearer, make_config, new_key
from tests.grpc_helpers import error_info

GET_CLIP = "/clipstore.v1.ClipService/GetClip"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _withheld(release: threading.Event) -> Iterator[bytes]:
    """A request body that never comes: the call's headers go out, its message does not."""
    release.wait(60)
    return
    yield b""  # pragma: no cover - makes this a generator


def _open_calls_without_bodies(port: int, method: str, *, calls: int, connections: int,
                               release: threading.Event, metadata: tuple = ()) -> list[grpc.Future]:
    """`calls` calls spread over `connections` separate HTTP/2 connections, none sending its message."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(connections)]
    return [channels[i % connections].stream_unary(method).future(_withheld(release), metadata=metadata,
                                                                   timeout=60)
            for i in range(calls)]


def _timed(call: object) -> float:
    started = time.perf_counter()
    call()  # type: ignore[operator]
    return time.perf_counter() - started


def test_100_anonymous_calls_holding_their_message_starve_neither_health_nor_an_authenticated_call(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    with running_server(make_config(tmp_path / "d")) as srv, \
            grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        auditor = bearer(new_key(srv.app, "auditor"))
        release = threading.Event()
        # more calls than the server has workers (64 by default; 32 when the attack was found)
        attack = _open_calls_without_bodies(srv.port, GET_CLIP, calls=100, connections=10, release=release)
        try:
            time.sleep(1.0)  # every attacking call has reached the server
            health = _timed(lambda: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5))
            role = _timed(lambda: audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), metadata=auditor, timeout=5))
            print(f"under attack: health {health * 1000:.1f} ms, authenticated call {role * 1000:.1f} ms")
            assert health < 1.0 and role < 1.0
            # The attackers were refused without their message ever being read.
            for call in attack:
                assert call.exception(timeout=5).code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            release.set()


def test_callers_holding_health_bodies_delay_no_authenticated_call_and_are_cut_after_the_body_timeout(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    """Health answers anyone, so it runs on its own few threads: holding them takes no worker from
    role RPCs, and a body that does not come within request_body_timeout_s ends the call."""
    config = make_config(tmp_path / "d", **{"server.request_body_timeout_s": 1.0, "server.max_workers": 8,
                                            "server.max_calls_per_principal": 4})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        auditor = bearer(new_key(srv.app, "auditor"))
        release = threading.Event()  # more holders than the server has workers of either kind
        holders = _open_calls_without_bodies(srv.port, HEALTH_CHECK, calls=32, connections=4, release=release)
        try:
            time.sleep(0.3)
            role = _timed(lambda: audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), metadata=auditor, timeout=5))
            assert role < 1.0
            for call in holders:
                assert call.exception(timeout=10).code() == grpc.StatusCode.CANCELLED
            health = _timed(lambda: health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5))
            assert health < 1.0
        finally:
            release.set()
    cut = [line for line in _log_lines(log_stream) if line.get("cut_by") == "request_body_timeout_s"]
    assert len(cut) == 32 and {line["status"] for line in cut} == {"CANCELLED"}


def _log_lines(log_stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in log_stream.getvalue().splitlines()]


def test_one_principal_cannot_hold_more_than_its_share_of_calls(tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"server.max_workers": 8, "server.max_calls_per_principal": 4,
                                            "server.request_body_timeout_s": 30.0})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        greedy, other = bearer(new_key(srv.app, "auditor", "greedy")), bearer(new_key(srv.app, "auditor", "other"))
        release = threading.Event()
        held = _open_calls_without_bodies(srv.port, "/clipstore.v1.AuditService/GetCheckpoint", calls=4,
                                          connections=2, release=release, metadata=greedy)
        try:
            time.sleep(0.5)
            audit = audit_pb2_grpc.AuditServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=greedy, timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(refused.value).reason == "TOO_MANY_CALLS"
            assert _timed(lambda: audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=other,
                                                      timeout=5)) < 1.0
            assert not any(call.done() for call in held)
        finally:
            release.set()  # the held calls now send nothing and half-close: refused as malformed
        for call in held:
            assert call.exception(timeout=10).code() == grpc.StatusCode.INVALID_ARGUMENT
        # slots are given back: the greedy principal is served again
        audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=greedy, timeout=5)
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 10_000)]
    assert [e["outcome"]["reason"] for e in entries if e["action"] == "auth.deny"] == ["TOO_MANY_CALLS"]


def _slow_upload(release: threading.Event, *, every_s: float, stall_after: int | None = None
                 ) -> Iterator[clip_pb2.PutClipRequest]:
    yield clip_pb2.PutClipRequest(metadata=metadata())
    for i in range(1000):
        if stall_after is not None and i >= stall_after:
            release.wait(60)
            return
        time.sleep(every_s)
        yield clip_pb2.PutClipRequest(audio_chunk=b"a" * 100)


def test_a_stream_past_its_maximum_duration_is_refused_and_a_stalled_one_is_cut(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"server.stream_max_s": 1.0})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest = bearer(new_key(srv.app, "ingest"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        release = threading.Event()
        with pytest.raises(grpc.RpcError) as moving:
            clips.PutClip(_slow_upload(release, every_s=0.1), metadata=ingest, timeout=30)
        assert moving.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(moving.value).reason == "STREAM_TOO_LONG"
        started = time.monotonic()
        stalled = clips.PutClip.future(_slow_upload(release, every_s=0, stall_after=1), metadata=ingest, timeout=30)
        try:
            assert stalled.exception(timeout=15).code() == grpc.StatusCode.CANCELLED
            assert time.monotonic() - started < 1.0 + STREAM_CUT_GRACE_S + 2
        finally:
            release.set()
        assert srv.app.clips.list(ACCOUNT_ID, after="", limit=10) == []
    assert [line["cut_by"] for line in _log_lines(log_stream) if "cut_by" in line] == ["stream_max_s"]


FLOOD = 500


def _flood(port: int, calls: int) -> list[grpc.StatusCode]:
    """`calls` unauthenticated calls from 8 threads, each with its own connection."""
    codes: list[grpc.StatusCode] = []

    def caller(indices: range) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            stub = clip_pb2_grpc.ClipServiceStub(ch)
            for i in indices:
                key = () if i % 2 else bearer("csk_" + "A" * 43)  # no key, then an unknown key
                try:
                    stub.GetClip(clip_pb2.GetClipRequest(clip_id="c_x"), metadata=key, timeout=10)
                except grpc.RpcError as err:
                    codes.append(err.code())

    threads = [threading.Thread(target=caller, args=(range(t, calls, 8),)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


def test_a_flood_of_500_unauthenticated_calls_is_one_summary_entry_and_a_counter_of_500(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"audit.denial_summary_s": 3600})
    with running_server(config) as srv:
        before = srv.app.audit.reader.size()
        started = time.perf_counter()
        codes = _flood(srv.port, FLOOD)
        elapsed = time.perf_counter() - started
        assert codes == [grpc.StatusCode.UNAUTHENTICATED] * FLOOD
        assert srv.app.audit.reader.size() == before  # nothing appended while refusing
        denials = srv.metrics.registry
        counted = sum(denials.get_sample_value("clipstore_auth_denials_total",
                                               {"caller": "anonymous", "reason": reason}) or 0
                      for reason in ("MISSING_CREDENTIALS", "INVALID_CREDENTIALS"))
        assert counted == FLOOD
        assert srv.denials.flush() == 1
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(before, 10_000)]
        peer = srv.app.peer_pseudonyms.of("127.0.0.1")
    print(f"flood: {FLOOD} calls in {elapsed:.2f} s, {len(entries)} audit entries")
    [summary] = entries
    assert summary["action"] == "auth.deny_summary" and summary["actor"]["id"] == "anonymous"
    assert summary["outcome"] == {"result": "denied", "reason": f"count={FLOOD} peer={peer} "
                                  f"INVALID_CREDENTIALS={FLOOD // 2} MISSING_CREDENTIALS={FLOOD // 2}"}


def _without_own_listen(line: str) -> str:
    """A log line, less the server's own bind address (configuration, not a caller's)."""
    event = json.loads(line)
    if event["event"] == "server.started":
        event.pop("listen")
    return json.dumps(event)


def test_a_flood_of_anonymous_calls_leaves_the_callers_address_in_no_audit_entry_and_no_log_line(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    """An IP address is personal data: the summary names the peer by its keyed pseudonym, stable across
    intervals and restarts of the deployment, and no log line carries the address either."""
    config = make_config(tmp_path / "d", **{"audit.denial_summary_s": 3600})
    with running_server(config) as srv:
        _flood(srv.port, 40)
        srv.denials.flush()
        _flood(srv.port, 8)  # the next interval
    with running_server(config) as srv:  # the first server flushed the second interval as it stopped
        _flood(srv.port, 4)  # a restart: the same key, so the same pseudonym
        srv.denials.flush()
        entries = [e.decode() for e in srv.app.audit.reader.entries(0, 10_000)]
        peer = srv.app.peer_pseudonyms.of("ipv4:127.0.0.1:1")
    summaries = [json.loads(e)["outcome"]["reason"] for e in entries if '"auth.deny_summary"' in e]
    assert [r.split()[:2] for r in summaries] == [["count=40", f"peer={peer}"], ["count=8", f"peer={peer}"],
                                                  ["count=4", f"peer={peer}"]]
    logs = [_without_own_listen(line) for line in log_stream.getvalue().splitlines()]
    assert any('"rpc"' in line and "UNAUTHENTICATED" in line for line in logs)  # the refusals were logged
    for text in entries + logs:
        assert "127.0.0.1" not in text and "ipv4:" not in text, text


def test_counted_denials_reach_the_log_every_interval_and_at_shutdown(tmp_path: Path,
                                                                     log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"audit.denial_summary_s": 0.5})
    with running_server(config) as srv:
        _flood(srv.port, 8)
        deadline = time.monotonic() + 10
        while not any(b"auth.deny_summary" in e for e in srv.app.audit.reader.entries(0, 10_000)):
            assert time.monotonic() < deadline, "no summary within 10 s of a 0.5 s interval"
            time.sleep(0.1)
    config = make_config(tmp_path / "e", **{"audit.denial_summary_s": 3600})
    with running_server(config) as srv:
        _flood(srv.port, 8)
    with running_server(config) as srv:  # the first server flushed its counts as it stopped
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 10_000)]
    assert [e["outcome"]["reason"].split()[0] for e in entries if e["action"] == "auth.deny_summary"] == ["count=8"]


def test_denials_naming_a_principal_are_appended_up_to_a_quota_then_counted(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"audit.denial_summary_s": 3600, "audit.denials_per_principal": 10})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        reviewer = bearer(new_key(srv.app, "reviewer", "curious"))
        clips = clip_pb2_grpc.ClipServiceStub(channel)
        before = srv.app.audit.reader.size()
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as caught:
                clips.GetClip(clip_pb2.GetClipRequest(clip_id="c_x"), metadata=reviewer, timeout=5)
            assert error_info(caught.value).reason == "WRONG_ROLE"
        srv.denials.flush()
        entries = [json.loads(e) for e in srv.app.audit.reader.entries(before, 10_000)]
    assert [e["action"] for e in entries] == ["auth.deny"] * 10 + ["auth.deny_summary"]
    assert all(e["request_id"] for e in entries[:10])
    assert entries[-1]["actor"] == entries[0]["actor"] and entries[0]["actor"]["role"] == "reviewer"
    assert entries[-1]["outcome"]["reason"] == "count=40 WRONG_ROLE=40"


def test_an_idle_connection_is_closed_after_max_connection_idle_s(tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"server.max_connection_idle_s": 0.5})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        states: list[grpc.ChannelConnectivity] = []
        channel.subscribe(states.append)
        time.sleep(2.0)
        assert states[-1] == grpc.ChannelConnectivity.IDLE  # the server sent GOAWAY; the client let go
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)  # and reconnects


def test_finished_calls_free_their_streams_under_a_per_connection_stream_cap(
        tmp_path: Path, log_stream: io.StringIO) -> None:
    """Each finished call gives its HTTP/2 stream back at once (an armed time limit must not keep it)."""
    config = make_config(tmp_path / "d", **{"server.max_streams_per_connection": 10})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        auditor = bearer(new_key(srv.app, "auditor"))
        audit, health = audit_pb2_grpc.AuditServiceStub(channel), health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), metadata=auditor, timeout=5)
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)


@pytest.fixture
def collector_off() -> Iterator[None]:
    """No cyclic garbage collection: what only the collector would free stays, as it does between its runs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_refused_calls_free_their_streams_without_waiting_for_the_garbage_collector(
        tmp_path: Path, log_stream: io.StringIO, collector_off: None) -> None:
    """A refusal's traceback held the interceptor's frame (and, for one the audit writer recorded, the
    writer's batch): reference cycles that kept each refused call, and its HTTP/2 stream, alive until the
    collector ran. A burst of 16 refused review calls filled a connection's 100 streams and every later
    call on it was refused (RST_STREAM REFUSED_STREAM, UNAVAILABLE) until a full collection."""
    config = make_config(tmp_path / "d", **{"server.max_streams_per_connection": 10})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        ingest, reviewer = bearer(new_key(srv.app, "ingest")), bearer(new_key(srv.app, "reviewer"))
        safety_md = bearer(new_key(srv.app, "safety"))
        clips, review = clip_pb2_grpc.ClipServiceStub(channel), review_pb2_grpc.ReviewServiceStub(channel)
        safety = safety_pb2_grpc.SafetyServiceStub(channel)
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as empty:  # refused by deny_alone, which raises the error it is given
                safety.IdentifyLeak(iter(()), metadata=safety_md, timeout=5)
            assert error_info(empty.value).metadata["field"] == "audio_chunk", empty.value.details()
            with pytest.raises(grpc.RpcError) as not_found:  # refused in the servicer
                clips.GetClip(clip_pb2.GetClipRequest(clip_id="c_nope"), metadata=ingest, timeout=5)
            assert error_info(not_found.value).reason == "CLIP_NOT_FOUND", not_found.value.details()
            with pytest.raises(grpc.RpcError) as unknown:  # refused and audited by the audit writer
                review.RequestGrant(review_pb2.RequestGrantRequest(session_token="nope", assignment_id="as_x"),
                                    metadata=reviewer, timeout=5)
            assert error_info(unknown.value).reason == "SESSION_UNKNOWN", unknown.value.details()


def test_a_refused_fetch_with_a_malformed_grant_frees_its_stream_without_the_garbage_collector(
        tmp_path: Path, log_stream: io.StringIO, collector_off: None) -> None:
    """FetchClip kept the malformed grant's refusal past its except block, for the unit to act on in its
    place: its traceback held the frame that held it, and that frame the call's. When the unit refused for
    another reason first (an unknown session), that cycle kept every such call alive until the collector ran."""
    config = make_config(tmp_path / "d", **{"server.max_streams_per_connection": 10})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        reviewer = bearer(new_key(srv.app, "reviewer"))
        review = review_pb2_grpc.ReviewServiceStub(channel)
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as unknown:
                list(review.FetchClip(review_pb2.FetchClipRequest(session_token="nope", grant="not a grant",
                                                                  review_clip_id="rc_x"), metadata=reviewer, timeout=5))
            assert error_info(unknown.value).reason == "SESSION_UNKNOWN", unknown.value.details()


def test_identify_leak_calls_are_bounded_server_wide(tmp_path: Path, log_stream: io.StringIO) -> None:
    """Each IdentifyLeak buffers up to 64 MiB and one principal may have 24 calls in flight (~1.5 GiB):
    beyond `server.max_identify_leak_calls` in flight on the server, whoever calls, a call is refused
    RESOURCE_EXHAUSTED (IDENTIFY_LEAK_BUSY) before any byte is buffered; a freed slot serves the next."""
    from concurrent.futures import ThreadPoolExecutor
    with running_server(make_config(tmp_path / "d", **{"server.max_identify_leak_calls": 2})) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        safety = safety_pb2_grpc.SafetyServiceStub(channel)
        callers = [bearer(new_key(server.app, "safety", f"s{i}")) for i in range(3)]
        release = threading.Event()
        started = threading.Semaphore(0)

        def held() -> Iterator[safety_pb2.IdentifyLeakRequest]:
            yield safety_pb2.IdentifyLeakRequest(audio_chunk=b"\0" * 1024)
            started.release()
            release.wait(30)

        def slow(md: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
            try:
                safety.IdentifyLeak(held(), metadata=md, timeout=30)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        with ThreadPoolExecutor(2) as pool:
            holding = [pool.submit(slow, md) for md in callers[:2]]
            for _ in holding:
                assert started.acquire(timeout=10)
            time.sleep(0.2)  # both calls are in the servicer, reading their uploads
            with pytest.raises(grpc.RpcError) as busy:
                safety.IdentifyLeak(iter([safety_pb2.IdentifyLeakRequest(audio_chunk=b"\0")]), metadata=callers[2],
                                    timeout=10)
            assert (busy.value.code(), error_info(busy.value).reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                          "IDENTIFY_LEAK_BUSY")
            assert "server.max_identify_leak_calls" in (busy.value.details() or "")
            entries = [json.loads(e) for e in server.app.audit.reader.entries(0, 100_000)]
            assert [e["outcome"] for e in entries if e["action"] == "forensics.identify"] == [
                {"reason": "IDENTIFY_LEAK_BUSY", "result": "denied"}]
            release.set()
            assert all(f.result(30) != grpc.StatusCode.RESOURCE_EXHAUSTED for f in holding)
        with pytest.raises(grpc.RpcError) as later:  # the slots are free again: the upload is read and judged
            safety.IdentifyLeak(iter(()), metadata=callers[2], timeout=10)
        assert error_info(later.value).metadata["field"] == "audio_chunk"
