"""Errors of the key hierarchy. Messages never carry key material."""

from __future__ import annotations


class KmsError(Exception):
    """Base of every key-provider and key-ring failure."""


class KmsUnavailable(KmsError):
    """The root provider could not be reached; retrying may help."""


class KmsAccessDenied(KmsError):
    """The root provider refused the operation (permissions, disabled key)."""


class KmsDecryptError(KmsError):
    """A wrapped blob did not open: wrong context, wrong key, or tampered."""


class KeyVersionError(KmsError):
    """An account key version is unknown, retired or destroyed."""


class AccountKeysDestroyed(KeyVersionError):
    """The account was crypto-shredded; its data can never be opened again."""


class UnknownKeyVersion(KeyVersionError):
    """No key of that version exists for the account."""


class RetiredKeyVersion(KeyVersionError):
    """The version is below the account's minimum decryption version."""


class DekUnwrapError(KmsError):
    """A wrapped data key does not open under the named account, clip and version."""
