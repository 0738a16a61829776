"""S3BlobStore: boto3 against any S3-compatible endpoint; multipart for large objects.

Three calls, the ones made per clip, take a fast path (`_FastPath`): the GetObject of a fetch, the ranged
GetObject, and the PutObject of a clip that fits one request (under `part_bytes`). botocore's per-call
pipeline (event hooks, endpoint ruleset resolution, parameter validation and serialization, response
parsing) cost more client CPU than the request: ~40 % of the server's CPU in a PutClip of a 32 KiB clip,
~20 % in a review's FetchClip. Against moto's server, 32 KiB, client CPU per call through this store
(medians of 5 x 300 calls, 2 shared cores): put_stream 0.95-1.05 ms -> 0.53-0.59 ms, get_stream
0.88-1.00 -> 0.48-0.53 ms, read_range 0.91-0.99 -> 0.48-0.62 ms. What is left is SigV4 signing and
http.client. In bench/ingest.py --only 32k (5 runs each, alternated), the server's CPU per PutClip went from
a median 3.44 to 2.66 ms and PutClip's wall time against raw boto3 put_object from 1.52x to 1.31x.

The fast path keeps botocore for what it does well: credentials (refreshable ones refresh per call), SigV4
signing, its HTTP session and its `before-send` event (moto's in-process mock answers there). The object URL
and signing region are the ones botocore's endpoint rules give a get_object of this client, learned once.
It is tried once: anything but the answer asked for (a PUT's 2xx; a GET's 200, or 206 for a range; so a 404,
a connection cut, a timeout too) is dropped and the same call is made through the boto3 client, so errors,
retries and region redirects are exactly boto3's, at the cost of one extra request on a failure. A body
that fails after its first bytes were handed out cannot start again: that is BlobUnavailable, and a body
shorter than its Content-Length raises, never ends early.
Multipart uploads, HEAD, DELETE, listings, the sweep and the health probe stay on the boto3 client.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import http.client
import os
import re
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.exceptions
import botocore.hooks
import botocore.httpsession
import botocore.response
import botocore.session
import botocore.utils
import urllib3.exceptions

from clipstore.blobs._buffers import BufferPool
from clipstore.blobs.protocol import READ_CHUNK_BYTES, BlobNotFound, BlobUnavailable
from clipstore.logs import get_logger

log = get_logger("clipstore.blobs")
FALLBACK_WARN_EVERY_S = 60.0  # a fast path that keeps falling back doubles the requests: said, not flooded

T = TypeVar("T")
PART_BYTES = 6 * 1024 * 1024  # ≥ the S3 minimum (5 MiB); a 5 MiB clip still goes in one PUT
# Upload buffers (clipstore.blobs._buffers) hold a part and the chunk that completes it (the envelope's are
# 64 KiB + a tag); 8 are kept for reuse, made only when bodies over 1 MiB are in flight: 56 MiB at most.
BUFFER_SLACK_BYTES = 1 << 20
UPLOAD_BUFFERS = 8
SWEEP_PAGE_UPLOADS = 1_000  # ListMultipartUploads' own maximum per page
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


def _timestamp(value: str) -> datetime:
    """botocore's timestamp parser for the two forms S3 sends, without dateutil: an HTTP date (the
    Last-Modified header of every GET) and ISO 8601 (listings). dateutil's took ~65 us per GET here;
    anything else goes to botocore's own."""
    try:
        if value.endswith("Z"):
            return datetime.fromisoformat(value)
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        parsed: datetime = botocore.utils.parse_timestamp(value)
        return parsed


