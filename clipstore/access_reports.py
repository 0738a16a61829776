"""Access reports: the account holder's verifiable list of every human access to their clips.

`AccessReports.build` records the request in the account's own access chain (so asking is audited,
and the request entry is the report's head: nothing of the account's before it can be left out),
takes a checkpoint covering it (cosigned by the witness quorum when witnesses are configured; one
signing and witness round serves all the reports waiting, clipstore.audit.report_checkpoints), and
returns the report `auditlog verify-report` checks offline: the account's chained entries from the
window's fence to the request, one multiproof, the checkpoint and a binding note signed with the
log key. Format and argument: docs/access-report.md.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from auditlog.access import REQUEST_ACTION
from auditlog.checkpoint import Checkpoint
from auditlog.errors import ProofError
from auditlog.merkle import leaf_hash
from auditlog.multiproof import multiproof_ranges, verify_multiproof
from auditlog.note import NoteSigner, open_note, sign_note
from auditlog.report import REPORT_FORMAT, binding_text
from clipstore.audit import AuditLog, AuditUnavailable
from clipstore.audit.reader import AuditReader
from clipstore.clock import rfc3339
from clipstore.errors import InvalidArgument, ResourceExhausted
from clipstore.logs import get_logger
from clipstore.unit import Actor

PSEUDONYM_KEY_NAME = "access-report-pseudonym-hmac"
PSEUDONYM_CHARS = 20  # 80 bits of the HMAC: unique among an account's reviewers, unlinkable across accounts
MAX_NONCE_CHARS = 64
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")
log = get_logger("clipstore.access_reports")


def reviewer_pseudonym(key: bytes, account_ref: str, principal_id: str) -> str:
    """Stable for one reviewer within one account, unlinkable across accounts without the key."""
    mac = hmac.new(key, b"clipstore access pseudonym v1\x00" + account_ref.encode() + b"\x00" + principal_id.encode(),
                   hashlib.sha256)
    return "rv_" + mac.hexdigest()[:PSEUDONYM_CHARS]


@dataclass(frozen=True)
class AccessReport:
    report: bytes  # JSON, format clipstore-access-report/1
    tree_size: int  # of the checkpoint it proves against
    entries: int


class AccessReports:
    def __init__(self, *, audit: AuditLog, account_ref: Callable[[str], str],
                 captured_at: Callable[[Collection[str]], dict[str, float]], pseudonym_key: bytes,
                 checkpoints: Callable[[int], str], max_bytes: int) -> None:
        """`checkpoints(head)`: a (cosigned) checkpoint note whose tree holds entry `head`
        (`ReportCheckpoints.covering`); raises AuditUnavailable."""
        self._audit = audit
        self._max_bytes = max_bytes  # one gRPC message: the server could not send a larger report
        self._account_ref, self._captured_at = account_ref, captured_at
        self._key, self._checkpoints = pseudonym_key, checkpoints

    def build(self, account_id: str, actor: Actor, *, since: float | None = None, until: float | None = None,
              nonce: str = "") -> AccessReport:
        """The report of the account's accesses in [since, until], complete up to this request."""
        if nonce and not _NONCE.fullmatch(nonce):
            raise InvalidArgument("nonce", f"1 to {MAX_NONCE_CHARS} characters of A-Z a-z 0-9 _ -")
        if since is not None and until is not None and since > until:
            raise InvalidArgument("since", "must not be after until")
        ref = self._account_ref(account_id)
        # The request, in the account's chain: its head from now on, and the report's.
        head = self._audit.append(actor.record(REQUEST_ACTION, account_ref=ref,
                                               reason=f"nonce={nonce}" if nonce else ""))
        note = self._checkpoints(head)
        report = assemble_report(self._audit.reader, self._audit.signer, note=note, account_id=account_id,
                                 account_ref=ref, head=head, since=since, until=until, pseudonym_key=self._key,
                                 captured_at=self._captured_at)
        if len(report.report) > self._max_bytes:  # the request stays recorded: it was made
            raise ResourceExhausted(f"the report holds {report.entries} accesses ({len(report.report)} bytes), more "
                                    f"than one message of {self._max_bytes} bytes carries; ask with since (the report "
                                    "then starts at the last access before it)", reason="REPORT_TOO_LARGE")
        return report


def assemble_report(reader: AuditReader, signer: NoteSigner, *, note: str, account_id: str, account_ref: str,
                    head: int, since: float | None, until: float | None, pseudonym_key: bytes,
                    captured_at: Callable[[Collection[str]], dict[str, float]]) -> AccessReport:
    """The report from the stored log: the account's chain from the window's fence up to the request entry
    at index `head`, proved against the checkpoint `note` (which must cover it). Also what the bench times."""
    checkpoint = Checkpoint.parse(open_note(note, [signer.verifier]))
    if checkpoint.size <= head:
        raise AuditUnavailable("the newest checkpoint does not cover this request yet; retry")
    rows = reader.account_entries(account_ref, through=head, before=rfc3339(since) if since is not None else None)
    indices = [index for _, index in rows]
    entries = reader.entries_at(indices)
    proof = reader.range_roots(multiproof_ranges(indices, checkpoint.size))
    try:  # a stored node gone bad would give a report that fails for the user: refuse it here
        verify_multiproof([(i, leaf_hash(e)) for i, e in zip(indices, entries, strict=True)], checkpoint.size,
                          proof, checkpoint.root)
    except ProofError as exc:
        log.error("access_report.bad_stored_nodes", detail=str(exc))
        raise AuditUnavailable("the stored proof nodes do not match the signed tree; operators: verify the "
                               "audit log") from None
    parsed = [json.loads(e) for e in entries]
    actors = {p["actor"]["id"] for p in parsed}
    captured = {c: rfc3339(t) for c, t in captured_at({p["target"]["clip_id"] for p in parsed} - {""}).items()}
    request_id = parsed[-1]["request_id"]
    window = {"since": rfc3339(since) if since is not None else "",
              "until": rfc3339(until) if until is not None else ""}
    binding = sign_note(binding_text(
        origin=checkpoint.origin, account_ref=account_ref,
        account_id_sha256=hashlib.sha256(account_id.encode()).hexdigest(), request_id=request_id,
        reviewers={a: reviewer_pseudonym(pseudonym_key, account_ref, a) for a in actors}, clips=captured, **window),
        signer)
    report = {"format": REPORT_FORMAT, "request_id": request_id, **window, "checkpoint": note, "binding": binding,
              "entries": [{"index": i, "entry": e.decode()} for i, e in zip(indices, entries, strict=True)],
              "proof": [base64.b64encode(h).decode() for h in proof]}
    return AccessReport(report=json.dumps(report, ensure_ascii=False, separators=(",", ":")).encode(),
                        tree_size=checkpoint.size, entries=len(entries))
