"""The CLI's admin commands: principals, reviewers and leak forensics, over the API of a (remote) server.

They need neither the database nor the KMS, only `--server`, TLS flags and an
admin credential (`clipstore.remote`). Output is one `key=value` line per
record on stdout; a key, secret or code is printed once, there, and nowhere
else. The local bootstrap of the first admin is `clipstore principals create`
without `--server` (`clipstore.cli`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.auth import ROLES
from clipstore.client._wire import Audio
from clipstore.config import ConfigError, is_loopback
from clipstore.remote import Remote, add_remote_flags, remote
from clipstore.v1 import (
    common_pb2,
    enrolment_pb2,
    enrolment_pb2_grpc,
    principal_admin_pb2,
    principal_admin_pb2_grpc,
    reviewer_admin_pb2,
    reviewer_admin_pb2_grpc,
    safety_pb2,
    safety_pb2_grpc,
)

ENROLMENT_CODE_ENV = "CLIPSTORE_ENROLMENT_CODE"
EXIT_REFUSED = 1
PURPOSES = {"enrol": enrolment_pb2.ENROLMENT_PURPOSE_ENROL, "rotate-totp": enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_TOTP,
            "rotate-api-key": enrolment_pb2.ENROLMENT_PURPOSE_ROTATE_API_KEY}
RPC_TIMEOUT_S = 30.0
IDENTIFY_TIMEOUT_S = 300.0  # uploading a long file and searching it for a mark


def _role(name: str) -> common_pb2.Role.ValueType:
    return common_pb2.Role.Value("ROLE_" + name.upper())


def _when(ts: Timestamp) -> str:
    return dt.datetime.fromtimestamp(ts.seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _timestamp(text: str) -> Timestamp:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("expires-at", f"not an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        raise ConfigError("expires-at", f"give a time zone, e.g. {text}Z or {text}+02:00")
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def _line(**fields: Any) -> None:
    print(" ".join(f"{k}={shlex.quote(str(v))}" for k, v in fields.items() if v not in ("", None)))


def _principal(p: principal_admin_pb2.Principal) -> None:
    _line(principal_id=p.principal_id, role=common_pb2.Role.Name(p.role).removeprefix("ROLE_").lower(),
          name=p.name, disabled=str(p.disabled).lower(), spiffe_id=p.spiffe_id,
          expires_at=_when(p.expires_at) if p.HasField("expires_at") else "never", usable_keys=p.usable_keys)


def _shown_once(what: str, *, plural: bool = False) -> None:
    print(f"# the {what} {'are' if plural else 'is'} shown only once: store {'them' if plural else 'it'} now",
          file=sys.stderr)


def connect(args: argparse.Namespace, *, credentials: bool = True) -> Remote:
    target = remote(args, credentials=credentials)
    if target.channel_credentials is None and not is_loopback(target.server):
        raise ConfigError("server", f"{target.server} is not a loopback address: use TLS (--ca-file, or --tls) so "
                                    "credentials never cross the network in clear")
    return target


def _run(args: argparse.Namespace, call: Callable[[grpc.Channel, tuple[tuple[str, str], ...]], None], *,
         credentials: bool = True) -> int:
    target = connect(args, credentials=credentials)
    with target.channel() as channel:
        try:
            call(channel, target.metadata)
        except grpc.RpcError as err:
            print(f"error: {target.server}: {refusal(err)}", file=sys.stderr)
            return EXIT_REFUSED
    return 0


def refusal(err: grpc.RpcError) -> str:
    """`CODE REASON: message` of a failed call (the reason from its google.rpc.ErrorInfo, when it has one)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    reason = ""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = f" {info.reason}"
    return f"{err.code().name}{reason}: {err.details()}"


# -- principals ---------------------------------------------------------------------------------------------

def principals_create(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        request = principal_admin_pb2.CreatePrincipalRequest(role=_role(args.role), name=args.name,
                                                             spiffe_id=args.spiffe_id or "")
        if args.expires_at:
            request.expires_at.CopyFrom(_timestamp(args.expires_at))
        resp = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).CreatePrincipal(
            request, metadata=md, timeout=RPC_TIMEOUT_S)
        _principal(resp.principal)
        if resp.api_key:
            print(f"api_key={resp.api_key}")
            _shown_once("API key")
    return _run(args, call)


