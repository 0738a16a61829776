"""Root-key providers and the per-account key ring (KMS root → account KEK)."""

from kms._aws import AwsKms
from kms._local import LocalKms
from kms.errors import (
    AccountKeysDestroyed,
    DekUnwrapError,
    KeyVersionError,
    KmsAccessDenied,
    KmsDecryptError,
    KmsError,
    KmsUnavailable,
    RetiredKeyVersion,
    UnknownKeyVersion,
)
from kms.keyring import KekRecord, KekStore, KeyRing, NewKek, WrappedDek
from kms.provider import DataKey, EncryptionContext, KeyProvider

__all__ = [
    "AccountKeysDestroyed", "AwsKms", "DataKey", "DekUnwrapError", "EncryptionContext", "KekRecord", "KekStore",
    "KeyProvider", "KeyRing", "KeyVersionError", "KmsAccessDenied", "KmsDecryptError", "KmsError",
    "KmsUnavailable", "LocalKms", "NewKek", "RetiredKeyVersion", "UnknownKeyVersion", "WrappedDek",
]
