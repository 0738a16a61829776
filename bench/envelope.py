"""Envelope benchmark (not a test): the server's sealing path against raw AES-GCM and two peers, same run.

  python bench/envelope.py [--rounds 9] [--round-s 0.06]

Ours is the path the server really uses: ingest takes a fresh DEK from the key
ring (cached account KEK, LocalKms root) and drains `seal_clip` over 1 MiB
plaintext chunks (one gRPC message each, as the client library sends them); fetch unwraps the DEK and drains
`open_clip` over the sealed object in the chunks the blob stores read it in. One op = ingest + fetch of one clip.

Against, over the same plaintext chunks:
  raw   AES-256-GCM (`cryptography`'s AESGCM) under one fixed key and nonce: each
        64 KiB of plaintext (our format's segment) encrypted, and a stored clip's 64 KiB segments decrypted (as
        ours opens a stored clip): the floor, no format at all;
  esdk  aws-encryption-sdk with its raw AES master key provider (no KMS call),
        its fastest configuration per size: each suite × frame length below is
        screened and the fastest kept (the committing suite is the one that
        matches ours; the others are shown for fairness);
  tink  Google Tink's streaming AEAD, key template AES256_GCM_HKDF_1MB, its
        fastest way per size: 64 KiB writes or one write × 64 KiB reads or one
        `read()`, screened like ESDK's.

Rounds of all contenders are interleaved (one short burst each, order rotated);
a ratio is ours ÷ the peer within each round, and each figure the median over
rounds, so a neighbour on a shared machine slows both sides of a ratio alike.
Each clip size runs in a fresh process (allocator state from 5 MiB rounds
cannot slow 32 KiB ones). Last, a 50 MiB clip is sealed and opened as a
stream while RSS is sampled.
"""

from __future__ import annotations

import argparse
import io
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aws_encryption_sdk  # noqa: E402
import psutil  # noqa: E402
import tink  # noqa: E402
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy, EncryptionKeyType, WrappingAlgorithm  # noqa: E402
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey  # noqa: E402
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from tink import streaming_aead  # noqa: E402

from clipstore.blobs.protocol import READ_CHUNK_BYTES  # noqa: E402
from clipstore.client._wire import AUDIO_CHUNK_BYTES  # noqa: E402
from clipstore.envelope import open_clip, seal_clip  # noqa: E402
from clipstore.store import Database  # noqa: E402
from clipstore.store.keys import KekRows, SqlKekStore  # noqa: E402
from kms import KeyRing, LocalKms  # noqa: E402

SIZES = {"32k": 32 * 1024, "320k": 320 * 1024, "5m": 5 * 1024 * 1024}
CHUNK_BYTES = 64 * 1024  # our format's segment: the raw floor's unit and the peers' stream writes
MESSAGE_BYTES = AUDIO_CHUNK_BYTES  # what the client library puts in one PutClip message
STREAM_BYTES = 50 * 1024 * 1024
ACCOUNT = "acct_bench"
# (suite, commitment policy) × frame length; frame 0 = ESDK's non-framed format.
ESDK_SUITES = {
    "commit": (Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY, CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT),
    "hkdf": (Algorithm.AES_256_GCM_IV12_TAG16_HKDF_SHA256, CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT),
    "nokdf": (Algorithm.AES_256_GCM_IV12_TAG16, CommitmentPolicy.FORBID_ENCRYPT_ALLOW_DECRYPT),
}
ESDK_FRAMES = [64 * 1024, 1024 * 1024, 0]

Op = Callable[[], None]


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


# -- contenders -----------------------------------------------------------------
def ours(ring: KeyRing, plaintext: bytes) -> Op:
    chunks = _chunks(plaintext, MESSAGE_BYTES)
    dek, stored = ring.data_key_for(ACCOUNT, "c_stored")  # a stored clip, fetched every op
    sealed = _chunks(b"".join(seal_clip(dek, chunks, clip_id="c_stored", account_ref=ACCOUNT)), READ_CHUNK_BYTES)
    counter = iter(range(10**12))

    def run() -> None:
        clip_id = f"c_{next(counter)}"
        dek, _ = ring.data_key_for(ACCOUNT, clip_id)
        pieces = list(seal_clip(dek, chunks, clip_id=clip_id, account_ref=ACCOUNT))
        dek2 = ring.unwrap(stored, account_ref=ACCOUNT, clip_id="c_stored")
        opened = sum(len(p) for p in open_clip(dek2, sealed, clip_id="c_stored", account_ref=ACCOUNT))
        assert pieces and opened == len(plaintext)

    return run