_URL_MARKER = "clipstore-fast-path-url-marker"  # a key that percent-encodes to itself
_PUT_CHECKSUM_HEADER = "x-amz-checksum-crc32"
_BODY_READ_ERRORS = (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(?:\d+|\*)")


class _Answer(NamedTuple):
    """A GetObject's body with what says which bytes it holds."""
    body: botocore.response.StreamingBody
    status: int
    content_range: str | None


def _range_held(answer: _Answer, first: int | None, last: int | None) -> int | None:
    """How many bytes `answer` holds if they are the ones asked for (the whole object when `first` is None;
    else from `first`, at most to `last`: S3 stops a range at the object's end), else None. A server that
    ignores Range answers 200 with the whole object, one that cuts a whole read answers 206: neither is taken."""
    if first is None or last is None:
        return -1 if answer.status == 200 and answer.content_range is None else None
    match = _CONTENT_RANGE.fullmatch(answer.content_range or "") if answer.status == 206 else None
    if match is None or int(match[1]) != first or not first <= int(match[2]) <= last:
        return None
    return int(match[2]) - first + 1


class _UrlLearned(Exception):
    """Stops the one get_object made at construction, before it is signed or sent."""


class _FastPath:
    """GetObject and a single-request PutObject without botocore's per-call pipeline (event hooks,
    endpoint rules, parameter validation and serialization, response parsing), which cost more client CPU
    than the request itself: see the module docstring. botocore still does what it does well: the
    credentials, SigV4 signing (S3SigV4Auth, with the request context its S3 rules read), the HTTP session
    (URLLib3Session, built as botocore's EndpointCreator builds the client's) and the `before-send` event,
    emitted as botocore's Endpoint emits it, so a handler's response (moto's in-process mock, a test's
    fault) is used instead of sending.

    Only the answer asked for is used (a PUT's 2xx; a GET's 200, or 206 for a range). On anything else
    (another status, an exception from the network or from a handler) `put` answers False and `get` None,
    and the store makes the same call through the boto3 client, which keeps its errors, retries and
    region redirects: one extra request, on a failure only."""

    def __init__(self, *, url_prefix: str, region: str, user_agent: str, credentials: botocore.credentials.Credentials,
                 events: Any, config: botocore.config.Config, http_session: botocore.httpsession.URLLib3Session,
                 sse_headers: dict[str, str]) -> None:
        self._url_prefix, self._region, self._credentials = url_prefix, region, credentials
        # botocore's, so that S3's access logs name one client for every call
        self._agent = {"User-Agent": user_agent} if user_agent else {}
        self._events, self._config, self._http, self._sse_headers = events, config, http_session, sse_headers
        self.fallbacks = 0  # fast attempts dropped for boto3 (a missing object's 404 is not one)
        self._warned_at: float | None = None

    @classmethod
    def for_client(cls, client: Any, core: botocore.session.Session, bucket: str,
                   sse_headers: dict[str, str]) -> _FastPath | None:
        """The fast path for the objects `client` reads in `bucket`, or None where it would not do what the
        client does: no credentials (anonymous), a signer other than SigV4 for "s3" (unsigned, SigV2, S3
        Express) or an object URL that does not end in its key."""
        credentials = core.get_credentials()
        if credentials is None:
            return None
        # The object URL and the signing region, as botocore's endpoint rules make them for a get_object of
        # this client and bucket (path-style for moto and custom endpoints, virtual-hosted on AWS). A
        # presigned URL would not do: botocore presigns S3 URLs with SigV2 on the global endpoint.
        seen: dict[str, Any] = {}

        def learn(request: botocore.awsrequest.AWSRequest, signing_name: str, region_name: str,
                  signature_version: object, **kwargs: object) -> None:
            signing = request.context.get("signing", {})
            agent = request.headers.get("User-Agent") or ""
            seen.update(url=request.url, user_agent=agent.decode() if isinstance(agent, bytes) else agent,
                        signing_name=signing.get("signing_name") or signing_name,
                        region=signing.get("region") or region_name, version=signature_version)
            raise _UrlLearned

        client.meta.events.register_first("before-sign.s3.GetObject", learn)
        try:
            client.get_object(Bucket=bucket, Key=_URL_MARKER)
        except _UrlLearned:
            pass
        except Exception:  # whatever stops botocore here, the boto3 client makes every call
            return None
        finally:
            client.meta.events.unregister("before-sign.s3.GetObject", learn)
        url = str(seen.get("url", ""))
        if (seen.get("version") not in ("s3v4", "v4") or seen.get("signing_name") != "s3" or not seen.get("region")
                or not url.endswith("/" + _URL_MARKER) or url.count(_URL_MARKER) != 1 or "?" in url):
            return None
        config = client.meta.config
        return cls(url_prefix=url[:-len(_URL_MARKER)], region=str(seen["region"]), user_agent=seen["user_agent"],
                   credentials=credentials, events=client.meta.events, config=config,
                   http_session=_http_session(config, core, client.meta.endpoint_url), sse_headers=sse_headers)

    def put(self, key: str, body: bytearray) -> bool:
        """PUT the object in one request, sending `body` in place; True once S3 has stored it."""
        headers = {"Content-Length": str(len(body)),
                   # S3 refuses a body damaged on the way, so no clip is acknowledged that could not be read back.
                   _PUT_CHECKSUM_HEADER: base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode(),
                   "x-amz-sdk-checksum-algorithm": "CRC32",  # as botocore sends it (moto stores the CRC by it)
                   **self._sse_headers}
        response = self._send("PUT", "PutObject", key, headers, body, stream=False)
        if response is None:
            return False
        if 200 <= response.status_code < 300:
            return True
        self._fell_back("PutObject", f"status {response.status_code}")
        _discard(response)
        return False

    def get(self, key: str, headers: dict[str, str]) -> _Answer | None:
        """The object's body (or the range in `headers`), its length enforced: a body that ends early raises.
        Only the status the request asks for is used (206 for a range, 200 for the whole object)."""
        response = self._send("GET", "GetObject", key, headers, None, stream=True)
        if response is None:
            return None
        if response.status_code != (206 if "Range" in headers else 200):
            if response.status_code != 404:  # a missing object is boto3's BlobNotFound, not a fast path's fault
                self._fell_back("GetObject", f"status {response.status_code}")
            _discard(response)
            return None
        length = response.headers.get("content-length")
        body = botocore.response.StreamingBody(response.raw, int(length) if length is not None else None)
        return _Answer(body, response.status_code, response.headers.get("content-range"))

    def _send(self, method: str, operation: str, key: str, headers: dict[str, str], body: bytearray | None, *,
              stream: bool) -> botocore.awsrequest.AWSResponse | None:
        try:
            request = botocore.awsrequest.AWSRequest(
                method=method, url=self._url_prefix + botocore.utils.percent_encode(key, safe="/~"),
                headers={**self._agent, **headers}, data=body, stream_output=stream)
            # What S3SigV4Auth reads to choose the payload hash, as botocore sets it for PutObject: over
            # HTTPS with the CRC32 header, a streaming body goes UNSIGNED-PAYLOAD; over HTTP it is hashed.
            request.context["client_config"] = self._config
            if body is not None:
                request.context.update(has_streaming_input=True, checksum={"request_algorithm": {
                    "in": "header", "algorithm": "crc32", "name": _PUT_CHECKSUM_HEADER}})
            frozen = self._credentials.get_frozen_credentials()  # refreshable credentials refresh here
            botocore.auth.S3SigV4Auth(frozen, "s3", self._region).add_auth(request)
            for name, value in request.headers.items():  # as botocore's Endpoint.prepare_request
                if isinstance(value, str):
                    request.headers[name] = value.encode("utf-8")
            prepared = request.prepare()
            responses = self._events.emit(f"before-send.s3.{operation}", request=prepared)
            response: botocore.awsrequest.AWSResponse | None = botocore.hooks.first_non_none_response(responses)
            return response if response is not None else self._http.send(prepared)
        except Exception as exc:  # any failure: the same call goes through the boto3 client
            self._fell_back(operation, type(exc).__name__)
            return None

    def _fell_back(self, operation: str, why: str) -> None:
        """Count a fast attempt dropped for boto3; warn at most every FALLBACK_WARN_EVERY_S (the operation and a
        status or exception type: never a key, URL or signature), so a store that refuses the fast form, or
        a wrong region, shows in the log instead of silently doubling every request."""
        self.fallbacks += 1
        now = time.monotonic()
        if self._warned_at is None or now - self._warned_at >= FALLBACK_WARN_EVERY_S:
            self._warned_at = now
            log.warning("s3.fast_path_fallback", operation=operation, why=why, fallbacks=self.fallbacks)


def _http_session(config: botocore.config.Config, core: botocore.session.Session,
                  endpoint_url: str) -> botocore.httpsession.URLLib3Session:
    """An HTTP session like the one botocore's EndpointCreator gives the client: its timeouts, pool size,
    TLS verification (ca_bundle, else REQUESTS_CA_BUNDLE, else the default store), client certificate,
    proxies (configured, else from the environment) and socket options. Its pool is its own, beside the
    client's (which carries multipart uploads, HEAD, DELETE, listings and the fallbacks)."""
    verify = core.get_config_variable("ca_bundle")
    if verify is None:
        verify = os.environ.get("REQUESTS_CA_BUNDLE", True)
    proxies = config.proxies if config.proxies is not None else botocore.utils.get_environ_proxies(endpoint_url)
    keepalive = config.tcp_keepalive
    if keepalive is None:
        keepalive = core.get_config_variable("tcp_keepalive")
    socket_options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if keepalive:
        socket_options.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
    return botocore.httpsession.URLLib3Session(
        verify=verify, proxies=proxies, timeout=(config.connect_timeout, config.read_timeout),
        max_pool_connections=config.max_pool_connections, socket_options=socket_options,
        client_cert=config.client_cert, proxies_config=config.proxies_config)


def _discard(response: botocore.awsrequest.AWSResponse) -> None:
    """Close an answer that is not used (its connection is not reused: its body may be unread)."""
    with contextlib.suppress(Exception):
        response.raw.close()


class S3BlobStore:
    def __init__(self, bucket: str, *, prefix: str = "clips/", client: Any | None = None,
                 endpoint_url: str | None = None, region: str | None = None, profile: str | None = None,
                 sse_kms_key_id: str | None = None, part_bytes: int = PART_BYTES, connections: int = 10) -> None:
        if part_bytes < 5 * 1024 * 1024:
            raise ValueError("part_bytes must be at least 5 MiB (an S3 limit)")
        self.bucket, self.prefix, self.part_bytes = bucket, prefix, part_bytes
        self._buffers = BufferPool(capacity=part_bytes + BUFFER_SLACK_BYTES, count=UPLOAD_BUFFERS)
        config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                        connect_timeout=5, read_timeout=30,
                                        # One per call that may be in S3 at once: a smaller pool drops and
                                        # reopens connections under load (a TCP handshake per clip).
                                        max_pool_connections=connections,
                                        # Uploads keep botocore's CRC32 (S3 refuses a body damaged on the
                                        # way, so no clip is acknowledged that could not be read back).
                                        # Reads skip its check: every byte served is authenticated by the
                                        # envelope's AES-GCM (a damaged object is an integrity failure, audited),
                                        # and the CRC took 80 % of a 5 MiB GET's client CPU.
                                        response_checksum_validation="when_required")
        core = botocore.session.get_session()
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
        session = boto3.session.Session(profile_name=profile, botocore_session=core)
        self.client = client or session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        # Defence in depth: the object is already sealed; SSE-KMS adds the bucket's own key.
        self._sse = {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": sse_kms_key_id} if sse_kms_key_id else {}
        sse_headers = {"x-amz-server-side-encryption": "aws:kms",
                       "x-amz-server-side-encryption-aws-kms-key-id": sse_kms_key_id} if sse_kms_key_id else {}
        # A client given by the caller keeps every call: its session, hence its credentials, is not ours.
        self._fast = None if client is not None else _FastPath.for_client(self.client, core, bucket, sse_headers)

    def __repr__(self) -> str:
        return f"S3BlobStore(bucket={self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _MISSING:
                raise BlobNotFound("clip object is missing") from None
            raise BlobUnavailable(f"blob store error {code}; retry later") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise BlobUnavailable(f"blob store unreachable ({type(exc).__name__}); retry later") from None

    def _upload_part(self, key: str, upload_id: str, parts: list[dict[str, Any]], body: bytearray) -> None:
        number = len(parts) + 1
        etag = self._call(lambda: self.client.upload_part(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id,
                                                          PartNumber=number, Body=body))["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})

    def check(self) -> None:
        self._call(lambda: self.client.head_bucket(Bucket=self.bucket))

    def put_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        # The object, or a part, is written into a buffer used again by later uploads and handed to
        # botocore as a bytearray of exactly its length, which it hashes and sends in place (see _buffers).
        # A part goes as soon as it holds part_bytes, whole (S3 parts need not be equal; all but the last
        # must be >= 5 MiB).
        size, parts = 0, []  # type: ignore[var-annotated]
        upload_id: str | None = None
        with self._buffers.assembly() as buf:
            try:
                for chunk in chunks:
                    buf.write(chunk)
                    if buf.size >= self.part_bytes:
                        if upload_id is None:
                            upload_id = self._call(lambda: self.client.create_multipart_upload(
                                Bucket=self.bucket, Key=self._key(key), **self._sse))["UploadId"]
                        self._upload_part(key, upload_id, parts, buf.body())
                        size += buf.size
                        buf.reset()
                size += buf.size
                if upload_id is None:
                    body = buf.body()
                    if self._fast is None or not self._fast.put(self._key(key), body):
                        self._call(lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body,
                                                                  **self._sse))
                    return size
                if buf.size:
                    self._upload_part(key, upload_id, parts, buf.body())
                self._call(lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": parts}))
                return size
            except BaseException:
                if upload_id is not None:  # leave no multipart upload behind
                    with contextlib.suppress(Exception):
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key),
                                                           UploadId=upload_id)
                raise

    def _get(self, key: str, first: int | None = None, last: int | None = None) -> tuple[
            botocore.response.StreamingBody, int]:
        """The object's body (or its bytes `first` to `last`): the fast path's, else boto3's; with how many
        bytes it holds (-1: the whole object). An answer holding other bytes than asked is BlobUnavailable."""
        extra = {"Range": f"bytes={first}-{last}"} if first is not None else {}
        answer = self._fast.get(self._key(key), extra) if self._fast is not None else None
        if answer is None:
            response = self._call(lambda: self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra))
            answer = _Answer(response["Body"], response["ResponseMetadata"]["HTTPStatusCode"],
                             response.get("ContentRange"))
        held = _range_held(answer, first, last)
        if held is None:
            answer.body.close()
            raise BlobUnavailable("the blob store answered other bytes than were asked for; retry later")
        return answer.body, held

    def _read(self, body: botocore.response.StreamingBody, amount: int | None) -> bytes:
        """Read from a body; past its first byte nothing falls back or retries: a failure is BlobUnavailable,
        and a body shorter than its Content-Length raises (IncompleteReadError), it never ends early."""
        try:
            chunk: bytes = self._call(lambda: body.read(amount))
            return chunk
        except _BODY_READ_ERRORS as exc:
            raise BlobUnavailable(f"blob store read failed ({type(exc).__name__}); retry later") from None

    def get_stream(self, key: str) -> Iterator[bytes]:
        body, _ = self._get(key)
        try:
            while chunk := self._read(body, READ_CHUNK_BYTES):
                yield chunk
        finally:
            body.close()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        body, held = self._get(key, offset, offset + length - 1)
        try:
            data = bytes(self._read(body, held + 1))
        finally:
            body.close()
        if len(data) != held:  # a Content-Length longer than its Content-Range
            raise BlobUnavailable("the blob store answered other bytes than were asked for; retry later")
        return data

    def size(self, key: str) -> int:
        return int(self._call(lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)))
                   ["ContentLength"])

    def delete(self, key: str) -> None:
        self._call(lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def list_keys(self, older_than_s: float) -> Iterator[str]:
        cutoff = time.time() - older_than_s
        paginator = self.client.get_paginator("list_objects_v2")
        for page in self._call(lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))):
            for obj in page.get("Contents", []):
                if obj["LastModified"].timestamp() < cutoff:
                    yield obj["Key"][len(self.prefix):]

    def _abort(self, key: str, upload_id: str) -> bool:
        """False if the upload was already gone: another replica's sweep aborted it, or it completed."""
        def abort() -> bool:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
                    return False
                raise
            return True
        return self._call(abort)

    def sweep_incomplete(self, older_than_s: float) -> int:
        """Abort every multipart upload under the prefix begun before `older_than_s` ago, on every page of
        ListMultipartUploads (S3 answers at most 1,000 uploads a call)."""
        cutoff, removed = time.time() - older_than_s, 0
        markers: dict[str, str] = {}
        while True:
            resp = self._call(functools.partial(self.client.list_multipart_uploads, Bucket=self.bucket,
                                                Prefix=self.prefix, MaxUploads=SWEEP_PAGE_UPLOADS, **markers))
            for upload in resp.get("Uploads", []):
                if upload["Initiated"].timestamp() < cutoff and self._abort(upload["Key"], upload["UploadId"]):
                    removed += 1
            following = {name: resp[f"Next{name}"] for name in ("KeyMarker", "UploadIdMarker")
                         if resp.get(f"Next{name}")}
            # a store that says "truncated" without moving its markers would keep this loop going: stop
            if not resp.get("IsTruncated") or "KeyMarker" not in following or following == markers:
                return removed
            markers = following
