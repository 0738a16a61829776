"""Where published tiles are read from: a directory, an HTTP(S) prefix, or an S3 prefix.

Each source is a function `read(path) -> bytes` raising FileNotFoundError for
a missing file. S3 is read with a plain SigV4-signed GET (standard library
only): credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN), region from AWS_REGION or AWS_DEFAULT_REGION, and an
S3-compatible endpoint from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import hmac
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["open_source"]

MAX_FILE_BYTES = 64 << 20  # a full entry bundle of 256 maximal entries is 16 MiB; bounds memory
TIMEOUT_S = 60


def _dir(root: Path) -> Callable[[str], bytes]:
    def read(path: str) -> bytes:
        with (root / path).open("rb") as fh:
            return fh.read(MAX_FILE_BYTES)
    return read


def _get(url: str, headers: Mapping[str, str]) -> bytes:
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310 (http(s) only, checked by caller)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310
            data: bytes = response.read(MAX_FILE_BYTES)
            return data
    except urllib.error.HTTPError as exc:
        if exc.code in (403, 404):  # S3 answers 403 for a missing key without ListBucket
            raise FileNotFoundError(url) from None
        raise


def _http(prefix: str) -> Callable[[str], bytes]:
    return lambda path: _get(f"{prefix.rstrip('/')}/{path}", {})


def _s3(bucket: str, prefix: str, env: Mapping[str, str]) -> Callable[[str], bytes]:
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    base = f"{endpoint.rstrip('/')}/{bucket}" if endpoint else f"https://{bucket}.s3.{region}.amazonaws.com"
    access, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")

    def read(path: str) -> bytes:
        url = f"{base}/{urllib.parse.quote(prefix + path)}"
        if not access or not secret:
            return _get(url, {})  # a public bucket
        parts = urllib.parse.urlsplit(url)
        now = dt.datetime.now(dt.UTC)
        amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        headers = {"host": parts.netloc, "x-amz-content-sha256": hashlib.sha256(b"").hexdigest(),
                   "x-amz-date": amz_date}
        if env.get("AWS_SESSION_TOKEN"):
            headers["x-amz-security-token"] = env["AWS_SESSION_TOKEN"]
        signed = ";".join(sorted(headers))
        canonical = "\n".join(["GET", parts.path, "", *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                               signed, headers["x-amz-content-sha256"]])
        scope = f"{day}/{region}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        key = f"AWS4{secret}".encode()
        for part in (day, region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access}/{scope}, SignedHeaders={signed}, "
                                    f"Signature={signature}")
        return _get(url, {k: v for k, v in headers.items() if k != "host"})
    return read


def open_source(location: str, env: Mapping[str, str] | None = None) -> Callable[[str], bytes]:
    """`DIR`, `http(s)://host/prefix` or `s3://bucket/prefix`; OSError if DIR is not a directory."""
    if location.startswith(("http://", "https://")):
        return _http(location)
    if location.startswith("s3://"):
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {location!r}")
        return _s3(bucket, prefix.strip("/") + "/" if prefix.strip("/") else "", os.environ if env is None else env)
    root = Path(location)
    if not root.is_dir():  # a mistyped path is not a log whose checkpoint was removed: nothing was read
        raise (NotADirectoryError if root.exists() else FileNotFoundError)(
            errno.ENOTDIR if root.exists() else errno.ENOENT, "not a directory" if root.exists() else
            "no such directory", location)
    return _dir(root)
