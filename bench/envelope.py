"""Envelope benchmark (not a test): our seal+open against aws-encryption-sdk, same run.

  python bench/envelope.py [--seconds 2]

Ours: the one-shot API (`seal_bytes`/`open_bytes`, a clip in memory, as the
peer's encrypt/decrypt take one); the streaming generators are shown beside it.
Peer: aws-encryption-sdk with its raw AES master key provider (the keyring API
needs aws-cryptographic-material-providers, which is not installed), suite
AES_256_GCM_HKDF_SHA512_COMMIT_KEY (key commitment, no signature, like ours)
and 64 KiB frames (like our segments). Ours: a fresh DEK from the key ring
(cached account KEK, LocalKms root), seal, unwrap, open. Then a 50 MiB clip
is sealed and opened as a stream while RSS is sampled. Every measurement runs
in a fresh process, so allocator state one side leaves cannot slow the other.
"""

from __future__ import annotations

import argparse
import secrets
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
from aws_encryption_sdk.identifiers import Algorithm, CommitmentPolicy, EncryptionKeyType, WrappingAlgorithm  # noqa: E402
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey  # noqa: E402
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider  # noqa: E402

from clipstore.envelope import SEGMENT_SIZE_BYTES, open_bytes, open_clip, seal_bytes, seal_clip  # noqa: E402
from clipstore.store import Database  # noqa: E402
from clipstore.store.keys import SqlKekStore  # noqa: E402
from kms import KeyRing, LocalKms  # noqa: E402

SIZES = [32 * 1024, 320 * 1024, 5 * 1024 * 1024]
STREAM_BYTES = 50 * 1024 * 1024
CHUNK_BYTES = 64 * 1024  # what a gRPC stream delivers per message


class _StaticRawKeys(RawMasterKeyProvider):  # type: ignore[misc]
    provider_id = "bench"

    def __init__(self, **kwargs: object) -> None:
        self._key = secrets.token_bytes(32)

    def _get_raw_key(self, key_id: bytes) -> WrappingKey:
        return WrappingKey(wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                           wrapping_key=self._key, wrapping_key_type=EncryptionKeyType.SYMMETRIC)


def _rate(fn: Callable[[], None], seconds: float, rounds: int = 5) -> float:
    """Best of `rounds` timed rounds (as timeit does): other tenants of a shared machine only slow a run."""
    fn()  # warm up
    best = 0.0
    for _ in range(rounds):
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            fn()
            n += 1
        best = max(best, n / (time.perf_counter() - start))
    return best


def esdk_round_trip(size: int) -> Callable[[], None]:
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
    provider = _StaticRawKeys()
    provider.add_master_key(b"bench-key")
    plaintext = secrets.token_bytes(size)
    context = {"clip_id": "c_bench", "account_ref": "acct_bench"}

    def run() -> None:
        ct, _ = client.encrypt(source=plaintext, key_provider=provider, encryption_context=context,
                               algorithm=Algorithm.AES_256_GCM_HKDF_SHA512_COMMIT_KEY,
                               frame_length=SEGMENT_SIZE_BYTES)
        pt, _ = client.decrypt(source=ct, key_provider=provider)
        assert len(pt) == size

    return run


def ours_round_trip(ring: KeyRing, size: int, *, streaming: bool) -> Callable[[], None]:
    """A fresh DEK from the key ring, seal, unwrap, open: one-shot (in-memory clip, like the
    peer's encrypt/decrypt) or through the streaming generators the server uses."""
    plaintext = secrets.token_bytes(size)
    counter = iter(range(10**12))

    def run() -> None:
        clip_id = f"c_{next(counter)}"
        dek, wrapped = ring.data_key_for("acct_bench", clip_id)
        if streaming:
            ct: bytes | bytearray = b"".join(seal_clip(dek, [plaintext], clip_id=clip_id, account_ref="acct_bench"))
        else:
            ct = seal_bytes(dek, plaintext, clip_id=clip_id, account_ref="acct_bench")
        dek2 = ring.unwrap(wrapped, account_ref="acct_bench", clip_id=clip_id)
        if streaming:
            pt: bytes | bytearray = b"".join(open_clip(dek2, [ct], clip_id=clip_id, account_ref="acct_bench"))
        else:
            pt = open_bytes(dek2, ct, clip_id=clip_id, account_ref="acct_bench")
        assert len(pt) == size

    return run


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
    dek, wrapped = ring.data_key_for("acct_bench", "c_stream")
    with tempfile.TemporaryFile() as fh:
        for piece in seal_clip(dek, chunks(), clip_id="c_stream", account_ref="acct_bench"):
            fh.write(piece)
        fh.seek(0)
        total = 0
        dek2 = ring.unwrap(wrapped, account_ref="acct_bench", clip_id="c_stream")
        for piece in open_clip(dek2, iter(lambda: fh.read(CHUNK_BYTES), b""), clip_id="c_stream",
                               account_ref="acct_bench"):
            total += len(piece)
    elapsed = time.perf_counter() - start
    stop.set()
    sampler.join()
    assert total == STREAM_BYTES
    return (peak[0] - base) / (1 << 20), elapsed


def _ring(tmp: str) -> KeyRing:
    ring = KeyRing(LocalKms.from_file(Path(tmp) / "root.key"), SqlKekStore(Database(f"sqlite:///{tmp}/m.db")),
                   now=time.time)
    ring.create_account("acct_bench")
    return ring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", choices=["ours", "streamed", "esdk"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # one measurement in a fresh process: allocator state left by one side cannot slow the other
        with tempfile.TemporaryDirectory() as tmp:
            fn = esdk_round_trip(args.size) if args.one == "esdk" else \
                ours_round_trip(_ring(tmp), args.size, streaming=args.one == "streamed")
            print(f"{_rate(fn, args.seconds):.3f}")
        return
    if args.stream_only:  # a fresh process, so earlier allocations do not hide growth
        with tempfile.TemporaryDirectory() as tmp:
            growth, seconds = stream_rss_growth_mib(_ring(tmp))
        print(f"{growth:.2f} {seconds:.3f}")
        return
    def measure(one: str, size: int) -> float:
        out = subprocess.run([sys.executable, __file__, "--one", one, "--size", str(size), "--seconds",
                              str(args.seconds)], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    print(f"{'clip size':>10} {'ours ops/s':>12} {'streamed':>10} {'esdk ops/s':>12} {'speedup':>8}")
    speedups = []
    for size in SIZES:
        ours, streamed, esdk = measure("ours", size), measure("streamed", size), measure("esdk", size)
        speedups.append(ours / esdk)
        print(f"{size // 1024:>8}Ki {ours:>12.1f} {streamed:>10.1f} {esdk:>12.1f} {ours / esdk:>8.2f}")
    out = subprocess.run([sys.executable, __file__, "--stream-only"], capture_output=True, text=True,
                         check=True).stdout.split()
    growth, seconds = float(out[0]), float(out[1])
    print(f"50 MiB stream seal+open: {seconds:.2f} s, {100 / seconds:.0f} MiB/s, "
          f"peak RSS growth {growth:.1f} MiB (goal < 32)")
    print(f"envelope_rss_growth_mib={growth:.1f}")
    print(f"envelope_speedup_vs_esdk_min={min(speedups):.2f}")


if __name__ == "__main__":
    main()
