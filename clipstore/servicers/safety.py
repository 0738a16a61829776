"""SafetyService (role safety): escalations instead of a chat room, and leak forensics.

What a safety caller receives is an `Escalation`: a pseudonymous clip id, the
category and the reviewer's note (audited before it leaves), never identity.
IdentifyLeak (safety or auditor) names the fetch a leaked copy came from by the
reviewer's pseudonym, never a name.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from clipstore.errors import Cancelled, InvalidArgument, ResourceExhausted
from clipstore.interceptors import current_actor
from clipstore.review import ReviewDesk
from clipstore.review.forensics import Forensics
from clipstore.rows import EscalationRow
from clipstore.servicers.common import next_token, page_after, page_limit, required_id, text, timestamp
from clipstore.servicers.review import MAX_NOTE_CHARS
from clipstore.v1 import safety_pb2, safety_pb2_grpc


def escalation_message(row: EscalationRow, note: str) -> safety_pb2.Escalation:
    return safety_pb2.Escalation(escalation_id=row.escalation_id, review_clip_id=row.review_clip_id,
                                 category=row.category, note=note,  # type: ignore[arg-type]
                                 created_at=timestamp(row.created_at), resolved=row.resolved_at is not None)


MAX_LEAK_BYTES = 64 << 20  # bounds memory per IdentifyLeak: minutes of audio, far more than a clip


def _leaked_file(requests: Iterator[safety_pb2.IdentifyLeakRequest], context: grpc.ServicerContext) -> bytes:
    data = bytearray()
    try:
        for request in requests:
            data += request.audio_chunk
            if len(data) > MAX_LEAK_BYTES:
                raise InvalidArgument("audio_chunk", f"the file may be at most {MAX_LEAK_BYTES} bytes; "
                                                     "send the first minutes only")
    except grpc.RpcError:  # the request iterator raises this once the call is cancelled
        raise Cancelled("the call was cancelled") from None
    if not context.is_active():
        raise Cancelled("the call was cancelled")
    if not data:
        raise InvalidArgument("audio_chunk", "send the file's bytes")
    return bytes(data)


class SafetyServicer(safety_pb2_grpc.SafetyServiceServicer):
    def __init__(self, desk: ReviewDesk, forensics: Forensics, *, max_identify_calls: int) -> None:
        self._desk, self._forensics = desk, forensics
        # Server-wide, not per principal: each call buffers up to MAX_LEAK_BYTES, and one principal's
        # `server.max_calls_per_principal` calls alone would hold ~1.5 GiB.
        self._identify_slots = threading.BoundedSemaphore(max_identify_calls)
        self._max_identify_calls = max_identify_calls

    def IdentifyLeak(self, request_iterator: Iterator[safety_pb2.IdentifyLeakRequest],
                     context: grpc.ServicerContext) -> safety_pb2.IdentifyLeakResponse:
        if not self._identify_slots.acquire(blocking=False):  # before a byte is buffered; audited like the rest
            self._forensics.refuse_upload(current_actor(), ResourceExhausted(
                f"{self._max_identify_calls} IdentifyLeak calls are in flight on this server "
                "(server.max_identify_leak_calls); retry in a minute", reason="IDENTIFY_LEAK_BUSY"))
        try:
            return self._identify(request_iterator, context)
        finally:
            self._identify_slots.release()

    def _identify(self, request_iterator: Iterator[safety_pb2.IdentifyLeakRequest],
                  context: grpc.ServicerContext) -> safety_pb2.IdentifyLeakResponse:
        try:
            data = _leaked_file(request_iterator, context)
        except InvalidArgument as refused:  # empty or too large: still one forensics.identify entry
            self._forensics.refuse_upload(current_actor(), refused)
        finding = self._forensics.identify(data, current_actor())
        fetch = finding.fetch
        return safety_pb2.IdentifyLeakResponse(
            watermark_id=fetch.watermark_id, grant_id=fetch.grant_id, reviewer_id=fetch.reviewer_id,
            fetched_at=timestamp(fetch.fetched_at), clip_id=fetch.clip_id, review_clip_id=fetch.review_clip_id,
            confidence=finding.confidence)

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
