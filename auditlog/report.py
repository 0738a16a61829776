"""Access reports: every human access to one account's clips, verifiable offline.

A report (JSON, format `clipstore-access-report/1`, docs/access-report.md) carries the account's
chained entries (`auditlog.access`) from the start of its chain, or from the last one before the
window, up to the report's own request entry; one multiproof (`auditlog.multiproof`) putting them
all in one checkpoint; that checkpoint (signed by the log, cosigned by witnesses); and a binding
note signed by the log key naming the account's pseudonym, the SHA-256 of the account id, the
reviewers' per-account pseudonyms and the clips' capture times.

Plan of `verify_report` (each step raises `ReportError` naming where it failed):
  1. form: the JSON, its fields and their bounds;
  2. the checkpoint: the log's signature, and `quorum` witness cosignatures;
  3. the binding: the log's signature, its header, log, request and window lines, the account id;
  4. every entry: canonical form, its seq equals its index, inside the checkpoint;
  5. the multiproof: all entries are leaves of the checkpoint's tree;
  6. ownership: every entry is chained and names the bound account pseudonym;
  7. completeness: account_seq contiguous and each account_prev the hash of the entry before it,
     starting at 1 or at an entry before the window;
  8. the head: the last entry is this report's request (and carries `nonce`, when given);
  9. pseudonyms: every actor has one in the binding.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from auditlog.access import REQUEST_ACTION, AccountLink, account_link
from auditlog.checkpoint import Checkpoint
from auditlog.cosignature import Cosignature, CosignatureVerifier, open_cosigned_checkpoint
from auditlog.entry import GENESIS_PREV, entry_hash, parse_entry
from auditlog.errors import EntryError, ProofError, VerificationError
from auditlog.multiproof import verify_multiproof
from auditlog.note import NoteVerifier, open_note

__all__ = ["BINDING_HEADER", "REPORT_FORMAT", "Access", "ReportError", "VerifiedReport", "binding_text",
           "verify_report"]

REPORT_FORMAT = "clipstore-access-report/1"
BINDING_HEADER = "clipstore-access-binding/v1"
MAX_REPORT_BYTES = 64 << 20  # ~100k entries with their proof; bounds memory on hostile files
MAX_REPORT_ENTRIES = 100_000
_SINGLE = frozenset({"log", "account-ref", "account-id-sha256", "request", "window"})  # binding lines, once each
_FIELDS = frozenset({"format", "request_id", "since", "until", "checkpoint", "binding", "entries", "proof"})


class ReportError(VerificationError):
    """A report does not verify; `where` names the part (checkpoint, binding, entry <i>, proof, …)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


@dataclass(frozen=True)
class Access:
    index: int  # in the log
    time: str
    action: str
    result: str
    reason: str
    clip_id: str
    captured_at: str  # the clip's capture time as the binding states it; "" if unknown
    who: str  # the actor's per-account pseudonym
    role: str


@dataclass(frozen=True)
class VerifiedReport:
    account_ref: str
    checkpoint: Checkpoint
    cosignatures: tuple[Cosignature, ...]
    accesses: tuple[Access, ...]  # those in the window, in log order
    complete_through: str  # the request entry's time: nothing of the account's before it is missing
    chain_start: bool  # the report starts at the account's first chained entry
    since: str
    until: str


def binding_text(*, origin: str, account_ref: str, account_id_sha256: str, request_id: str,
                 reviewers: dict[str, str], clips: dict[str, str], since: str, until: str) -> str:
    """The binding note's text (the service signs it with the log key). `since`/`until` are the report's
    window ("" unbounded, written `-`): signed, so nobody relaying a report can narrow it to hide accesses."""
    lines = [BINDING_HEADER, f"log {origin}", f"account-ref {account_ref}", f"account-id-sha256 {account_id_sha256}",
             f"request {request_id}", f"window {since or '-'} {until or '-'}"]
    lines += [f"reviewer {p} {pseudonym}" for p, pseudonym in sorted(reviewers.items())]
    lines += [f"clip {c} {captured}" for c, captured in sorted(clips.items())]
    return "".join(f"{line}\n" for line in lines)


@dataclass(frozen=True)
class _Binding:
    origin: str
    account_ref: str
    account_id_sha256: str
    request_id: str
    window: str
    reviewers: dict[str, str]
    clips: dict[str, str]


