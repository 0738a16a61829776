"""The signer only extends its own history: the insider's rewrite of the stored log (plain SQL on the live
database) is never signed; audit health turns NOT_SERVING and security actions fail as AUDIT_UNAVAILABLE."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from auditlog.entry import GENESIS_PREV, canonical_json, entry_hash
from auditlog.merkle import consistency_proof, leaf_hash, root_hash
from auditlog.witness import WitnessServer
from clipstore.audit import AuditUnavailable
from clipstore.audit.history import CACHED_BLOCKS, HistoryRewritten, RecomputedTree
from clipstore.config import Config
from clipstore.server import AUDIT_SERVICE, ClipstoreServer, running_server
from clipstore.unit import AuditRecord
from clipstore.v1 import clip_pb2_grpc
from tests.auditlog_helpers import build_entries, stored_tiles
from tests.clip_helpers import metadata, put_requests
from tests.conftest import FakeClock, bearer, make_config, new_key
from tests.grpc_helpers import error_info
from tests.test_review import World, _ready
from tests.test_witnessing import _config as witnessed_config
from tests.test_witnessing import _wait_published as wait_cosigned
from tests.test_witnessing import log_key, witnesses  # noqa: F401 (fixtures)


def forge_without(url: str, action: str, *, pad: bool = False) -> int:
    """The insider's rewrite, in plain SQL on the live database: delete the last `action` entry, re-chain
    every later one (with `pad`, add a harmless-looking entry so the size is unchanged), rebuild
    audit_tiles, reset audit_head, and drop the checkpoints that covered the deleted entry. Returns the
    deleted entry's index."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            rows = [(seq, bytes(e)) for seq, e in conn.execute(sa.text("SELECT seq, entry FROM audit_entries "
                                                                       "ORDER BY seq"))]
            victim = max(seq for seq, e in rows if json.loads(e)["action"] == action)
            entries, prev = [], GENESIS_PREV
            for seq, entry in enumerate(json.loads(e) for s, e in rows if s != victim):
                entry.update(seq=seq, prev=prev)
                entries.append(canonical_json(entry))
                prev = entry_hash(entries[-1])
            if pad:
                entries.append(canonical_json({**json.loads(entries[-1]), "seq": len(entries), "prev": prev}))
                prev = entry_hash(entries[-1])
            conn.execute(sa.text("DELETE FROM audit_entries WHERE seq >= :v"), {"v": victim})
            for s in range(victim, len(entries)):
                conn.execute(sa.text("INSERT INTO audit_entries (seq, entry) VALUES (:s, :e)"),
                             {"s": s, "e": entries[s]})
            conn.execute(sa.text("DELETE FROM audit_tiles"))
            tiles = stored_tiles([leaf_hash(e) for e in entries])
            if tiles:
                conn.execute(sa.text("INSERT INTO audit_tiles (level, idx, hashes, nodes) VALUES (:l, :i, :h, :n)"),
                             [{"l": level, "i": i, "h": h, "n": n} for level, i, h, n in tiles])
            conn.execute(sa.text("UPDATE audit_head SET size = :n, last_hash = :h WHERE id = 1"),
                         {"n": len(entries), "h": prev})
            conn.execute(sa.text("DELETE FROM audit_checkpoints WHERE size > :v"), {"v": victim})
    finally:
        engine.dispose()
    return victim


def _checkpoint_sizes(server: ClipstoreServer) -> list[int]:
    with server.app.db.read() as conn:
        return sorted(conn.scalars(sa.text("SELECT size FROM audit_checkpoints")))


def _audit_health(server: ClipstoreServer) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=AUDIT_SERVICE),
                                                         timeout=10).status


def _assert_refuses_everything(server: ClipstoreServer, log_stream: io.StringIO, kind: str,
                               ingest: tuple[tuple[str, str], ...]) -> None:
    """No signature over the stored log, audit NOT_SERVING, the alert logged and metered, and the next
    security action refused as AUDIT_UNAVAILABLE."""
    sizes = _checkpoint_sizes(server)
    with pytest.raises(AuditUnavailable):
        server.app.audit.checkpoint()
    assert _checkpoint_sizes(server) == sizes
    assert _audit_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING
    alerts = [json.loads(line) for line in log_stream.getvalue().splitlines()
              if '"audit.history_rewritten"' in line]
    assert len(alerts) == 1 and alerts[0]["kind"] == kind and alerts[0]["level"] == "critical"
    assert server.metrics.registry.get_sample_value("clipstore_audit_history_alert") == 1
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as err:
        clip_pb2_grpc.ClipServiceStub(channel).PutClip(put_requests(metadata(), b"\x01" * 1000), metadata=ingest,
                                                       timeout=30)
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")


