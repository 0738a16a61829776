"""Benchmark plumbing: moto's server and `clipstore serve` as real subprocesses on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

from clipstore.v1 import clip_pb2

REPO = Path(__file__).resolve().parent.parent
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(AWS_ENV)


def put_requests(meta: clip_pb2.ClipMetadata, chunks: Iterable[bytes]) -> Iterator[clip_pb2.PutClipRequest]:
    """A PutClip stream: metadata, the audio chunks, and the trailer declaring their size and SHA-256."""
    digest, size = hashlib.sha256(), 0
    yield clip_pb2.PutClipRequest(metadata=meta)
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
        yield clip_pb2.PutClipRequest(audio_chunk=chunk)
    yield clip_pb2.PutClipRequest(trailer=clip_pb2.ClipTrailer(size_bytes=size, sha256=digest.digest()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                boto3.client("s3", endpoint_url=endpoint).list_buckets()
                break
            except Exception:
                time.sleep(0.05)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait()


class Server:
    """A running server subprocess: its address, process, API keys, and its JSON log lines."""

    def __init__(self, proc: subprocess.Popen[str], keys: dict[str, str]) -> None:
        self.proc, self.keys = proc, keys
        self.log: list[dict[str, object]] = []
        assert proc.stderr is not None
        for line in proc.stderr:  # start-up lines, up to the one that says where it listens
            with contextlib.suppress(ValueError):
                self.log.append(json.loads(line))
            if self.log and self.log[-1].get("event") == "server.started":
                break
        else:
            raise RuntimeError(f"server exited before it started: {self.log[-3:]}")
        started = self.log[-1]
        self.address = f"127.0.0.1:{started['port']}"
        self.metrics_port = started.get("metrics_port")
        self._drain = threading.Thread(target=self._read, daemon=True)  # a full pipe would stall the server
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with contextlib.suppress(ValueError):
                self.log.append(json.loads(line))

    def mark(self) -> int:
        """A position in the log, after the lines of calls already answered have arrived."""
        time.sleep(0.3)
        return len(self.log)

    def rpc_ms(self, method_suffix: str, start: int = 0, end: int | None = None) -> list[float]:
        """Server-side durations (access log) of `method_suffix` calls logged between two marks."""
        return [float(e["duration_ms"]) for e in self.log[start:end]  # type: ignore[arg-type]
                if e.get("event") == "rpc" and str(e.get("method", "")).endswith(method_suffix)]

    def metric(self, name: str) -> float:
        """One unlabelled sample from the metrics endpoint (`metrics.listen` must be set)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise KeyError(name)


@contextmanager
def _running(argv: list[str], env: dict[str, str], keys: dict[str, str]) -> Iterator[Server]:
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        yield Server(proc, keys)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def clipstore_server(endpoint: str | None = None, **settings: str) -> Iterator[Server]:
    """A server subprocess; S3 on `endpoint` if given, else the file store. `settings` are CLIPSTORE_* vars."""
    with tempfile.TemporaryDirectory() as data:
        # The storage and review benches send random bytes as clips: no watermark, which would need real audio
        # (bench/audio.py and bench/watermark.py measure that path and set it themselves).
        env = {**os.environ, "CLIPSTORE_DATA_DIR": data, "CLIPSTORE_LISTEN": "127.0.0.1:0",
               "CLIPSTORE_REVIEW_WATERMARK": "off", **settings}
        if endpoint:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            env.update({"CLIPSTORE_S3_BUCKET": bucket, "CLIPSTORE_S3_ENDPOINT_URL": endpoint})
        keys = {}
        for role in ("ingest", "admin", "auditor", "safety"):
            out = subprocess.run([sys.executable, "-m", "clipstore", "principals", "create", "--role", role,
                                  "--name", f"bench-{role}"], env=env, capture_output=True, text=True, check=True)
            keys[role] = out.stdout.split("api_key=")[1].split()[0]
        with _running([sys.executable, "-m", "clipstore", "serve"], env, keys) as server:
            yield server


@contextmanager
def floor_server() -> Iterator[Server]:
    """bench/_floor.py: one group-committed audit append per call, nothing else."""
    with tempfile.TemporaryDirectory() as data, \
            _running([sys.executable, str(REPO / "bench" / "_floor.py"), data], dict(os.environ), {}) as server:
        yield server
