"""Our signed-note and checkpoint parsers against answers produced by Go's golang.org/x/mod/sumdb
(tests/vectors/golang-sumdb-note-interop/SOURCE.txt): accept what Go accepts, reject what it rejects."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from auditlog.checkpoint import Checkpoint
from auditlog.errors import CheckpointError, NoteError
from auditlog.note import NoteSigner, NoteVerifier, open_note, sign_note, verify_note

VECTORS = json.loads((Path(__file__).parent / "vectors" / "golang-sumdb-note-interop" / "vectors.json").read_text())
ROOT_LINE = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize("case", VECTORS["tree_size_lines"], ids=lambda c: repr(c["size_line"]))
def test_tree_size_line_is_read_as_go_reads_it(case: dict[str, Any]) -> None:
    """Only ASCII decimal without leading zeros: before, '²' raised ValueError (not CheckpointError) and
    '١٢' (Arabic-Indic digits) was read as 12."""
    body = f"example.com/log\n{case['size_line']}\n{ROOT_LINE}\n"
    if case["go_ok"]:
        assert Checkpoint.parse(body).size == int(case["size_line"])
    else:
        with pytest.raises(CheckpointError, match="line 2"):
            Checkpoint.parse(body)


def _id(case: dict[str, Any]) -> str:
    return str(case["name"]).encode("ascii", "backslashreplace").decode()


# C2SP signed-note: "If the key name and ID match a known key, verifiers MUST verify the signature. If a
# signature from a known key fails to verify, clients SHOULD reject the whole note." Go drops a repeated
# signature by a key it already verified without looking at it; we verify it, and reject the note.
STRICTER_THAN_GO = {"repeated signature by a known key, the repeat invalid"}


@pytest.mark.parametrize("case", VECTORS["notes"], ids=_id)
def test_go_signed_note_is_judged_as_go_judges_it(case: dict[str, Any]) -> None:
    """Before, a note Go and the spec accept was refused when its text held an empty line or a character
    that is not str.isprintable() (U+00A0, U+200B, U+2028, DEL, …), or when any signature, even one by a
    key we do not know and must ignore, named a key so (a cosigned checkpoint with one such extra
    witness failed `auditlog verify`); and a verifier key with such a name did not parse."""
    known = [NoteVerifier.from_key_string(k) for k in case["known_vkeys"]]
    note = base64.b64decode(case["note_b64"])
    if case["go_ok"] and case["name"] not in STRICTER_THAN_GO:
        text, verified = verify_note(note, known)
        assert text == case["go_text"]
        assert [f"{v.name}+{v.key_hash:08x}" for v, _ in verified] == case["go_verified"]
        assert open_note(note, known) == case["go_text"]
    else:
        with pytest.raises(NoteError):
            open_note(note, known)


@pytest.mark.parametrize("case", VECTORS["verifier_keys"], ids=_id)
def test_verifier_key_is_parsed_as_go_parses_it(case: dict[str, Any]) -> None:
    """Before, '0x…' and ' …' key hashes were taken (int(text, 16) is lenient) and names Go takes refused."""
    if case["go_ok"]:
        assert NoteVerifier.from_key_string(case["vkey"]).key_string().lower() == case["vkey"].lower()
    else:
        with pytest.raises(NoteError):
            NoteVerifier.from_key_string(case["vkey"])


@pytest.mark.parametrize("case", VECTORS["signer_keys"], ids=_id)
def test_signer_key_is_parsed_as_go_parses_it(case: dict[str, Any]) -> None:
    """Before, a signer key whose hash is in upper case (Go takes it) was refused."""
    signer = NoteSigner.from_key_string(case["skey"])
    assert f"{signer.name}+{signer.verifier.key_hash:08x}" == case["go_vkey"]


def test_our_signature_with_a_go_key_is_the_line_go_wrote() -> None:
    """Ed25519 is deterministic: signing Go's text with Go's key gives Go's own signature line."""
    signer = NoteSigner.from_key_string(VECTORS["go_signer_key_for_python"])
    assert signer.verifier.key_string() == VECTORS["go_verifier_key_b"]
    case = next(c for c in VECTORS["notes"] if c["name"] == "three signatures, all known")
    note = base64.b64decode(case["note_b64"]).decode()
    ours = sign_note(case["go_text"], signer)
    assert ours.split("\n\n")[-1] in note.split("\n\n")[-1].splitlines(keepends=True)


@pytest.mark.parametrize("text", ["line one\n\nline three\n", "\nsecond\n", "t\u00a0t\u200bt\x7f\n"],
                         ids=["empty-line-inside", "empty-first-line", "non-printable"])
def test_texts_go_accepts_sign_and_open_round_trip(text: str) -> None:
    signer = NoteSigner.generate("example.com/x\u200by")
    assert open_note(sign_note(text, signer), [signer.verifier]) == text


@pytest.mark.parametrize("text", ["a\tb\n", "a\rb\n", "no newline"], ids=["tab", "cr", "no-newline"])
def test_texts_no_note_may_hold_are_not_signed(text: str) -> None:
    with pytest.raises(NoteError):
        sign_note(text, NoteSigner.generate("example.com/x"))


def test_a_repeated_valid_signature_lists_its_key_once() -> None:
    case = next(c for c in VECTORS["notes"] if c["name"] == "repeated identical signature")
    known = [NoteVerifier.from_key_string(k) for k in case["known_vkeys"]]
    assert len(verify_note(base64.b64decode(case["note_b64"]), known)[1]) == 1
