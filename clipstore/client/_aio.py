"""AsyncClipstoreClient: the asyncio twin of ClipstoreClient (grpc.aio), method for method."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auditlog.note import NoteVerifier
from clipstore.client._audit import (
    AuditEntry,
    InclusionProof,
    VerifiedCheckpoint,
    check_grew,
    check_inclusion,
    check_page,
    checkpoint_from,
)
from clipstore.client._wire import (
    DEFAULT_STREAM_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    Audio,
    AudioInput,
    RetryPolicy,
    Trailer,
    clip_metadata,
    duration,
    enrolment_purpose,
    flag_category,
    put_requests,
    split,
    timestamp,
    transport,
)
from clipstore.client._wire import role as wire_role
from clipstore.client.errors import ClipstoreRpcError, from_rpc_error
from clipstore.v1 import (
    account_pb2,
    account_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    clip_pb2,
    clip_pb2_grpc,
    enrolment_pb2,
    enrolment_pb2_grpc,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
    review_pb2,
    review_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)

T = TypeVar("T")


async def _put_requests(meta: clip_pb2.ClipMetadata, chunks: AsyncIterable[bytes]
                        ) -> AsyncIterator[clip_pb2.PutClipRequest]:
    yield clip_pb2.PutClipRequest(metadata=meta)
    trailer = Trailer()
    async for chunk in chunks:
        for part in split(chunk):
            yield trailer.audio(part)
    yield trailer.message()


class AsyncClipstoreClient:
    """The asyncio client: the same methods as `ClipstoreClient`, awaited; streams are async iterators.
    `put_clip` also takes an async iterable of bytes (sent once, like any iterator)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                 key_file: str | Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S, retry: RetryPolicy | None = None,
                 interceptors: Iterable[grpc.aio.ClientInterceptor] = (), options: Iterable[tuple[str, Any]] = (),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._transport = t = transport(target, api_key=api_key, ca_file=ca_file, cert_file=cert_file,
                                        key_file=key_file, options=options)
        self.channel: grpc.aio.Channel = (
            grpc.aio.insecure_channel(t.target, options=t.options, interceptors=list(interceptors))
            if t.credentials is None else
            grpc.aio.secure_channel(t.target, t.credentials, options=t.options, interceptors=list(interceptors)))
        self.timeout_s, self.stream_timeout_s = timeout_s, stream_timeout_s
        self.retry = retry or RetryPolicy.published()
        self._sleep = sleep
        self._clips = clip_pb2_grpc.ClipServiceStub(self.channel)
        self._accounts = account_pb2_grpc.AccountServiceStub(self.channel)
        self._principals = principal_admin_pb2_grpc.PrincipalAdminServiceStub(self.channel)
        self._enrolment = enrolment_pb2_grpc.EnrolmentServiceStub(self.channel)
        self._admin = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(self.channel)
        self._review = review_pb2_grpc.ReviewServiceStub(self.channel)
        self._safety = safety_pb2_grpc.SafetyServiceStub(self.channel)
        self._audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def __aenter__(self) -> AsyncClipstoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout_s: float | None) -> T:
        try:
            return await method(request, timeout=timeout_s or self.timeout_s, metadata=self._transport.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- health ----------------------------------------------------------------------------------------
    async def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        check = self._health.Check  # type: ignore[attr-defined]  # types-grpcio-health-checking's stub lists no methods
        response = await self._call(check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- clips -----------------------------------------------------------------------------------------
    async def put_clip(self, audio: AudioInput | AsyncIterable[bytes], *, account_id: str, locale: str,
                       content_type: str, wake_word_detected: bool, device_serial: str = "", device_type: str = "",
                       captured_at: datetime | float | None = None, duration_ms: int = 0,
                       idempotency_key: str | None = None, timeout_s: float | None = None) -> clip_pb2.Clip:
        """See `ClipstoreClient.put_clip`."""
        meta = clip_metadata(account_id=account_id, locale=locale, content_type=content_type,
                             wake_word_detected=wake_word_detected, device_serial=device_serial,
                             device_type=device_type, captured_at=captured_at, duration_ms=duration_ms,
                             idempotency_key=idempotency_key)
        timeout = timeout_s or self.stream_timeout_s
        if isinstance(audio, AsyncIterable):
            return (await self._call(self._clips.PutClip, _put_requests(meta, audio), timeout)).clip
        source = Audio(audio)
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            try:
                return (await self._call(self._clips.PutClip, put_requests(meta, source.chunks()),
                                         max(deadline - time.monotonic(), 0.001))).clip
            except ClipstoreRpcError as error:
                delay = self.retry.backoff_s(attempt)
                if not (error.retryable and source.replayable and attempt < self.retry.max_attempts
                        and time.monotonic() + delay < deadline):
                    raise
                await self._sleep(delay)

    async def get_clip(self, clip_id: str, *, timeout_s: float | None = None) -> clip_pb2.Clip:
        return (await self._call(self._clips.GetClip, clip_pb2.GetClipRequest(clip_id=clip_id), timeout_s)).clip

    async def list_clips(self, account_id: str, *, include_identity: bool = False, page_size: int = 100,
                         timeout_s: float | None = None) -> AsyncIterator[clip_pb2.Clip]:
        token = ""
        while True:
            page = await self._call(self._clips.ListClips, clip_pb2.ListClipsRequest(
                account_id=account_id, page_size=page_size, page_token=token, include_identity=include_identity),
                timeout_s)
            for clip in page.clips:
                yield clip
            token = page.next_page_token
            if not token:
                return

    async def delete_clip(self, clip_id: str, *, timeout_s: float | None = None) -> None:
        await self._call(self._clips.DeleteClip, clip_pb2.DeleteClipRequest(clip_id=clip_id), timeout_s)

    # -- accounts --------------------------------------------------------------------------------------
    async def set_review_preference(self, account_id: str, allow_human_review: bool, *,
                                    timeout_s: float | None = None) -> account_pb2.SetReviewPreferenceResponse:
        return await self._call(self._accounts.SetReviewPreference, account_pb2.SetReviewPreferenceRequest(
            account_id=account_id, allow_human_review=allow_human_review), timeout_s)

    async def delete_account(self, account_id: str, *,
                             timeout_s: float | None = None) -> account_pb2.DeleteAccountResponse:
        return await self._call(self._accounts.DeleteAccount,
                                account_pb2.DeleteAccountRequest(account_id=account_id), timeout_s)

    async def rotate_account_key(self, account_id: str, *,
                                 timeout_s: float | None = None) -> account_pb2.RotateAccountKeyResponse:
        return await self._call(self._accounts.RotateAccountKey,
                                account_pb2.RotateAccountKeyRequest(account_id=account_id), timeout_s)

    async def access_report(self, account_id: str, *, since: datetime | float | None = None,
                            until: datetime | float | None = None, nonce: str = "",
                            timeout_s: float | None = None) -> account_pb2.GetAccessReportResponse:
        """The account's verifiable access report (role ingest); check it with `auditlog verify-report`."""
        return await self._call(self._accounts.GetAccessReport, account_pb2.GetAccessReportRequest(
            account_id=account_id, since=timestamp(since), until=timestamp(until), nonce=nonce), timeout_s)

    # -- principals ------------------------------------------------------------------------------------
    async def create_principal(self, role: str | int, name: str, *, spiffe_id: str = "",
                               expires_at: datetime | float | None = None,
                               timeout_s: float | None = None) -> principal_admin_pb2.CreatePrincipalResponse:
        return await self._call(self._principals.CreatePrincipal, principal_admin_pb2.CreatePrincipalRequest(
            role=wire_role(role), name=name, spiffe_id=spiffe_id, expires_at=timestamp(expires_at)),  # type: ignore[arg-type]
            timeout_s)

    async def list_principals(self, role: str | int = 0, *, page_size: int = 100,
                              timeout_s: float | None = None) -> AsyncIterator[principal_admin_pb2.Principal]:
        token = ""
        while True:
            page = await self._call(self._principals.ListPrincipals, principal_admin_pb2.ListPrincipalsRequest(
                role=wire_role(role), page_size=page_size, page_token=token), timeout_s)  # type: ignore[arg-type]
            for principal in page.principals:
                yield principal
            token = page.next_page_token
            if not token:
                return

    async def disable_principal(self, principal_id: str, *,
                                timeout_s: float | None = None) -> principal_admin_pb2.DisablePrincipalResponse:
        return await self._call(self._principals.DisablePrincipal,
                                principal_admin_pb2.DisablePrincipalRequest(principal_id=principal_id), timeout_s)

    async def enable_principal(self, principal_id: str, *,
                               timeout_s: float | None = None) -> principal_admin_pb2.Principal:
        return (await self._call(self._principals.EnablePrincipal, principal_admin_pb2.EnablePrincipalRequest(
            principal_id=principal_id), timeout_s)).principal

    async def rotate_principal_key(self, principal_id: str, *, overlap_s: float | None = None,
                                   timeout_s: float | None = None) -> principal_admin_pb2.RotatePrincipalKeyResponse:
        return await self._call(self._principals.RotatePrincipalKey, principal_admin_pb2.RotatePrincipalKeyRequest(
            principal_id=principal_id, overlap=duration(overlap_s)), timeout_s)

    async def set_principal_expiry(self, principal_id: str, expires_at: datetime | float | None, *,
                                   timeout_s: float | None = None) -> principal_admin_pb2.Principal:
        return (await self._call(self._principals.SetPrincipalExpiry, principal_admin_pb2.SetPrincipalExpiryRequest(
            principal_id=principal_id, expires_at=timestamp(expires_at)), timeout_s)).principal

    # -- reviewer administration -----------------------------------------------------------------------
    async def create_reviewer(self, name: str, locales: Iterable[str], *, spiffe_id: str = "",
                              timeout_s: float | None = None) -> reviewer_admin_pb2.CreateReviewerResponse:
        return await self._call(self._admin.CreateReviewer, reviewer_admin_pb2.CreateReviewerRequest(
            name=name, locales=list(locales), spiffe_id=spiffe_id), timeout_s)

    async def issue_enrolment_code(self, reviewer_id: str, purpose: str | int = "enrol", *,
                                   timeout_s: float | None = None) -> reviewer_admin_pb2.EnrolmentOffer:
        return (await self._call(self._admin.IssueEnrolmentCode, reviewer_admin_pb2.IssueEnrolmentCodeRequest(
            reviewer_id=reviewer_id, purpose=enrolment_purpose(purpose)), timeout_s)).enrolment  # type: ignore[arg-type]

    async def redeem_enrolment_code(self, reviewer_id: str, code: str, *,
                                    timeout_s: float | None = None) -> enrolment_pb2.RedeemEnrolmentCodeResponse:
        return await self._call(self._enrolment.RedeemEnrolmentCode, enrolment_pb2.RedeemEnrolmentCodeRequest(
            reviewer_id=reviewer_id, code=code), timeout_s)

    async def disable_reviewer(self, reviewer_id: str, *,
                               timeout_s: float | None = None) -> reviewer_admin_pb2.DisableReviewerResponse:
        return await self._call(self._admin.DisableReviewer,
                                reviewer_admin_pb2.DisableReviewerRequest(reviewer_id=reviewer_id), timeout_s)

    # -- review ----------------------------------------------------------------------------------------
    async def start_review_session(self, totp_code: str, *,
                                   timeout_s: float | None = None) -> review_pb2.StartReviewSessionResponse:
        return await self._call(self._review.StartReviewSession,
                                review_pb2.StartReviewSessionRequest(totp_code=totp_code), timeout_s)

    async def next_assignment(self, session_token: str, locale: str = "", *,
                              timeout_s: float | None = None) -> review_pb2.NextAssignmentResponse:
        return await self._call(self._review.NextAssignment, review_pb2.NextAssignmentRequest(
            session_token=session_token, locale=locale), timeout_s)

    async def request_grant(self, session_token: str, assignment_id: str, *,
                            timeout_s: float | None = None) -> review_pb2.RequestGrantResponse:
        return await self._call(self._review.RequestGrant, review_pb2.RequestGrantRequest(
            session_token=session_token, assignment_id=assignment_id), timeout_s)

    async def fetch_clip(self, session_token: str, grant: str, review_clip_id: str, *,
                         timeout_s: float | None = None) -> AsyncIterator[bytes]:
        call = self._review.FetchClip(review_pb2.FetchClipRequest(
            session_token=session_token, grant=grant, review_clip_id=review_clip_id),
            timeout=timeout_s or self.stream_timeout_s, metadata=self._transport.metadata())
        try:
            async for response in call:
                if response.WhichOneof("part") == "audio_chunk":
                    yield response.audio_chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()

    async def fetch_clip_to(self, path: str | Path, session_token: str, grant: str, review_clip_id: str, *,
                            timeout_s: float | None = None) -> int:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in self.fetch_clip(session_token, grant, review_clip_id, timeout_s=timeout_s):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    async def flag_clip(self, session_token: str, assignment_id: str, category: str | int, note: str = "", *,
                        timeout_s: float | None = None) -> str:
        return (await self._call(self._review.FlagClip, review_pb2.FlagClipRequest(
            session_token=session_token, assignment_id=assignment_id, category=flag_category(category),  # type: ignore[arg-type]
            note=note), timeout_s)).escalation_id

    async def complete_assignment(self, session_token: str, assignment_id: str, label: str, *,
                                  timeout_s: float | None = None) -> None:
        await self._call(self._review.CompleteAssignment, review_pb2.CompleteAssignmentRequest(
            session_token=session_token, assignment_id=assignment_id, label=label), timeout_s)

    async def end_review_session(self, session_token: str, *, timeout_s: float | None = None) -> None:
        await self._call(self._review.EndReviewSession,
                         review_pb2.EndReviewSessionRequest(session_token=session_token), timeout_s)

    # -- safety ----------------------------------------------------------------------------------------
    async def list_escalations(self, *, include_resolved: bool = False, page_size: int = 100,
                               timeout_s: float | None = None) -> AsyncIterator[safety_pb2.Escalation]:
        token = ""
        while True:
            page = await self._call(self._safety.ListEscalations, safety_pb2.ListEscalationsRequest(
                page_size=page_size, page_token=token, include_resolved=include_resolved), timeout_s)
            for escalation in page.escalations:
                yield escalation
            token = page.next_page_token
            if not token:
                return

    async def resolve_escalation(self, escalation_id: str, resolution: str, *,
                                 timeout_s: float | None = None) -> safety_pb2.Escalation:
        return (await self._call(self._safety.ResolveEscalation, safety_pb2.ResolveEscalationRequest(
            escalation_id=escalation_id, resolution=resolution), timeout_s)).escalation

    async def identify_leak(self, audio: AudioInput, *,
                            timeout_s: float | None = None) -> safety_pb2.IdentifyLeakResponse:
        """See `ClipstoreClient.identify_leak`."""
        requests = (safety_pb2.IdentifyLeakRequest(audio_chunk=c) for c in Audio(audio).chunks())
        return await self._call(self._safety.IdentifyLeak, requests, timeout_s or self.stream_timeout_s)

    # -- audit -----------------------------------------------------------------------------------------
    async def get_checkpoint(self, verifier_key: str | NoteVerifier, *, trusted: VerifiedCheckpoint | None = None,
                             timeout_s: float | None = None) -> VerifiedCheckpoint:
        """See `ClipstoreClient.get_checkpoint`."""
        checkpoint = checkpoint_from(await self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(),
                                                      timeout_s), verifier_key)
        if trusted is not None:
            await self._check_grew(trusted, checkpoint, timeout_s)
        return checkpoint

    async def _check_grew(self, old: VerifiedCheckpoint, new: VerifiedCheckpoint, timeout_s: float | None
                          ) -> list[bytes]:
        proof: list[bytes] = []
        if 0 < old.size < new.size:
            proof = list((await self._call(self._audit.GetConsistencyProof, audit_pb2.GetConsistencyProofRequest(
                old_size=old.size, new_size=new.size), timeout_s)).proof)
        check_grew(old, new, proof)
        return proof

    async def list_entries(self, checkpoint: VerifiedCheckpoint, *, start: int = 0, page_size: int = 100,
                           timeout_s: float | None = None) -> AsyncIterator[AuditEntry]:
        """See `ClipstoreClient.list_entries`."""
        prev: str | None = None
        index = start
        while index < checkpoint.size:
            want = min(page_size, checkpoint.size - index)
            page = await self._call(self._audit.ListEntries, audit_pb2.ListEntriesRequest(
                start_index=index, page_size=want), timeout_s)
            entries = list(page.entries)[:want]
            last = index + max(len(entries), 1) - 1
            first_proof = await self._inclusion(index, checkpoint, timeout_s)
            last_proof = await self._inclusion(last, checkpoint, timeout_s)
            verified = check_page(checkpoint, index, entries, prev, first_proof, last_proof)
            for entry in verified:
                yield entry
            prev = verified[-1].leaf_hash.hex()
            index += len(verified)

    async def _inclusion(self, index: int, checkpoint: VerifiedCheckpoint, timeout_s: float | None) -> list[bytes]:
        return list((await self._call(self._audit.GetInclusionProof, audit_pb2.GetInclusionProofRequest(
            index=index, tree_size=checkpoint.size), timeout_s)).proof)

    async def get_inclusion_proof(self, index: int, checkpoint: VerifiedCheckpoint, *, entry: bytes | None = None,
                                  timeout_s: float | None = None) -> InclusionProof:
        response = await self._call(self._audit.GetInclusionProof, audit_pb2.GetInclusionProofRequest(
            index=index, tree_size=checkpoint.size), timeout_s)
        return check_inclusion(checkpoint, index, response, entry)

    async def get_consistency_proof(self, old: VerifiedCheckpoint, new: VerifiedCheckpoint, *,
                                    timeout_s: float | None = None) -> list[bytes]:
        return await self._check_grew(old, new, timeout_s)