def _parse_binding(text: str) -> _Binding:
    lines = text[:-1].split("\n")
    if lines[0] != BINDING_HEADER:
        raise ReportError("binding", f"first line must be {BINDING_HEADER!r}")
    single: dict[str, str] = {}
    reviewers: dict[str, str] = {}
    clips: dict[str, str] = {}
    for number, line in enumerate(lines[1:], start=2):
        key, _, value = line.partition(" ")
        if key in _SINGLE and key not in single and value and (key != "window" or value.count(" ") == 1):
            single[key] = value
        elif key in ("reviewer", "clip") and value.count(" ") == 1:
            name, other = value.split(" ")
            table = reviewers if key == "reviewer" else clips
            if name in table:
                raise ReportError("binding", f"line {number} repeats {key} {name}")
            table[name] = other
        else:
            raise ReportError("binding", f"line {number} is not a known binding line")
    missing = _SINGLE - set(single)
    if missing:
        raise ReportError("binding", f"missing line(s): {', '.join(sorted(missing))}")
    return _Binding(origin=single["log"], account_ref=single["account-ref"],
                    account_id_sha256=single["account-id-sha256"], request_id=single["request"],
                    window=single["window"], reviewers=reviewers, clips=clips)


def _time(value: object, where: str) -> dt.datetime:
    if not isinstance(value, str):
        raise ReportError(where, "time is not a string")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ReportError(where, f"time {value[:40]!r} is not RFC 3339") from None
    if parsed.tzinfo is None:
        raise ReportError(where, f"time {value[:40]!r} has no UTC offset")
    return parsed