def _principals_list(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        stub, token = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel), ""
        while True:
            page = stub.ListPrincipals(principal_admin_pb2.ListPrincipalsRequest(
                role=_role(args.role) if args.role else common_pb2.ROLE_UNSPECIFIED, page_token=token),
                metadata=md, timeout=RPC_TIMEOUT_S)
            for p in page.principals:
                _principal(p)
            token = page.next_page_token
            if not token:
                return
    return _run(args, call)


def _principals_disable(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        resp = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).DisablePrincipal(
            principal_admin_pb2.DisablePrincipalRequest(principal_id=args.principal_id), metadata=md,
            timeout=RPC_TIMEOUT_S)
        _principal(resp.principal)
        if resp.ended_sessions or resp.voided_grants:
            _line(ended_sessions=resp.ended_sessions, voided_grants=resp.voided_grants)
    return _run(args, call)


def _principals_enable(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        _principal(principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).EnablePrincipal(
            principal_admin_pb2.EnablePrincipalRequest(principal_id=args.principal_id), metadata=md,
            timeout=RPC_TIMEOUT_S).principal)
    return _run(args, call)


def _principals_rotate_key(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        request = principal_admin_pb2.RotatePrincipalKeyRequest(principal_id=args.principal_id)
        if args.overlap_s is not None:
            request.overlap.CopyFrom(Duration(seconds=args.overlap_s))
        resp = principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).RotatePrincipalKey(
            request, metadata=md, timeout=RPC_TIMEOUT_S)
        print(f"api_key={resp.api_key}")
        _line(previous_keys_retire_at=_when(resp.previous_keys_retire_at))
        _shown_once("API key")
    return _run(args, call)


def _principals_set_expiry(args: argparse.Namespace) -> int:
    if bool(args.expires_at) == args.never:
        raise ConfigError("expires-at", "give exactly one of --expires-at TIME or --never")

    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        request = principal_admin_pb2.SetPrincipalExpiryRequest(principal_id=args.principal_id)
        if args.expires_at:
            request.expires_at.CopyFrom(_timestamp(args.expires_at))
        _principal(principal_admin_pb2_grpc.PrincipalAdminServiceStub(channel).SetPrincipalExpiry(
            request, metadata=md, timeout=RPC_TIMEOUT_S).principal)
    return _run(args, call)


# -- reviewers -------------------------------------------------------------------------------------------

def _offer(offer: reviewer_admin_pb2.EnrolmentOffer) -> None:
    _line(reviewer_id=offer.reviewer_id, enrolment_code=offer.code, expires_at=_when(offer.expires_at))
    print(f"# pass the reviewer their id and this code out of band; they run: clipstore reviewers redeem "
          f"--reviewer-id {offer.reviewer_id} (the code on stdin or in ${ENROLMENT_CODE_ENV})", file=sys.stderr)


def _reviewers_create(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        _offer(reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).CreateReviewer(
            reviewer_admin_pb2.CreateReviewerRequest(name=args.name, locales=args.locale or [],
                                                     spiffe_id=args.spiffe_id or ""),
            metadata=md, timeout=RPC_TIMEOUT_S).enrolment)
    return _run(args, call)


def _reviewers_issue_code(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        _offer(reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).IssueEnrolmentCode(
            reviewer_admin_pb2.IssueEnrolmentCodeRequest(reviewer_id=args.reviewer_id,
                                                         purpose=PURPOSES[args.purpose]),
            metadata=md, timeout=RPC_TIMEOUT_S).enrolment)
    return _run(args, call)


def _reviewers_disable(args: argparse.Namespace) -> int:
    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        resp = reviewer_admin_pb2_grpc.ReviewerAdminServiceStub(channel).DisableReviewer(
            reviewer_admin_pb2.DisableReviewerRequest(reviewer_id=args.reviewer_id), metadata=md,
            timeout=RPC_TIMEOUT_S)
        _line(reviewer_id=args.reviewer_id, disabled="true", ended_sessions=resp.ended_sessions,
              voided_grants=resp.voided_grants)
    return _run(args, call)


def _enrolment_code() -> str:
    code = os.environ.get(ENROLMENT_CODE_ENV, "").strip()
    if not code:
        if sys.stdin.isatty():
            import getpass
            code = getpass.getpass("enrolment code: ").strip()
        else:
            code = sys.stdin.readline().strip()
    if not code:
        raise ConfigError("enrolment-code", f"give the code on stdin or in ${ENROLMENT_CODE_ENV}")
    return code


