"""The one table from error kind to gRPC status code, and the README error table made from it."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clipstore.errors import ERROR_DOMAIN, ClipstoreError, Kind, Reason
from clipstore.readme import rewrite_main

STATUS_BY_KIND: dict[Kind, grpc.StatusCode] = {
    Kind.BAD_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    Kind.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    Kind.NOT_AUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Kind.NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Kind.WRONG_STATE: grpc.StatusCode.FAILED_PRECONDITION,
    Kind.LIMIT_REACHED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Kind.DEPENDENCY_DOWN: grpc.StatusCode.UNAVAILABLE,
    Kind.CORRUPT: grpc.StatusCode.DATA_LOSS,
    Kind.NOT_IMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Kind.CANCELLED: grpc.StatusCode.CANCELLED,
    Kind.BUG: grpc.StatusCode.INTERNAL,
}


def status_code(error: ClipstoreError) -> grpc.StatusCode:
    return STATUS_BY_KIND[error.kind]


def grpc_status(error: ClipstoreError, request_id: str) -> grpc.Status:
    """The status a failed call ends with: code, message and a `google.rpc.ErrorInfo`."""
    info = error_details_pb2.ErrorInfo(reason=str(error.reason), domain=ERROR_DOMAIN,
                                       metadata={**error.metadata, "request_id": request_id})
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(
        code=status_code(error).value[0], message=error.message, details=[detail]))


def reason_table_markdown() -> str:
    """The README's error table, one row per reason (tests keep the README equal to this)."""
    rows = ["| code | reason | meaning / what to do |", "|---|---|---|"]
    rows += [f"| {STATUS_BY_KIND[r.kind].name} | `{r}` | {r.advice} |" for r in Reason]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m clipstore.servicers.status README.md: regenerate the table in place
    rewrite_main(reason_table_markdown)
