"""Signed notes and checkpoints, checked against notes signed by Go's sumdb/note."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from auditlog import CheckpointError, NoteError
from auditlog.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from auditlog.note import NoteSigner, NoteVerifier, open_note, sign_note

V: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "golang-sumdb-note" / "vectors.json").read_text())
PETER = NoteVerifier.from_key_string(V["peter_vkey"])
ENOCH = NoteVerifier.from_key_string(V["enoch_vkey"])
TEXT, PETER_SIG, ENOCH_SIG = V["text"], V["peter_sig"], V["enoch_sig"]


def test_signing_with_go_test_key_reproduces_go_output_byte_for_byte() -> None:
    signer = NoteSigner.from_key_string(V["peter_skey"])
    assert sign_note(TEXT, signer) == TEXT + "\n" + PETER_SIG
    assert signer.verifier.key_string() == V["peter_vkey"]
    assert signer.key_string() == V["peter_skey"]


def test_go_signed_note_opens_with_one_or_both_known_keys() -> None:
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    assert open_note(note, [PETER]) == TEXT
    assert open_note(note.encode(), [PETER, ENOCH]) == TEXT


def test_note_without_a_known_key_is_rejected() -> None:
    with pytest.raises(NoteError, match="no verifiable signatures"):
        open_note(TEXT + "\n" + PETER_SIG, [ENOCH])


def test_corrupted_signature_is_rejected_naming_the_key() -> None:
    bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteError, match="invalid signature for key PeterNeumann\\+c74f20a3"):
        open_note(TEXT + "\n" + bad, [PETER])


def test_duplicate_verifiers_are_ambiguous() -> None:
    with pytest.raises(NoteError, match="ambiguous key"):
        open_note(TEXT + "\n" + ENOCH_SIG, [ENOCH, PETER, ENOCH])


@pytest.mark.parametrize("note", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + PETER_SIG[:-1],
    "\x01" + TEXT + "\n" + PETER_SIG,
    TEXT + "\n" + PETER_SIG.replace("PeterNeumann", "Bad Name")[:-1],
    TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    TEXT + "\n" + PETER_SIG * 101,
], ids=["no-sigs", "blank-only", "no-final-newline", "control-char", "bad-name", "trailing-line", "101-sigs"])
def test_malformed_notes_from_go_suite_are_rejected(note: str) -> None:
    with pytest.raises(NoteError):
        open_note(note, [PETER])


def test_invalid_utf8_is_rejected() -> None:
    with pytest.raises(NoteError, match="UTF-8"):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), [PETER])


@pytest.mark.parametrize("vkey", V["bad_vkeys"] + [V["peter_vkey"][:-1], V["peter_vkey"] + "A",
                                                    V["peter_vkey"].replace("c74f20a3", "c74f20a4"),
                                                    "PeterNeumann+c74f20a3", ""])
def test_mangled_verifier_keys_are_rejected(vkey: str) -> None:
    with pytest.raises(NoteError):
        NoteVerifier.from_key_string(vkey)


def test_c2sp_example_checkpoint_body_parses() -> None:
    body = "example.com/origin\n923748\nnND/nri/U0xuHUrYSy0HtMeal2vzD9V4k/BO79C+QeI=\n"
    cp = Checkpoint.parse(body)
    assert (cp.origin, cp.size) == ("example.com/origin", 923748)
    assert cp.to_text() == body


@pytest.mark.parametrize(("body", "needle"), [
    ("origin\n12\n", "needs origin, size and root"),
    ("origin\n012\nnND/nri/U0xuHUrYSy0HtMeal2vzD9V4k/BO79C+QeI=\n", "canonical decimal"),
    ("origin\n-1\nnND/nri/U0xuHUrYSy0HtMeal2vzD9V4k/BO79C+QeI=\n", "canonical decimal"),
    ("origin\n1\nnotbase64!\n", "not base64"),
    ("origin\n1\n" + base64.b64encode(b"x" * 31).decode() + "\n", "31 bytes"),
    ("\n1\nnND/nri/U0xuHUrYSy0HtMeal2vzD9V4k/BO79C+QeI=\n", "origin"),
])
def test_malformed_checkpoints_name_the_line(body: str, needle: str) -> None:
    with pytest.raises(CheckpointError, match=needle):
        Checkpoint.parse(body)


def test_checkpoint_round_trip_and_origin_must_match_key() -> None:
    signer = NoteSigner.generate("clipstore-audit/test")
    cp = Checkpoint(origin=signer.name, size=3, root=b"\x07" * 32)
    assert open_checkpoint(sign_checkpoint(cp, signer), signer.verifier) == cp
    other = NoteSigner.generate("someone-else")
    with pytest.raises(NoteError):
        open_checkpoint(sign_checkpoint(cp, signer), other.verifier)


def test_signer_repr_hides_the_key() -> None:
    signer = NoteSigner.from_key_string(V["peter_skey"])
    assert "AYEK" not in repr(signer) and "PRIVATE" not in repr(signer)
