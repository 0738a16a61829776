"""The clip object format: a versioned header, then 64 KiB AES-256-GCM segments.

    header ‖ segment₀ ‖ … ‖ segmentₙ          (byte layout: docs/clip-format.md)

Keys: HKDF-SHA256(DEK, salt, "clipstore/clip/v1") → segment key ‖ commit key.
The header carries an HMAC commitment (one ciphertext never opens under two
keys) and an account tag; segment i uses nonce = prefix ‖ u32 i ‖ last flag
(STREAM, as in Tink and age) and AAD = SHA-256(header). Memory is bounded by
two segments for any clip size; every segment is authenticated before its
plaintext is released, and a truncated stream ends in an error.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from clipstore.errors import (
    AccountMismatch,
    ClipIdMismatch,
    Extended,
    HeaderTampered,
    MalformedHeader,
    Reordered,
    SegmentTampered,
    Truncated,
    UnsupportedFormat,
)

MAGIC = b"CLPS"
FORMAT_VERSION = 1
SUITE_AES256GCM_HKDF_SHA256 = 1
SEGMENT_SIZE_BYTES = 64 * 1024
TAG_BYTES = 16
DEK_BYTES = 32
SALT_BYTES = 32
NONCE_PREFIX_BYTES = 7
ACCOUNT_TAG_BYTES = 16
COMMITMENT_BYTES = 32
MAX_CLIP_ID_BYTES = 64
MAX_SEGMENTS = 1 << 32  # u32 segment counter
REORDER_SEARCH_SEGMENTS = 16  # how far to look when classifying a misplaced segment
_FIXED = struct.Struct(">4sBBIB")  # magic, version, suite, segment size, clip id length
_HKDF_INFO = b"clipstore/clip/v1"

__all__ = ["SEGMENT_SIZE_BYTES", "ClipHeader", "open_bytes", "open_clip", "open_segments", "seal_bytes", "seal_clip",
           "sealed_size", "segment_count"]


class ClipHeader(NamedTuple):
    """A parsed header. A NamedTuple: one is made per clip opened, and a frozen dataclass cost 14k
    instructions to make (each field set through object.__setattr__), a tenth of parsing a header."""

    clip_id: str
    segment_size: int
    salt: bytes
    nonce_prefix: bytes
    account_tag: bytes
    commitment: bytes

    def encode(self) -> bytes:
        return _unsigned_header(self.clip_id.encode("ascii"), self.segment_size, self.salt, self.nonce_prefix,
                                self.account_tag) + self.commitment

    @property
    def length(self) -> int:
        return _FIXED.size + len(self.clip_id) + SALT_BYTES + NONCE_PREFIX_BYTES + ACCOUNT_TAG_BYTES + \
            COMMITMENT_BYTES


def _unsigned_header(cid: bytes, segment_size: int, salt: bytes, nonce_prefix: bytes, account_tag: bytes) -> bytes:
    """The header up to its commitment, which is computed over these bytes."""
    return (_FIXED.pack(MAGIC, FORMAT_VERSION, SUITE_AES256GCM_HKDF_SHA256, segment_size, len(cid))
            + cid + salt + nonce_prefix + account_tag)


def _check_clip_id(clip_id: str) -> bytes:
    try:
        raw = clip_id.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("clip_id must be ASCII") from None
    if not 0 < len(raw) <= MAX_CLIP_ID_BYTES:
        raise ValueError(f"clip_id must be 1 to {MAX_CLIP_ID_BYTES} bytes, got {len(raw)}")
    return raw


_SHA256 = hashes.SHA256()


class _Keys:
    def __init__(self, dek: bytes, salt: bytes) -> None:
        if len(dek) != DEK_BYTES:
            raise ValueError(f"dek must be {DEK_BYTES} bytes, got {len(dek)}")
        okm = HKDF(algorithm=_SHA256, length=64, salt=salt, info=_HKDF_INFO).derive(dek)
        self.aead = AESGCM(okm[:32])
        # Keyed once, copied per use. cryptography's HMAC rather than the stdlib's: under OpenSSL 3 its key
        # setup and copy cost about half as many instructions (callgrind), and each clip computes two MACs.
        self._commit_mac = HMAC(okm[32:], _SHA256)

    def _mac(self, label: bytes, data: bytes) -> bytes:
        mac = self._commit_mac.copy()
        mac.update(label)
        mac.update(data)
        return mac.finalize()

    def account_tag(self, account_ref: str) -> bytes:
        return self._mac(b"account\x00", account_ref.encode())[:ACCOUNT_TAG_BYTES]

    def commitment(self, header_prefix: bytes) -> bytes:
        return self._mac(b"header\x00", header_prefix)


_NONCE = struct.Struct(">7sI?")  # prefix, u32 segment index, last flag (0x01 on the final segment)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return _NONCE.pack(prefix, index, last)


# -- sealing -------------------------------------------------------------------
def _start(dek: bytes, clip_id: str, account_ref: str, segment_size: int,
           random_bytes: Callable[[int], bytes]) -> tuple[bytes, _Keys, bytes, bytes]:
    """A new clip's header, keys, segment AAD and nonce prefix."""
    cid = _check_clip_id(clip_id)
    if not 0 < segment_size <= 1 << 24:
        raise ValueError(f"segment_size must be in (0, 16 MiB], got {segment_size}")
    salt, prefix = random_bytes(SALT_BYTES), random_bytes(NONCE_PREFIX_BYTES)
    keys = _Keys(dek, salt)
    unsigned = _unsigned_header(cid, segment_size, salt, prefix, keys.account_tag(account_ref))
    header = unsigned + keys.commitment(unsigned)
    return header, keys, hashlib.sha256(header).digest(), prefix


