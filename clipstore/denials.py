"""Refused credentials and roles are counted, not appended one by one.

An entry per refused call let one anonymous client write ~320 permanent entries a second. Now:

- a caller no credential identifies (missing, malformed or unknown key; a certificate naming no
  principal) adds to a count per peer address; every `interval_s` (and at shutdown) each peer's
  count becomes ONE `auth.deny_summary` entry;
- a refusal that names a principal (wrong role, too many calls, a disabled, expired or rotated-out
  credential) is appended as `auth.deny` for the first `per_principal` of each interval, so the
  ordinary case keeps its request id; past that it is counted into the principal's summary entry.

A summary's `reason` reads `count=N REASON=n …`; an anonymous summary names the peer by its
pseudonym, `peer=pp_3b1f0c9a7e5d2468ac01` (`clipstore.peers`: a keyed HMAC of the address without its
port, stable per host and deployment), never by its address, which is personal data in a log that is
permanent and published; `clipstore audit peer-pseudonym ADDRESS` prints the pseudonym of a suspected
address to search for. Past `MAX_PEERS_PER_INTERVAL` peers, the rest share `peer=other`. Counts live
in memory until flushed: a crash loses at most one interval of them.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from clipstore.audit import AuditLog
from clipstore.errors import ClipstoreError
from clipstore.logs import get_logger
from clipstore.rows import Principal
from clipstore.unit import AuditRecord

MAX_PEERS_PER_INTERVAL = 1024  # bounds memory and entries per interval; more peers share one entry
OTHER_PEERS = "other"
ANONYMOUS = "anonymous"
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
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="denial-ledger", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def record(self, *, peer: str, principal: Principal | None, error: ClipstoreError, request_id: str) -> None:
        """Count one refusal; append it at once only if it names a principal still under its quota."""
        reason = str(error.reason)
        # A disabled, expired or rotated-out credential authenticates no one, but names its principal.
        named = getattr(error, "principal_id", "") or (principal.id if principal else "")
        who = _Who(principal.id if principal else ANONYMOUS, principal.role if principal else "",
                   getattr(error, "principal_id", ""))
        self._on_denial(bool(named), reason)
        pseudonym = "" if named else self._pseudonym(peer)  # outside the lock: an HMAC per anonymous refusal
        with self._lock:
            immediate = bool(named) and self._appended[named] < self._per_principal
            if immediate:
                self._appended[named] += 1
            else:
                if not named:
                    who = _Who(ANONYMOUS, "", peer=self._peer_slot(pseudonym))
                self._counts.setdefault(who, Counter())[reason] += 1
        if immediate:
            self._append(AuditRecord(actor_id=who.actor_id, actor_role=who.actor_role, action="auth.deny",
                                     outcome="denied", reason=reason, request_id=request_id,
                                     principal_id=who.principal_id))

    def _peer_slot(self, peer: str) -> str:
        if len(self._counts) >= MAX_PEERS_PER_INTERVAL and _Who(ANONYMOUS, "", peer=peer) not in self._counts:
            return OTHER_PEERS
        return peer

    def flush(self) -> int:
        """Append one summary entry per peer and per principal counted since the last flush."""
        with self._lock:
            counts, self._counts = self._counts, {}
            self._appended.clear()
        for who, reasons in counts.items():
            parts = [f"count={sum(reasons.values())}"]
            if who.peer:
                parts.append(f"peer={who.peer}")
            parts += [f"{reason}={n}" for reason, n in sorted(reasons.items())]
            self._append(AuditRecord(actor_id=who.actor_id, actor_role=who.actor_role,
                                     action="auth.deny_summary", outcome="denied", reason=" ".join(parts),
                                     principal_id=who.principal_id))
        return len(counts)

    def close(self) -> None:
        """Stop the timer and flush what was counted (call before the audit log closes)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.flush()

    def _append(self, record: AuditRecord) -> None:
        try:
            self._audit.append(record)
        except Exception as exc:  # the call is refused either way; say that the record is missing
            log.error("audit.denial_not_recorded", action=record.action, exc_type=type(exc).__name__)
