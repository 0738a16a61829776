"""ClipstoreClient: the blocking client."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
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
    clip_metadata,
    duration,
    enrolment_purpose,
    flag_category,
    put_requests,
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


class ClipstoreClient:
    """A typed client for every clipstore service; use it as a context manager.

    Authenticate with `api_key` (loopback or TLS only) or with a client certificate
    (`cert_file`, `key_file`, and `ca_file` for the server's CA). Every call has a
    deadline (`timeout_s`, streams `stream_timeout_s`, or per call) and raises a
    `clipstore.client.errors.ClipstoreRpcError` subclass named after the reason.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, api_key: str | None = None,
                 ca_file: str | Path | None = None, cert_file: str | Path | None = None,
                 key_file: str | Path | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 stream_timeout_s: float = DEFAULT_STREAM_TIMEOUT_S, retry: RetryPolicy | None = None,
                 interceptors: Iterable[grpc.UnaryUnaryClientInterceptor | grpc.StreamUnaryClientInterceptor
                                        | grpc.UnaryStreamClientInterceptor] = (),
                 options: Iterable[tuple[str, Any]] = (), sleep: Callable[[float], None] = time.sleep) -> None:
        self._transport = transport(target, api_key=api_key, ca_file=ca_file, cert_file=cert_file,
                                    key_file=key_file, options=options)
        t = self._transport
        channel = grpc.insecure_channel(t.target, options=t.options) if t.credentials is None \
            else grpc.secure_channel(t.target, t.credentials, options=t.options)
        self._channel = channel
        self.channel: grpc.Channel = grpc.intercept_channel(channel, *interceptors)
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

    def __enter__(self) -> ClipstoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout_s: float | None) -> T:
        try:
            return method(request, timeout=timeout_s or self.timeout_s, metadata=self._transport.metadata())
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    # -- health ----------------------------------------------------------------------------------------
    def health(self, service: str = "", *, timeout_s: float | None = None) -> str:
        """`SERVING` or `NOT_SERVING` for a service ("" = the whole server)."""
        check = self._health.Check  # type: ignore[attr-defined]  # types-grpcio-health-checking's stub lists no methods
        response = self._call(check, health_pb2.HealthCheckRequest(service=service), timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # -- clips (roles ingest, admin) -------------------------------------------------------------------
    def put_clip(self, audio: AudioInput, *, account_id: str, locale: str, content_type: str,
                 wake_word_detected: bool, device_serial: str = "", device_type: str = "",
                 captured_at: datetime | float | None = None, duration_ms: int = 0,
                 idempotency_key: str | None = None, timeout_s: float | None = None) -> clip_pb2.Clip:
        """Store one clip; `audio` is bytes, a binary file or an iterable of byte chunks.

        Sends the audio in 1 MiB messages (AUDIO_CHUNK_BYTES) and a trailer with its size and SHA-256.
        A failure where nothing was done (UNAVAILABLE) is retried with the same
        idempotency key (generated when not given), so the clip is stored at most
        once; an iterator is sent only once. `timeout_s` bounds all attempts together.
        The server returns a key's clip only to the same recording (metadata and audio):
        a key reused for another raises `IdempotencyKeyReusedError`, and nothing is stored.
        """
        meta = clip_metadata(account_id=account_id, locale=locale, content_type=content_type,
                             wake_word_detected=wake_word_detected, device_serial=device_serial,
                             device_type=device_type, captured_at=captured_at, duration_ms=duration_ms,
                             idempotency_key=idempotency_key)
        source = Audio(audio)
        deadline = time.monotonic() + (timeout_s or self.stream_timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._call(self._clips.PutClip, put_requests(meta, source.chunks()),
                                  max(deadline - time.monotonic(), 0.001)).clip
            except ClipstoreRpcError as error:
                delay = self.retry.backoff_s(attempt)
                if not (error.retryable and source.replayable and attempt < self.retry.max_attempts
                        and time.monotonic() + delay < deadline):
                    raise
                self._sleep(delay)

    def get_clip(self, clip_id: str, *, timeout_s: float | None = None) -> clip_pb2.Clip:
        """A clip's metadata and identity (audited on the server)."""
        return self._call(self._clips.GetClip, clip_pb2.GetClipRequest(clip_id=clip_id), timeout_s).clip

    def list_clips(self, account_id: str, *, include_identity: bool = False, page_size: int = 100,
                   timeout_s: float | None = None) -> Iterator[clip_pb2.Clip]:
        """Every clip of an account, page by page (each page one call with its own deadline)."""
        token = ""
        while True:
            page = self._call(self._clips.ListClips, clip_pb2.ListClipsRequest(
                account_id=account_id, page_size=page_size, page_token=token, include_identity=include_identity),
                timeout_s)
            yield from page.clips
            token = page.next_page_token
            if not token:
                return

    def delete_clip(self, clip_id: str, *, timeout_s: float | None = None) -> None:
        self._call(self._clips.DeleteClip, clip_pb2.DeleteClipRequest(clip_id=clip_id), timeout_s)

    # -- accounts (roles ingest, admin) ----------------------------------------------------------------
    def set_review_preference(self, account_id: str, allow_human_review: bool, *,
                              timeout_s: float | None = None) -> account_pb2.SetReviewPreferenceResponse:
        return self._call(self._accounts.SetReviewPreference, account_pb2.SetReviewPreferenceRequest(
            account_id=account_id, allow_human_review=allow_human_review), timeout_s)

    def delete_account(self, account_id: str, *, timeout_s: float | None = None) -> account_pb2.DeleteAccountResponse:
        return self._call(self._accounts.DeleteAccount, account_pb2.DeleteAccountRequest(account_id=account_id),
                          timeout_s)

    def rotate_account_key(self, account_id: str, *,
                           timeout_s: float | None = None) -> account_pb2.RotateAccountKeyResponse:
        return self._call(self._accounts.RotateAccountKey,
                          account_pb2.RotateAccountKeyRequest(account_id=account_id), timeout_s)

    def access_report(self, account_id: str, *, since: datetime | float | None = None,
                      until: datetime | float | None = None, nonce: str = "",
                      timeout_s: float | None = None) -> account_pb2.GetAccessReportResponse:
        """The account's verifiable access report (role ingest); check it with `auditlog verify-report`."""
        return self._call(self._accounts.GetAccessReport, account_pb2.GetAccessReportRequest(
            account_id=account_id, since=timestamp(since), until=timestamp(until), nonce=nonce), timeout_s)

    # -- principals (role admin) -----------------------------------------------------------------------
    def create_principal(self, role: str | int, name: str, *, spiffe_id: str = "",
                         expires_at: datetime | float | None = None,
                         timeout_s: float | None = None) -> principal_admin_pb2.CreatePrincipalResponse:
        """A non-reviewer principal; its API key (none with `spiffe_id`) is in the response, shown once."""
        return self._call(self._principals.CreatePrincipal, principal_admin_pb2.CreatePrincipalRequest(
            role=wire_role(role), name=name, spiffe_id=spiffe_id, expires_at=timestamp(expires_at)),  # type: ignore[arg-type]
            timeout_s)

    def list_principals(self, role: str | int = 0, *, page_size: int = 100,
                        timeout_s: float | None = None) -> Iterator[principal_admin_pb2.Principal]:
        token = ""
        while True:
            page = self._call(self._principals.ListPrincipals, principal_admin_pb2.ListPrincipalsRequest(
                role=wire_role(role), page_size=page_size, page_token=token), timeout_s)  # type: ignore[arg-type]
            yield from page.principals
            token = page.next_page_token
            if not token:
                return

    def disable_principal(self, principal_id: str, *,
                          timeout_s: float | None = None) -> principal_admin_pb2.DisablePrincipalResponse:
        return self._call(self._principals.DisablePrincipal,
                          principal_admin_pb2.DisablePrincipalRequest(principal_id=principal_id), timeout_s)

    def enable_principal(self, principal_id: str, *, timeout_s: float | None = None) -> principal_admin_pb2.Principal:
        return self._call(self._principals.EnablePrincipal,
                          principal_admin_pb2.EnablePrincipalRequest(principal_id=principal_id), timeout_s).principal

    def rotate_principal_key(self, principal_id: str, *, overlap_s: float | None = None,
                             timeout_s: float | None = None) -> principal_admin_pb2.RotatePrincipalKeyResponse:
        """A new API key (shown once); the old ones work for `overlap_s` (default: the server's)."""
        return self._call(self._principals.RotatePrincipalKey, principal_admin_pb2.RotatePrincipalKeyRequest(
            principal_id=principal_id, overlap=duration(overlap_s)), timeout_s)

    def set_principal_expiry(self, principal_id: str, expires_at: datetime | float | None, *,
                             timeout_s: float | None = None) -> principal_admin_pb2.Principal:
        """None clears the expiry."""
        return self._call(self._principals.SetPrincipalExpiry, principal_admin_pb2.SetPrincipalExpiryRequest(
            principal_id=principal_id, expires_at=timestamp(expires_at)), timeout_s).principal

    # -- reviewer administration (role admin) ----------------------------------------------------------
    def create_reviewer(self, name: str, locales: Iterable[str], *, spiffe_id: str = "",
                        timeout_s: float | None = None) -> reviewer_admin_pb2.CreateReviewerResponse:
        """Create a reviewer without factors; pass `response.enrolment.code` to them out of band."""
        return self._call(self._admin.CreateReviewer, reviewer_admin_pb2.CreateReviewerRequest(
            name=name, locales=list(locales), spiffe_id=spiffe_id), timeout_s)

    def issue_enrolment_code(self, reviewer_id: str, purpose: str | int = "enrol", *,
                             timeout_s: float | None = None) -> reviewer_admin_pb2.EnrolmentOffer:
        """A new one-time code: `"enrol"` again, `"rotate_totp"` or `"rotate_api_key"`."""
        return self._call(self._admin.IssueEnrolmentCode, reviewer_admin_pb2.IssueEnrolmentCodeRequest(
            reviewer_id=reviewer_id, purpose=enrolment_purpose(purpose)), timeout_s).enrolment  # type: ignore[arg-type]

    def redeem_enrolment_code(self, reviewer_id: str, code: str, *,
                              timeout_s: float | None = None) -> enrolment_pb2.RedeemEnrolmentCodeResponse:
        """The reviewer's side (no credentials needed): the factors the code issues, shown once."""
        return self._call(self._enrolment.RedeemEnrolmentCode, enrolment_pb2.RedeemEnrolmentCodeRequest(
            reviewer_id=reviewer_id, code=code), timeout_s)

    def disable_reviewer(self, reviewer_id: str, *,
                         timeout_s: float | None = None) -> reviewer_admin_pb2.DisableReviewerResponse:
        return self._call(self._admin.DisableReviewer,
                          reviewer_admin_pb2.DisableReviewerRequest(reviewer_id=reviewer_id), timeout_s)

    # -- review (role reviewer) ------------------------------------------------------------------------
    def start_review_session(self, totp_code: str, *,
                             timeout_s: float | None = None) -> review_pb2.StartReviewSessionResponse:
        return self._call(self._review.StartReviewSession,
                          review_pb2.StartReviewSessionRequest(totp_code=totp_code), timeout_s)

    def next_assignment(self, session_token: str, locale: str = "", *,
                        timeout_s: float | None = None) -> review_pb2.NextAssignmentResponse:
        return self._call(self._review.NextAssignment, review_pb2.NextAssignmentRequest(
            session_token=session_token, locale=locale), timeout_s)

    def request_grant(self, session_token: str, assignment_id: str, *,
                      timeout_s: float | None = None) -> review_pb2.RequestGrantResponse:
        return self._call(self._review.RequestGrant, review_pb2.RequestGrantRequest(
            session_token=session_token, assignment_id=assignment_id), timeout_s)

    def fetch_clip(self, session_token: str, grant: str, review_clip_id: str, *,
                   timeout_s: float | None = None) -> Iterator[bytes]:
        """Redeem a grant (single use) and yield the audio chunk by chunk."""
        responses = self._review.FetchClip(review_pb2.FetchClipRequest(
            session_token=session_token, grant=grant, review_clip_id=review_clip_id),
            timeout=timeout_s or self.stream_timeout_s, metadata=self._transport.metadata())
        try:
            for response in responses:
                if response.WhichOneof("part") == "audio_chunk":
                    yield response.audio_chunk
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            responses.cancel()  # a caller that stops early ends the stream

    def fetch_clip_to(self, path: str | Path, session_token: str, grant: str, review_clip_id: str, *,
                      timeout_s: float | None = None) -> int:
        """Redeem a grant and write the audio to `path` (mode 0600), whole or not at all; returns its size."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                for chunk in self.fetch_clip(session_token, grant, review_clip_id, timeout_s=timeout_s):
                    out.write(chunk)
                    size += len(chunk)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return size

    def flag_clip(self, session_token: str, assignment_id: str, category: str | int, note: str = "", *,
                  timeout_s: float | None = None) -> str:
        """Escalate to the safety team; returns the escalation id."""
        return self._call(self._review.FlagClip, review_pb2.FlagClipRequest(
            session_token=session_token, assignment_id=assignment_id, category=flag_category(category),  # type: ignore[arg-type]
            note=note), timeout_s).escalation_id

    def complete_assignment(self, session_token: str, assignment_id: str, label: str, *,
                            timeout_s: float | None = None) -> None:
        self._call(self._review.CompleteAssignment, review_pb2.CompleteAssignmentRequest(
            session_token=session_token, assignment_id=assignment_id, label=label), timeout_s)

    def end_review_session(self, session_token: str, *, timeout_s: float | None = None) -> None:
        self._call(self._review.EndReviewSession, review_pb2.EndReviewSessionRequest(session_token=session_token),
                   timeout_s)

    # -- safety (role safety) --------------------------------------------------------------------------
    def list_escalations(self, *, include_resolved: bool = False, page_size: int = 100,
                         timeout_s: float | None = None) -> Iterator[safety_pb2.Escalation]:
        token = ""
        while True:
            page = self._call(self._safety.ListEscalations, safety_pb2.ListEscalationsRequest(
                page_size=page_size, page_token=token, include_resolved=include_resolved), timeout_s)
            yield from page.escalations
            token = page.next_page_token
            if not token:
                return

    def resolve_escalation(self, escalation_id: str, resolution: str, *,
                           timeout_s: float | None = None) -> safety_pb2.Escalation:
        return self._call(self._safety.ResolveEscalation, safety_pb2.ResolveEscalationRequest(
            escalation_id=escalation_id, resolution=resolution), timeout_s).escalation

    def identify_leak(self, audio: AudioInput, *, timeout_s: float | None = None) -> safety_pb2.IdentifyLeakResponse:
        """(roles safety, auditor) The fetch whose forensic watermark a leaked copy carries: grant, reviewer
        pseudonym, time, clip. `audio` is bytes, a binary file or an iterable of byte chunks (WAV, FLAC,
        Ogg Vorbis or Opus); `errors.WatermarkNotFoundError` when it carries no mark of this service."""
        requests = (safety_pb2.IdentifyLeakRequest(audio_chunk=c) for c in Audio(audio).chunks())
        return self._call(self._safety.IdentifyLeak, requests, timeout_s or self.stream_timeout_s)

    # -- audit (role auditor): everything verified before it is returned --------------------------------
    def get_checkpoint(self, verifier_key: str | NoteVerifier, *, trusted: VerifiedCheckpoint | None = None,
                       timeout_s: float | None = None) -> VerifiedCheckpoint:
        """The latest checkpoint, signed by `verifier_key` (obtained independently, never from the server).

        With `trusted` (a checkpoint you saved earlier), also proves the log only grew since.
        Raises `auditlog.VerificationError` (NoteError, CheckpointError, ProofError) otherwise.
        """
        checkpoint = checkpoint_from(self._call(self._audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(),
                                                timeout_s), verifier_key)
        if trusted is not None:
            self._check_grew(trusted, checkpoint, timeout_s)
        return checkpoint

    def list_entries(self, checkpoint: VerifiedCheckpoint, *, start: int = 0, page_size: int = 100,
                     timeout_s: float | None = None) -> Iterator[AuditEntry]:
        """Entries [start, checkpoint.size), each page proven to be in the checkpoint's tree before it is
        yielded (two inclusion proofs per page); raises `auditlog.VerificationError` at the first defect."""
        prev: str | None = None
        index = start
        while index < checkpoint.size:
            want = min(page_size, checkpoint.size - index)
            page = self._call(self._audit.ListEntries, audit_pb2.ListEntriesRequest(
                start_index=index, page_size=want), timeout_s)
            entries = list(page.entries)[:want]
            last = index + max(len(entries), 1) - 1
            first_proof, last_proof = (self._inclusion(i, checkpoint, timeout_s) for i in (index, last))
            verified = check_page(checkpoint, index, entries, prev, first_proof, last_proof)
            yield from verified
            prev = verified[-1].leaf_hash.hex()
            index += len(verified)

    def _inclusion(self, index: int, checkpoint: VerifiedCheckpoint, timeout_s: float | None) -> list[bytes]:
        return list(self._call(self._audit.GetInclusionProof, audit_pb2.GetInclusionProofRequest(
            index=index, tree_size=checkpoint.size), timeout_s).proof)

    def get_inclusion_proof(self, index: int, checkpoint: VerifiedCheckpoint, *, entry: bytes | None = None,
                            timeout_s: float | None = None) -> InclusionProof:
        """A proof that entry `index` (and, if given, exactly these `entry` bytes) is in the checkpoint."""
        response = self._call(self._audit.GetInclusionProof, audit_pb2.GetInclusionProofRequest(
            index=index, tree_size=checkpoint.size), timeout_s)
        return check_inclusion(checkpoint, index, response, entry)

    def get_consistency_proof(self, old: VerifiedCheckpoint, new: VerifiedCheckpoint, *,
                              timeout_s: float | None = None) -> list[bytes]:
        """A proof that `old`'s tree is a prefix of `new`'s, verified."""
        return self._check_grew(old, new, timeout_s)

    def _check_grew(self, old: VerifiedCheckpoint, new: VerifiedCheckpoint, timeout_s: float | None) -> list[bytes]:
        proof: list[bytes] = []
        if 0 < old.size < new.size:
            proof = list(self._call(self._audit.GetConsistencyProof, audit_pb2.GetConsistencyProofRequest(
                old_size=old.size, new_size=new.size), timeout_s).proof)
        check_grew(old, new, proof)
        return proof
