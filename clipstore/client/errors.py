"""One exception class per error reason, generated from `clipstore.errors.Reason`.

Every reason `FOO_BAR` the server can send raises `FooBarError`, a subclass of
`ClipstoreRpcError` carrying the gRPC `code`, the `reason`, the server's
`message`, the `request_id` to quote and the rest of the `ErrorInfo` metadata
(e.g. `field` for INVALID_ARGUMENT). The classes are built at import time from
the reason list, so a reason added to the server is a class here without a
copy to keep in step. A failure without a clipstore `ErrorInfo` (a deadline, a
refused connection, a reason newer than this client) raises `ClipstoreRpcError`
itself with `reason` set to what was received, or None.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import Any, cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from clipstore.errors import ERROR_DOMAIN, Kind, Reason
from clipstore.servicers.status import STATUS_BY_KIND

_STATUS_TRAILER = "grpc-status-details-bin"


class ClipstoreRpcError(Exception):
    """A failed clipstore call. Catch a generated subclass (`GrantExpiredError`) or this and read `reason`."""

    #: What went wrong, by meaning; None when the server sent no clipstore reason.
    kind: Kind | None = None

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str | None = None,
                 request_id: str | None = None, metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{code.name}{f' {reason}' if reason else ''}: {message}"
                         f"{f' (request id {request_id})' if request_id else ''}")
        self.code = code
        self.reason = reason
        self.message = message
        self.request_id = request_id
        self.metadata = dict(metadata or {})

    @property
    def retryable(self) -> bool:
        """The server (or the transport) says nothing was done and a retry may succeed."""
        return self.code is grpc.StatusCode.UNAVAILABLE


def _class_name(reason: Reason) -> str:
    name = "".join(part.capitalize() for part in reason.split("_")) + "Error"
    # NOT_IMPLEMENTED must not shadow the builtin NotImplementedError for callers who import it.
    return f"Clipstore{name}" if hasattr(builtins, name) else name


def _generated(reason: Reason) -> type[ClipstoreRpcError]:
    doc = f"{STATUS_BY_KIND[reason.kind].name} `{reason}`: {reason.advice}."
    return type(_class_name(reason), (ClipstoreRpcError,),
                {"__doc__": doc, "__module__": __name__, "kind": reason.kind})


#: The class raised for each reason.
BY_REASON: Mapping[Reason, type[ClipstoreRpcError]] = {reason: _generated(reason) for reason in Reason}
globals().update({cls.__name__: cls for cls in BY_REASON.values()})
__all__ = ["BY_REASON", "ClipstoreRpcError", "from_rpc_error", *(cls.__name__ for cls in BY_REASON.values())]


def __getattr__(name: str) -> type[ClipstoreRpcError]:
    """Only reached for names that were not generated; typed so checkers accept `errors.GrantExpiredError`."""
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}: no clipstore reason maps to it")


def _error_info(trailing: Sequence[tuple[str, Any]] | None) -> error_details_pb2.ErrorInfo | None:
    for key, value in trailing or ():
        if key == _STATUS_TRAILER:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                    return info
    return None


def from_rpc_error(err: grpc.RpcError, *, trailing_metadata: Sequence[tuple[str, Any]] | None = None,
                   request_id: str | None = None) -> ClipstoreRpcError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: grpc.StatusCode = err.code()
    message: str = err.details() or ""
    if trailing_metadata is None:
        trailing_metadata = cast("Sequence[tuple[str, Any]]", err.trailing_metadata())
    info = _error_info(trailing_metadata)
    if info is None:
        return ClipstoreRpcError(code, message, request_id=request_id)
    metadata = dict(info.metadata)
    request_id = metadata.pop("request_id", None) or request_id
    known = Reason.__members__.get(info.reason)  # the wire value is the member's name
    if known is None:  # a reason newer than this client: still typed by code, reason kept
        return ClipstoreRpcError(code, message, reason=info.reason, request_id=request_id, metadata=metadata)
    cls = BY_REASON[known]
    return cls(code, message, reason=info.reason, request_id=request_id, metadata=metadata)
