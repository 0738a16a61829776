"""ReviewerAdminService (admin) and EnrolmentService (a reviewer holding a code).

The admin's responses carry enrolment codes, never a factor; the factors are
built only in `RedeemEnrolmentCode`'s response, for the reviewer.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from clipstore.auth import PRINCIPAL_ID_RE
from clipstore.enrolment import Offer, Purpose, SelfEnrolment
from clipstore.errors import InvalidArgument
from clipstore.interceptors import current_actor, current_request
from clipstore.locales import canonical_locale
from clipstore.principals import PrincipalLifecycle, canonical_spiffe_id
from clipstore.servicers.common import LOCALE_RE, MAX_ID_CHARS, text, timestamp
from clipstore.v1 import enrolment_pb2, enrolment_pb2_grpc, reviewer_admin_pb2, reviewer_admin_pb2_grpc

MAX_CODE_CHARS = 64
_PURPOSES = {enrolment_pb2.ENROLMENT_PURPOSE_ENROL: Purpose.ENROL,
             enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_TOTP: Purpose.ROTATE_TOTP,
             enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_API_KEY: Purpose.ROTATE_API_KEY}
_PURPOSE_VALUES = {purpose: value for value, purpose in _PURPOSES.items()}

# The principal id a call's client certificate names ("" if none), or None without a certificate.
Presenter = Callable[[grpc.ServicerContext], str | None]


def _reviewer_id(value: str) -> str:
    return text("reviewer_id", value, max_chars=MAX_ID_CHARS, required=True)


def _offer(offer: Offer) -> reviewer_admin_pb2.EnrolmentOffer:
    return reviewer_admin_pb2.EnrolmentOffer(reviewer_id=offer.reviewer_id, purpose=_PURPOSE_VALUES[offer.purpose],
                                             code=offer.code, expires_at=timestamp(offer.expires_at))


MAX_LOCALES_CHARS = 400  # the reviewers.locales column: the tags, comma-separated


class ReviewerAdminServicer(reviewer_admin_pb2_grpc.ReviewerAdminServiceServicer):
    def __init__(self, enrolment: SelfEnrolment, lifecycle: PrincipalLifecycle) -> None:
        self._enrolment, self._lifecycle = enrolment, lifecycle

    def CreateReviewer(self, request: reviewer_admin_pb2.CreateReviewerRequest,
                       context: grpc.ServicerContext) -> reviewer_admin_pb2.CreateReviewerResponse:
        name = text("name", request.name, max_chars=200, required=True)
        if len(request.locales) > 20 or any(not LOCALE_RE.match(loc) for loc in request.locales):
            raise InvalidArgument("locales", "up to 20 BCP 47 tags such as en-US")
        spiffe_id = text("spiffe_id", request.spiffe_id, max_chars=255, required=False)
        if spiffe_id:
            spiffe_id = canonical_spiffe_id(spiffe_id, role="reviewer", trust_domain=self._lifecycle.trust_domain)
        locales = tuple(dict.fromkeys(canonical_locale(loc) for loc in request.locales))  # en-us is en-US
        if len(",".join(locales)) > MAX_LOCALES_CHARS:
            raise InvalidArgument("locales", f"at most {MAX_LOCALES_CHARS} characters together (with a comma "
                                             "between tags)")
        offer = self._enrolment.create_reviewer(name, locales, current_actor(),
                                                spiffe_id=spiffe_id or None)
        return reviewer_admin_pb2.CreateReviewerResponse(reviewer_id=offer.reviewer_id, enrolment=_offer(offer))

    def DisableReviewer(self, request: reviewer_admin_pb2.DisableReviewerRequest,
                        context: grpc.ServicerContext) -> reviewer_admin_pb2.DisableReviewerResponse:
        _, ended, voided = self._lifecycle.disable(_reviewer_id(request.reviewer_id), current_actor(),
                                                   role="reviewer")
        return reviewer_admin_pb2.DisableReviewerResponse(ended_sessions=ended, voided_grants=voided)

    def IssueEnrolmentCode(self, request: reviewer_admin_pb2.IssueEnrolmentCodeRequest,
                           context: grpc.ServicerContext) -> reviewer_admin_pb2.IssueEnrolmentCodeResponse:
        purpose = _PURPOSES.get(request.purpose)
        if purpose is None:
            raise InvalidArgument("purpose", "choose ENROL, ROTATE_TOTP or ROTATE_API_KEY")
        offer = self._enrolment.issue(_reviewer_id(request.reviewer_id), purpose, current_actor())
        return reviewer_admin_pb2.IssueEnrolmentCodeResponse(enrolment=_offer(offer))


class EnrolmentServicer(enrolment_pb2_grpc.EnrolmentServiceServicer):
    def __init__(self, enrolment: SelfEnrolment, presenter: Presenter) -> None:
        self._enrolment, self._presenter = enrolment, presenter

    def RedeemEnrolmentCode(self, request: enrolment_pb2.RedeemEnrolmentCodeRequest,
                            context: grpc.ServicerContext) -> enrolment_pb2.RedeemEnrolmentCodeResponse:
        reviewer_id = _reviewer_id(request.reviewer_id)
        # Anyone may call this, and a refusal names the reviewer id in the permanent (published) log: only the
        # shape of a principal id gets that far, never free text (the code pasted into the wrong field, a name).
        if not PRINCIPAL_ID_RE.fullmatch(reviewer_id):
            raise InvalidArgument("reviewer_id", "must be the reviewer id the admin passed on with the code "
                                                 "(p_ and 16 hex digits)")
        code = text("code", request.code, max_chars=MAX_CODE_CHARS, required=True)
        factors = self._enrolment.redeem(reviewer_id, code, presented_by=self._presenter(context),
                                         request_id=current_request().request_id)
        return enrolment_pb2.RedeemEnrolmentCodeResponse(
            reviewer_id=factors.reviewer_id, purpose=_PURPOSE_VALUES[factors.purpose], api_key=factors.api_key,
            totp_secret=factors.totp_secret, provisioning_uri=factors.provisioning_uri)
