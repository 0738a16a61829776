"""C2SP tlog-cosignature v1: a witness's timestamped Ed25519 signature on a checkpoint.

A cosignature is a signed-note signature line
`— <witness name> base64(key ID ‖ u64 timestamp ‖ Ed25519 signature)` where
key ID = SHA-256(name ‖ "\\n" ‖ 0x04 ‖ public key)[:4] and the signed message is
"cosignature/v1\\ntime <timestamp>\\n" followed by the whole checkpoint body.
Verifier key string: `name+hexID+base64(0x04 ‖ public key)`; signer key
string: `PRIVATE+KEY+name+hexID+base64(0x04 ‖ seed)`.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from auditlog.checkpoint import Checkpoint
from auditlog.errors import CheckpointError, NoteError
from auditlog.note import NoteVerifier, _b64decode, _key_hash, _parse_key_hash, _valid_name, verify_note

__all__ = ["Cosignature", "CosignatureSigner", "CosignatureVerifier", "cosigned_message",
           "open_cosigned_checkpoint"]

ALG_COSIGNATURE_V1 = 0x04
COSIGNATURE_BYTES = 8 + 64  # u64 timestamp ‖ Ed25519 signature (after the 4-byte key ID)
MAX_TIMESTAMP = (1 << 63) - 1  # as the Go and Rust verifiers: the top bit is never set


def cosigned_message(text: str, timestamp: int) -> bytes:
    """What a witness signs: header line, time line, then the checkpoint body."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError(f"timestamp must be in [0, 2**63), got {timestamp}")
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


def _raw_key(public: Ed25519PublicKey) -> bytes:
    return bytes([ALG_COSIGNATURE_V1]) + public.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class CosignatureVerifier:
    name: str
    key_hash: int
    public_key: Ed25519PublicKey

    @classmethod
    def from_public_key(cls, name: str, public_key: Ed25519PublicKey) -> CosignatureVerifier:
        if not _valid_name(name):
            raise NoteError(f"witness name must be non-empty without spaces or '+', got {name!r}")
        return cls(name, _key_hash(name, _raw_key(public_key)), public_key)

    @classmethod
    def from_key_string(cls, vkey: str) -> CosignatureVerifier:
        """Parse `name+hexID+base64(0x04‖pubkey)`; `NoteError` says what is wrong."""
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("witness key must look like name+hexID+base64key")
        name, hex_hash, b64 = parts
        claimed = _parse_key_hash(hex_hash)
        if not _valid_name(name) or claimed is None:
            raise NoteError("witness key has a malformed name or key ID (want 8 hexadecimal digits)")
        raw = _b64decode(b64)
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
            raise NoteError("witness key is not a cosignature/v1 key (want 0x04 followed by 32 bytes)")
        if _key_hash(name, raw) != claimed:
            raise NoteError("witness key ID does not match its name and key")
        return cls(name, claimed, Ed25519PublicKey.from_public_bytes(raw[1:]))

    def key_string(self) -> str:
        return f"{self.name}+{self.key_hash:08x}+{base64.b64encode(_raw_key(self.public_key)).decode()}"

    @staticmethod
    def timestamp(signature: bytes) -> int:
        """The time a cosignature (the bytes after its key ID) claims; `NoteError` if malformed."""
        if len(signature) != COSIGNATURE_BYTES:
            raise NoteError(f"cosignature is {len(signature)} bytes after its key ID, want {COSIGNATURE_BYTES}")
        timestamp: int = struct.unpack(">Q", signature[:8])[0]
        if timestamp > MAX_TIMESTAMP:
            raise NoteError("cosignature timestamp has its top bit set")
        return timestamp

    def verify(self, message: bytes, signature: bytes) -> bool:
        """`message` is the note text; the signed bytes are rebuilt around it."""
        try:
            timestamp = self.timestamp(signature)
            text = message.decode()
        except (NoteError, UnicodeDecodeError):
            return False
        try:
            self.public_key.verify(signature[8:], cosigned_message(text, timestamp))
        except InvalidSignature:
            return False
        return True


class CosignatureSigner:
    """A witness's signing key; repr never shows the key."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.verifier = CosignatureVerifier.from_public_key(name, private_key.public_key())
        self.name = name

    def __repr__(self) -> str:
        return f"CosignatureSigner(name={self.name!r}, key_hash={self.verifier.key_hash:08x})"

    @classmethod
    def generate(cls, name: str) -> CosignatureSigner:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_key_string(cls, skey: str) -> CosignatureSigner:
        parts = skey.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise NoteError("witness signer key must look like PRIVATE+KEY+name+hexID+base64key")
        raw = _b64decode(parts[4])
        if len(raw) != 33 or raw[0] != ALG_COSIGNATURE_V1:
            raise NoteError("witness signer key is not a cosignature/v1 Ed25519 seed (0x04 ‖ 32 bytes)")
        signer = cls(parts[2], Ed25519PrivateKey.from_private_bytes(raw[1:]))
        if signer.verifier.key_hash != _parse_key_hash(parts[3]):
            raise NoteError("witness signer key ID does not match its name and key")
        return signer

    def key_string(self) -> str:
        seed = self._key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        raw = base64.b64encode(bytes([ALG_COSIGNATURE_V1]) + seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.verifier.key_hash:08x}+{raw}"

    def cosign(self, text: str, timestamp: int) -> str:
        """One signature line (ending in a newline) over the checkpoint body `text`."""
        signature = self._key.sign(cosigned_message(text, timestamp))
        blob = struct.pack(">IQ", self.verifier.key_hash, timestamp) + signature
        return f"\u2014 {self.name} {base64.b64encode(blob).decode()}\n"


@dataclass(frozen=True)
class Cosignature:
    witness: str
    timestamp: int  # seconds since the epoch, as the witness claims


def open_cosigned_checkpoint(note: str | bytes, log: NoteVerifier, witnesses: Sequence[CosignatureVerifier],
                             quorum: int) -> tuple[Checkpoint, list[Cosignature]]:
    """Verify the log's signature and at least `quorum` distinct witnesses' cosignatures.

    Steps: (1) every signature by a known key verifies (unknown ones are
    ignored); (2) the log signed it and the origin is the log's name;
    (3) count one cosignature per configured witness; (4) the quorum holds.
    """
    if not 0 <= quorum <= len(witnesses):
        raise ValueError(f"quorum must be between 0 and {len(witnesses)} (the witnesses given), got {quorum}")
    # (1)
    text, verified = verify_note(note, [log, *witnesses])
    # (2)
    if not any(v is log for v, _ in verified):
        raise NoteError(f"note has no valid signature by the log key {log.name}+{log.key_hash:08x}")
    checkpoint = Checkpoint.parse(text)
    if checkpoint.origin != log.name:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin!r} is not the key's name {log.name!r}")
    # (3)
    seen: dict[int, Cosignature] = {}
    for v, signature in verified:
        if isinstance(v, CosignatureVerifier) and id(v) not in seen:
            seen[id(v)] = Cosignature(witness=v.name, timestamp=CosignatureVerifier.timestamp(signature))
    # (4)
    if len(seen) < quorum:
        raise CheckpointError(f"checkpoint has {len(seen)} valid witness cosignatures, the quorum is {quorum}")
    return checkpoint, list(seen.values())
