"""SafetyService (role safety): escalations instead of a chat room.

What a safety caller receives is an `Escalation`: a pseudonymous clip id, the
category and the reviewer's note (audited before it leaves), never identity.
"""

from __future__ import annotations

import grpc

from clipstore.interceptors import current_actor
from clipstore.review import ReviewDesk
from clipstore.servicers.common import next_token, page_after, page_limit, required_id, text, timestamp
from clipstore.servicers.review import MAX_NOTE_CHARS
from clipstore.store.review import EscalationRow
from clipstore.v1 import safety_pb2, safety_pb2_grpc


def escalation_message(row: EscalationRow, note: str) -> safety_pb2.Escalation:
    return safety_pb2.Escalation(escalation_id=row.escalation_id, review_clip_id=row.review_clip_id,
                                 category=row.category, note=note,  # type: ignore[arg-type]
                                 created_at=timestamp(row.created_at), resolved=row.resolved_at is not None)


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    def ListEscalations(self, request: safety_pb2.ListEscalationsRequest,
                        context: grpc.ServicerContext) -> safety_pb2.ListEscalationsResponse:
        limit = page_limit(request.page_size)
        rows = self._desk.list_escalations(include_resolved=request.include_resolved,
                                           after=page_after(request.page_token), limit=limit, actor=current_actor())
        token = next_token([r.escalation_id for r, _ in rows], limit)
        return safety_pb2.ListEscalationsResponse(escalations=[escalation_message(r, note) for r, note in rows],
                                                  next_page_token=token)

    def ResolveEscalation(self, request: safety_pb2.ResolveEscalationRequest,
                          context: grpc.ServicerContext) -> safety_pb2.ResolveEscalationResponse:
        resolution = text("resolution", request.resolution, max_chars=MAX_NOTE_CHARS, required=True)
        row, note = self._desk.resolve_escalation(required_id("escalation_id", request.escalation_id), resolution,
                                                  current_actor())
        return safety_pb2.ResolveEscalationResponse(escalation=escalation_message(row, note))
