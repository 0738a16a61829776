"""The interceptor chain every RPC passes through:

request id → authentication → role check → handler → error mapping → access log.

Servicers raise `ClipstoreError`s; this is the one place that turns them into
a gRPC status carrying `google.rpc.ErrorInfo`.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import grpc
import sqlalchemy as sa
import structlog

from clipstore.audit import Actor, AuditLog, AuditRecord
from clipstore.auth import PUBLIC_PREFIXES, authorize
from clipstore.errors import (
    ClipstoreError,
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)
from clipstore.logs import get_logger
from clipstore.servicers.status import grpc_status, status_code
from clipstore.store.principals import Principal
from kms import AccountKeysDestroyed, DekUnwrapError, KeyVersionError, KmsAccessDenied, KmsError

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


class ClipstoreInterceptor(grpc.ServerInterceptor):
    """Runs the chain around every handler; see the module docstring."""

    def __init__(self, authenticate: Authenticator, on_denied: DenialHook | None = None,
                 on_finished: Callable[[str, str, float], None] | None = None) -> None:
        self._authenticate = authenticate
        self._on_denied = on_denied
        self._on_finished = on_finished

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
        public = method.startswith(PUBLIC_PREFIXES)
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        kind = ("stream" if handler.request_streaming else "unary") + "_" + (
            "stream" if handler.response_streaming else "unary")
        behavior = getattr(handler, kind)
        parse = _parser(handler.request_deserializer, handler.request_streaming)
        wrapped = wrap(behavior, parse, method, metadata, public)
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        # The request bytes reach us undecoded: grpcio answers a body that does not parse with
        # INTERNAL ("Exception deserializing request!"), which is the caller's error, not ours.
        return factory(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)

    # -- the chain -------------------------------------------------------
    def _request_context(self, method: str, metadata: Mapping[str, str],
                         context: grpc.ServicerContext) -> RequestContext:
        incoming = metadata.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        context.send_initial_metadata(((REQUEST_ID_HEADER, request_id),))
        structlog.contextvars.bind_contextvars(request_id=request_id)
        return RequestContext(request_id=request_id, method=method, principal=None)

    def _authenticated(self, ctx: RequestContext, metadata: Mapping[str, str],
                       context: grpc.ServicerContext) -> RequestContext:
        try:
            ctx = replace(ctx, principal=self._authenticate(metadata, context))
            authorize(ctx.principal, ctx.method)  # type: ignore[arg-type]
        except ClipstoreError as exc:
            if self._on_denied is not None:
                self._on_denied(ctx, exc)
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
    def _scope(self, method: str, metadata: Mapping[str, str], public: bool,
               context: grpc.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        ctx = self._request_context(method, metadata, context)
        status = "OK"
        try:
            if not public:
                ctx = self._authenticated(ctx, metadata, context)
            token = _current.set(ctx)
            try:
                yield
            finally:
                _current.reset(token)
            # A handler can finish normally after its client left (grpcio may end a request
            # iterator as if half-closed when the client cancels): the client got no answer.
            status = _ended_early(context) or status
        except GeneratorExit:
            status = "CANCELLED"
            raise
        except Exception as exc:
            ended = _ended_early(context)
            if ended is not None:  # nobody is listening any more: record what happened, send nothing
                status = ended
            else:
                error = self._error_for(exc, ctx)
                status = status_code(error).name
                context.abort_with_status(grpc_status(error, ctx.request_id))
        finally:
            elapsed = time.perf_counter() - started
            log.info("rpc", method=ctx.method, status=status,
                     principal=ctx.principal.id if ctx.principal else None,
                     role=ctx.principal.role if ctx.principal else None,
                     duration_ms=round(elapsed * 1000, 3))
            if self._on_finished is not None:
                self._on_finished(method, status, elapsed)
            structlog.contextvars.unbind_contextvars("request_id")

    def _wrap_unary(self, behavior: Callable[..., Any], parse: Callable[[Any], Any], method: str,
                    metadata: Mapping[str, str], public: bool) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            with self._scope(method, metadata, public, context):
                return behavior(parse(request), context)
        return run

    def _wrap_stream(self, behavior: Callable[..., Iterator[Any]], parse: Callable[[Any], Any], method: str,
                     metadata: Mapping[str, str], public: bool) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._scope(method, metadata, public, context):
                yield from behavior(parse(request), context)
        return run


def _parser(deserialize: Callable[[bytes], Any] | None, streaming: bool) -> Callable[[Any], Any]:
    """Decode request bytes inside the chain, so a malformed body is the caller's INVALID_ARGUMENT."""
    def one(raw: bytes) -> Any:
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError, or anything a third-party deserializer raises
            raise InvalidArgument("request", "the message does not parse as this method's request type",
                                  reason="MALFORMED_REQUEST") from None
    if not streaming:
        return one
    return lambda raws: (one(raw) for raw in raws)


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
    if isinstance(exc, AccountKeysDestroyed):
        return NotFound("the account was deleted; its clips can never be opened", reason="ACCOUNT_DELETED")
    if isinstance(exc, KeyVersionError):
        return FailedPrecondition("the clip's key version is retired or unknown; an operator must rewrap it",
                                  reason="KEY_VERSION_UNAVAILABLE")
    if isinstance(exc, DekUnwrapError):
        return DataLoss("the clip's data key does not open; the event was recorded", reason="CLIP_INTEGRITY")
    if isinstance(exc, KmsAccessDenied):
        return Unavailable("the service cannot use its root key; operators: check the KMS key policy and state",
                           reason="KMS_ACCESS_DENIED")
    if isinstance(exc, KmsError):
        return Unavailable("the key service is unavailable; retry later", reason="KMS_UNAVAILABLE")
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
        return Unavailable("the metadata database is unavailable; retry later", reason="DATABASE_UNAVAILABLE")
    return None


def audit_denial(audit: AuditLog, ctx: RequestContext, error: ClipstoreError) -> None:
    """Record a refused credential or role; if even that fails, the call fails as it would anyway."""
    principal = ctx.principal
    record = AuditRecord(actor_id=principal.id if principal else "anonymous",
                         actor_role=principal.role if principal else "", action="auth.deny",
                         outcome="denied", reason=error.reason, request_id=ctx.request_id,
                         # whose disabled, expired, rotated-out or revoked credential was presented
                         principal_id=getattr(error, "principal_id", ""))
    try:
        audit.append(record)
    except Exception as exc:
        log.error("audit.denial_not_recorded", exc_type=type(exc).__name__)
