"""Standalone verifier for clipstore's audit log (depends on `cryptography` only).

Security teams can install and read this package alone: entry encoding, the
hash chain, RFC 9162 Merkle proofs, C2SP signed-note checkpoints, and
`python -m auditlog verify`.
"""

from auditlog.errors import CheckpointError, EntryError, NoteError, ProofError, VerificationError

__all__ = ["CheckpointError", "EntryError", "NoteError", "ProofError", "VerificationError"]