def _reviewers_redeem(args: argparse.Namespace) -> int:
    """The reviewer's own command: no credential but the code (and, under mTLS, their certificate)."""
    code = _enrolment_code()

    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        resp = enrolment_pb2_grpc.EnrolmentServiceStub(channel).RedeemEnrolmentCode(
            enrolment_pb2.RedeemEnrolmentCodeRequest(reviewer_id=args.reviewer_id, code=code), timeout=RPC_TIMEOUT_S)
        for name in ("api_key", "totp_secret", "provisioning_uri"):
            if getattr(resp, name):
                print(f"{name}={getattr(resp, name)}")
        _shown_once("factors above are yours alone and", plural=True)
    return _run(args, call, credentials=False)


def _forensics_identify(args: argparse.Namespace) -> int:
    """(safety or auditor) Which fetch a leaked copy came from; the server audits the request."""
    try:
        leaked = args.file.open("rb")
    except OSError as exc:
        raise ConfigError("file", f"cannot read {args.file}: {exc.strerror}") from None

    def call(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        requests = (safety_pb2.IdentifyLeakRequest(audio_chunk=c) for c in Audio(leaked).chunks())
        resp = safety_pb2_grpc.SafetyServiceStub(channel).IdentifyLeak(requests, metadata=md,
                                                                       timeout=IDENTIFY_TIMEOUT_S)
        _line(watermark_id=resp.watermark_id, grant_id=resp.grant_id, reviewer_id=resp.reviewer_id,
              fetched_at=_when(resp.fetched_at), clip_id=resp.clip_id, review_clip_id=resp.review_clip_id,
              confidence=f"{resp.confidence:.3f}")
    with leaked:
        return _run(args, call)


def _add(sub: Any, name: str, help_text: str, func: Callable[[argparse.Namespace], int],
         positional: Iterable[str] = ()) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    for arg in positional:
        parser.add_argument(arg)
    add_remote_flags(parser)
    parser.set_defaults(func=func)
    return parser


def add_principal_commands(psub: Any) -> None:
    """`principals list|disable|enable|rotate-key|set-expiry`, over the API (`create` is in `clipstore.cli`)."""
    listing = _add(psub, "list", "list principals (all roles, or --role)", _principals_list)
    listing.add_argument("--role", choices=ROLES)
    _add(psub, "disable", "refuse a principal's keys and certificate from now on", _principals_disable,
         ["principal_id"])
    _add(psub, "enable", "lift a disable", _principals_enable, ["principal_id"])
    rotate = _add(psub, "rotate-key", "issue a new API key; the old ones work for the overlap",
                  _principals_rotate_key, ["principal_id"])
    rotate.add_argument("--overlap-s", type=int, help="seconds the old keys keep working (default: the server's)")
    expiry = _add(psub, "set-expiry", "refuse a principal after a time", _principals_set_expiry, ["principal_id"])
    expiry.add_argument("--expires-at", help="ISO 8601 with a time zone, e.g. 2027-01-31T00:00:00Z")
    expiry.add_argument("--never", action="store_true", help="clear the expiry")


def add_reviewer_commands(sub: Any) -> None:
    reviewers = sub.add_parser("reviewers", help="human reviewers: enrolment codes, never their factors")
    rsub = reviewers.add_subparsers(dest="reviewers_command", required=True)
    create = _add(rsub, "create", "create a reviewer; prints a one-time enrolment code", _reviewers_create)
    create.add_argument("--name", required=True)
    create.add_argument("--locale", action="append", help="BCP 47 tag (repeatable)")
    create.add_argument("--spiffe-id", help="spiffe://<trust domain>/reviewer/<name> of their client certificate")
    issue = _add(rsub, "issue-code", "a new code: enrol again, or rotate the TOTP secret or API key",
                 _reviewers_issue_code, ["reviewer_id"])
    issue.add_argument("--purpose", required=True, choices=sorted(PURPOSES))
    _add(rsub, "disable", "disable a reviewer, end their sessions, void their grants", _reviewers_disable,
         ["reviewer_id"])
    redeem = _add(rsub, "redeem", "(the reviewer) redeem a code: prints your factors once", _reviewers_redeem)
    redeem.add_argument("--reviewer-id", required=True)


def add_forensics_commands(sub: Any) -> None:
    forensics = sub.add_parser("forensics", help="trace a leaked copy of a clip to the fetch it came from")
    fsub = forensics.add_subparsers(dest="forensics_command", required=True)
    identify = _add(fsub, "identify", "(safety, auditor) the grant, reviewer pseudonym and time a leaked copy's "
                                      "watermark names; audited", _forensics_identify)
    identify.add_argument("file", type=Path, help="the leaked audio: WAV, FLAC, Ogg Vorbis or Ogg Opus")
