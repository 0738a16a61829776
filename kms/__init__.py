"""Root-key providers and the per-account key ring (KMS root → account KEK)."""

from kms._aws import AwsKms
from kms._local import LocalKms
from kms.errors import (
    AccountKeysDestroyed,
    KeyVersionError,
    KmsAccessDenied,
    KmsDecryptError,
    KmsError,
    KmsUnavailable,
)
from kms.provider import DataKey, EncryptionContext, KeyProvider

__all__ = [
    "AccountKeysDestroyed", "AwsKms", "DataKey", "EncryptionContext", "KeyProvider", "KeyVersionError",
    "KmsAccessDenied", "KmsDecryptError", "KmsError", "KmsUnavailable", "LocalKms",
]
