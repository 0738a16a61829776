"""AuditService (role auditor): checkpoints, entries and proofs."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from auditlog.checkpoint import Checkpoint
from auditlog.note import open_note
from clipstore.audit import AuditLog
from clipstore.audit.reader import MAX_PAGE_ENTRIES
from clipstore.errors import InvalidArgument, OutOfRange
from clipstore.interceptors import current_request
from clipstore.unit import AuditRecord
from clipstore.v1 import audit_pb2, audit_pb2_grpc

DEFAULT_PAGE_ENTRIES = 100
MAX_INDEX = (1 << 63) - 1  # entry indices are stored as signed 64-bit integers


def _index(field: str, value: int) -> None:
    if value > MAX_INDEX:
        raise InvalidArgument(field, f"at most {MAX_INDEX} (2^63 - 1), got {value}")


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, audit: AuditLog, published: Callable[[], tuple[int, str] | None] = lambda: None) -> None:
        self._audit = audit
        self._published = published
        self._reader = audit.reader

    def _check_size(self, field: str, size: int) -> None:
        current = self._reader.size()
        if size > current:
            raise OutOfRange(f"{field} {size} exceeds the log size {current}; use GetCheckpoint's tree_size",
                             metadata={"field": field, "tree_size": str(current)})

    def GetCheckpoint(self, request: audit_pb2.GetCheckpointRequest,
                      context: grpc.ServicerContext) -> audit_pb2.GetCheckpointResponse:
        # With witnesses or tiles configured, the published (cosigned) checkpoint; it may lag
        # the newest signed one by a publishing round.
        latest = self._published() or self._reader.latest_checkpoint()
        if latest is None:
            latest = self._audit.checkpoint()
        size, note = latest
        checkpoint = Checkpoint.parse(open_note(note, [self._audit.signer.verifier]))  # cosignatures: unknown keys
        return audit_pb2.GetCheckpointResponse(signed_note=note, tree_size=size, root_hash=checkpoint.root,
                                               verifier_key=self._audit.signer.verifier.key_string())

    def ListEntries(self, request: audit_pb2.ListEntriesRequest,
                    context: grpc.ServicerContext) -> audit_pb2.ListEntriesResponse:
        _index("start_index", request.start_index)
        if request.page_size > MAX_PAGE_ENTRIES:
            raise InvalidArgument("page_size", f"at most {MAX_PAGE_ENTRIES}, got {request.page_size}")
        ctx = current_request()
        assert ctx.principal is not None
        self._audit.append(AuditRecord(actor_id=ctx.principal.id, actor_role=ctx.principal.role,
                                       action="audit.read", request_id=ctx.request_id))
        size = self._reader.size()
        count = min(request.page_size or DEFAULT_PAGE_ENTRIES, max(size - request.start_index, 0))
        entries = self._reader.entries(request.start_index, count) if count else []
        return audit_pb2.ListEntriesResponse(entries=entries, next_index=request.start_index + len(entries),
                                             tree_size=size)

    def GetInclusionProof(self, request: audit_pb2.GetInclusionProofRequest,
                          context: grpc.ServicerContext) -> audit_pb2.GetInclusionProofResponse:
        _index("index", request.index)
        _index("tree_size", request.tree_size)
        if request.tree_size == 0:
            raise InvalidArgument("tree_size", "required: pass the tree_size of a checkpoint you hold")
        if request.index >= request.tree_size:
            raise InvalidArgument("index", f"must be below tree_size {request.tree_size}, got {request.index}")
        self._check_size("tree_size", request.tree_size)
        return audit_pb2.GetInclusionProofResponse(
            proof=self._reader.inclusion_proof(request.index, request.tree_size),
            leaf_hash=self._reader.leaf_hash(request.index), tree_size=request.tree_size)

    def GetConsistencyProof(self, request: audit_pb2.GetConsistencyProofRequest,
                            context: grpc.ServicerContext) -> audit_pb2.GetConsistencyProofResponse:
        _index("old_size", request.old_size)
        _index("new_size", request.new_size)
        if not 0 < request.old_size <= request.new_size:
            raise InvalidArgument("old_size", f"need 0 < old_size <= new_size, got {request.old_size} and "
                                              f"{request.new_size}")
        self._check_size("new_size", request.new_size)
        return audit_pb2.GetConsistencyProofResponse(
            proof=self._reader.consistency_proof(request.old_size, request.new_size))
