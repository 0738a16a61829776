"""Prometheus metrics on a separate loopback port."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import clipstore
from clipstore.config import ConfigError
from clipstore.server import running_server
from clipstore.v1 import clip_pb2, clip_pb2_grpc
from tests.clip_helpers import ACCOUNT_ID, metadata, put_requests
from tests.conftest import bearer, make_config, new_key


def test_metrics_endpoint_reports_rpcs_audit_keys_and_queue(tmp_path: Path, log_stream: io.StringIO) -> None:
    config = make_config(tmp_path / "d", **{"metrics.listen": "127.0.0.1:0"})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        key = new_key(srv.app, "ingest")
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        stub.PutClip(put_requests(metadata(), b"a" * 1000), metadata=bearer(key), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.GetClip(clip_pb2.GetClipRequest(clip_id="c_x"), timeout=10)
        assert srv.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    assert 'clipstore_rpcs_total{code="OK",method="/clipstore.v1.ClipService/PutClip"} 1.0' in text
    assert 'clipstore_rpcs_total{code="UNAUTHENTICATED",method="/clipstore.v1.ClipService/GetClip"} 1.0' in text
    # an anonymous refusal is counted (and summarised in the audit log per interval), not appended
    assert 'clipstore_auth_denials_total{caller="anonymous",reason="MISSING_CREDENTIALS"} 1.0' in text
    assert 'clipstore_audit_records_total{action="clip.ingest",outcome="ok",reason=""} 1.0' in text
    for name in ("clipstore_rpc_duration_seconds_bucket", "clipstore_kms_root_calls_total",
                 "clipstore_key_cache_hits_total", "clipstore_key_cache_lookups_total",
                 "clipstore_review_queue_clips", "clipstore_audit_batch_entries_bucket",
                 "clipstore_audit_commit_duration_seconds_bucket", "clipstore_audit_log_entries",
                 "clipstore_db_commits_total"):
        assert name in text
    assert key not in text and ACCOUNT_ID not in text


def test_metrics_must_bind_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="metrics.listen"):
        make_config(tmp_path, **{"metrics.listen": "0.0.0.0:9464"})


def test_metrics_fit_standard_dashboards(tmp_path: Path, log_stream: io.StringIO) -> None:
    """Counters are counters named *_total, every clipstore name ends in a unit, and the standard process,
    python and build-info families are there, so stock Prometheus/Grafana dashboards and alerts work."""
    config = make_config(tmp_path / "d", **{"metrics.listen": "127.0.0.1:0"})
    with running_server(config) as srv, grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = clip_pb2_grpc.ClipServiceStub(channel)
        key = new_key(srv.app, "ingest")
        for _ in range(2):
            stub.ListClips(clip_pb2.ListClipsRequest(account_id=ACCOUNT_ID), metadata=bearer(key), timeout=10)
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {name: f for name, f in families.items() if name.startswith("clipstore_")}
    for name, family in ours.items():
        if family.type == "counter":
            assert all(s.name == f"{name}_total" for s in family.samples), name
        else:  # a gauge or histogram says what it measures in
            assert name.endswith(("_seconds", "_bytes", "_entries", "_clips", "_info", "_up", "_alert")), name
    for name in ("clipstore_kms_root_calls", "clipstore_key_cache_hits", "clipstore_key_cache_lookups"):
        assert families[name].type == "counter", name
    assert not any(name.endswith("_ratio") for name in families) and "_created" not in text
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds",
            "python_info"} <= families.keys()
    [build] = families["clipstore_build_info"].samples
    assert build.value == 1 and build.labels["version"] == clipstore.__version__
    assert {s.labels["dependency"]: s.value for s in families["clipstore_dependency_up"].samples} == \
        {"database": 1.0, "root_key": 1.0, "blob_store": 1.0, "audit_log": 1.0}