@pytest.fixture
def srv(tmp_path: Path, database_url: str | None, clock: FakeClock, log_stream: io.StringIO
        ) -> Iterator[ClipstoreServer]:
    config = make_config(tmp_path / "data", database_url=database_url, **{"review.sample_rate": 1.0})
    with running_server(config, clock=clock) as server:
        yield server


@pytest.fixture
def w(srv: ClipstoreServer, clock: FakeClock) -> Iterator[World]:
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as channel:
        yield World(srv, channel, clock)


@pytest.mark.parametrize("fetch_signed", [True, False], ids=["fetch-already-signed", "fetch-not-yet-signed"])
def test_deleting_a_fetch_and_rechaining_the_live_log_is_never_signed_and_stops_audited_actions(
        w: World, log_stream: io.StringIO, fetch_signed: bool) -> None:
    app = w.server.app
    r, token, _, grant = _ready(w)
    if not fetch_signed:
        app.audit.checkpoint()
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    w.opt_in()  # entries after the fetch, re-chained by the forger
    if fetch_signed:
        app.audit.checkpoint()
    assert _audit_health(w.server) == health_pb2.HealthCheckResponse.SERVING
    size = app.audit.reader.size()
    forge_without(app.config.effective_database_url, "clip.fetch", pad=fetch_signed)
    assert app.audit.reader.size() == (size if fetch_signed else size - 1)
    # The forged log is internally perfect: re-chained, nodes rebuilt, head reset.
    assert app.audit.reader.root(app.audit.reader.size()) == root_hash(
        [leaf_hash(e) for e in app.audit.reader.entries(0, 10_000)])
    # Padded to its old size the stored log ends in another entry (a fork); else it is shorter than what
    # this process wrote (a shrink).
    _assert_refuses_everything(w.server, log_stream, "fork" if fetch_signed else "shrink", w.ingest)


def test_the_writer_refuses_to_chain_onto_a_rewritten_log_before_any_checkpoint(
        w: World, log_stream: io.StringIO) -> None:
    r, token, _, grant = _ready(w)
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    size = w.server.app.audit.reader.size()
    forge_without(w.server.app.config.effective_database_url, "clip.fetch")
    with pytest.raises(grpc.RpcError) as err:
        w.opt_in()
    assert (err.value.code(), error_info(err.value).reason) == (grpc.StatusCode.UNAVAILABLE, "AUDIT_UNAVAILABLE")
    assert w.server.app.audit.reader.size() == size - 1  # nothing was chained onto the forgery
    _assert_refuses_everything(w.server, log_stream, "shrink", w.ingest)


def test_an_entry_edited_in_place_after_it_was_written_is_never_signed(w: World, log_stream: io.StringIO) -> None:
    app = w.server.app
    r, token, _, grant = _ready(w)
    app.audit.checkpoint()
    w.fetch(r, token, grant.grant, grant.review_clip_id)
    w.opt_in()
    engine = sa.create_engine(app.config.effective_database_url)
    try:
        with engine.begin() as conn:  # another reviewer's name on the fetch; the chain is left as it was
            seq, entry = conn.execute(sa.text("SELECT seq, entry FROM audit_entries ORDER BY seq DESC")).all()[1]
            edited = json.loads(bytes(entry))
            edited["actor"]["id"] = "p_someone_else"
            conn.execute(sa.text("UPDATE audit_entries SET entry = :e WHERE seq = :s"),
                         {"e": canonical_json(edited), "s": seq})
    finally:
        engine.dispose()
    _assert_refuses_everything(w.server, log_stream, "mismatch", w.ingest)