def raw_aes(plaintext: bytes) -> Op:
    chunks = _chunks(plaintext, CHUNK_BYTES)
    aead, nonce = AESGCM(secrets.token_bytes(32)), secrets.token_bytes(12)
    stored = [aead.encrypt(nonce, c, None) for c in chunks]  # like ours, fetch opens a stored clip

    def run() -> None:
        sealed = [aead.encrypt(nonce, c, None) for c in chunks]
        opened = sum(len(aead.decrypt(nonce, c, None)) for c in stored)
        assert sealed and opened == len(plaintext)

    return run


class _StaticRawKeys(RawMasterKeyProvider):  # type: ignore[misc]
    provider_id = "bench"

    def __init__(self, **kwargs: object) -> None:
        self._key = secrets.token_bytes(32)

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return WrappingKey(wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                           wrapping_key=self._key, wrapping_key_type=EncryptionKeyType.SYMMETRIC)


def esdk(plaintext: bytes, suite: str, frame: int) -> Op:
    algorithm, policy = ESDK_SUITES[suite]
    client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=policy)
    provider = _StaticRawKeys()
    provider.add_master_key(b"bench-key")
    context = {"clip_id": "c_bench", "account_ref": ACCOUNT}

    def run() -> None:
        ct, _ = client.encrypt(source=plaintext, key_provider=provider, encryption_context=context,
                               algorithm=algorithm, frame_length=frame)
        pt, _ = client.decrypt(source=ct, key_provider=provider)
        assert len(pt) == len(plaintext)

    return run


class _Sink(io.BytesIO):
    def close(self) -> None:  # Tink closes its destination; keep the bytes readable
        pass


def tink_streaming(plaintext: bytes, write_bytes: int, read_bytes: int) -> Op:
    """Tink's streaming AEAD; plaintext written `write_bytes` at a time, read back `read_bytes` at a time
    (-1: all in one call)."""
    streaming_aead.register()
    handle = tink.new_keyset_handle(streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB)
    primitive = handle.primitive(streaming_aead.StreamingAead)
    chunks = _chunks(plaintext, write_bytes)

    def run() -> None:
        sink = _Sink()
        with primitive.new_encrypting_stream(sink, ACCOUNT.encode()) as enc:
            for c in chunks:
                enc.write(c)
        opened = 0
        with primitive.new_decrypting_stream(io.BytesIO(sink.getvalue()), ACCOUNT.encode()) as dec:
            while piece := dec.read(read_bytes):
                opened += len(piece)
        assert opened == len(plaintext)

    return run


