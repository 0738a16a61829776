"""Domain errors: each one carries its gRPC status code and a stable reason.

Servicers raise these; the interceptor in `clipstore.interceptors` is the one
place that turns them into a gRPC status with `google.rpc.ErrorInfo`.
Messages say what to do next and never carry keys, tokens, codes or PII.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

ERROR_DOMAIN = "clipstore.v1"


class ClipstoreError(Exception):
    """A security or request outcome the caller should see as a gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(ClipstoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {problem}", reason=reason, metadata={"field": field})


class Unauthenticated(ClipstoreError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(ClipstoreError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(ClipstoreError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(ClipstoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(ClipstoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "DAILY_CAP"


class Unavailable(ClipstoreError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DataLoss(ClipstoreError):
    code = grpc.StatusCode.DATA_LOSS
    reason = "DATA_LOSS"


class EnvelopeError(DataLoss):
    """A clip object failed authentication. Callers see one generic status;
    `kind` and `detail` (never key material) go to the audit log and tests."""

    reason = "CLIP_INTEGRITY"
    kind = "integrity"

    def __init__(self, detail: str) -> None:
        super().__init__("the clip failed its integrity check and was not returned; the event was recorded")
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


class MalformedHeader(EnvelopeError):
    kind = "malformed_header"


class UnsupportedFormat(EnvelopeError):
    kind = "unsupported_format"


class HeaderTampered(EnvelopeError):
    kind = "header_tampered"


class ClipIdMismatch(EnvelopeError):
    kind = "clip_id_mismatch"


class AccountMismatch(EnvelopeError):
    kind = "account_mismatch"


class SegmentTampered(EnvelopeError):
    kind = "segment_tampered"


class Truncated(EnvelopeError):
    kind = "truncated"


class Extended(EnvelopeError):
    kind = "extended"


class Reordered(EnvelopeError):
    kind = "reordered"
