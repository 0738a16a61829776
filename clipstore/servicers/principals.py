"""PrincipalAdminService (role admin): the lifecycle of every principal."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from clipstore.errors import InvalidArgument
from clipstore.interceptors import current_actor
from clipstore.principals import PrincipalLifecycle
from clipstore.rows import Principal, PrincipalListing
from clipstore.servicers.common import (
    MAX_ID_CHARS,
    next_token,
    optional_instant,
    page_after,
    page_limit,
    text,
    timestamp,
)
from clipstore.v1 import common_pb2, principal_admin_pb2, principal_admin_pb2_grpc

_ROLE_PREFIX = "ROLE_"


def role_name(value: int) -> str:
    """`ROLE_INGEST` → "ingest"; INVALID_ARGUMENT for unspecified or unknown values."""
    if value == common_pb2.ROLE_UNSPECIFIED or value not in common_pb2.Role.values():
        raise InvalidArgument("role", "choose a role")
    return common_pb2.Role.Name(value).removeprefix(_ROLE_PREFIX).lower()  # type: ignore[arg-type]


def role_value(name: str) -> common_pb2.Role.ValueType:
    return common_pb2.Role.Value(_ROLE_PREFIX + name.upper())


def principal_message(principal: Principal, usable_keys: int = 0) -> principal_admin_pb2.Principal:
    message = principal_admin_pb2.Principal(
        principal_id=principal.id, name=principal.name, role=role_value(principal.role),
        spiffe_id=principal.spiffe_id or "", disabled=principal.disabled, created_at=timestamp(principal.created_at),
        usable_keys=usable_keys)
    if principal.expires_at is not None:
        message.expires_at.CopyFrom(timestamp(principal.expires_at))
    return message


def _listed(item: PrincipalListing) -> principal_admin_pb2.Principal:
    return principal_message(item.principal, item.usable_keys)


def _overlap(has: bool, value: Duration) -> float | None:
    if not has:
        return None
    if value.seconds < 0 or not 0 <= value.nanos < 1_000_000_000:
        raise InvalidArgument("overlap", "must not be negative (nanos in [0, 999999999])")
    return value.ToNanoseconds() / 1e9


def principal_id(value: str) -> str:
    return text("principal_id", value, max_chars=MAX_ID_CHARS, required=True)


class PrincipalAdminServicer(principal_admin_pb2_grpc.PrincipalAdminServiceServicer):
    def __init__(self, lifecycle: PrincipalLifecycle) -> None:
        self._lifecycle = lifecycle

    def CreatePrincipal(self, request: principal_admin_pb2.CreatePrincipalRequest,
                        context: grpc.ServicerContext) -> principal_admin_pb2.CreatePrincipalResponse:
        role = role_name(request.role)
        name = text("name", request.name, max_chars=200, required=True)
        spiffe_id = text("spiffe_id", request.spiffe_id, max_chars=255, required=False) or None
        principal, key = self._lifecycle.create(
            role=role, name=name, spiffe_id=spiffe_id,
            expires_at=optional_instant("expires_at", request.HasField("expires_at"), request.expires_at),
            actor=current_actor())
        return principal_admin_pb2.CreatePrincipalResponse(principal=principal_message(principal, int(bool(key))),
                                                           api_key=key or "")

    def ListPrincipals(self, request: principal_admin_pb2.ListPrincipalsRequest,
                       context: grpc.ServicerContext) -> principal_admin_pb2.ListPrincipalsResponse:
        limit = page_limit(request.page_size)
        role = role_name(request.role) if request.role else None
        items = self._lifecycle.page(role=role, after=page_after(request.page_token), limit=limit)
        return principal_admin_pb2.ListPrincipalsResponse(
            principals=[_listed(i) for i in items], next_page_token=next_token([i.principal.id for i in items], limit))

    def DisablePrincipal(self, request: principal_admin_pb2.DisablePrincipalRequest,
                         context: grpc.ServicerContext) -> principal_admin_pb2.DisablePrincipalResponse:
        listing, ended, voided = self._lifecycle.disable(principal_id(request.principal_id), current_actor())
        return principal_admin_pb2.DisablePrincipalResponse(principal=_listed(listing),
                                                            ended_sessions=ended, voided_grants=voided)

    def EnablePrincipal(self, request: principal_admin_pb2.EnablePrincipalRequest,
                        context: grpc.ServicerContext) -> principal_admin_pb2.EnablePrincipalResponse:
        listing = self._lifecycle.enable(principal_id(request.principal_id), current_actor())
        return principal_admin_pb2.EnablePrincipalResponse(principal=_listed(listing))

    def RotatePrincipalKey(self, request: principal_admin_pb2.RotatePrincipalKeyRequest,
                           context: grpc.ServicerContext) -> principal_admin_pb2.RotatePrincipalKeyResponse:
        rotation = self._lifecycle.rotate_key(principal_id(request.principal_id),
                                              _overlap(request.HasField("overlap"), request.overlap), current_actor())
        return principal_admin_pb2.RotatePrincipalKeyResponse(
            api_key=rotation.api_key, previous_keys_retire_at=timestamp(rotation.previous_keys_retire_at))

    def SetPrincipalExpiry(self, request: principal_admin_pb2.SetPrincipalExpiryRequest,
                           context: grpc.ServicerContext) -> principal_admin_pb2.SetPrincipalExpiryResponse:
        expires_at = optional_instant("expires_at", request.HasField("expires_at"), request.expires_at)
        listing = self._lifecycle.set_expiry(principal_id(request.principal_id), expires_at, current_actor())
        return principal_admin_pb2.SetPrincipalExpiryResponse(principal=_listed(listing))
