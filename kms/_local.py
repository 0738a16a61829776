"""LocalKms: a 256-bit root key in a 0600 file; AES-256-GCM, context as AAD."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kms.errors import KmsDecryptError
from kms.provider import DataKey, EncryptionContext

ROOT_KEY_BYTES = 32
NONCE_BYTES = 12
BLOB_VERSION = b"\x01"
DATA_KEY_BYTES = 32


def _aad(context: EncryptionContext) -> bytes:
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode()


class LocalKms:
    """The embedded root: fine for one machine; use AWS KMS in production."""

    def __init__(self, root_key: bytes) -> None:
        if len(root_key) != ROOT_KEY_BYTES:
            raise ValueError(f"root_key must be {ROOT_KEY_BYTES} bytes, got {len(root_key)}")
        self._aead = AESGCM(root_key)

    def __repr__(self) -> str:
        return "LocalKms(<root key hidden>)"

    @classmethod
    def from_file(cls, path: Path, *, create: bool = True) -> LocalKms:
        """Load the key file, creating it (mode 0600) if missing and `create` is set.

        The file is opened without following symlinks and checked through that open descriptor
        (owner and mode), so what is checked is what is read. `PermissionError` names the path and
        the fix; a symlink is refused rather than followed to wherever it points."""
        if create and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_bytes(ROOT_KEY_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PermissionError(f"{path} is a symbolic link; replace it with the key file itself "
                                      f"(mode 0600, owned by the service user)") from None
            raise
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PermissionError(f"{path} is not a regular file; it must hold the {ROOT_KEY_BYTES}-byte root key")
            if st.st_uid != os.geteuid():
                raise PermissionError(f"{path} is owned by uid {st.st_uid}, not the service user (uid "
                                      f"{os.geteuid()}); run: chown {os.geteuid()} {path}")
            if st.st_mode & 0o077:
                raise PermissionError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); "
                                      f"run: chmod 600 {path}")
            key = fh.read(ROOT_KEY_BYTES + 1)
        if len(key) != ROOT_KEY_BYTES:
            raise ValueError(f"{path} must hold {ROOT_KEY_BYTES} bytes, holds {len(key)}")
        return cls(key)

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return BLOB_VERSION + nonce + self._aead.encrypt(nonce, plaintext, _aad(context))

    def decrypt(self, blob: bytes, context: EncryptionContext) -> bytes:
        if len(blob) < 1 + NONCE_BYTES + 16 or blob[:1] != BLOB_VERSION:
            raise KmsDecryptError("wrapped blob is malformed or of an unknown version")
        nonce, body = blob[1:1 + NONCE_BYTES], blob[1 + NONCE_BYTES:]
        try:
            return self._aead.decrypt(nonce, body, _aad(context))
        except InvalidTag:
            raise KmsDecryptError("wrapped blob does not open under this root key and context") from None

    def generate_data_key(self, context: EncryptionContext) -> DataKey:
        plaintext = secrets.token_bytes(DATA_KEY_BYTES)
        return DataKey(plaintext=plaintext, wrapped=self.encrypt(plaintext, context))
