"""A unit of work as the domain sees it: who acts, what it records, and the transaction it runs in.

`clipstore.audit.log.AuditLog.run(unit)` opens the transaction, hands the unit a
`Tx` and commits its state change together with its audit entries. The domain
only records (`tx.audit`), refuses (`tx.deny`, `tx.refuse`) and passes `tx` on to
the ports that bind the store to it; it never sees the connection's type, so this
module and the domain load no database driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import NoReturn, Protocol, TypeVar

from auditlog.entry import MAX_ENTRY_BYTES
from clipstore.errors import ClipstoreError

# What a record's own strings may take of its entry: the verifier refuses an entry over MAX_ENTRY_BYTES,
# so the service never writes one. The rest (keys, seq, time, the two 64-digit hashes) takes < 400 bytes.
RECORD_MAX_BYTES = MAX_ENTRY_BYTES - 1024
DENIED = "denied"  # a refusal's outcome (`Tx.deny`): what the audit writer may count rather than append


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One security-relevant action. Never account ids, names, serials, keys or codes."""

    actor_id: str
    actor_role: str
    action: str
    outcome: str = "ok"
    reason: str = ""
    clip_id: str = ""
    account_ref: str = ""
    principal_id: str = ""  # the principal acted upon (enrolment, disabling)
    request_id: str = ""
    # what a clip.fetch did to the audio (docs/voice-disguise.md): the disguise policy applied and the
    # forensic watermark's id (also on forensics.identify: the mark found); None on every other action,
    # whose entries then carry neither key
    disguise: str | None = None
    watermark: str | None = None

    def __post_init__(self) -> None:
        fields = (self.actor_id, self.actor_role, self.action, self.outcome, str(self.reason), self.clip_id,
                  self.account_ref, self.principal_id, self.request_id, self.disguise or "", self.watermark or "")
        # JSON writes a character as at most 6 bytes (\u001f), so the exact count is needed only past a sixth
        if sum(map(len, fields)) * 6 > RECORD_MAX_BYTES and (
                sum(len(encode_basestring(field).encode()) - 2 for field in fields) > RECORD_MAX_BYTES):  # no quotes
            raise ValueError(f"an audit record may take at most {RECORD_MAX_BYTES} bytes of its entry "
                             f"(auditlog refuses an entry over {MAX_ENTRY_BYTES})")


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who acts: a principal (id and role) within one request."""

    id: str
    role: str
    request_id: str = ""

    def record(self, action: str, **fields: str) -> AuditRecord:
        return AuditRecord(actor_id=self.id, actor_role=self.role, action=action, request_id=self.request_id,
                           **fields)


SYSTEM = Actor(id="system", role="retention")
ANONYMOUS_ID = "anonymous"  # the actor of a call no credential names (a redemption of an enrolment code)
OPERATOR = Actor(id="cli", role="operator")
STARTUP = Actor(id="system", role="startup")


T = TypeVar("T")


class Tx:
    """What a unit of work sees: the batch's connection, the batch's clock reading, and its audit trail."""

    def __init__(self, conn: object, now: float) -> None:
        self.conn = conn  # opaque here: the store's transaction, which only the store side opens (store.db.connection)
        self.now = now
        self.records: list[AuditRecord] = []
        self._denials: list[ClipstoreError] = []

    def audit(self, record: AuditRecord) -> None:
        """Record an action; it commits together with the unit's state change."""
        self.records.append(record)

    def deny(self, actor: Actor, action: str, error: ClipstoreError, **target: str) -> ClipstoreError:
        """Record a refusal and return the error to raise; what the unit wrote so far still commits. Past its
        principal's budget for the interval, the writer counts the refusal into the principal's denial
        summary instead of appending it (`AuditLog.admit_denial`, clipstore.denials)."""
        self.audit(actor.record(action, outcome=DENIED, reason=error.reason, **target))
        self._denials.append(error)
        return error

    def refuse(self, error: ClipstoreError) -> ClipstoreError:
        """An expected outcome that is not worth an entry (an empty queue): keep the unit's writes."""
        self._denials.append(error)
        return error

    def is_denial(self, exc: BaseException) -> bool:
        return any(exc is d for d in self._denials)


Unit = Callable[[Tx], T]


class Ledger(Protocol):
    """Runs a unit of work in one transaction with its audit entries (`clipstore.audit.AuditLog`)."""

    def run(self, unit: Callable[[Tx], T]) -> T: ...


def deny_alone(ledger: Ledger, actor: Actor, action: str, error: ClipstoreError, **target: str) -> NoReturn:
    """Record a refusal found before any unit ran (one entry, in a unit of its own, budgeted as `Tx.deny`),
    then raise it."""
    def unit(tx: Tx) -> None:
        raise tx.deny(actor, action, error, **target)
    ledger.run(unit)
    raise AssertionError("unreachable: the unit always raises")


class AuditTrail(Ledger, Protocol):
    """A `Ledger` that also appends one entry on its own (an action with no state change of ours)."""

    def append(self, record: AuditRecord) -> int: ...
