"""Refusals are counted, not appended one by one.

An entry per refused call let one anonymous client write ~320 permanent entries a second, and a stolen
reviewer key grow the log by one entry per RequestGrant with garbage. Now:

- a caller no credential identifies (missing, malformed or unknown key; a certificate naming no
  principal) adds to a count per peer address; every `interval_s` (and at shutdown) each peer's
  count becomes ONE `auth.deny_summary` entry;
- a refusal that names a principal shares one budget per principal and interval, whoever refused:
  the interceptor (wrong role, too many calls, a disabled, expired or rotated-out credential:
  `record`) or the domain (`grant.deny`, `session.deny`, `enrolment.deny`, a refused `clip.ingest`
  …: the audit writer asks `admit` for each refusal a refused unit recorded). The first
  `per_principal` of each interval are appended as ever (`auth.deny`, or the domain's own entry),
  so the ordinary case keeps its request id; past that each is counted into the principal's
  summary entry instead. A domain refusal's unit still commits the rest of what it wrote (a failure
  count, a lockout); the caller's answer is the same whether its entry was appended or counted.
  The domain's refusals of anonymous callers (a wrong enrolment code) share one budget of that size,
  all such callers together, past which each is counted under `peer=other` (the writer knows no
  peer). Operator and system actors (`cli`, `system`) are never budgeted.

A summary is one `auth.deny_summary` entry (actor: the principal, or `anonymous`; outcome `denied`)
whose `reason` reads `count=N [peer=P] TOKEN=n … [other=n]`: `count` the sum of the rest, tokens in
sorted order. An interceptor's refusal is counted under its reason (`WRONG_ROLE=3`), a domain
refusal under its action and reason (`grant.deny/GRANT_INVALID=37 session.deny/REVIEWER_LOCKED=12`).
Past `MAX_TOKENS_PER_SUMMARY` distinct tokens in one entry, and for a token that is not
`[action/]REASON_CODE`, refusals are counted as `other=n`, last: an entry stays far inside
`RECORD_MAX_BYTES`. An anonymous summary names the peer by its pseudonym,
`peer=pp_3b1f0c9a7e5d2468ac01` (`clipstore.peers`: a keyed HMAC of the address without its port,
stable per host and deployment), never by its address, which is personal data in a log that is
permanent and published; `clipstore audit peer-pseudonym ADDRESS` prints the pseudonym of a suspected
address to search for. Past `MAX_PEERS_PER_INTERVAL` peers, the rest share `peer=other`. Counts live
in memory until flushed: a crash loses at most one interval of them (a counted domain refusal's state
change, committed at once, survives it). A batch of units that fails to commit after the writer asked
`admit` leaves its refusals counted (their callers were refused, with AUDIT_UNAVAILABLE).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from clipstore.audit import AuditLog
from clipstore.auth import PRINCIPAL_ID_PREFIX
from clipstore.errors import ClipstoreError
from clipstore.logs import get_logger
from clipstore.rows import Principal
from clipstore.unit import ANONYMOUS_ID, DENIED, RECORD_MAX_BYTES, AuditRecord

MAX_PEERS_PER_INTERVAL = 1024  # bounds memory and entries per interval; more peers share one entry
OTHER_PEERS = "other"
MAX_TOKENS_PER_SUMMARY = 48  # distinct `TOKEN=n` in one summary entry; the rest count as `other=n`
OTHER_REFUSALS = "other"
# A token: a reason code, after an action for a domain refusal (`enrolment.deny/ENROLMENT_CODE_WRONG_REVIEWER`);
# anything else counts as `other`, so a summary holds codes only, each at most 97 characters
_TOKEN = re.compile(r"(?:[a-z][a-z0-9_.]{0,39}/)?[A-Z][A-Z0-9_]{0,55}")
_TOKEN_MAX_CHARS = 40 + 1 + 56
# The longest summary `reason`: a count, a peer, each token (and `other`) with a 20-digit count, a space
_SUMMARY_MAX_CHARS = 32 + 32 + (MAX_TOKENS_PER_SUMMARY + 1) * (_TOKEN_MAX_CHARS + 22)
assert _SUMMARY_MAX_CHARS < RECORD_MAX_BYTES // 2, "a denial summary must fit its audit entry with room to spare"
log = get_logger("clipstore.denials")


@dataclass(frozen=True)
class _Who:
    """Whose refusals one summary entry counts."""

    actor_id: str
    actor_role: str
    principal_id: str = ""  # the principal whose credential was presented, when it names one
    peer: str = ""  # for callers nothing identifies: the peer's pseudonym, never its address


class DenialLedger:
    """`pseudonym` maps gRPC's peer string to what a summary names (`PeerPseudonyms.of`); the ledger
    holds no address, only pseudonyms."""

    def __init__(self, audit: AuditLog, *, pseudonym: Callable[[str], str], interval_s: float, per_principal: int,
                 on_denial: Callable[[bool, str], None] = lambda identified, reason: None) -> None:
        self._audit = audit
        self._pseudonym = pseudonym
        self._interval_s = interval_s
        self._per_principal = per_principal
        self._on_denial = on_denial
        self._lock = threading.Lock()
        self._counts: dict[_Who, Counter[str]] = {}
        self._appended: Counter[str] = Counter()  # denials appended at once this interval, by principal
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="denial-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def record(self, *, peer: str, principal: Principal | None, error: ClipstoreError, request_id: str) -> None:
        """Count one refusal of the interceptor; append it at once only if it names a principal still
        under its quota."""
        reason = str(error.reason)
        # A disabled, expired or rotated-out credential authenticates no one, but names its principal.
        named = getattr(error, "principal_id", "") or (principal.id if principal else "")
        who = _Who(principal.id if principal else ANONYMOUS_ID, principal.role if principal else "",
                   getattr(error, "principal_id", ""))
        self._on_denial(bool(named), reason)
        pseudonym = "" if named else self._pseudonym(peer)  # outside the lock: an HMAC per anonymous refusal
        with self._lock:
            immediate = bool(named) and self._within_budget(named)
            if not immediate:
                if not named:
                    who = _Who(ANONYMOUS_ID, "", peer=self._peer_slot(pseudonym))
                self._count(who, reason)
        if immediate:
            self._append(AuditRecord(actor_id=who.actor_id, actor_role=who.actor_role, action="auth.deny",
                                     outcome=DENIED, reason=reason, request_id=request_id,
                                     principal_id=who.principal_id))

    def admit(self, record: AuditRecord) -> bool:
        """Whether the audit writer appends this refusal a unit recorded (`AuditLog.admit_denial`): yes
        while its principal is under the budget it shares with `record`, else it is counted into the
        principal's summary (False). A refusal by no principal that the service made for an anonymous
        caller (a wrong enrolment code) shares one budget with every other such refusal, past which it is
        counted under `peer=other`: the writer knows no peer. Operator and system refusals are always
        appended. Runs on the writer thread while every other unit waits: one lock, O(1)."""
        if record.outcome != DENIED:
            return True
        if record.actor_id.startswith(PRINCIPAL_ID_PREFIX):
            budget, who = record.actor_id, _Who(record.actor_id, record.actor_role)
        elif record.actor_id == ANONYMOUS_ID:
            budget, who = ANONYMOUS_ID, _Who(ANONYMOUS_ID, "", peer=OTHER_PEERS)
        else:
            return True
        with self._lock:
            if self._within_budget(budget):
                return True
            self._count(who, f"{record.action}/{record.reason}")
        return False

    def _within_budget(self, budget: str) -> bool:
        """Take one of `budget`'s appends this interval if any is left (after `close` every refusal is
        appended: no flush would come for its count). Under `_lock`."""
        if self._closed or self._appended[budget] < self._per_principal:
            self._appended[budget] += 1
            return True
        return False

    def _count(self, who: _Who, token: str) -> None:
        """Count one refusal into `who`'s summary (under `_lock`)."""
        tokens = self._counts.get(who)
        if tokens is None:
            tokens = self._counts[who] = Counter()
        if token not in tokens and (len(tokens) >= MAX_TOKENS_PER_SUMMARY or not _TOKEN.fullmatch(token)):
            token = OTHER_REFUSALS
        tokens[token] += 1

    def _peer_slot(self, peer: str) -> str:
        if len(self._counts) >= MAX_PEERS_PER_INTERVAL and _Who(ANONYMOUS_ID, "", peer=peer) not in self._counts:
            return OTHER_PEERS
        return peer

    def flush(self) -> int:
        """Append one summary entry per peer and per principal counted since the last flush."""
        with self._lock:
            counts, self._counts = self._counts, {}
            self._appended.clear()
        for who, tokens in counts.items():
            other = tokens.pop(OTHER_REFUSALS, 0)
            parts = [f"count={sum(tokens.values()) + other}"]
            if who.peer:
                parts.append(f"peer={who.peer}")
            parts += [f"{token}={n}" for token, n in sorted(tokens.items())]
            if other:
                parts.append(f"{OTHER_REFUSALS}={other}")
            self._append(AuditRecord(actor_id=who.actor_id, actor_role=who.actor_role,
                                     action="auth.deny_summary", outcome=DENIED, reason=" ".join(parts),
                                     principal_id=who.principal_id))
        return len(counts)

    def close(self) -> None:
        """Stop the timer and flush what was counted (call before the audit log closes). A refusal after
        this is appended, as no flush would come for its count."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            self._closed = True
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def _append(self, record: AuditRecord) -> None:
        try:
            self._audit.append(record)
        except Exception as exc:  # the call is refused either way; say that the record is missing
            log.error("audit.denial_not_recorded", action=record.action, exc_type=type(exc).__name__)
