"""A clip's key: the one door to everything sealed under a clip's data key.

The unwrapped DEK is never used directly as an AES key. Each purpose gets its
own subkey, HKDF-SHA256(DEK, info = "clipstore/subkey/v2" ‖ 0x00 ‖ purpose),
and each blob is bound to its purpose and row by its associated data. The audio
stream derives its segment keys from the DEK with its own salt and info
(`clipstore.envelope`), so no two uses share a key.

Blob format v2: "csk2" ‖ 12-byte nonce ‖ AES-256-GCM(subkey, plaintext,
AAD = "clipstore/<purpose>/v2" ‖ 0x00 ‖ object id). Blobs written before v2
(nonce ‖ AES-256-GCM under the raw DEK, AAD "clipstore/<purpose>/v1" ‖ 0x00 ‖
object id) still open, and `ClipKey.reseal` moves one forward.
"""

from __future__ import annotations

import secrets
from enum import StrEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clipstore.errors import SealedBlobTampered

MAGIC_V2 = b"csk2"
NONCE_BYTES = 12
TAG_BYTES = 16
DEK_BYTES = 32


class Purpose(StrEnum):
    IDENTITY = "identity"  # account id and device serial
    NOTE = "escalation-note"  # what a reviewer wrote when flagging
    LABEL = "assignment-label"  # what a reviewer wrote when completing
    RESOLUTION = "escalation-resolution"  # what the safety team wrote


def _aad(purpose: Purpose, object_id: str, version: int) -> bytes:
    return f"clipstore/{purpose}/v{version}".encode() + b"\x00" + object_id.encode()


class ClipKey:
    """Built from one clip's unwrapped data key; derives a subkey per purpose."""

    def __init__(self, dek: bytes) -> None:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"dek must be {DEK_BYTES} bytes, got {len(dek)}")
        self._dek = dek
        self._aeads: dict[Purpose, AESGCM] = {}

    def __repr__(self) -> str:
        return "ClipKey(<hidden>)"

    @property
    def stream_dek(self) -> bytes:
        """For `clipstore.envelope` only, which derives the segment keys from it (salted HKDF)."""
        return self._dek

    def _aead(self, purpose: Purpose) -> AESGCM:
        aead = self._aeads.get(purpose)
        if aead is None:
            subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                          info=b"clipstore/subkey/v2\x00" + purpose.encode()).derive(self._dek)
            aead = self._aeads[purpose] = AESGCM(subkey)
        return aead

    def seal(self, purpose: Purpose, object_id: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return MAGIC_V2 + nonce + self._aead(purpose).encrypt(nonce, plaintext, _aad(purpose, object_id, 2))

    def open(self, purpose: Purpose, object_id: str, sealed: bytes) -> bytes:
        """The plaintext, or `SealedBlobTampered` (never partial data, never which part was wrong)."""
        what = f"{purpose} of {object_id}"
        if is_current(sealed):
            body = sealed[len(MAGIC_V2):]
            if len(body) >= NONCE_BYTES + TAG_BYTES:
                try:
                    return self._aead(purpose).decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:],
                                                       _aad(purpose, object_id, 2))
                except InvalidTag:
                    pass  # a v1 blob whose random nonce began with the magic (p = 2^-32): try v1
        if len(sealed) < NONCE_BYTES + TAG_BYTES:
            raise SealedBlobTampered(f"{what} is {len(sealed)} bytes, shorter than a nonce and a tag")
        try:
            return AESGCM(self._dek).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], _aad(purpose, object_id, 1))
        except InvalidTag:
            raise SealedBlobTampered(f"{what} does not open under its clip's key") from None

    def reseal(self, purpose: Purpose, object_id: str, sealed: bytes) -> bytes:
        """A blob of any version, sealed again in the current one."""
        return self.seal(purpose, object_id, self.open(purpose, object_id, sealed))


def is_current(sealed: bytes) -> bool:
    return sealed[:len(MAGIC_V2)] == MAGIC_V2
