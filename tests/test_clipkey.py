"""The clip key: one subkey per purpose, blobs bound to purpose and row, older blobs opened and moved on."""

from __future__ import annotations

import json
import secrets

import pytest
import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clipstore.clipkey import MAGIC_V2, ClipKey, Purpose, is_current
from clipstore.errors import SealedBlobTampered
from clipstore.store import schema
from clipstore.v1 import clip_pb2
from tests.clip_helpers import ACCOUNT_ID
from tests.test_idempotency import Ingest, ingest  # noqa: F401  # the fixture

DEK = bytes(range(32))


def _legacy(dek: bytes, purpose: Purpose, object_id: str, plaintext: bytes) -> bytes:
    """A blob as written before v2: the raw DEK as the AES key, the v1 associated data."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(dek).encrypt(nonce, plaintext, f"clipstore/{purpose}/v1".encode() + b"\x00" +
                                       object_id.encode())


def test_a_v2_blob_follows_the_documented_format() -> None:
    """Re-derived here from the module docstring with `cryptography` alone, as another implementation would."""
    sealed = ClipKey(DEK).seal(Purpose.NOTE, "esc_1", b"he said a name")
    subkey = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                  info=b"clipstore/subkey/v2\x00escalation-note").derive(DEK)
    assert sealed[:4] == MAGIC_V2 and is_current(sealed)
    assert AESGCM(subkey).decrypt(sealed[4:16], sealed[16:], b"clipstore/escalation-note/v2\x00esc_1") == \
        b"he said a name"


def test_the_data_key_itself_never_seals_a_blob() -> None:
    sealed = ClipKey(DEK).seal(Purpose.IDENTITY, "c_1", b"{}")
    with pytest.raises(InvalidTag):
        AESGCM(DEK).decrypt(sealed[4:16], sealed[16:], b"clipstore/identity/v2\x00c_1")


@pytest.mark.parametrize(("purpose", "object_id"), [(Purpose.LABEL, "esc_1"), (Purpose.NOTE, "esc_2")])
def test_a_blob_opens_only_for_its_purpose_and_row(purpose: Purpose, object_id: str) -> None:
    sealed = ClipKey(DEK).seal(Purpose.NOTE, "esc_1", b"text")
    with pytest.raises(SealedBlobTampered):
        ClipKey(DEK).open(purpose, object_id, sealed)


@pytest.mark.parametrize("blob", [b"", b"csk2", b"x" * 27, b"csk2" + b"\x00" * 40])
def test_short_or_forged_blobs_are_tampered(blob: bytes) -> None:
    with pytest.raises(SealedBlobTampered):
        ClipKey(DEK).open(Purpose.NOTE, "esc_1", blob)


def test_another_clips_key_opens_nothing() -> None:
    sealed = ClipKey(DEK).seal(Purpose.IDENTITY, "c_1", b"{}")
    with pytest.raises(SealedBlobTampered):
        ClipKey(secrets.token_bytes(32)).open(Purpose.IDENTITY, "c_1", sealed)


def test_a_blob_written_before_v2_opens_and_reseals_into_v2() -> None:
    legacy = _legacy(DEK, Purpose.RESOLUTION, "esc_9", b"referred")
    key = ClipKey(DEK)
    assert key.open(Purpose.RESOLUTION, "esc_9", legacy) == b"referred"
    moved = key.reseal(Purpose.RESOLUTION, "esc_9", legacy)
    assert is_current(moved) and key.open(Purpose.RESOLUTION, "esc_9", moved) == b"referred"


def test_a_legacy_blob_whose_nonce_starts_like_the_magic_still_opens() -> None:
    nonce = MAGIC_V2 + secrets.token_bytes(8)
    aad = b"clipstore/identity/v1\x00c_1"
    legacy = nonce + AESGCM(DEK).encrypt(nonce, b"{}", aad)
    assert ClipKey(DEK).open(Purpose.IDENTITY, "c_1", legacy) == b"{}"


def test_the_key_never_shows_itself() -> None:
    assert repr(ClipKey(DEK)) == "ClipKey(<hidden>)"
    with pytest.raises(ValueError, match="32 bytes"):
        ClipKey(b"short")


# -- the reseal job, on the real stores (SQLite and PostgreSQL) ------------------------------------------


def test_the_retention_job_moves_identities_sealed_before_v2_forward(ingest: Ingest) -> None:  # noqa: F811
    clip_id = ingest.put("k1").clip_id
    app = ingest.server.app
    row = app.clips.find(clip_id)
    assert row is not None and is_current(row.identity_ct)
    identity = json.dumps({"account_id": ACCOUNT_ID, "device_serial": "S"}).encode()
    legacy = _legacy(app.clips.key(row).stream_dek, Purpose.IDENTITY, clip_id, identity)
    with app.db.transaction() as conn:
        conn.execute(sa.update(schema.clips).where(schema.clips.c.clip_id == clip_id).values(identity_ct=legacy))
    assert app.clips.reseal_legacy() == 1 and app.clips.reseal_legacy() == 0  # resumable, then done
    moved = app.clips.find(clip_id)
    assert moved is not None and is_current(moved.identity_ct)
    got = ingest.clips.GetClip(clip_pb2.GetClipRequest(clip_id=clip_id), metadata=ingest.md, timeout=10).clip
    assert got.identity.account_id == ACCOUNT_ID and got.identity.device_serial == "S"
