"""Benchmark plumbing: moto's server and `clipstore serve` as real subprocesses on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3

REPO = Path(__file__).resolve().parent.parent
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
os.environ.update(AWS_ENV)


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


@contextmanager
def clipstore_server(endpoint: str | None = None) -> Iterator[tuple[str, subprocess.Popen[str], dict[str, str]]]:
    """Yields (address, process, api keys by role); S3 on `endpoint` if given, else the file store."""
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "CLIPSTORE_DATA_DIR": data, "CLIPSTORE_LISTEN": "127.0.0.1:0",
               "CLIPSTORE_REVIEW_DEFAULT_ALLOW": "true"}
        if endpoint:
            bucket = f"bench-{uuid.uuid4().hex[:8]}"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            env.update({"CLIPSTORE_S3_BUCKET": bucket, "CLIPSTORE_S3_ENDPOINT_URL": endpoint})
        keys = {}
        for role in ("ingest", "admin", "auditor"):
            out = subprocess.run([sys.executable, "-m", "clipstore", "principals", "create", "--role", role,
                                  "--name", f"bench-{role}"], env=env, capture_output=True, text=True, check=True)
            keys[role] = out.stdout.split("api_key=")[1].split()[0]
        proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve"], env=env, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
        assert proc.stderr is not None
        started = json.loads(proc.stderr.readline())
        try:
            yield f"127.0.0.1:{started['port']}", proc, keys
        finally:
            proc.terminate()
            proc.wait(timeout=30)
