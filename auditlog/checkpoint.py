"""C2SP tlog-checkpoint bodies inside signed notes.

Body: origin line, decimal tree size, base64 root hash, optional extension
lines, each ending in a newline.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from auditlog.errors import CheckpointError
from auditlog.merkle import HASH_BYTES
from auditlog.note import NoteSigner, NoteVerifier, open_note, sign_note

__all__ = ["Checkpoint", "open_checkpoint", "sign_checkpoint"]

MAX_TREE_SIZE = (1 << 63) - 1


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def to_text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body; `CheckpointError` names the bad line."""
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(f"checkpoint needs origin, size and root lines; got {len(lines)} lines")
        origin, size_text, root_text, *extensions = lines
        if not origin:
            raise CheckpointError("line 1 (origin) is empty")
        # ASCII digits only: str.isdigit() also takes '²' (which int() refuses) and '١٢' (which it reads as 12)
        if not (size_text.isascii() and size_text.isdigit()) or (size_text.startswith("0") and size_text != "0") \
                or int(size_text) > MAX_TREE_SIZE:
            raise CheckpointError(f"line 2 (tree size) is not a canonical decimal: {size_text[:40]!r}")
        try:
            root = base64.b64decode(root_text, validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError("line 3 (root hash) is not base64") from None
        if len(root) != HASH_BYTES:
            raise CheckpointError(f"line 3 (root hash) is {len(root)} bytes, want {HASH_BYTES}")
        if any(not ext for ext in extensions):
            raise CheckpointError("extension lines must not be empty")
        return cls(origin=origin, size=int(size_text), root=root, extensions=tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> str:
    """The checkpoint as a signed note; the origin must be the signer's name."""
    if checkpoint.origin != signer.name:
        raise ValueError(f"checkpoint origin {checkpoint.origin!r} must equal signer name {signer.name!r}")
    return sign_note(checkpoint.to_text(), signer)


def open_checkpoint(note: str | bytes, verifier: NoteVerifier) -> Checkpoint:
    """Verify the note's signature, then parse the body; the origin must be the key's name."""
    checkpoint = Checkpoint.parse(open_note(note, [verifier]))
    if checkpoint.origin != verifier.name:
        raise CheckpointError(f"checkpoint origin {checkpoint.origin!r} is not the key's name {verifier.name!r}")
    return checkpoint
