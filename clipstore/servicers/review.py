"""ReviewService (role reviewer): sessions, assignments, grants, fetch, flag, complete.

What a reviewer receives is built only from `ReviewClip`: a pseudonymous clip
id, locale, duration, content type. (SafetyService: `clipstore.servicers.safety`;
ReviewerAdminService: `clipstore.servicers.enrolment`.)
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from clipstore.errors import InvalidArgument
from clipstore.interceptors import current_actor
from clipstore.locales import canonical_locale
from clipstore.review import ReviewDesk
from clipstore.rows import ClipRow, QueuedClip
from clipstore.servicers.common import LOCALE_RE, required_id, text, timestamp
from clipstore.v1 import (
    common_pb2,
    review_pb2,
    review_pb2_grpc,
)

MAX_NOTE_CHARS = 2000
MAX_LABEL_CHARS = 64


def review_clip(review_clip_id: str, clip: ClipRow | QueuedClip) -> review_pb2.ReviewClip:
    """Only what a reviewer may see: a pseudonymous id, locale, duration, content type."""
    locale = canonical_locale(clip.queue.locale if isinstance(clip, QueuedClip) else clip.locale)  # older rows
    return review_pb2.ReviewClip(review_clip_id=review_clip_id, locale=locale, duration_ms=clip.duration_ms,
                                 content_type=clip.content_type)


def _token(value: str) -> str:
    return text("session_token", value, max_chars=128, required=True)


class ReviewServicer(review_pb2_grpc.ReviewServiceServicer):
    def __init__(self, desk: ReviewDesk) -> None:
        self._desk = desk

    def StartReviewSession(self, request: review_pb2.StartReviewSessionRequest,
                           context: grpc.ServicerContext) -> review_pb2.StartReviewSessionResponse:
        code = text("totp_code", request.totp_code, max_chars=16, required=True)
        token, expires = self._desk.start_session(code, current_actor())
        return review_pb2.StartReviewSessionResponse(session_token=token, expires_at=timestamp(expires))

    def NextAssignment(self, request: review_pb2.NextAssignmentRequest,
                       context: grpc.ServicerContext) -> review_pb2.NextAssignmentResponse:
        if request.locale and not LOCALE_RE.match(request.locale):
            raise InvalidArgument("locale", "must be a BCP 47 tag such as en-US, or empty")
        assignment, clip = self._desk.next_assignment(_token(request.session_token),
                                                      canonical_locale(request.locale), current_actor())
        return review_pb2.NextAssignmentResponse(assignment_id=assignment.assignment_id,
                                                 clip=review_clip(assignment.review_clip_id, clip),
                                                 expires_at=timestamp(assignment.expires_at))

    def RequestGrant(self, request: review_pb2.RequestGrantRequest,
                     context: grpc.ServicerContext) -> review_pb2.RequestGrantResponse:
        grant, expires, review_clip_id = self._desk.request_grant(
            _token(request.session_token), required_id("assignment_id", request.assignment_id), current_actor())
        return review_pb2.RequestGrantResponse(grant=grant, expires_at=timestamp(expires),
                                               review_clip_id=review_clip_id)

    def FetchClip(self, request: review_pb2.FetchClipRequest,
                  context: grpc.ServicerContext) -> Iterator[review_pb2.FetchClipResponse]:
        grant = text("grant", request.grant, max_chars=1024, required=True)
        review_clip_id, clip, audio = self._desk.fetch(_token(request.session_token), grant,
                                                       required_id("review_clip_id", request.review_clip_id),
                                                       current_actor())
        yield review_pb2.FetchClipResponse(clip=review_clip(review_clip_id, clip))
        for chunk in audio:
            yield review_pb2.FetchClipResponse(audio_chunk=chunk)

    def FlagClip(self, request: review_pb2.FlagClipRequest,
                 context: grpc.ServicerContext) -> review_pb2.FlagClipResponse:
        if request.category not in common_pb2.FlagCategory.values() or \
                request.category == common_pb2.FLAG_CATEGORY_UNSPECIFIED:
            raise InvalidArgument("category", "choose possible_crime, distress, sensitive or accidental_activation")
        note = text("note", request.note, max_chars=MAX_NOTE_CHARS, required=False)
        escalation_id = self._desk.flag(
            _token(request.session_token), required_id("assignment_id", request.assignment_id), request.category, note,
            current_actor(), accidental=request.category == common_pb2.FLAG_CATEGORY_ACCIDENTAL_ACTIVATION)
        return review_pb2.FlagClipResponse(escalation_id=escalation_id)

    def CompleteAssignment(self, request: review_pb2.CompleteAssignmentRequest,
                           context: grpc.ServicerContext) -> review_pb2.CompleteAssignmentResponse:
        label = text("label", request.label, max_chars=MAX_LABEL_CHARS, required=True)
        self._desk.complete(_token(request.session_token), required_id("assignment_id", request.assignment_id), label,
                            current_actor())
        return review_pb2.CompleteAssignmentResponse()

    def EndReviewSession(self, request: review_pb2.EndReviewSessionRequest,
                         context: grpc.ServicerContext) -> review_pb2.EndReviewSessionResponse:
        self._desk.end_session(_token(request.session_token), current_actor())
        return review_pb2.EndReviewSessionResponse()
