"""The writer's entries are exactly what the verifier calls canonical."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auditlog.entry import MAX_ENTRY_BYTES, make_entry, parse_entry
from clipstore.audit.log import entry_bytes
from clipstore.unit import RECORD_MAX_BYTES, AuditRecord

# Any text JSON can carry: quotes, backslashes, control characters, non-ASCII; no lone surrogates,
# which no str from our code can hold and UTF-8 cannot encode.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(action=TEXT, actor_id=TEXT, role=TEXT, outcome=TEXT, reason=TEXT, clip_id=TEXT, account_ref=TEXT,
       principal_id=TEXT, request_id=TEXT, prev=TEXT, time=TEXT, seq=st.integers(0, 2**63 - 1),
       disguise=st.none() | TEXT, watermark=st.none() | TEXT)
def test_writer_entries_are_byte_identical_to_make_entry(action: str, actor_id: str, role: str, outcome: str,
                                                         reason: str, clip_id: str, account_ref: str,
                                                         principal_id: str, request_id: str, prev: str, time: str,
                                                         seq: int, disguise: str | None,
                                                         watermark: str | None) -> None:
    record = AuditRecord(actor_id=actor_id, actor_role=role, action=action, outcome=outcome, reason=reason,
                         clip_id=clip_id, account_ref=account_ref, principal_id=principal_id, request_id=request_id,
                         disguise=disguise, watermark=watermark)
    # a clip.fetch entry says what was done to the audio; other entries carry neither key
    audio = {k: v for k, v in (("disguise", disguise), ("watermark", watermark)) if v is not None}
    written = entry_bytes(record, seq=seq, prev=prev, time=time)
    assert written == make_entry(seq=seq, prev=prev, time=time, actor={"id": actor_id, "role": role},
                                 action=action, target={"clip_id": clip_id, "account_ref": account_ref,
                                                        "principal_id": principal_id},
                                 outcome={"result": outcome, "reason": reason, **audio}, request_id=request_id)
    if len(prev) == 64:
        assert parse_entry(written, 0)["seq"] == seq


def _largest_entry(record: AuditRecord) -> bytes:
    """The entry `record` would make at its longest: the largest seq, a time of 9999 and an access chain."""
    return entry_bytes(record, seq=2**63 - 1, prev="f" * 64, time="9999-12-31T23:59:59.999999Z",
                       account=(2**63 - 1, "f" * 64))


@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600", "\x1f"])  # 1, 2, 4 and 6 bytes as the entry writes it
def test_a_record_the_verifier_would_refuse_cannot_be_made(char: str) -> None:
    """auditlog refuses an entry over MAX_ENTRY_BYTES, so no record that could make one exists: the largest
    allowed is parsed by the verifier, one byte more raises where the record is made, never in the writer."""
    width = len(json.dumps(char, ensure_ascii=False).encode()) - 2
    base = AuditRecord(actor_id="p_0123456789abcdef", actor_role="reviewer", action="grant.deny", reason="")
    used = sum(len(json.dumps(getattr(base, f), ensure_ascii=False).encode()) - 2
               for f in ("actor_id", "actor_role", "action", "outcome", "reason", "clip_id", "account_ref",
                         "principal_id", "request_id"))
    fits = (RECORD_MAX_BYTES - used) // width
    record = dataclasses.replace(base, reason=char * fits)
    entry = _largest_entry(record)
    assert len(entry) <= MAX_ENTRY_BYTES
    assert parse_entry(entry, 0)["outcome"]["reason"] == char * fits
    with pytest.raises(ValueError, match="at most"):
        dataclasses.replace(base, reason=char * (fits + 1))
