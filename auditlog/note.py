"""Signed notes (golang.org/x/mod/sumdb/note, C2SP signed-note) with Ed25519.

A note is UTF-8 text ending in a newline (it may hold empty lines, and any
character but the ASCII controls other than newline), a blank line, then
signature lines `— <name> <base64(key hash ‖ signature)>`; the text ends at the
last blank line. A key name is non-empty without Unicode spaces or '+', and
nothing else is asked of it (Go's note package and the spec take U+200B or
U+007F). Key hash = first 4 bytes (big endian) of SHA-256(name ‖ "\\n" ‖ 0x01 ‖
public key). Verifier key string: `name+hexhash+base64(0x01 ‖ public key)`; signer key string:
`PRIVATE+KEY+name+hexhash+base64(0x01 ‖ seed)`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import string
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from auditlog.errors import NoteError

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100  # as the Go implementation: bounds work on hostile notes
MAX_NOTE_BYTES = 1 << 20
_SIG_PREFIX = "\u2014 "  # em dash, space
# Unicode White_Space, as Go's unicode.IsSpace (str.isspace() also takes U+001C-U+001F, which are not)
_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                    + "".join(chr(c) for c in range(0x2000, 0x200B)))
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f]")  # C2SP signed-note: no ASCII control but newline

__all__ = ["NoteSigner", "NoteVerifier", "Verifier", "open_note", "sign_note", "verify_note"]


def _valid_name(name: str) -> bool:
    """C2SP signed-note: non-empty, no Unicode space, no '+' (as Go's isValidName)."""
    return bool(name) and "+" not in name and _SPACES.isdisjoint(name)


def _parse_key_hash(text: str) -> int | None:
    """Exactly 8 hex digits (either case, as Go's strconv.ParseUint(text, 16, 32)); None otherwise.
    int(text, 16) alone also takes '0x', '_', signs and spaces."""
    if len(text) != 8 or not all(c in string.hexdigits for c in text):
        return None
    return int(text, 16)


def _key_hash(name: str, alg_and_key: bytes) -> int:
    digest = hashlib.sha256(name.encode() + b"\n" + alg_and_key).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError("malformed base64") from None


@dataclass(frozen=True)
class NoteVerifier:
    name: str
    key_hash: int
    public_key: Ed25519PublicKey

    @classmethod
    def from_key_string(cls, vkey: str) -> NoteVerifier:
        """Parse `name+hexhash+base64(0x01‖pubkey)`; `NoteError` says what is wrong."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("verifier key must look like name+hexhash+base64key")
        name, hex_hash, b64 = parts
        claimed = _parse_key_hash(hex_hash)
        if not _valid_name(name) or claimed is None:
            raise NoteError("verifier key has a malformed name or key hash (want 8 hexadecimal digits)")
        raw = _b64decode(b64)
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("verifier key is not an Ed25519 key (want 0x01 followed by 32 bytes)")
        if _key_hash(name, raw) != claimed:
            raise NoteError("verifier key hash does not match its name and key")
        return cls(name, claimed, Ed25519PublicKey.from_public_bytes(raw[1:]))

    def key_string(self) -> str:
        raw = bytes([ALG_ED25519]) + self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}+{self.key_hash:08x}+{base64.b64encode(raw).decode()}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """Signs notes with an Ed25519 key; repr never shows the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        if not _valid_name(name):
            raise ValueError(f"note signer name must be non-empty without spaces or '+', got {name!r}")
        self.name = name
        self._key = private_key
        public = private_key.public_key()
        raw = bytes([ALG_ED25519]) + public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.verifier = NoteVerifier(name, _key_hash(name, raw), public)

    def __repr__(self) -> str:
        return f"NoteSigner(name={self.name!r}, key_hash={self.verifier.key_hash:08x})"

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_key_string(cls, skey: str) -> NoteSigner:
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("signer key must look like PRIVATE+KEY+name+hexhash+base64key")
        raw = _b64decode(parts[4])
        if len(raw) != 33 or raw[0] != ALG_ED25519:
            raise NoteError("signer key is not an Ed25519 seed")
        if not _valid_name(parts[2]):
            raise NoteError("signer key has a malformed name")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_hash != _parse_key_hash(parts[3]):
            raise NoteError("signer key hash does not match its name and key")
        return signer

    def key_string(self) -> str:
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        raw = bytes([ALG_ED25519]) + seed
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_hash:08x}+{base64.b64encode(raw).decode()}"

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("malformed note: text must end in a newline")
    if _CONTROL.search(text):
        raise NoteError("malformed note: text contains control characters")


