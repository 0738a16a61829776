"""Enrolling a reviewer as it is done: the admin gets a code, the reviewer redeems it."""

from __future__ import annotations

import base64

import grpc

from clipstore.v1 import enrolment_pb2, enrolment_pb2_grpc, reviewer_admin_pb2, reviewer_admin_pb2_grpc


def totp_secret_bytes(b32: str) -> bytes:
    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


def create_reviewer(channel: grpc.Channel, admin: tuple[tuple[str, str], ...], name: str = "rev",
                    locales: tuple[str, ...] = ("en-US",), spiffe_id: str = ""
                    ) -> reviewer_admin_pb2.CreateReviewerResponse:
    return reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).CreateReviewer(
        reviewer_admin_pb2.CreateReviewerRequest(name=name, locales=list(locales), spiffe_id=spiffe_id),
        metadata=admin, timeout=10)


def redeem(channel: grpc.Channel, reviewer_id: str, code: str) -> enrolment_pb2.RedeemEnrolmentCodeResponse:
    """No credentials: the code is the credential."""
    return enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(
        enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=reviewer_id, code=code), timeout=10)


def enrol(channel: grpc.Channel, admin: tuple[tuple[str, str], ...], name: str = "rev",
          locales: tuple[str, ...] = ("en-US",), spiffe_id: str = "", redeem_on: grpc.Channel | None = None
          ) -> tuple[reviewer_admin_pb2.CreateReviewerResponse, enrolment_pb2.RedeemEnrolmentCodeResponse]:
    """Create a reviewer (as the admin, on `channel`) and redeem its code (as the reviewer, on `redeem_on`)."""
    created = create_reviewer(channel, admin, name, locales, spiffe_id)
    return created, redeem(redeem_on or channel, created.reviewer_id, created.enrolment.code)
