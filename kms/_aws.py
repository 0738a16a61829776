"""AwsKms: the production root, boto3 KMS with an EncryptionContext."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from kms.errors import KmsAccessDenied, KmsDecryptError, KmsError, KmsUnavailable
from kms.provider import DataKey, EncryptionContext

T = TypeVar("T")
_ACCESS_CODES = frozenset({"AccessDeniedException", "DisabledException", "NotFoundException",
                           "KMSInvalidStateException", "UnrecognizedClientException",
                           "InvalidKeyUsageException"})
_DECRYPT_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
DEFAULT_RETRY_ATTEMPTS = 5


class AwsKms:
    """Root key in AWS KMS (or anything speaking its API, e.g. moto)."""

    def __init__(self, key_id: str, *, client: Any | None = None, endpoint_url: str | None = None,
                 region: str | None = None, retry_attempts: int = DEFAULT_RETRY_ATTEMPTS) -> None:
        if not key_id:
            raise ValueError("key_id must name a KMS key id, ARN or alias")
        self.key_id = key_id
        config = botocore.config.Config(retries={"max_attempts": retry_attempts, "mode": "adaptive"},
                                        connect_timeout=5, read_timeout=10)
        self._client = client or boto3.client("kms", endpoint_url=endpoint_url, region_name=region, config=config)

    def __repr__(self) -> str:
        return f"AwsKms(key_id={self.key_id!r})"

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _DECRYPT_CODES:
                raise KmsDecryptError("KMS could not decrypt: wrong key, wrong context or tampered blob") from None
            if code in _ACCESS_CODES:
                raise KmsAccessDenied(f"KMS refused the request ({code}); check the key policy and key state") \
                    from None
            raise KmsUnavailable(f"KMS error {code}; retry later") from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as exc:
            raise KmsUnavailable(f"KMS unreachable ({type(exc).__name__}); retry later") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise KmsError(f"KMS client error ({type(exc).__name__})") from None

    def encrypt(self, plaintext: bytes, context: EncryptionContext) -> bytes:
        resp = self._call(lambda: self._client.encrypt(
            KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=dict(context)))
        return _field(resp, "CiphertextBlob")

    def decrypt(self, blob: bytes, context: EncryptionContext) -> bytes:
        resp = self._call(lambda: self._client.decrypt(
            KeyId=self.key_id, CiphertextBlob=blob, EncryptionContext=dict(context)))
        return _field(resp, "Plaintext")

    def generate_data_key(self, context: EncryptionContext) -> DataKey:
        resp = self._call(lambda: self._client.generate_data_key(
            KeyId=self.key_id, KeySpec="AES_256", EncryptionContext=dict(context)))
        return DataKey(plaintext=_field(resp, "Plaintext"), wrapped=_field(resp, "CiphertextBlob"))


def _field(resp: Mapping[str, Any], name: str) -> bytes:
    """A bytes field of a KMS answer. botocore parses a 200 whose JSON body was cut short (a connection
    dropped mid-body, a proxy's truncated answer) as an object without the fields, not as an error:
    that is the key service failing, not a bug."""
    value = resp.get(name)
    if not isinstance(value, bytes | bytearray) or not value:
        raise KmsUnavailable(f"KMS answered without its {name} (a cut or garbled answer); retry later")
    return bytes(value)