# -- measurement ----------------------------------------------------------------
def _burst(fn: Op, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def interleaved(contenders: dict[str, Op], rounds: int, round_s: float) -> dict[str, list[float]]:
    """Ops/s of each contender in each of `rounds` rounds; within a round each runs one burst, order rotated."""
    names = list(contenders)
    for fn in contenders.values():
        fn()  # warm up
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(_burst(contenders[name], round_s))
    return rates


def _fastest(configs: dict[str, Op], round_s: float) -> str:
    """The peer's fastest configuration at this size, from a short interleaved screening."""
    screened = interleaved(configs, 3, round_s / 2)
    return max(screened, key=lambda k: statistics.median(screened[k]))


def measure_size(size: int, rounds: int, round_s: float) -> dict[str, object]:
    plaintext = secrets.token_bytes(size)
    esdks = {f"{s}/{f // 1024}k": esdk(plaintext, s, f) for s in ESDK_SUITES for f in ESDK_FRAMES}
    tinks = {f"write {w // 1024}k/read {'all' if r < 0 else f'{r // 1024}k'}": tink_streaming(plaintext, w, r)
             for w in (CHUNK_BYTES, max(size, 1)) for r in (CHUNK_BYTES, -1)}
    esdk_config, tink_config = _fastest(esdks, round_s), _fastest(tinks, round_s)
    with tempfile.TemporaryDirectory() as tmp:
        rates = interleaved({"ours": ours(_ring(tmp), plaintext), "raw": raw_aes(plaintext),
                             "esdk": esdks[esdk_config], "tink": tinks[tink_config]}, rounds, round_s)
    # Ratios pair the bursts of one round (neighbours' load is shared), then take the median over rounds.
    return {"mib_s": {k: statistics.median(v) * size / (1 << 20) for k, v in rates.items()},
            "ours_vs": {k: statistics.median(o / p for o, p in zip(rates["ours"], v, strict=True))
                        for k, v in rates.items() if k != "ours"},
            "esdk": esdk_config, "tink": tink_config}


def stream_rss_growth_mib(ring: KeyRing) -> tuple[float, float]:
    """Seal then open 50 MiB chunk by chunk through a temp file; peak RSS growth and seconds."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    def chunks() -> Iterator[bytes]:
        block = secrets.token_bytes(CHUNK_BYTES)
        for _ in range(STREAM_BYTES // CHUNK_BYTES):
            yield block

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    dek, wrapped = ring.data_key_for(ACCOUNT, "c_stream")
    with tempfile.TemporaryFile() as fh:
        for piece in seal_clip(dek, chunks(), clip_id="c_stream", account_ref=ACCOUNT):
            fh.write(piece)
        fh.seek(0)
        total = 0
        dek2 = ring.unwrap(wrapped, account_ref=ACCOUNT, clip_id="c_stream")
        for piece in open_clip(dek2, iter(lambda: fh.read(READ_CHUNK_BYTES), b""), clip_id="c_stream",
                               account_ref=ACCOUNT):
            total += len(piece)
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert total == STREAM_BYTES
    return (peak[0] - base) / (1 << 20), elapsed


def _ring(tmp: str) -> KeyRing:
    db = Database(f"sqlite:///{tmp}/m.db")
    ring = KeyRing(LocalKms.from_file(Path(tmp) / "root.key"), SqlKekStore(db), now=time.time)
    first = ring.new_kek(ACCOUNT, 1)  # the account's first key, stored as AccountDirectory stores it
    with db.transaction() as conn:
        KekRows(conn).add(ACCOUNT, first.record, time.time())
    ring.stored(first)
    return ring


def _child(*argv: str) -> str:
    return subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--round-s", type=float, default=0.04, help="seconds per contender per round")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size:  # one clip size, in a fresh process
        print(json.dumps(measure_size(args.size, args.rounds, args.round_s)))
        return
    if args.stream_only:  # a fresh process, so earlier allocations do not hide growth
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(stream_rss_growth_mib(_ring(tmp))))
        return

    print(f"{'clip':>5} {'ours MiB/s':>10} {'raw AES':>8} {'ours/raw':>8} {'esdk':>8} {'ours/esdk':>9} "
          f"{'tink':>8} {'ours/tink':>9}  fastest esdk; tink")
    figures: dict[str, dict[str, float]] = {}
    for label, size in SIZES.items():
        result = json.loads(_child("--size", str(size), "--rounds", str(args.rounds), "--round-s",
                                   str(args.round_s)))
        mib, figures[label] = result["mib_s"], result["ours_vs"]
        f = figures[label]
        print(f"{label:>5} {mib['ours']:>10.0f} {mib['raw']:>8.0f} {f['raw']:>8.2f} {mib['esdk']:>8.0f} "
              f"{f['esdk']:>9.2f} {mib['tink']:>8.0f} {f['tink']:>9.2f}  {result['esdk']}; {result['tink']}")
    growth, seconds = json.loads(_child("--stream-only"))
    print(f"50 MiB stream seal+open: {seconds:.2f} s, {100 / seconds:.0f} MiB/s, "
          f"peak RSS growth {growth:.1f} MiB (goal < 32)")
    print("goals: ours/raw ≥ 0.70 at 5 MiB; ours/esdk ≥ 5 at every size; ours/tink > 1 at every size")
    print(f"envelope_rss_growth_mib={growth:.1f}")
    print(f"envelope_vs_raw_aes_5m={figures['5m']['raw']:.2f}")
    print(f"envelope_speedup_vs_esdk_min={min(f['esdk'] for f in figures.values()):.2f}")
    print(f"envelope_speedup_vs_tink_min={min(f['tink'] for f in figures.values()):.2f}")


if __name__ == "__main__":
    main()
