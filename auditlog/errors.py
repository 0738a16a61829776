"""Every way verification can fail. Each error names what failed and where."""

from __future__ import annotations


class VerificationError(Exception):
    """Base of all auditlog verification failures."""


class ProofError(VerificationError):
    """A Merkle inclusion or consistency proof does not verify."""


class NoteError(VerificationError):
    """A signed note or key string is malformed, unsigned or badly signed."""


class CheckpointError(VerificationError):
    """A checkpoint body is malformed or does not match the log."""


class EntryError(VerificationError):
    """An entry or the chain of entries is wrong at `index`."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"entry {index}: {reason}")
        self.index = index
        self.reason = reason