def seal_bytes(dek: bytes, plaintext: bytes, *, clip_id: str, account_ref: str,
               segment_size: int = SEGMENT_SIZE_BYTES,
               random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> bytearray:
    """One-shot `seal_clip` for a clip already in memory: the same bytes, sealed in place
    into one buffer (no per-segment allocations, no join)."""
    header, keys, aad, prefix = _start(dek, clip_id, account_ref, segment_size, random_bytes)
    count = max(1, -(-len(plaintext) // segment_size))
    out = bytearray(len(header) + len(plaintext) + count * TAG_BYTES)
    out[:len(header)] = header
    src, dst, pos = memoryview(plaintext), memoryview(out), len(header)
    for index in range(count):
        piece = src[index * segment_size:(index + 1) * segment_size]
        keys.aead.encrypt_into(_nonce(prefix, index, index == count - 1), piece, aad,
                               dst[pos:pos + len(piece) + TAG_BYTES])
        pos += len(piece) + TAG_BYTES
    return out


def seal_clip(dek: bytes, plaintext: Iterable[bytes | memoryview], *, clip_id: str, account_ref: str,
              segment_size: int = SEGMENT_SIZE_BYTES,
              random_bytes: Callable[[int], bytes] = secrets.token_bytes) -> Iterator[bytes]:
    """Yield the header, then each sealed segment, reading `plaintext` chunk by chunk.

    `random_bytes` supplies salt and nonce prefix; only format vectors fix it.
    """
    header, keys, aad, prefix = _start(dek, clip_id, account_ref, segment_size, random_bytes)
    yield header
    # A full segment is sealed only once more plaintext shows it is not the last, so the latest one
    # is held back. Each segment is copied at most once: a whole segment inside an immutable chunk
    # is held as a view of it; only segments that straddle chunks are assembled in `pending`, which
    # starts as a view of an immutable chunk's tail and is copied only when more plaintext follows
    # (so a clip shorter than a segment, sent in one message, is never copied).
    held: bytes | bytearray | memoryview | None = None
    pending: bytearray | memoryview = bytearray()
    index = 0
    for chunk in plaintext:
        view, pos = memoryview(chunk).cast("B"), 0  # bytes, whatever the buffer's shape (TypeError if strided)
        # a view of a caller's mutable buffer could change under us; bytes, or a view of bytes, cannot
        zero_copy = type(chunk) is bytes or (type(chunk) is memoryview and type(chunk.obj) is bytes)
        while pos < len(view):
            if held is not None:
                if index + 1 >= MAX_SEGMENTS:
                    raise ValueError("clip exceeds the format's 2**32 segments")
                yield keys.aead.encrypt(_nonce(prefix, index, False), held, aad)
                held, index = None, index + 1
            if not pending and zero_copy and len(view) - pos >= segment_size:
                held = view[pos:pos + segment_size]
                pos += segment_size
                continue
            take = min(segment_size - len(pending), len(view) - pos)
            if not pending and zero_copy:
                pending = view[pos:pos + take]
            else:
                pending = bytearray(pending) if isinstance(pending, memoryview) else pending
                pending += view[pos:pos + take]
            pos += take
            if len(pending) == segment_size:
                held, pending = pending, bytearray()
        if not zero_copy:  # nothing of a mutable chunk is held (copied above): the caller may resize it now
            view.release()
    yield keys.aead.encrypt(_nonce(prefix, index, True), pending if held is None else held, aad)


def sealed_size(plaintext_bytes: int, *, clip_id: str, segment_size: int = SEGMENT_SIZE_BYTES) -> int:
    segments = max(1, -(-plaintext_bytes // segment_size))
    header = _FIXED.size + len(_check_clip_id(clip_id)) + SALT_BYTES + NONCE_PREFIX_BYTES + ACCOUNT_TAG_BYTES + \
        COMMITMENT_BYTES
    return header + plaintext_bytes + segments * TAG_BYTES


# -- opening -------------------------------------------------------------------
class _Reader:
    """Exact-size reads over an iterable of byte chunks; each byte is copied once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self._cur = memoryview(next(self._it, b""))  # the first chunk, so the header's reads take the fast path
        self._pos = 0

    def read(self, n: int) -> bytes | memoryview:
        start, end = self._pos, self._pos + n
        if end <= len(self._cur):  # the common case: inside the current chunk, a slice and no copy
            self._pos = end
            return self._cur[start:end]
        parts: list[memoryview] = []
        while n:
            if self._pos >= len(self._cur):
                chunk = next(self._it, None)
                if chunk is None:
                    break
                self._cur, self._pos = memoryview(chunk), 0
                continue
            take = min(n, len(self._cur) - self._pos)
            parts.append(self._cur[self._pos:self._pos + take])
            self._pos += take
            n -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)  # a slice of one chunk needs no copy


def _parse_header(read: Callable[[int], bytes | memoryview]) -> tuple[ClipHeader, bytes]:
    fixed = bytes(read(_FIXED.size))
    if len(fixed) < _FIXED.size:
        raise MalformedHeader(f"object is {len(fixed)} bytes, shorter than a header")
    magic, version, suite, segment_size, id_len = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise MalformedHeader("not a clipstore clip object (bad magic)")
    if version != FORMAT_VERSION or suite != SUITE_AES256GCM_HKDF_SHA256:
        raise UnsupportedFormat(f"format version {version} suite {suite}; this build reads version "
                                f"{FORMAT_VERSION} suite {SUITE_AES256GCM_HKDF_SHA256}")
    if not 0 < id_len <= MAX_CLIP_ID_BYTES or not 0 < segment_size <= 1 << 24:
        raise MalformedHeader(f"clip id length {id_len} or segment size {segment_size} out of range")
    rest_len = id_len + SALT_BYTES + NONCE_PREFIX_BYTES + ACCOUNT_TAG_BYTES + COMMITMENT_BYTES
    rest = bytes(read(rest_len))
    if len(rest) < rest_len:
        raise MalformedHeader("header is cut short")
    try:
        clip_id = rest[:id_len].decode("ascii")
    except UnicodeDecodeError:
        raise MalformedHeader("clip id in header is not ASCII") from None
    o = id_len
    header = ClipHeader(clip_id=clip_id, segment_size=segment_size, salt=rest[o:o + SALT_BYTES],
                        nonce_prefix=rest[o + SALT_BYTES:o + SALT_BYTES + NONCE_PREFIX_BYTES],
                        account_tag=rest[o + SALT_BYTES + NONCE_PREFIX_BYTES:-COMMITMENT_BYTES],
                        commitment=rest[-COMMITMENT_BYTES:])
    return header, fixed + rest


def _authenticate_header(dek: bytes, header: ClipHeader, raw: bytes, *, clip_id: str,
                         account_ref: str) -> tuple[_Keys, bytes]:
    # Numbered checks, cheapest first; each names what failed.
    # 1. the object claims to be this clip
    if header.clip_id != clip_id:
        raise ClipIdMismatch(f"object is clip {header.clip_id!r}, expected {clip_id!r}")
    # 2. the key commitment: header intact and this is the clip's key
    keys = _Keys(dek, header.salt)
    if not hmac.compare_digest(keys.commitment(raw[:-COMMITMENT_BYTES]), header.commitment):
        raise HeaderTampered("header does not match its key commitment (tampered header or wrong key)")
    # 3. the clip belongs to this account
    if not hmac.compare_digest(keys.account_tag(account_ref), header.account_tag):
        raise AccountMismatch("clip was sealed for another account")
    return keys, hashlib.sha256(raw).digest()


class _SegmentOpener:
    def __init__(self, keys: _Keys, header: ClipHeader, aad: bytes) -> None:
        self._aead, self._prefix, self._aad = keys.aead, header.nonce_prefix, aad

    def _try(self, index: int, last: bool, ct: bytes | memoryview) -> bytes | None:
        try:
            return self._aead.decrypt(_nonce(self._prefix, index, last), ct, self._aad)
        except InvalidTag:
            return None

    def open(self, index: int, last: bool, ct: bytes | memoryview) -> bytes:
        if len(ct) < TAG_BYTES:
            raise Truncated(f"segment {index} is {len(ct)} bytes, shorter than its tag")
        plain = self._try(index, last, ct)
        if plain is not None:
            return plain
        self._classify(index, last, ct)

    def open_into(self, index: int, last: bool, ct: memoryview, out: memoryview) -> None:
        if len(ct) < TAG_BYTES:
            raise Truncated(f"segment {index} is {len(ct)} bytes, shorter than its tag")
        try:
            self._aead.decrypt_into(_nonce(self._prefix, index, last), ct, self._aad, out)
        except InvalidTag:
            self._classify(index, last, ct)

    def _classify(self, index: int, last: bool, ct: bytes | memoryview) -> NoReturn:
        """Name the failure for the audit entry; the caller sees one status either way."""
        if last and self._try(index, False, ct) is not None:
            raise Truncated(f"stream ends after segment {index}, which is not the final segment")
        if not last and self._try(index, True, ct) is not None:
            raise Extended(f"data follows segment {index}, the final segment")
        for other in range(max(0, index - REORDER_SEARCH_SEGMENTS), index + REORDER_SEARCH_SEGMENTS):
            if other != index and any(self._try(other, flag, ct) is not None for flag in (False, True)):
                raise Reordered(f"segment at position {index} is segment {other}")
        raise SegmentTampered(f"segment {index} failed authentication")


def open_clip(dek: bytes, ciphertext: Iterable[bytes], *, clip_id: str, account_ref: str) -> Iterator[bytes]:
    """Yield authenticated plaintext segment by segment; raise `EnvelopeError` on any defect."""
    reader = _Reader(ciphertext)
    header, raw = _parse_header(reader.read)
    keys, aad = _authenticate_header(dek, header, raw, clip_id=clip_id, account_ref=account_ref)
    opener = _SegmentOpener(keys, header, aad)
    seg_ct = header.segment_size + TAG_BYTES
    current, index = reader.read(seg_ct), 0
    while True:
        following = reader.read(seg_ct)  # one segment of look-ahead tells whether `current` is last
        last = not following
        yield opener.open(index, last, current)
        if last:
            return
        current, index = following, index + 1
        if index >= MAX_SEGMENTS:
            raise Extended("more than 2**32 segments")


def open_bytes(dek: bytes, ciphertext: bytes | bytearray, *, clip_id: str, account_ref: str) -> bytearray:
    """One-shot `open_clip`: every segment authenticated into one buffer; on any failure the
    buffer is dropped and an `EnvelopeError` raised, so no plaintext reaches the caller."""
    view, position = memoryview(ciphertext), 0

    def read(n: int) -> memoryview:
        nonlocal position
        piece = view[position:position + n]
        position += len(piece)
        return piece

    header, raw = _parse_header(read)
    keys, aad = _authenticate_header(dek, header, raw, clip_id=clip_id, account_ref=account_ref)
    opener = _SegmentOpener(keys, header, aad)
    seg_ct = header.segment_size + TAG_BYTES
    total = segment_count(len(view), len(raw), header.segment_size)
    out = bytearray(len(view) - len(raw) - total * TAG_BYTES)
    dst = memoryview(out)
    for index in range(total):
        start = len(raw) + index * seg_ct
        piece = view[start:start + seg_ct]
        opener.open_into(index, index == total - 1, piece,
                         dst[index * header.segment_size:index * header.segment_size + len(piece) - TAG_BYTES])
    return out


def segment_count(object_size: int, header_length: int, segment_size: int = SEGMENT_SIZE_BYTES) -> int:
    body = object_size - header_length
    if body < TAG_BYTES:
        raise Truncated(f"object body is {body} bytes, shorter than one segment tag")
    return -(-body // (segment_size + TAG_BYTES))


def open_segments(dek: bytes, read_at: Callable[[int, int], bytes], object_size: int, *, clip_id: str,
                  account_ref: str, first: int, stop: int) -> Iterator[bytes]:
    """Ranged decryption: segments [first, stop) of an object read with `read_at(offset, length)`
    (a ranged GET); the header is read and authenticated first."""
    position = 0

    def read_header(n: int) -> bytes:
        nonlocal position
        data = read_at(position, n)
        position += len(data)
        return data

    header, raw = _parse_header(read_header)
    keys, aad = _authenticate_header(dek, header, raw, clip_id=clip_id, account_ref=account_ref)
    total = segment_count(object_size, len(raw), header.segment_size)
    if not 0 <= first <= stop <= total:
        raise ValueError(f"segment range [{first}, {stop}) is outside [0, {total})")
    opener = _SegmentOpener(keys, header, aad)
    seg_ct = header.segment_size + TAG_BYTES
    for index in range(first, stop):
        offset = len(raw) + index * seg_ct
        yield opener.open(index, index == total - 1, read_at(offset, min(seg_ct, object_size - offset)))
