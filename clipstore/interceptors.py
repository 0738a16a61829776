"""The interceptor chain every RPC passes through:

request id → authentication → role check → a slot of the principal's share → the request
body (read only now, within a time limit) → handler → error mapping → access log.

Servicers raise `ClipstoreError`s; this is the one place that turns them into
a gRPC status carrying `google.rpc.ErrorInfo`.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import grpc
import sqlalchemy as sa
import structlog

from clipstore.admission import PrincipalSlots, Timer, Watchdog
from clipstore.auth import PUBLIC_PREFIXES, authorize, request_metadata
from clipstore.clips import key_failure
from clipstore.config import ServingConfig
from clipstore.errors import (
    Cancelled,
    ClipstoreError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from clipstore.logs import get_logger
from clipstore.rows import Principal
from clipstore.servicers.status import grpc_status, status_code
from clipstore.unit import Actor
from kms import KmsError

REQUEST_ID_HEADER = "x-request-id"
# Only UUID-shaped ids are adopted: request ids reach the audit log, so they must not carry names or
# account numbers a client might otherwise put there.
_REQUEST_ID_RE = re.compile(r"^(?:[0-9a-fA-F]{32}|"
                            r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$")
log = get_logger("clipstore.rpc")


@dataclass(frozen=True, kw_only=True)
class RequestContext:
    request_id: str
    method: str
    principal: Principal | None
    # gRPC's peer string, e.g. ipv4:10.0.0.7:53122; read for a refused call only, for the denial ledger, which
    # writes its pseudonym (clipstore.peers): an address is personal data, never logged or audited
    peer: str = ""


_current: ContextVar[RequestContext | None] = ContextVar("clipstore_request", default=None)


def current_request() -> RequestContext:
    """The request being served on this thread; `RuntimeError` outside an RPC."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("current_request() called outside an RPC")
    return ctx


def current_actor() -> Actor:
    """The authenticated caller of the current RPC, for audit records."""
    ctx = current_request()
    if ctx.principal is None:
        raise RuntimeError("current_actor() called in an unauthenticated RPC")
    return Actor(id=ctx.principal.id, role=ctx.principal.role, request_id=ctx.request_id)


Authenticator = Callable[[Mapping[str, str], grpc.ServicerContext], Principal]
DenialHook = Callable[[RequestContext, ClipstoreError], None]
STREAM_CUT_GRACE_S = 5.0  # a stream still moving past its limit is refused in-band; a stalled one is cut


class _Limits:
    """The time limits of one call: its stream deadline and the watchdog timers armed for it."""

    def __init__(self, watchdog: Watchdog, context: grpc.ServicerContext) -> None:
        self._watchdog, self.context = watchdog, context
        self.timers: list[Timer] = []
        self.stream_ends_at: float | None = None
        self.request_ended = False  # the request stream reached its end (as far as grpcio says)

    def arm(self, after_s: float, limit: str) -> Timer:
        timer = self._watchdog.arm(after_s, limit, self.context.cancel)
        self.timers.append(timer)
        return timer

    def check_stream(self) -> None:
        if self.stream_ends_at is not None and time.monotonic() > self.stream_ends_at:
            raise ResourceExhausted("the stream has run longer than the server allows; send or read faster, "
                                    "or split the work", reason="STREAM_TOO_LONG")

    def cut_by(self) -> str | None:
        return next((t.limit for t in self.timers if t.fired), None)


