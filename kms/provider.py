"""The root-key provider protocol: what the key ring needs from a KMS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

EncryptionContext = Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class DataKey:
    plaintext: bytes
    wrapped: bytes

    def __repr__(self) -> str:  # never print key material
        return f"DataKey(wrapped={len(self.wrapped)} bytes)"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps and unwraps small secrets under a root key, bound to a context."""

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> bytes: ...

    def decrypt(self, blob: bytes, context: EncryptionContext) -> bytes: ...

    def generate_data_key(self, context: EncryptionContext) -> DataKey: ...
