"""Per-account access chains: what makes an access report provably complete.

Every entry recording a human access to an account's clips (`ACCESS_ACTIONS`), and every request
for the account's access report, carries two more fields in its `target`: `account_seq`, 1 for
the account's first such entry and one more for each after it, and `account_prev`, the hash
(`auditlog.entry.entry_hash`) of the account's previous such entry, or 64 zeros for the first.
The service computes both in the unit of work that appends the entry, on the log's one writer.

`AccountChains` is the auditor's half of the argument: over a whole log it checks that every
account's chain is linear in log order (no two entries with one account_seq, no gap, every link
the hash of the entry before it) and that, once chaining began, no access entry is left out of
its account's chain. Where that holds for the log up to a checkpoint, an account's entry with
account_seq n is preceded in the log by exactly n - 1 entries of that account, each in the chain:
an access report that runs from account_seq 1 (or from an entry before its window) to the
report's own request entry then holds every access up to that request. docs/access-report.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from auditlog.entry import GENESIS_PREV, entry_hash, parse_entry
from auditlog.errors import EntryError

__all__ = ["ACCESS_ACTIONS", "REQUEST_ACTION", "AccountChains", "AccountLink", "account_link"]

REQUEST_ACTION = "account.access_report"
ACCESS_ACTIONS = frozenset({
    "grant.issue",  # a reviewer was granted one listen to a clip
    "clip.fetch",  # a reviewer heard the clip
    "clip.flag",  # a reviewer escalated it to the safety team
    "escalation.read",  # the safety team read an escalation about it
    "escalation.resolve",  # the safety team resolved it
    "clip.identity_read",  # staff read the account id and device serial behind it
    REQUEST_ACTION,  # the account's report was asked for (itself audited, and the report's head)
})
_PREFIXES = tuple(b'{"action":"' + a.encode() + b'",' for a in ACCESS_ACTIONS)
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class AccountLink:
    ref: str
    seq: int
    prev: str


def account_link(entry: Mapping[str, Any], index: int) -> AccountLink | None:
    """The entry's place in its account's chain; None for an entry outside every chain."""
    target = entry["target"]
    if not isinstance(target, dict):
        raise EntryError(index, "malformed: target is not an object")
    if "account_seq" not in target and "account_prev" not in target:
        return None
    seq, prev, ref = target.get("account_seq"), target.get("account_prev"), target.get("account_ref")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise EntryError(index, "malformed: target.account_seq is not a positive integer")
    if not isinstance(prev, str) or len(prev) != 64 or not set(prev) <= _HEX:
        raise EntryError(index, "malformed: target.account_prev is not a 64-character lowercase hex hash")
    if not isinstance(ref, str) or not ref:
        raise EntryError(index, "malformed: a chained entry has no target.account_ref")
    return AccountLink(ref=ref, seq=seq, prev=prev)


class AccountChains:
    """Feed every entry of a log in order to `check`; it raises `EntryError` at the first entry
    that breaks an account's chain. Memory: one (seq, hash) per account seen."""

    def __init__(self, heads: Mapping[str, tuple[int, str]] | None = None, first_chained: int | None = None) -> None:
        """Empty for a log read from entry 0; or resumed from what `heads` and `first_chained` said
        after an earlier pass over the log's first entries (an incremental verification's state)."""
        self._heads: dict[str, tuple[int, str]] = dict(heads or {})
        self.first_chained = first_chained  # the index where chaining began

    @property
    def heads(self) -> dict[str, tuple[int, str]]:
        """account_ref -> (account_seq, hex hash) of each account's newest entry seen."""
        return dict(self._heads)

    def check(self, data: bytes, index: int) -> None:
        if b'"account_seq":' not in data and (self.first_chained is None or not data.startswith(_PREFIXES)):
            return  # neither chained nor an access that should have been
        entry = parse_entry(data, index)
        link = account_link(entry, index)
        if link is None:
            if entry["action"] in ACCESS_ACTIONS and isinstance(entry["target"], dict) \
                    and entry["target"].get("account_ref"):
                raise EntryError(index, f"account chain: a {entry['action']} entry is outside its account's chain, "
                                        f"though chaining began at entry {self.first_chained}")
            return
        if self.first_chained is None:
            self.first_chained = index
        seq, prev = self._heads.get(link.ref, (0, GENESIS_PREV))
        if link.seq != seq + 1:
            raise EntryError(index, f"account chain: account_seq is {link.seq}, expected {seq + 1} "
                                    "(the account's chain forks or skips here)")
        if link.prev != prev:
            raise EntryError(index, "account chain: account_prev is not the hash of the account's previous entry")
        self._heads[link.ref] = (link.seq, entry_hash(data))