class ClipstoreInterceptor(grpc.ServerInterceptor):
    """Runs the chain around every handler; see the module docstring.

    Every handler is served request-streaming, whatever its declared shape. grpcio's sync server
    reads a unary request on a worker thread before it calls the handler, so a caller that opens
    calls and never sends their messages holds every worker before anyone knows who it is (32
    such calls stopped health and every role). A request-streaming handler starts at once: the
    chain checks credentials first and reads the body only for a caller who passed, within
    `request_body_timeout_s`; a refused caller's message is never read.
    """

    def __init__(self, authenticate: Authenticator, *, serving: ServingConfig,
                 on_denied: DenialHook | None = None,
                 on_finished: Callable[[str, str, float], None] | None = None,
                 public_pool: futures.ThreadPoolExecutor | None = None,
                 parsers: Mapping[str, Callable[[bytes], Any]] | None = None) -> None:
        """`parsers`: by full method name, what decodes its request messages instead of the generated
        deserializer (PutClip's hands audio chunks on uncopied)."""
        self._authenticate = authenticate
        self._serving = serving
        self._on_denied = on_denied
        self._on_finished = on_finished
        self._public_pool = public_pool
        self._parsers = dict(parsers or {})
        self._slots = PrincipalSlots(serving.max_calls_per_principal)
        self._watchdog = Watchdog()

    def close(self) -> None:
        self._watchdog.close()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        metadata = request_metadata(details.invocation_metadata or ())
        public = method.startswith(PUBLIC_PREFIXES)
        streaming = handler.request_streaming or handler.response_streaming
        behavior = getattr(handler, ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary"))
        parse = _parser(self._parsers.get(method, handler.request_deserializer))
        read = self._read_stream if handler.request_streaming else self._read_one

        # The request id of a unary request goes out with the first response (headers) or with a failure
        # (trailers), never before: a failure that is the call's only answer is then "Trailers-Only",
        # which is what lets a gRPC retry policy (the published service config) retry UNAVAILABLE;
        # headers sent early commit a call. A client streaming its request (PutClip, which its client
        # retries itself, with its key) gets them at once: it knows the server reads.
        early = handler.request_streaming
        if handler.response_streaming:
            def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
                with self._scope(method, metadata, public, streaming, context, early) as limits:
                    headers = early or None
                    for response in behavior(read(requests, parse, limits), context):
                        limits.check_stream()
                        headers = headers or _send_headers(context)
                        yield response
                    if headers is None:
                        _send_headers(context)
            factory = grpc.stream_stream_rpc_method_handler
        else:
            def run(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:  # type: ignore[misc]
                with self._scope(method, metadata, public, streaming, context, early) as limits:
                    response = behavior(read(requests, parse, limits), context)
                    if not early:
                        _send_headers(context)
                    return response
            factory = grpc.stream_unary_rpc_method_handler
        if public and self._public_pool is not None:
            # Health and reflection answer anyone, so they run on their own few threads: callers
            # holding those cannot take a worker from authenticated RPCs.
            run.experimental_thread_pool = self._public_pool  # type: ignore[attr-defined]
        # The request bytes reach us undecoded: grpcio answers a body that does not parse with
        # INTERNAL ("Exception deserializing request!"), which is the caller's error, not ours.
        return factory(run, request_deserializer=None, response_serializer=handler.response_serializer)

    # -- reading the request -------------------------------------------------
    def _read_one(self, requests: Iterator[bytes], parse: Callable[[bytes], Any], limits: _Limits) -> Any:
        timer = limits.arm(self._serving.request_body_timeout_s, "request_body_timeout_s")
        try:
            raw = next(requests, None)
        finally:
            Watchdog.disarm(timer)
        if raw is None and _ended_after_settling(limits.context):
            raise _ended(limits)
        if raw is None:
            raise InvalidArgument("request", "this method takes exactly one request message",
                                  reason="MALFORMED_REQUEST")
        return parse(raw)

    @staticmethod
    def _read_stream(requests: Iterator[bytes], parse: Callable[[bytes], Any], limits: _Limits) -> Iterator[Any]:
        for raw in requests:
            limits.check_stream()
            yield parse(raw)
        limits.request_ended = True
        if limits.cut_by():  # the watchdog cut the call: its end is not the client's
            raise _ended(limits)

    # -- the chain -------------------------------------------------------
    def _request_context(self, method: str, metadata: Mapping[str, str],
                         context: grpc.ServicerContext, early_headers: bool) -> RequestContext:
        incoming = metadata.get(REQUEST_ID_HEADER, "")
        # 128 random bits as 32 hex digits, the shape adopted above (uuid4().hex cost twice as much: a UUID built
        # and taken apart again, every call)
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else secrets.token_hex(16)
        if early_headers:
            context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        structlog.contextvars.bind_contextvars(request_id=request_id)
        return RequestContext(request_id=request_id, method=method, principal=None)

    def _admitted(self, ctx: RequestContext, metadata: Mapping[str, str],
                  context: grpc.ServicerContext) -> RequestContext:
        """Who is calling, may their role call this, and do they have a free slot."""
        try:
            ctx = replace(ctx, principal=self._authenticate(metadata, context))
            assert ctx.principal is not None
            authorize(ctx.principal, ctx.method)
            if not self._slots.acquire(ctx.principal.id):
                raise ResourceExhausted(f"{self._serving.max_calls_per_principal} calls of this principal are "
                                        "in flight; finish some, then retry", reason="TOO_MANY_CALLS")
        except ClipstoreError as exc:
            if self._on_denied is not None:
                # the peer only now: asked of every call, it took ~0.16 ms of wall time each in a loaded server
                self._on_denied(replace(ctx, peer=context.peer()), exc)
            raise
        return ctx

    @staticmethod
    def _error_for(exc: Exception, ctx: RequestContext) -> ClipstoreError:
        """The one status a failed call ends with."""
        translated = translate(exc)
        if translated is not None:
            return translated
        if isinstance(exc, NotImplementedError):
            return Unimplemented(f"{ctx.method} is not implemented in this release")
        log.error("rpc.unhandled_exception", method=ctx.method, exc_type=type(exc).__name__)
        return Internal(f"internal error; retry later and quote request id {ctx.request_id}")

    @contextmanager
    def _scope(self, method: str, metadata: Mapping[str, str], public: bool, streaming: bool,
               context: grpc.ServicerContext, early_headers: bool) -> Iterator[_Limits]:
        started = time.perf_counter()
        ctx = self._request_context(method, metadata, context, early_headers)
        limits = _Limits(self._watchdog, context)
        status = "OK"
        holding: str | None = None  # the principal whose slot this call holds
        try:
            if not public:
                ctx = self._admitted(ctx, metadata, context)
                holding = ctx.principal.id if ctx.principal else None
            if streaming:
                limits.stream_ends_at = time.monotonic() + self._serving.stream_max_s
                limits.arm(self._serving.stream_max_s + STREAM_CUT_GRACE_S, "stream_max_s")
            token = _current.set(ctx)
            try:
                yield limits
            finally:
                _current.reset(token)
            # A handler can finish normally after its client left (grpcio may end a request
            # iterator as if half-closed when the client cancels): the client got no answer.
            status = _ended_early(context) or status
        except GeneratorExit:
            status = "CANCELLED"
            raise
        except Exception as exc:
            # A call that ended under the handler has nobody to tell; record what happened (aborting
            # a dead call sends nothing, and keeps grpcio from logging the exception as a crash).
            ended = _ended_early(context)
            if not ended and limits.request_ended and isinstance(exc, InvalidArgument):
                ended = _ended_after_settling(context)  # a "missing part" may be a cancelled upload
            error = _ended(limits) if ended else self._error_for(exc, ctx)
            status = ended or status_code(error).name
            answer = grpc_status(error, ctx.request_id)
            try:
                context.abort_with_status(_Status(answer.code, answer.details, (
                    *answer.trailing_metadata, (REQUEST_ID_HEADER, ctx.request_id))))
            finally:
                # The error's traceback holds this frame (whose `error` is most often `exc`), and every frame
                # it left, some holding it too (`deny_alone(..., error)` raises the error it was given):
                # cycles that kept the call, and its HTTP/2 stream (max_concurrent_streams), alive until
                # the collector ran. The status is decided; nothing reads the traceback after this.
                exc.with_traceback(None)
                del error, answer
        finally:
            for timer in limits.timers:
                Watchdog.disarm(timer)
            if holding is not None:
                self._slots.release(holding)
            elapsed = time.perf_counter() - started
            log.info("rpc", method=ctx.method, status=status,
                     principal=ctx.principal.id if ctx.principal else None,
                     role=ctx.principal.role if ctx.principal else None,
                     duration_ms=round(elapsed * 1000, 3), **_cut(limits))
            if self._on_finished is not None:
                self._on_finished(method, status, elapsed)
            structlog.contextvars.unbind_contextvars("request_id")


CANCEL_SETTLE_S = 0.05  # how long a cancellation notice may trail the end of the request it caused


def _ended_after_settling(context: grpc.ServicerContext) -> str | None:
    """`_ended_early`, for a request that ended where it should not have. grpcio ends a request
    iterator as if the client half-closed when the call is cancelled (or a message is refused) and
    reports the cancellation a moment later, so this gives that notice a moment to arrive. It runs
    only on that path (no message at all; a request stream that ended and then failed the handler's
    checks), never for a call that went as it should."""
    deadline = time.monotonic() + CANCEL_SETTLE_S
    while context.is_active() and time.monotonic() < deadline:
        time.sleep(0.005)
    return _ended_early(context)


def _send_headers(context: grpc.ServicerContext) -> bool:
    context.send_initial_metadata(((REQUEST_ID_HEADER, current_request().request_id),))
    return True


@dataclass(frozen=True)
class _Status(grpc.Status):
    """A `grpc.Status` (grpc_status builds the same) whose trailers also carry the request id."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def _ended(limits: _Limits) -> Cancelled:
    limit = limits.cut_by()
    return Cancelled(f"the server ended the call at its limit {limit}" if limit else
                     "the call ended before the server finished (cancelled, deadline passed, or a message "
                     "the transport refused)")


def _cut(limits: _Limits) -> dict[str, str]:
    """For the access log: the limit the watchdog cancelled this call for, if it did."""
    limit = limits.cut_by()
    return {"cut_by": limit} if limit else {}


def _parser(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """Decode request bytes inside the chain, so a malformed body is the caller's INVALID_ARGUMENT."""
    def parse(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError, or anything a third-party deserializer raises
            raise InvalidArgument("request", "the message does not parse as this method's request type",
                                  reason="MALFORMED_REQUEST") from None
    return parse


def _ended_early(context: grpc.ServicerContext) -> str | None:
    """How a call ended under its handler, if it did: the client cancelled it, its deadline passed, or
    the transport refused one of its messages (e.g. larger than max_message_bytes, which the client
    sees as RESOURCE_EXHAUSTED but the server only as a cancelled call). None while it is active."""
    if context.is_active():
        return None
    return "DEADLINE_EXCEEDED" if context.time_remaining() <= 0 else "CANCELLED"


def translate(exc: BaseException) -> ClipstoreError | None:
    """Errors of the layers below (key ring, database) as the status a caller should see."""
    if isinstance(exc, ClipstoreError):
        return exc
    if isinstance(exc, KmsError):
        return key_failure(exc)
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError) or (  # Timeout: pool
            isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated):  # the connection dropped, whatever
        return Unavailable("the metadata database is unavailable; retry later", reason="DATABASE_UNAVAILABLE")
    return None
