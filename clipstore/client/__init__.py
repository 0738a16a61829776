"""The typed Python client for clipstore: `ClipstoreClient` (blocking) and `AsyncClipstoreClient` (asyncio).

    from clipstore.client import ClipstoreClient, errors

    with ClipstoreClient("127.0.0.1:50051", api_key="csk_…") as client:
        clip = client.put_clip(audio, account_id="acct-1", locale="en-US",
                               content_type="audio/opus", wake_word_detected=True)

Errors are `errors.ClipstoreRpcError` subclasses, one per reason (`errors.GrantExpiredError`);
audit calls verify what they return and raise `auditlog.VerificationError` when it does not check out.
"""

from auditlog.errors import VerificationError
from clipstore.client import errors
from clipstore.client._aio import AsyncClipstoreClient
from clipstore.client._audit import AuditEntry, InclusionProof, VerifiedCheckpoint
from clipstore.client._sync import ClipstoreClient
from clipstore.client._wire import SERVICE_CONFIG, SERVICE_CONFIG_JSON, RetryPolicy
from clipstore.client.errors import ClipstoreRpcError

__all__ = ["SERVICE_CONFIG", "SERVICE_CONFIG_JSON", "AsyncClipstoreClient", "AuditEntry", "ClipstoreClient",
           "ClipstoreRpcError", "InclusionProof", "RetryPolicy", "VerificationError", "VerifiedCheckpoint", "errors"]
