"""Streaming decode of a clip's plaintext into float32 blocks, and encode back to the same content type.

Memory stays bounded whatever the clip's length: the decoder holds one block
and a small window of the plaintext; the encoder hands out bytes as soon as a
chunk is full.

- audio/L16 (big-endian, RFC 2586) and audio/pcm (little-endian) are headerless
  16-bit PCM; the service stores no rate for them, so they are taken as
  `RAW_PCM_RATE_HZ` mono, and written back the same way (the bytes round-trip
  whatever the true rate; only a transform's idea of frequency shifts).
- audio/wav, audio/flac, audio/ogg and audio/opus are read by libsndfile (the
  soundfile wheels bundle it with FLAC, Vorbis and Opus) through a window over
  the plaintext stream. libsndfile reads an Ogg stream's last page when it opens
  it (to learn its length): the window then skips forward, and a backward seek
  past it re-opens the plaintext stream (`open_plaintext` is a factory), so an
  Ogg clip is decrypted twice, never held whole. WAV is written here (a header
  whose sizes are known up front), FLAC and Ogg by libsndfile into a
  forward-only sink: its closing header fix-ups (FLAC's MD5 and frame sizes,
  optional by the FLAC spec) are dropped once those bytes have left, and the
  total sample count is patched in before they leave.
- Opus at 48 kHz is decoded by FFmpeg (PyAV) once libsndfile has opened and
  checked it: 2-2.4x less CPU, though FFmpeg opens the stream anew and reads its
  last page too, so such a clip is decrypted three times (AES-GCM at GB/s: well
  under a millisecond per 10 s clip). Opus is written by libopus through PyAV.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import soundfile

from clipstore.audio.errors import AudioTooLong, UnsupportedAudio

RAW_PCM_RATE_HZ = 16000
BLOCK_S = 0.5  # frames per decoded block, in seconds: bounds memory and keeps the vocoder's overlap small
OUT_CHUNK_BYTES = 64 * 1024  # what one FetchClip message carries
SOURCE_WINDOW_BYTES = 1 << 20  # how far back libsndfile may seek without re-opening the plaintext
MAX_REOPENS = 2  # an Ogg clip needs one (its last page); more means a pathological seek pattern
MAX_CHANNELS = 8
MAX_RATE_HZ = 384_000  # a header's claimed rate sizes every block (BLOCK_S of it): 2**31 Hz would ask for gigabytes
# Opus is written by libopus through PyAV (its wheels bundle FFmpeg with libopus), not libsndfile: libsndfile
# sets no encoder complexity and its Opus writer cost 150-250 ms per 10 s here, libopus at complexity 5 about
# 20-35 ms (docs/voice-disguise.md, bench/audio.py). Complexity 0-10 trades CPU for quality at a bitrate.
OPUS_COMPLEXITY = 5
FFMPEG_OPUS_RATE_HZ = 48_000  # the one rate FFmpeg decodes Opus at: such clips are decoded by it (below)
OPUS_RATES = frozenset({8000, 12000, 16000, 24000, 48000})  # what libopus takes, and all libsndfile decodes to
OPUS_BITRATE_PER_CHANNEL = (24_000, 128_000)  # the source's own bitrate, held within this range (bits/s)
_OPUS_LAYOUTS = ("mono", "stereo", "3.0", "quad", "5.0", "5.1", "6.1", "7.1")  # Vorbis channel order, RFC 7845

# Decode bombs: a few KB of FLAC or Ogg can decode to hours of audio (FLAC's constant subframes, up to 65535
# frames each; Ogg pages of tiny packets) and the fetch pays CPU per decoded sample. A clip may decode to at
# most its declared duration x DURATION_SLACK + DURATION_GRACE_S (when it declared one: duration_ms > 0), and
# never to more frames, nor samples (frames x channels), per stored byte than below. The ratios sit above what
# libsndfile writes for pure digital silence, the most compressible real clip (30-60 s, 8-48 kHz, 1-8
# channels): FLAC 346 frames and 995 samples per byte, Vorbis 217 and 1434, Opus 187 and 375, WAV GSM 6.10 4.9.
DURATION_SLACK = 1.25
DURATION_GRACE_S = 1.0
MAX_FRAMES_PER_BYTE: dict[str, int] = {"WAV": 8, "FLAC": 512, "OGG": 512}
MAX_SAMPLES_PER_BYTE: dict[str, int] = {"WAV": 8, "FLAC": 1536, "OGG": 2048}

RAW_TYPES: dict[str, str] = {"audio/L16": ">i2", "audio/pcm": "<i2"}
SNDFILE_TYPES: dict[str, str] = {"audio/wav": "WAV", "audio/flac": "FLAC", "audio/ogg": "OGG", "audio/opus": "OGG"}
CONTENT_TYPES = frozenset({*RAW_TYPES, *SNDFILE_TYPES})  # what FetchClip can decode and re-encode

# libsndfile subtypes written back as they came; any other WAV subtype (u-law, ADPCM…) is written as PCM_16
_WAV_SUBTYPES: dict[str, tuple[int, int, str]] = {  # subtype -> (WAVE format tag, bits, numpy dtype)
    "PCM_16": (1, 16, "<i2"),
    "PCM_24": (1, 24, "<i3"),
    "PCM_32": (1, 32, "<i4"),
    "FLOAT": (3, 32, "<f4"),
    "DOUBLE": (3, 64, "<f8"),
}
_FULL_SCALE = {"<i2": 32767.0, ">i2": 32767.0, "<i4": 2147483647.0}


@dataclass(frozen=True, kw_only=True)
class AudioFormat:
    rate: int
    channels: int
    subtype: str  # libsndfile's name: PCM_16, VORBIS, OPUS…; RAW for headerless PCM
    container: str  # WAV, FLAC, OGG, or the numpy dtype of headerless PCM (">i2", "<i2")
    bitrate: int | None = None  # bits/s of the stored clip, container included, when its length is known


@dataclass
class Decoded:
    """An open clip: its format, its length in frames if the container says, and its blocks (once)."""

    format: AudioFormat
    frames: int | None
    blocks: Iterator[np.ndarray]


def block_frames(rate: int) -> int:
    return max(1, int(rate * BLOCK_S))


# -- decode ------------------------------------------------------------------------------------------------
def frame_limit(container: str, rate: int, channels: int, *, size_bytes: int, declared_ms: int) -> int:
    """The most frames a stored clip may decode to: by its size, and by its declared duration if it has one."""
    size = max(0, size_bytes)
    limit = min(size * MAX_FRAMES_PER_BYTE[container], size * MAX_SAMPLES_PER_BYTE[container] // channels)
    if declared_ms > 0:
        limit = min(limit, int((declared_ms / 1000 * DURATION_SLACK + DURATION_GRACE_S) * rate))
    return limit


def decode(content_type: str, open_plaintext: Callable[[], Iterator[bytes]], *, size_bytes: int,
           declared_ms: int = 0) -> Decoded:
    """Open a clip's plaintext as `content_type`; `UnsupportedAudio` if it is none of `CONTENT_TYPES` or
    does not decode, `AudioTooLong` (when opened, or as its blocks are read) if it decodes to more than
    `frame_limit` allows. `open_plaintext` returns the plaintext stream from its start, each time it is called.
    Headerless PCM is one frame per two stored bytes: no limit needed."""
    if content_type in RAW_TYPES:
        return _decode_raw(RAW_TYPES[content_type], open_plaintext())
    if content_type not in SNDFILE_TYPES:
        raise UnsupportedAudio(f"{content_type} is not decoded at the fetch boundary")
    source = _WindowSource(open_plaintext, size_bytes)
    try:
        sound = soundfile.SoundFile(source, "r")
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:  # RuntimeError: old soundfile
        source.close()
        source.reraise()
        raise UnsupportedAudio(f"the clip does not decode as {content_type}") from exc
    try:
        source.reraise()
    except BaseException:
        sound.close()
        source.close()
        raise
    if sound.format != SNDFILE_TYPES[content_type] or not 0 < sound.channels <= MAX_CHANNELS:
        sound.close()
        source.close()
        raise UnsupportedAudio(f"the clip holds {sound.format}/{sound.subtype}, not {content_type}")
    if not 0 < sound.samplerate <= MAX_RATE_HZ:
        sound.close()
        source.close()
        raise UnsupportedAudio(f"the clip's header claims {sound.samplerate} Hz; at most {MAX_RATE_HZ} Hz is decoded")
    limit = frame_limit(sound.format, sound.samplerate, sound.channels, size_bytes=size_bytes,
                        declared_ms=declared_ms)
    frames = sound.frames if 0 < sound.frames < (1 << 62) else None
    if frames is not None and frames > limit:
        sound.close()
        source.close()
        raise AudioTooLong(_too_long(frames, limit, sound.samplerate, size_bytes, declared_ms))
    bitrate = size_bytes * 8 * sound.samplerate // frames if frames else None
    fmt = AudioFormat(rate=sound.samplerate, channels=sound.channels, subtype=sound.subtype, container=sound.format,
                      bitrate=bitrate)
    if fmt.subtype == "OPUS" and fmt.rate == FFMPEG_OPUS_RATE_HZ:
        sound.close()
        source.close()
        blocks = _ffmpeg_opus_blocks(open_plaintext, fmt, limit, size_bytes, declared_ms)
    else:
        blocks = _sndfile_blocks(sound, source, limit, size_bytes, declared_ms)
    return Decoded(format=fmt, frames=frames, blocks=blocks)


def _too_long(frames: int | None, limit: int, rate: int, size_bytes: int, declared_ms: int) -> str:
    """Why: what the header states (`frames`) or that decoding passed the limit (`frames` None); formats only."""
    told = f"duration_ms={declared_ms} and " if declared_ms > 0 else ""
    what = f"states {frames / rate:.1f} s" if frames is not None else f"decodes to more than {limit / rate:.1f} s"
    return f"the clip {what} at {rate} Hz; its {told}{size_bytes} stored bytes allow at most {limit / rate:.1f} s"


def _sndfile_blocks(sound: soundfile.SoundFile, source: _WindowSource, limit: int, size_bytes: int,
                    declared_ms: int) -> Iterator[np.ndarray]:
    size = block_frames(sound.samplerate)
    read = 0
    try:
        while True:
            try:
                block = sound.read(min(size, limit - read + 1), dtype="float32", always_2d=True)
            except (soundfile.LibsndfileError, RuntimeError) as exc:
                source.reraise()
                raise UnsupportedAudio("the clip's audio data is damaged") from exc
            source.reraise()  # a stream that failed looks like the end of the file to libsndfile
            if not len(block):
                return
            read += len(block)
            if read > limit:
                raise AudioTooLong(_too_long(None, limit, sound.samplerate, size_bytes, declared_ms))
            yield block
    finally:
        sound.close()
        source.close()


def _ffmpeg_opus_blocks(open_plaintext: Callable[[], Iterator[bytes]], fmt: AudioFormat, limit: int, size_bytes: int,
                        declared_ms: int) -> Iterator[np.ndarray]:
    """An Ogg Opus clip at 48 kHz decoded by FFmpeg (PyAV), 2-2.4x less CPU than libsndfile here (10 s of
    48 kHz speech: mono 67 -> 31 ms, stereo 110 -> 46). libsndfile has opened and checked it (format,
    channels, rate, stated length); FFmpeg must find the same stream, and is held to the same frame limit.
    Only at 48 kHz: FFmpeg always decodes Opus at 48 kHz, libsndfile at the rate the clip was made from."""
    import av  # the audio extra

    source = _WindowSource(open_plaintext, size_bytes)
    size, read, held = block_frames(fmt.rate), 0, 0  # frames: a block's, decoded so far, held back
    pending: list[np.ndarray] = []
    try:
        try:
            container = av.open(source, mode="r", format="ogg")
        except (av.FFmpegError, OSError) as exc:
            source.reraise()
            raise UnsupportedAudio("the clip does not decode as Ogg Opus") from exc
        with container:
            streams = container.streams.audio
            if len(streams) != 1 or streams[0].codec_context.name != "opus" or \
                    streams[0].codec_context.channels != fmt.channels or streams[0].rate != fmt.rate:
                raise UnsupportedAudio("the clip's Opus stream is not the one its header describes")
            try:
                for frame in container.decode(streams[0]):
                    samples = frame.to_ndarray()  # planar float32: (channels, n)
                    if samples.dtype != np.float32 or samples.shape[0] != fmt.channels:
                        raise UnsupportedAudio("the clip's Opus stream changed its format")
                    read += samples.shape[1]
                    if read > limit:
                        raise AudioTooLong(_too_long(None, limit, fmt.rate, size_bytes, declared_ms))
                    pending.append(samples)
                    held += samples.shape[1]
                    if held >= size:  # blocks of `size` frames, as libsndfile's are
                        joined = np.concatenate(pending, axis=1)
                        for start in range(0, held - size + 1, size):
                            yield np.ascontiguousarray(joined[:, start:start + size].T)
                        pending, held = [joined[:, held - held % size:]], held % size
            except (av.FFmpegError, OSError) as exc:
                source.reraise()
                raise UnsupportedAudio("the clip's audio data is damaged") from exc
        source.reraise()
        if held:
            yield np.ascontiguousarray(np.concatenate(pending, axis=1).T)
    finally:
        source.close()


def _decode_raw(dtype: str, plaintext: Iterator[bytes]) -> Decoded:
    fmt = AudioFormat(rate=RAW_PCM_RATE_HZ, channels=1, subtype="PCM_16", container=dtype)
    return Decoded(format=fmt, frames=None, blocks=_raw_blocks(np.dtype(dtype), plaintext, block_frames(fmt.rate)))


def _raw_blocks(dtype: np.dtype[Any], plaintext: Iterator[bytes], frames: int) -> Iterator[np.ndarray]:
    want = frames * dtype.itemsize
    pending = bytearray()
    for chunk in plaintext:
        pending += chunk
        while len(pending) >= want:
            yield _pcm_to_float(bytes(pending[:want]), dtype)
            del pending[:want]
    whole = len(pending) - len(pending) % dtype.itemsize  # a trailing odd byte is no sample: dropped
    if whole:
        yield _pcm_to_float(bytes(pending[:whole]), dtype)


def _pcm_to_float(data: bytes, dtype: np.dtype[Any]) -> np.ndarray:
    return (np.frombuffer(data, dtype=dtype).astype(np.float32) / np.float32(32768.0)).reshape(-1, 1)


class _WindowSource(io.RawIOBase):
    """A read-only, seekable view of the plaintext stream that keeps only the last
    `SOURCE_WINDOW_BYTES`: forward seeks skip, a backward seek past the window re-opens the stream."""

    def __init__(self, open_plaintext: Callable[[], Iterator[bytes]], size_bytes: int) -> None:
        super().__init__()
        self._open, self._size = open_plaintext, size_bytes
        self._stream: Iterator[bytes] = iter(())
        self._window = bytearray()
        self._window_start = 0  # stream offset of self._window[0]
        self._pos = 0
        self._opens = 0
        self._failure: Exception | None = None
        self._reopen()

    def _reopen(self) -> None:
        if self._opens > MAX_REOPENS:
            raise OSError("libsndfile seeks back too often; refusing to decrypt the clip again")
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._stream, self._window, self._window_start = self._open(), bytearray(), 0
        self._opens += 1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def reraise(self) -> None:
        """Raise what the plaintext stream raised, if it failed; the decode paths call this after each
        decoder call. The decoders read through callbacks that do not pass an exception on (libsndfile's
        cffi callback prints it as unraisable, a traceback outside the JSON log, and reads 0 bytes), so
        a failure reads as the end of the file (`read`) and is raised here: a clip that fails its
        integrity check would otherwise be served cut short, or called undecodable."""
        if self._failure is not None:
            raise self._failure

    def _fill_to(self, end: int) -> None:
        while self._window_start + len(self._window) < end:
            try:
                chunk = next(self._stream, None)
            except Exception as exc:
                self._failure = exc
                return
            if chunk is None:
                return
            self._window += chunk
            # keep the window's size, but never drop what the read in progress needs
            excess = min(len(self._window) - SOURCE_WINDOW_BYTES, self._pos - self._window_start)
            if excess > 0:
                del self._window[:excess]
                self._window_start += excess

    def read(self, size: int = -1) -> bytes:
        if self._failure is not None:  # a failed stream stays failed: not read on, nor opened (decrypted) again
            return b""
        if size < 0:
            size = max(0, self._size - self._pos)
        if self._pos < self._window_start:
            self._reopen()
        if size > SOURCE_WINDOW_BYTES // 2:
            size = SOURCE_WINDOW_BYTES // 2  # a short read is allowed; keeps the window's promise
        self._fill_to(self._pos + size)
        if self._failure is not None:
            return b""
        start = self._pos - self._window_start
        data = bytes(self._window[start:start + size]) if start >= 0 else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()
        self._window = bytearray()
        super().close()


# -- encode ------------------------------------------------------------------------------------------------
def encode(fmt: AudioFormat, blocks: Iterable[np.ndarray], *, frames: int | None) -> Iterator[bytes]:
    """`blocks` (float32, (n, fmt.channels)) as bytes of the format they were decoded from, in chunks of
    at most `OUT_CHUNK_BYTES`. `frames` is the total to announce in the header, if known."""
    if fmt.container in (">i2", "<i2"):
        return _chunked(_pcm_bytes(b, fmt.container) for b in blocks)
    if fmt.container == "WAV":
        return _encode_wav(fmt, blocks, frames)
    if fmt.container == "OGG" and fmt.subtype == "OPUS":
        return _chunked(_encode_opus(fmt, blocks))
    if fmt.container in ("FLAC", "OGG"):
        return _chunked(_encode_sndfile(fmt, blocks, frames))
    raise UnsupportedAudio(f"cannot write {fmt.container}")


def _pcm_bytes(block: np.ndarray, dtype: str) -> bytes:
    if dtype == "<i3":  # 24-bit: the low three bytes of each little-endian int32
        wide = np.clip(np.rint(block * 8388607.0), -8388608, 8388607).astype("<i4")
        return wide.reshape(-1).view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    scale = _FULL_SCALE.get(dtype)
    if scale is None:
        return np.ascontiguousarray(block, dtype=dtype).tobytes()
    return np.clip(np.rint(block * scale), -scale - 1, scale).astype(dtype).tobytes()


def _chunked(parts: Iterable[bytes]) -> Iterator[bytes]:
    pending = bytearray()
    for part in parts:
        pending += part
        while len(pending) >= OUT_CHUNK_BYTES:
            yield bytes(pending[:OUT_CHUNK_BYTES])
            del pending[:OUT_CHUNK_BYTES]
    if pending:
        yield bytes(pending)


def wav_header(*, rate: int, channels: int, subtype: str, frames: int | None) -> bytes:
    """A canonical 44-byte RIFF/WAVE header; unknown length is 0xFFFFFFFF, as streaming writers do."""
    tag, bits, _ = _WAV_SUBTYPES[subtype]
    block_align = channels * bits // 8
    data = frames * block_align if frames is not None else None
    data_size = data if data is not None and data + 36 < 1 << 32 else 0xFFFFFFFF
    riff_size = data_size + 36 if data_size != 0xFFFFFFFF else 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, tag, channels, rate, rate * block_align, block_align, bits)
            + b"data" + struct.pack("<I", data_size))


def _encode_wav(fmt: AudioFormat, blocks: Iterable[np.ndarray], frames: int | None) -> Iterator[bytes]:
    subtype = fmt.subtype if fmt.subtype in _WAV_SUBTYPES else "PCM_16"
    dtype = _WAV_SUBTYPES[subtype][2]
    header = wav_header(rate=fmt.rate, channels=fmt.channels, subtype=subtype, frames=frames)
    return _chunked(_prepend(header, (_pcm_bytes(b, dtype) for b in blocks)))


def _prepend(first: bytes, rest: Iterable[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


class _ForwardSink(io.RawIOBase):
    """A write-only file for libsndfile whose bytes leave in order: a write behind what has left
    (a closing header fix-up) is dropped; `patch` may still change bytes that have not left."""

    def __init__(self) -> None:
        super().__init__()
        self.pending = bytearray()
        self.sent = 0  # stream offset of pending[0]
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True  # libsndfile probes; nothing is ever read back

    def read(self, size: int = -1) -> bytes:
        return b""

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.sent + len(self.pending)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def write(self, data: Any) -> int:
        data = bytes(data)
        written = len(data)
        start = self._pos - self.sent
        if start < 0:  # already left: a header fix-up at close, dropped
            data, start = data[-start:], 0
        end = start + len(data)
        if end > len(self.pending):
            self.pending.extend(bytes(end - len(self.pending)))
        self.pending[start:end] = data
        self._pos = self.sent + end
        return written

    def take(self, at_least: int) -> bytes:
        """The pending bytes before the write position, if there are `at_least` of them."""
        ready = self._pos - self.sent
        if ready < at_least or ready <= 0:
            return b""
        out = bytes(self.pending[:ready])
        del self.pending[:ready]
        self.sent += ready
        return out


def _flac_total_samples(head: bytearray, frames: int) -> None:
    """Write the total sample count into STREAMINFO (36 bits at byte 21.4), as libsndfile would at close."""
    if head[:4] != b"fLaC" or len(head) < 26 or not 0 <= frames < 1 << 36:
        return
    word = int.from_bytes(head[18:26], "big")
    word = (word & ~((1 << 36) - 1)) | frames
    head[18:26] = word.to_bytes(8, "big")


def _encode_sndfile(fmt: AudioFormat, blocks: Iterable[np.ndarray], frames: int | None) -> Iterator[bytes]:
    sink = _ForwardSink()
    first = True
    try:
        sound = soundfile.SoundFile(sink, "w", samplerate=fmt.rate, channels=fmt.channels, subtype=fmt.subtype,
                                    format=fmt.container)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as exc:
        raise UnsupportedAudio(f"cannot write {fmt.container}/{fmt.subtype}") from exc
    try:  # libsndfile refuses some formats only at the first write (FLAC at 65536 Hz: not in a frame header)
        with sound:
            for block in blocks:
                sound.write(block)
                if first and frames is not None and fmt.container == "FLAC" and len(sink.pending) >= 26:
                    _flac_total_samples(sink.pending, frames)
                data = sink.take(OUT_CHUNK_BYTES)
                if data:
                    first = False
                    yield data
    except (soundfile.LibsndfileError, RuntimeError) as exc:
        raise UnsupportedAudio(f"cannot write {fmt.container}/{fmt.subtype} at {fmt.rate} Hz") from exc
    if first and frames is not None and fmt.container == "FLAC":
        _flac_total_samples(sink.pending, frames)
    yield bytes(sink.pending)


def _encode_opus(fmt: AudioFormat, blocks: Iterable[np.ndarray]) -> Iterator[bytes]:
    """Ogg Opus (RFC 7845) by libopus at `OPUS_COMPLEXITY`, through PyAV, streamed out of a forward-only sink.
    The stream's pre-skip and final granule position make a decoder return exactly the frames given."""
    import av  # the audio extra; only Opus needs it

    if fmt.rate not in OPUS_RATES or not 0 < fmt.channels <= len(_OPUS_LAYOUTS):
        raise UnsupportedAudio(f"cannot write Opus at {fmt.rate} Hz with {fmt.channels} channels")
    low, high = OPUS_BITRATE_PER_CHANNEL
    bitrate = min(max(fmt.bitrate or high, low * fmt.channels), high * fmt.channels)
    sink = _ForwardSink()
    try:
        container = av.open(sink, mode="w", format="ogg")
        stream = container.add_stream("libopus", rate=fmt.rate, layout=_OPUS_LAYOUTS[fmt.channels - 1])
    except av.FFmpegError as exc:
        raise UnsupportedAudio("cannot write Opus") from exc
    context = stream.codec_context
    context.format = "flt"
    context.bit_rate = bitrate
    context.options = {"compression_level": str(OPUS_COMPLEXITY)}  # FFmpeg's name for OPUS_SET_COMPLEXITY
    layout, offset = stream.layout, 0
    try:
        with container:
            for block in blocks:
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block, np.float32).reshape(1, -1),
                                                   format="flt", layout=layout)
                frame.sample_rate, frame.pts = fmt.rate, offset
                offset += len(block)
                container.mux(stream.encode(frame))
                yield sink.take(1)
            container.mux(stream.encode(None))
    except av.FFmpegError as exc:
        raise UnsupportedAudio("cannot write Opus") from exc
    yield bytes(sink.pending)