def sign_note(text: str, signer: NoteSigner) -> str:
    """The signed note: text, blank line, one signature line."""
    _check_text(text)
    sig = signer.sign(text.encode())
    blob = struct.pack(">I", signer.verifier.key_hash) + sig
    return f"{text}\n{_SIG_PREFIX}{signer.name} {base64.b64encode(blob).decode()}\n"


class Verifier(Protocol):
    """What `verify_note` needs of a key: note signers and cosigners alike."""

    @property
    def name(self) -> str: ...

    @property
    def key_hash(self) -> int: ...

    def verify(self, message: bytes, signature: bytes) -> bool: ...


def open_note(note: str | bytes, verifiers: Sequence[Verifier]) -> str:
    """Return the note's text if a known key signed it; raise `NoteError` otherwise."""
    text, verified = verify_note(note, verifiers)
    if not verified:
        known = ", ".join(f"{v.name}+{v.key_hash:08x}" for v in verifiers) or "none"
        raise NoteError(f"note has no verifiable signatures (known keys: {known})")
    return text


def verify_note(note: str | bytes, verifiers: Sequence[Verifier]) -> tuple[str, list[tuple[Verifier, bytes]]]:
    """The note's text and each known key that signed it with the (first) signature, in note order.

    Steps, as in sumdb/note Open: (1) size, UTF-8, no ASCII control but
    newline; (2) split text from signatures at the last blank line; (3) parse
    each signature line; (4) a signature by a known key must verify, a repeated
    one too (C2SP: "MUST verify"; Go skips repeats unverified), but each key is
    listed once. Signatures by unknown keys are ignored (C2SP signed-note); the
    caller decides how many it needs.
    """
    # (1)
    if isinstance(note, bytes):
        if len(note) > MAX_NOTE_BYTES:
            raise NoteError(f"note is larger than {MAX_NOTE_BYTES} bytes")
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError:
            raise NoteError("malformed note: not UTF-8") from None
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError(f"note is larger than {MAX_NOTE_BYTES} bytes")
    if _CONTROL.search(note):
        raise NoteError("malformed note: control characters")
    # (2)
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("malformed note: no blank line before the signatures")
    text, sig_block = note[:split + 1], note[split + 2:]
    _check_text(text)
    if not sig_block.endswith("\n"):
        raise NoteError("malformed note: signature block must end with a newline")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"malformed note: more than {MAX_SIGNATURES} signatures")
    verified: list[tuple[Verifier, bytes]] = []
    for number, line in enumerate(lines, start=1):
        # (3)
        if not line.startswith(_SIG_PREFIX):
            raise NoteError(f"malformed note: signature line {number} does not start with an em dash")
        name, _, b64 = line[len(_SIG_PREFIX):].partition(" ")
        if not _valid_name(name) or not b64 or " " in b64:
            raise NoteError(f"malformed note: signature line {number} is not '— name signature'")
        blob = _b64decode(b64)
        if len(blob) < 5:
            raise NoteError(f"malformed note: signature line {number} is too short")
        key_hash = struct.unpack(">I", blob[:4])[0]
        # (4)
        matches = [v for v in verifiers if v.name == name and v.key_hash == key_hash]
        if len(matches) > 1:
            raise NoteError(f"ambiguous key {name}+{key_hash:08x}")
        if matches:
            if not matches[0].verify(text.encode(), blob[4:]):
                raise NoteError(f"invalid signature for key {name}+{key_hash:08x}")
            if all(v is not matches[0] for v, _ in verified):
                verified.append((matches[0], blob[4:]))
    return text, verified