def _form(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError("report", f"is {len(data)} bytes; at most {MAX_REPORT_BYTES} allowed")
    try:
        report = json.loads(data)
    except (ValueError, RecursionError):
        raise ReportError("report", "is not valid JSON") from None
    if not isinstance(report, dict) or set(report) != _FIELDS:
        raise ReportError("report", f"fields must be exactly {sorted(_FIELDS)}")
    if report["format"] != REPORT_FORMAT:
        raise ReportError("report", f"format is {str(report['format'])[:40]!r}, this verifier reads {REPORT_FORMAT!r}")
    for name in ("request_id", "since", "until", "checkpoint", "binding"):
        if not isinstance(report[name], str):
            raise ReportError("report", f"{name} is not a string")
    entries, proof = report["entries"], report["proof"]
    if not isinstance(entries, list) or not entries or len(entries) > MAX_REPORT_ENTRIES:
        raise ReportError("report", f"entries must be a list of 1 to {MAX_REPORT_ENTRIES}")
    if not isinstance(proof, list) or not all(isinstance(p, str) for p in proof):
        raise ReportError("report", "proof must be a list of base64 strings")
    for n, item in enumerate(entries):
        if not isinstance(item, dict) or set(item) != {"index", "entry"} or not isinstance(item["entry"], str) \
                or not isinstance(item["index"], int) or isinstance(item["index"], bool):
            raise ReportError("report", f"entries[{n}] must be {{\"index\": int, \"entry\": str}}")
    return report


def verify_report(data: bytes, log_key: NoteVerifier, *, witnesses: Sequence[CosignatureVerifier] = (),
                  quorum: int = 0, account_id: str | None = None, nonce: str | None = None) -> VerifiedReport:
    """Run the plan in the module docstring."""
    # 1
    report = _form(data)
    since = _time(report["since"], "report") if report["since"] else None
    until = _time(report["until"], "report") if report["until"] else None
    # 2
    try:
        checkpoint, cosigs = open_cosigned_checkpoint(report["checkpoint"], log_key, witnesses, quorum)
    except VerificationError as exc:
        raise ReportError("checkpoint", str(exc)) from None
    # 3
    try:
        binding = _parse_binding(open_note(report["binding"], [log_key]))
    except ReportError:
        raise
    except VerificationError as exc:
        raise ReportError("binding", str(exc)) from None
    if binding.origin != checkpoint.origin:
        raise ReportError("binding", f"is for log {binding.origin!r}, the checkpoint for {checkpoint.origin!r}")
    if binding.request_id != report["request_id"]:
        raise ReportError("binding", "names another request than the report")
    if binding.window != f"{report['since'] or '-'} {report['until'] or '-'}":
        raise ReportError("binding", "was signed for another since/until window than the report states "
                                     "(a narrowed window would hide accesses)")
    if account_id is not None and binding.account_id_sha256 != hashlib.sha256(account_id.encode()).hexdigest():
        raise ReportError("binding", "binds the report to another account id than the one given")
    # 4
    leaves: list[tuple[int, bytes]] = []
    parsed: list[tuple[int, bytes, dict[str, Any]]] = []
    for item in report["entries"]:
        index, raw = item["index"], item["entry"].encode("utf-8", errors="surrogatepass")
        if parsed and index <= parsed[-1][0]:
            raise ReportError(f"entry {index}", f"out of log order: follows entry {parsed[-1][0]}")
        if not 0 <= index < checkpoint.size:
            raise ReportError(f"entry {index}", f"is outside the checkpoint (size {checkpoint.size})")
        try:
            entry = parse_entry(raw, index)
        except EntryError as exc:
            raise ReportError(f"entry {index}", exc.reason) from None
        if entry["seq"] != index:
            raise ReportError(f"entry {index}", f"carries seq {entry['seq']}, not its index")
        leaves.append((index, hashlib.sha256(b"\x00" + raw).digest()))
        parsed.append((index, raw, entry))
    # 5
    try:
        proof = [base64.b64decode(p, validate=True) for p in report["proof"]]
    except (binascii.Error, ValueError):
        raise ReportError("proof", "a hash is not base64") from None
    try:
        verify_multiproof(leaves, checkpoint.size, proof, checkpoint.root)
    except ProofError as exc:
        raise ReportError("proof", f"{exc} (an entry, an index or the proof was altered)") from None
    # 6
    links: list[AccountLink] = []
    for index, _, entry in parsed:
        try:
            link = account_link(entry, index)
        except EntryError as exc:
            raise ReportError(f"entry {index}", exc.reason) from None
        if link is None:
            raise ReportError(f"entry {index}", "is not in an account chain")
        if link.ref != binding.account_ref:
            raise ReportError(f"entry {index}", "belongs to another account than the one bound")
        links.append(link)
    # 7
    first_index, _, first = parsed[0]
    if links[0].seq == 1:
        if links[0].prev != GENESIS_PREV:
            raise ReportError("completeness", f"entry {first_index} has account_seq 1 but links to an earlier entry")
    elif since is None or _time(first["time"], f"entry {first_index}") >= since:
        raise ReportError("completeness", f"the report starts at account_seq {links[0].seq}, not 1, and its "
                                          f"first entry ({first_index}) is not before the window: "
                                          f"{links[0].seq - 1} earlier access(es) may be left out")
    for (index, _, _), link, (prev_index, prev_raw, _), prev_link in zip(parsed[1:], links[1:], parsed, links,
                                                                          strict=False):
        if link.seq != prev_link.seq + 1:
            gap = link.seq - prev_link.seq - 1
            raise ReportError("completeness", f"entry {index} has account_seq {link.seq} after {prev_link.seq}: "
                              + (f"{gap} access(es) left out" if gap > 0 else "the chain is out of order"))
        if link.prev != entry_hash(prev_raw):
            raise ReportError("completeness", f"entry {index} does not link to entry {prev_index}, the account's "
                                              "previous entry in the report (one was replaced)")
    # 8
    last_index, _, last = parsed[-1]
    if last["action"] != REQUEST_ACTION or last["request_id"] != report["request_id"]:
        raise ReportError("completeness", f"the last entry ({last_index}) is not this report's own request, so "
                                          "accesses after it may be left out")
    outcome = last["outcome"] if isinstance(last["outcome"], dict) else {}
    if nonce is not None and outcome.get("reason") != f"nonce={nonce}":
        raise ReportError("completeness", f"the request entry ({last_index}) does not carry the nonce given")
    # 9
    accesses = []
    for index, _, entry in parsed[0 if links[0].seq == 1 else 1:]:
        actor = entry["actor"] if isinstance(entry["actor"], dict) else {}
        who = binding.reviewers.get(str(actor.get("id")))
        if who is None:
            raise ReportError("binding", f"names no pseudonym for the actor of entry {index}")
        when = _time(entry["time"], f"entry {index}")
        if (since is not None and when < since) or (until is not None and when > until):
            continue
        target, outcome = entry["target"], entry["outcome"] if isinstance(entry["outcome"], dict) else {}
        clip_id = str(target.get("clip_id", ""))
        accesses.append(Access(index=index, time=entry["time"], action=str(entry["action"]),
                               result=str(outcome.get("result", "")), reason=str(outcome.get("reason", "")),
                               clip_id=clip_id, captured_at=binding.clips.get(clip_id, ""), who=who,
                               role=str(actor.get("role", ""))))
    return VerifiedReport(account_ref=binding.account_ref, checkpoint=checkpoint, cosignatures=tuple(cosigs),
                          accesses=tuple(accesses), complete_through=last["time"], chain_start=links[0].seq == 1,
                          since=report["since"], until=report["until"])