def _wait_published(server: ClipstoreServer, size: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert server.app.publishing is not None
        server.app.publishing.poke()
        latest = server.app.publishing.latest
        if latest and latest[0] >= size:
            return
        time.sleep(0.05)
    raise AssertionError(f"size {size} was not published")


def _tiles_config(tmp_path: Path, database_url: str | None) -> Config:
    return make_config(tmp_path / "data", database_url=database_url,
                       **{"audit.tiles": str(tmp_path / "tiles"), "audit.publish_every_s": 0.2})


def test_a_restart_checks_the_stored_log_against_the_published_checkpoint_and_refuses_a_rewrite(
        tmp_path: Path, database_url: str | None, log_stream: io.StringIO) -> None:
    config = _tiles_config(tmp_path, database_url)
    with running_server(config) as server:
        ingest = bearer(new_key(server.app, "ingest"))
        for i in range(300):
            action = "clip.fetch" if i == 100 else "clip.ingest"
            server.app.audit.append(AuditRecord(actor_id="p", actor_role="reviewer", action=action,
                                                request_id=str(i)))
        size, _ = server.app.audit.checkpoint()
        _wait_published(server, size)
    # Offline now: the insider rewrites the database and deletes every checkpoint row that covered the fetch.
    forge_without(config.effective_database_url, "clip.fetch")
    with running_server(config) as server:
        _assert_refuses_everything(server, log_stream, "fork", ingest)


def test_an_untouched_log_restarts_serving_and_keeps_extending_the_published_checkpoint(
        tmp_path: Path, database_url: str | None) -> None:
    config = _tiles_config(tmp_path, database_url)
    sizes = []
    for round_ in range(2):
        with running_server(config) as server:
            for i in range(300):
                server.app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest",
                                                    request_id=f"{round_}-{i}"))
            size, _ = server.app.audit.checkpoint()
            _wait_published(server, size)
            assert _audit_health(server) == health_pb2.HealthCheckResponse.SERVING
            sizes.append(size)
    assert sizes[1] > sizes[0]


# -- the recomputed tree itself ---------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1300), st.data())
def test_the_recomputed_tree_gives_the_rfc9162_roots_and_proofs(size: int, data: st.DataObject) -> None:
    entries = build_entries(size)
    leaves = [leaf_hash(e) for e in entries]
    tree = RecomputedTree(lambda start, n: entries[start:start + n])
    cut = data.draw(st.integers(0, size))
    tree.append(leaves[:cut])
    tree.append(leaves[cut:])
    old = data.draw(st.integers(1, size))
    assert tree.head()[1] == root_hash(leaves)
    assert tree.root(old) == root_hash(leaves[:old])
    assert tree.consistency_proof(old, size) == consistency_proof(leaves, old)
    assert tree.subtrees(size)[0] == root_hash(leaves[:1 << (size.bit_length() - 1)])


def test_a_node_inside_a_finished_block_is_recomputed_from_its_entries_and_must_match() -> None:
    # The last CACHED_BLOCKS blocks keep their leaf hashes in memory (the next checkpoint's proofs start in
    # them): the forged entry is in block 0, which has left the cache.
    size = (CACHED_BLOCKS + 2) * 256 + 44
    entries = build_entries(size)
    leaves = [leaf_hash(e) for e in entries]
    tree = RecomputedTree(lambda start, n: entries[start:start + n])
    tree.append(leaves)
    assert tree.consistency_proof(100, size) == consistency_proof(leaves, 100)
    forged = list(entries)
    forged[70] = forged[70].replace(b"clip.ingest", b"clip.ingesT")
    tree = RecomputedTree(lambda start, n: forged[start:start + n])
    tree.append(leaves)
    assert tree.consistency_proof(size - 300, size) == consistency_proof(leaves, size - 300)
    with pytest.raises(HistoryRewritten) as caught:
        tree.consistency_proof(100, size)
    assert caught.value.kind == "fork"


def test_witnesses_are_sent_proofs_from_recomputed_hashes_never_from_audit_tiles(
        tmp_path: Path, database_url: str | None, witnesses: list[WitnessServer]) -> None:  # noqa: F811
    with running_server(witnessed_config(tmp_path, database_url, witnesses)) as server:  # type: ignore[arg-type]
        app = server.app
        for i in range(300):
            app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest", request_id=str(i)))
        old, _ = app.audit.checkpoint()
        wait_cosigned(app, old)
        for i in range(300):
            app.audit.append(AuditRecord(actor_id="p", actor_role="ingest", action="clip.ingest", request_id=str(i)))
        with app.db.transaction() as conn:  # every stored hash is garbage now
            for level, idx, hashes, nodes in conn.execute(sa.text("SELECT level, idx, hashes, nodes "
                                                                      "FROM audit_tiles")).all():
                conn.execute(sa.text("UPDATE audit_tiles SET hashes = :z, nodes = :y WHERE level = :l AND idx = :i"),
                             {"z": bytes(len(hashes)), "y": nodes and bytes(len(nodes)), "l": level, "i": idx})
        size, _ = app.audit.checkpoint()
        wait_cosigned(app, size)
        assert [w.witness.cosigned_size(app.audit.signer.name) for w in witnesses] == [size] * 3
        leaves = [leaf_hash(e) for e in app.audit.reader.entries(0, size)]
        assert app.audit.consistency_proof(old, size) == consistency_proof(leaves, old)
        assert app.audit.reader.consistency_proof(old, size) != consistency_proof(leaves, old)
