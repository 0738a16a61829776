"""A leaked copy names its fetch: FetchClip watermarks, IdentifyLeak (and the CLI) traces it back, audited.

End to end over gRPC on loopback: a reviewer fetches a real WAV clip, the copy is
trimmed, re-encoded and noised, and a safety or auditor caller learns the grant,
the reviewer's pseudonym, the time and the clip."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

from clipstore.app import WATERMARK_KEY_NAME  # noqa: E402
from clipstore.audio import watermark as wm  # noqa: E402
from clipstore.config import Config, ConfigError  # noqa: E402
from clipstore.server import running_server  # noqa: E402
from clipstore.servicers import safety as safety_servicer  # noqa: E402
from clipstore.store.service_keys import load_or_create_service_key  # noqa: E402
from clipstore.v1 import safety_pb2  # noqa: E402
from tests.audio_speech import encoded, speech  # noqa: E402
from tests.clip_helpers import metadata, put_requests  # noqa: E402
from tests.conftest import FakeClock, bearer, make_config, new_key  # noqa: E402
from tests.grpc_helpers import error_info  # noqa: E402
from tests.test_remote_cli import Cli  # noqa: E402
from tests.test_review import Reviewer, World  # noqa: E402

RATE = 16000
CLIP = encoded(speech("a", 8.0, seed=11), RATE, "audio/wav")


def _config(tmp_path: Path, database_url: str | None, watermark: str) -> Config:
    return make_config(tmp_path / "data", database_url=database_url,
                       **{"review.sample_rate": 1.0, "review.watermark": watermark})


@pytest.fixture
def w(tmp_path: Path, database_url: str | None, log_stream: io.StringIO) -> Iterator[World]:
    clock = FakeClock()
    with running_server(_config(tmp_path, database_url, "on"), clock=clock) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield World(server, channel, clock)


def _fetched(w: World) -> tuple[Reviewer, str, bytes]:
    """A reviewer fetches the WAV clip; returns (reviewer, grant id, the bytes they received)."""
    w.opt_in()
    w.clips.PutClip(put_requests(metadata(content_type="audio/wav", duration_ms=8000), CLIP), metadata=w.ingest,
                    timeout=30)
    r = w.enroll()
    token = w.session(r)
    assignment = w.next(r, token)
    grant = w.grant(r, token, assignment.assignment_id)
    _, audio = w.fetch(r, token, grant.grant, grant.review_clip_id)
    with w.server.app.db.read() as conn:
        grant_id = conn.exec_driver_sql("SELECT grant_id FROM grants").scalar_one()
    return r, grant_id, audio


def _leaked(audio: bytes) -> bytes:
    """What a leaker might post: a second cut from each end, quieter, Ogg Vorbis, with a little hiss."""
    samples, rate = soundfile.read(io.BytesIO(audio), dtype="float32", always_2d=True)
    cut = samples[rate:-rate] * 0.5
    cut = cut + np.random.default_rng(0).normal(0, np.sqrt(np.mean(cut ** 2) / 100), cut.shape).astype(np.float32)
    out = io.BytesIO()
    soundfile.write(out, cut, rate, format="OGG", subtype="VORBIS")
    return out.getvalue()


def _identify(w: World, data: bytes, md: tuple[tuple[str, str], ...]) -> safety_pb2.IdentifyLeakResponse:
    chunks = (safety_pb2.IdentifyLeakRequest(audio_chunk=data[i:i + 65536]) for i in range(0, len(data), 65536))
    return w.safety.IdentifyLeak(chunks, metadata=md, timeout=60)


def _denied(w: World, data: bytes, code: grpc.StatusCode, reason: str) -> dict[str, Any]:
    with pytest.raises(grpc.RpcError) as caught:
        _identify(w, data, w.safety_md)
    assert (caught.value.code(), error_info(caught.value).reason) == (code, reason), caught.value.details()
    last: dict[str, Any] = [e for e in w.entries() if e["action"] == "forensics.identify"][-1]
    assert last["outcome"]["result"] == "denied" and last["outcome"]["reason"] == reason
    return last


def test_a_leaked_copy_names_grant_reviewer_time_and_clip_and_the_request_is_audited(w: World) -> None:
    r, grant_id, audio = _fetched(w)
    assert audio[:4] == b"RIFF" and audio != CLIP  # still a WAV, and marked
    [fetch] = [e for e in w.entries() if e["action"] == "clip.fetch"]
    watermark_id = fetch["outcome"]["watermark"]
    assert watermark_id.startswith("wm_")

    found = _identify(w, _leaked(audio), w.safety_md)
    assert (found.watermark_id, found.grant_id, found.reviewer_id) == (watermark_id, grant_id, r.id)
    assert found.clip_id == fetch["target"]["clip_id"] and found.review_clip_id.startswith("rc_")
    assert found.fetched_at.seconds == int(w.clock.now())  # the fake clock stood still since the fetch
    assert 0.5 < found.confidence <= 1.0

    [entry] = [e for e in w.entries() if e["action"] == "forensics.identify"]
    assert entry["actor"]["role"] == "safety" and entry["outcome"]["result"] == "ok"
    assert entry["outcome"]["watermark"] == watermark_id and entry["target"]["clip_id"] == found.clip_id
    assert entry["target"]["principal_id"] == r.id


def test_an_auditor_may_identify_a_reviewer_may_not(w: World) -> None:
    _, grant_id, audio = _fetched(w)
    auditor = bearer(new_key(w.server.app, "auditor", "aud"))
    assert _identify(w, audio, auditor).grant_id == grant_id
    reviewer = bearer(new_key(w.server.app, "reviewer", "nosy"))
    with pytest.raises(grpc.RpcError) as caught:
        _identify(w, audio, reviewer)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_unmarked_audio_is_not_found_and_audited(w: World) -> None:
    entry = _denied(w, CLIP, grpc.StatusCode.NOT_FOUND, "WATERMARK_NOT_FOUND")
    assert entry["actor"]["role"] == "safety"


def test_a_file_that_is_not_audio_is_refused_and_audited(w: World) -> None:
    _denied(w, b"this is not audio" * 1000, grpc.StatusCode.INVALID_ARGUMENT, "LEAK_AUDIO_UNREADABLE")


def test_a_mark_of_this_key_that_no_fetch_recorded_is_unknown(w: World) -> None:
    app = w.server.app
    key = load_or_create_service_key(app.db, app.root, WATERMARK_KEY_NAME)
    forged = wm.WatermarkEmbedder(key, 0x00_11_22_33_44, RATE, 1).process(speech("b", 8.0, seed=2), 0)
    entry = _denied(w, encoded(forged, RATE, "audio/flac"), grpc.StatusCode.NOT_FOUND, "WATERMARK_UNKNOWN")
    assert entry["outcome"]["watermark"] == "wm_0011223344"


def test_an_upload_over_the_limit_is_refused(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safety_servicer, "MAX_LEAK_BYTES", 100_000)
    with pytest.raises(grpc.RpcError) as caught:
        _identify(w, bytes(100_001), w.safety_md)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 100000 bytes" in caught.value.details()
    # audited like every other outcome (it was not: the refusal came before the domain call)
    assert [e for e in w.entries() if e["action"] == "forensics.identify"][-1]["outcome"]["result"] == "denied"


def test_an_empty_upload_is_refused_and_audited(w: World) -> None:
    _denied(w, b"", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def test_without_watermarking_nothing_is_marked_and_identify_says_why(tmp_path: Path, database_url: str | None,
                                                                     log_stream: io.StringIO) -> None:
    clock = FakeClock()
    with running_server(_config(tmp_path, database_url, "off"), clock=clock) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        w = World(server, channel, clock)
        _, _, audio = _fetched(w)
        assert audio == CLIP
        assert [e for e in w.entries() if e["action"] == "clip.fetch"][0]["outcome"].get("watermark", "") == ""
        _denied(w, CLIP, grpc.StatusCode.FAILED_PRECONDITION, "WATERMARK_UNAVAILABLE")


def test_forensics_identify_from_the_cli(w: World, tmp_path: Path) -> None:
    r, grant_id, audio = _fetched(w)
    leak = tmp_path / "leak.ogg"
    leak.write_bytes(_leaked(audio))
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(home, f"127.0.0.1:{w.server.port}", CLIPSTORE_API_KEY=new_key(w.server.app, "safety", "sec"))
    [line] = cli.ok("forensics", "identify", str(leak))
    assert (line["grant_id"], line["reviewer_id"]) == (grant_id, r.id) and line["fetched_at"].endswith("Z")
    refused = cli("forensics", "identify", str(tmp_path / "missing.wav"))
    assert refused.returncode != 0 and "missing.wav" in refused.stderr


def test_review_watermark_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from clipstore import config as config_module
    from clipstore.config import load_config
    base = {"data_dir": str(tmp_path)}
    assert load_config(env={}, overrides=base).review_watermark == "on"  # the audio extra is installed here
    assert load_config(env={"CLIPSTORE_REVIEW_WATERMARK": "off"}, overrides=base).review_watermark == "off"
    with pytest.raises(ConfigError, match="on or off"):
        load_config(env={}, overrides={**base, "review.watermark": "maybe"})
    monkeypatch.setattr(config_module, "audio_extra_installed", lambda: False)
    assert load_config(env={}, overrides=base).review_watermark == "off"
    with pytest.raises(ConfigError, match="audio extra"):
        load_config(env={}, overrides={**base, "review.watermark": "on"})


def test_the_python_client_identifies_a_leak_blocking_and_async(w: World) -> None:
    import asyncio

    from clipstore.client import AsyncClipstoreClient, ClipstoreClient, errors
    r, grant_id, audio = _fetched(w)
    target, key = f"127.0.0.1:{w.server.port}", new_key(w.server.app, "safety", "client")
    with ClipstoreClient(target, api_key=key) as client:
        assert client.identify_leak(io.BytesIO(_leaked(audio))).reviewer_id == r.id
        with pytest.raises(errors.WatermarkNotFoundError):
            client.identify_leak(CLIP)

    async def scenario() -> str:
        async with AsyncClipstoreClient(target, api_key=key) as client:
            return (await client.identify_leak(audio)).grant_id

    assert asyncio.run(scenario()) == grant_id


def test_a_leaked_file_claiming_two_billion_hz_is_refused_and_audited(w: World) -> None:
    # The resampler's filter for 2**31 - 1 Hz -> 16 kHz would be hundreds of GB: a MemoryError, unaudited.
    from tests.test_hostile_audio import hostile_wav
    _denied(w, hostile_wav(rate=2**31 - 1), grpc.StatusCode.INVALID_ARGUMENT, "LEAK_AUDIO_UNREADABLE")
