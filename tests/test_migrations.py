"""Schema history: every database this repository ever created reaches today's schema, with its data."""

from __future__ import annotations

import ast
import importlib
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from auditlog.__main__ import verify_dir
from auditlog.merkle import leaf_hash, node_hash
from clipstore.app import App
from clipstore.audit.export import export_log
from clipstore.auth import create_principal, hash_api_key
from clipstore.cli import main
from clipstore.clipkey import ClipKey, Purpose
from clipstore.config import Config
from clipstore.identity import seal_identity
from clipstore.store import Database, migrations
from clipstore.store.keys import KekRows, SqlKekStore, destroy_keks
from clipstore.store.legacy import seal_plaintext
from clipstore.store.review import ReviewRows
from clipstore.store.schema import metadata
from kms import KeyRing, KmsUnavailable, LocalKms
from tests.auditlog_helpers import post_order_key
from tests.conftest import make_config, pg_schema
from tests.legacy import COMMITS

REPO = Path(__file__).resolve().parent.parent
VERSIONS_DIR = Path(migrations.__file__).parent / "versions"


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))


def reflect(url: str) -> dict[str, Any]:
    """Tables, columns (type, nullability, default), keys and indexes, as the database reports them."""
    engine = _engine(url)
    try:
        inspector = sa.inspect(engine)
        out: dict[str, Any] = {}
        for table in inspector.get_table_names():
            if table == "alembic_version":
                continue
            pk = inspector.get_pk_constraint(table)
            out[table] = {
                "columns": {c["name"]: (str(c["type"].compile(engine.dialect)), c["nullable"],
                                        _default(c.get("default"))) for c in inspector.get_columns(table)},
                "pk": (pk.get("name"), pk["constrained_columns"]),
                "unique": sorted((u.get("name"), tuple(u["column_names"]))
                                 for u in inspector.get_unique_constraints(table)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"])
                                  for i in inspector.get_indexes(table)),
                "foreign_keys": inspector.get_foreign_keys(table),
            }
        return out
    finally:
        engine.dispose()


def _default(text: str | None) -> str | None:
    """DEFAULT 0 and DEFAULT '0' are one default (SQLite reports the text as written)."""
    return None if text is None else text.strip("'")


def alembic_version(url: str) -> list[str]:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(sa.text("SELECT version_num FROM alembic_version")))
    finally:
        engine.dispose()


_HEAD_SCHEMA: dict[str, Any] = {}


class Databases:
    """Empty databases of one dialect, and today's schema.py created directly and reflected there:
    what every upgrade path must arrive at (built once per dialect)."""

    def __init__(self, dialect: str, new: Callable[[], str]) -> None:
        self.dialect, self.new = dialect, new

    def head_schema(self) -> Any:
        if self.dialect not in _HEAD_SCHEMA:
            url = self.new()
            engine = _engine(url)
            metadata.create_all(engine)
            engine.dispose()
            _HEAD_SCHEMA[self.dialect] = reflect(url)
        return _HEAD_SCHEMA[self.dialect]


@pytest.fixture(params=["sqlite", "postgresql"])
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    if request.param == "sqlite":
        yield Databases("sqlite", lambda: f"sqlite:///{tmp_path}/{secrets.token_hex(4)}.db")
        return
    if problem := request.getfixturevalue("pg_problem"):
        pytest.skip(f"no PostgreSQL ({problem})")
    with ExitStack() as stack:
        yield Databases("postgresql", lambda: stack.enter_context(pg_schema()))


def legacy_migrate(url: str, commit: str) -> None:
    """What starting clipstore at `commit` did to the database (its own migrate()), including crashing:
    c04bea2's migration 9 cannot read an audit tree from b36eb06, and on SQLite leaves its staging table."""
    engine = _engine(url)
    try:
        importlib.import_module(f"tests.legacy.c{commit}").migrate(engine)
    except sa.exc.DBAPIError:
        assert commit == "c04bea2", f"the migrations of {commit} failed"
    finally:
        engine.dispose()


# Every database the old mechanism could leave: created at one commit, last started at a later one.
HISTORIES = [(created, ran) for i, created in enumerate(COMMITS) for ran in COMMITS[i:]]


@pytest.mark.parametrize(("created", "ran"), HISTORIES, ids=[f"{c}-{r}" for c, r in HISTORIES])
def test_legacy_database_upgrades_to_the_head_schema(databases: Databases, created: str, ran: str) -> None:
    url = databases.new()
    legacy_migrate(url, created)
    if ran != created:
        legacy_migrate(url, ran)
    db = Database(url)
    db.close()
    assert db.revision == migrations.HEAD
    assert alembic_version(url) == [migrations.HEAD]
    assert reflect(url) == databases.head_schema()  # schema_migrations is gone, too


@pytest.mark.parametrize("revision", [r for r, _ in migrations.history()])
def test_database_at_any_revision_upgrades_to_the_head_schema(databases: Databases, revision: str) -> None:
    url = databases.new()
    db = Database(url, upgrade=False)
    with db.migration_lock() as conn:
        migrations.run(conn, revision)
    assert db.upgrade() == migrations.HEAD
    db.close()
    assert reflect(url) == databases.head_schema()


def test_offline_sql_builds_the_head_schema(pg_url: str) -> None:
    """What a DBA reviews and applies by hand yields the same schema as the service's own upgrade."""
    expected = Databases("postgresql", lambda: pg_url).head_schema()
    with pg_schema() as url:
        engine = _engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(migrations.offline_sql())
        engine.dispose()
        assert reflect(url) == expected
        assert alembic_version(url) == [migrations.HEAD]
        db = Database(url)  # and the service takes it from there
        db.close()
        assert db.revision == migrations.HEAD


@pytest.mark.parametrize("created", ["b36eb06", "d9e6d48"])  # (level, idx) columns; level << 56 | idx keys
def test_audit_subtree_hashes_move_to_their_post_order_keys(databases: Databases, created: str) -> None:
    url = databases.new()
    legacy_migrate(url, created)
    nodes = {(level, idx): secrets.token_bytes(32) for level in range(0, 20) for idx in (0, 1, 2, 5, 1000, 123_456)}
    engine = _engine(url)
    with engine.begin() as conn:
        if created == "b36eb06":
            conn.execute(sa.text("INSERT INTO audit_nodes (level, idx, hash) VALUES (:l, :i, :h)"),
                         [{"l": level, "i": idx, "h": h} for (level, idx), h in nodes.items()])
        else:
            conn.execute(sa.text("INSERT INTO audit_nodes (node_key, hash) VALUES (:k, :h)"),
                         [{"k": level << 56 | idx, "h": h} for (level, idx), h in nodes.items()])
    engine.dispose()
    db = Database(url, upgrade=False)
    with db.migration_lock() as conn:
        migrations._adopt(conn)
        migrations.run(conn, "0016")  # 0017 turns audit_nodes into tiles (tests/test_audit_storage.py)
    db.close()
    engine = _engine(url)
    with engine.connect() as conn:
        moved = dict(conn.execute(sa.text("SELECT node_key, hash FROM audit_nodes")).all())
    engine.dispose()
    assert moved == {post_order_key(level, idx): h for (level, idx), h in nodes.items() if level > 0}


def test_revisions_spell_out_their_ddl_and_never_import_the_live_schema() -> None:
    # hashlib: 0017 hashes entries into the leaf tiles on SQLite (SHA-256 is not going to change under it)
    allowed = {"__future__", "hashlib", "typing", "sqlalchemy", "alembic", "clipstore.store.migrations._shape"}
    files = sorted(VERSIONS_DIR.glob("r*.py"))
    assert [f.name[1:5] for f in files] == [r for r, _ in migrations.history()]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert set(names) <= allowed, f"{path.name} imports {names}"


def test_database_newer_than_this_clipstore_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    Database(url).close()
    engine = _engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(RuntimeError, match="9999 is newer than this clipstore"):
        Database(url)


REPLICA = """
import sys, time
from pathlib import Path
from clipstore.app import App
from tests.conftest import make_config
go = Path(sys.argv[1])
config = make_config(Path(sys.argv[2]), database_url=sys.argv[3] or None)
while not go.exists():  # start together: everything is imported, the database is not yet touched
    time.sleep(0.002)
app = App(config)
print(app.db.revision, app.audit.signer.verifier.key_string())
app.close()
"""


def test_three_replicas_starting_together_on_an_empty_database_all_come_up(
        tmp_path: Path, database_url: str | None) -> None:
    data, go = tmp_path / "data", tmp_path / "go"
    data.mkdir(mode=0o700)
    LocalKms.from_file(make_config(data).root_key_file)  # replicas share one root key (AWS KMS in production)
    replicas = [subprocess.Popen([sys.executable, "-c", REPLICA, str(go), str(data), database_url or ""],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    time.sleep(1.0)
    go.touch()
    results = [p.communicate(timeout=120) for p in replicas]
    assert [p.returncode for p in replicas] == [0, 0, 0], [err[-2000:] for _, err in results]
    assert {out.split()[0] for out, _ in results} == {migrations.HEAD}
    assert len({out.split()[1] for out, _ in results}) == 1  # one signing key, created once


def _private(data_dir: Path) -> None:
    """Old commits created the SQLite file with the process umask; today's start refuses that."""
    for path in data_dir.glob("clipstore.db*"):
        path.chmod(0o600)


def _perfect_subtrees(entries: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(level, idx, hash) of every perfect subtree, leaves included: what b36eb06 stored."""
    levels = [[leaf_hash(e) for e in entries]]
    while len(levels[-1]) > 1:
        below = levels[-1]
        levels.append([node_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)])
    return [(level, idx, h) for level, hashes in enumerate(levels) for idx, h in enumerate(hashes)]


def _legacy_deployment(tmp_path: Path, database_url: str | None) -> tuple[Config, str, dict[str, Any]]:
    """A data dir whose database was made and filled by the code of revision 5fa6877 (before service_keys)."""
    config = make_config(tmp_path / "data", database_url=database_url)
    config.data_dir.mkdir(parents=True, mode=0o700)
    root = LocalKms.from_file(config.root_key_file)
    url = config.effective_database_url
    legacy_migrate(url, "b36eb06")
    legacy_migrate(url, "5fa6877")
    _private(config.data_dir)
    return config, url, _legacy_rows(url, root, tmp_path)


def _legacy_rows(url: str, root: LocalKms, tmp_path: Path) -> dict[str, Any]:
    """Fill a database left by b36eb06 and then 5fa6877 the way those commits did: an audit log with
    (level, idx) subtree hashes, the signing seed in audit_signing_key, plaintext escalation notes."""
    scratch = App(make_config(tmp_path / "scratch"))  # produces a real log to copy in
    try:
        principal, api_key = create_principal(scratch.principals, scratch.audit, role="auditor", name="legacy")
        for _ in range(4):
            create_principal(scratch.principals, scratch.audit, role="ingest", name="other")
        with scratch.db.read() as conn:
            entries = conn.execute(sa.text("SELECT seq, entry FROM audit_entries")).all()
            head = conn.execute(sa.text("SELECT size, last_hash FROM audit_head")).one()
    finally:
        scratch.close()
    seed, origin = secrets.token_bytes(32), f"clipstore-audit/{secrets.token_hex(8)}"
    db = Database(url, upgrade=False)
    keyring = KeyRing(root, SqlKekStore(db), now=lambda: 1.0)
    clips = {}
    for name in ("kept", "shredded"):
        account_ref = f"acct_{name}"
        first = keyring.new_kek(account_ref, 1)
        with db.transaction() as conn:
            KekRows(conn).add(account_ref, first.record, 1.0)
        keyring.stored(first)
        dek, wrapped = keyring.data_key_for(account_ref, f"clip_{name}")
        clips[name] = {"clip_id": f"clip_{name}", "account_ref": account_ref, "size_bytes": 1, "sealed_bytes": 1,
                       "content_type": "audio/wav", "locale": "en-US", "device_type": "speaker",
                       "duration_ms": 1, "captured_at": None, "wake_word": True, "created_at": 1.0,
                       "expires_at": 1e12, "key_version": wrapped.key_version, "wrapped_dek": wrapped.blob,
                       "identity_ct": seal_identity(ClipKey(dek), f"clip_{name}", account_id="a", device_serial="d")}
    with db.transaction() as conn:
        destroy_keks(conn, "acct_shredded", 1.0)
    notes = {"esc_kept": ("clip_kept", "he said: call 555-0100"), "esc_shredded": ("clip_shredded", "shred me"),
             "esc_purged": ("clip_purged", "the clip is gone")}
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO principals (id, name, role, key_hash, created_at, disabled) "
                             "VALUES (:id, 'legacy', 'auditor', :h, 1.0, false)"),
                     {"id": principal.id, "h": hash_api_key(api_key)})
        conn.execute(sa.text("UPDATE audit_head SET size = :s, last_hash = :h"), {"s": head[0], "h": head[1]})
        conn.execute(sa.text("INSERT INTO audit_entries (seq, entry) VALUES (:s, :e)"),
                     [{"s": s, "e": e} for s, e in entries])
        conn.execute(sa.text("INSERT INTO audit_nodes (level, idx, hash) VALUES (:l, :i, :h)"),
                     [{"l": level, "i": idx, "h": h} for level, idx, h in _perfect_subtrees([e for _, e in entries])])
        conn.execute(sa.text("INSERT INTO audit_signing_key (id, name, wrapped_seed, created_at) "
                             "VALUES (1, :n, :w, 1.0)"),
                     {"n": origin, "w": root.encrypt(seed, {"purpose": "audit-checkpoint-signing", "origin": origin})})
        conn.execute(sa.table("clips", *map(sa.column, clips["kept"])).insert(), list(clips.values()))
        conn.execute(sa.text("INSERT INTO escalations (escalation_id, review_clip_id, clip_id, category, note, "
                             "created_by, created_at) VALUES (:e, 'rv', :c, 1, :n, :p, 1.0)"),
                     [{"e": e, "c": c, "n": n, "p": principal.id} for e, (c, n) in notes.items()])
        conn.execute(sa.text("UPDATE escalations SET resolved_at = 2.0, resolution = 'called 555-0100 back' "
                             "WHERE escalation_id = 'esc_kept'"))
        conn.execute(sa.text("INSERT INTO assignments (assignment_id, clip_id, review_clip_id, reviewer_id, "
                             "created_at, expires_at, completed_at, label) "
                             "VALUES ('asg_kept', 'clip_kept', 'rv', :p, 1.0, 2.0, 1.5, '555-0100')"),
                     {"p": principal.id})
    db.close()
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"api_key": api_key, "principal_id": principal.id, "public_key": public, "entries": len(entries)}


def test_legacy_database_keeps_its_log_signing_key_and_its_plaintext_is_sealed_under_the_clip_key(
        tmp_path: Path, database_url: str | None) -> None:
    config, url, legacy = _legacy_deployment(tmp_path, database_url)

    app = App(config)
    try:
        assert app.db.revision == migrations.HEAD
        match = app.principals.by_key_hash(hash_api_key(legacy["api_key"]))
        assert match is not None and match.principal.id == legacy["principal_id"]
        public = app.audit.signer.verifier.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert public == legacy["public_key"]  # the log keeps its signing key
        assert app.audit.reader.size() == legacy["entries"]
        size = export_log(app.audit, tmp_path / "export", actor_id="test", actor_role="auditor")
        assert verify_dir(tmp_path / "export", app.audit.signer.verifier.key_string(), None)[0] == 0
        assert size == legacy["entries"] + 1  # the export's own entry, appended to the carried-over log
        with app.db.read() as conn:
            rows = {row.escalation_id: row for row in ReviewRows(conn).escalations(
                include_resolved=True, after="", limit=10)}
        kept = app.clips.find("clip_kept")
        assert kept is not None
        key = app.clips.key(kept)
        assert key.open(Purpose.NOTE, "esc_kept", rows["esc_kept"].note_ct) == b"he said: call 555-0100"
        assert rows["esc_shredded"].note_ct == rows["esc_purged"].note_ct == b""  # erased with their clip
        assert rows["esc_kept"].resolution_ct is not None
        assert key.open(Purpose.RESOLUTION, "esc_kept", rows["esc_kept"].resolution_ct) == b"called 555-0100 back"
        with app.db.read() as conn:
            label_ct, label = conn.execute(sa.text(
                "SELECT label_ct, label FROM assignments WHERE assignment_id = 'asg_kept'")).one()
            assert conn.scalar(sa.text("SELECT count(*) FROM escalations WHERE resolution IS NOT NULL")) == 0
        assert label is None and key.open(Purpose.LABEL, "asg_kept", label_ct) == b"555-0100"
    finally:
        app.close()
    for name, data in _stored_bytes(url, config.data_dir):  # gone from the pages, not only from the rows
        assert b"555-0100" not in data and b"shred me" not in data, name


def test_a_legacy_database_with_its_root_key_file_missing_stops_the_start_and_gets_no_new_root_key(
        tmp_path: Path, database_url: str | None) -> None:
    """A database from before service_keys holds its keys elsewhere (the signing seed in audit_signing_key, the
    account keys): with root.key missing, the start made a new root key (the database held no service key
    yet), left it in the data dir and then said that file did not open the database's keys."""
    from clipstore.config import ConfigError
    config, _, _ = _legacy_deployment(tmp_path, database_url)
    config.root_key_file.unlink()  # moved to a new host without it
    with pytest.raises(ConfigError) as refused:
        App(config).close()
    assert "root.key is missing but the database holds keys" in str(refused.value)
    assert not config.root_key_file.exists()


def _stored_bytes(url: str, data_dir: Path) -> list[tuple[str, bytes]]:
    """The bytes that hold escalations and assignments: the SQLite files, or the PostgreSQL pages
    (read through the buffer cache with pageinspect, so dead row versions and dropped columns count)."""
    if url.startswith("sqlite"):
        return [(p.name, p.read_bytes()) for p in data_dir.glob("clipstore.db*")]
    engine = _engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pageinspect SCHEMA " +
                                 conn.scalar(sa.text("SELECT current_schema()")))
            return [(table, b"".join(conn.scalars(sa.text(
                f"SELECT get_raw_page('{table}', n::int) FROM "  # noqa: S608
                f"generate_series(0, pg_relation_size('{table}') / current_setting('block_size')::int - 1) n"))))
                    for table in ("escalations", "assignments")]
    finally:
        engine.dispose()


def test_db_commands_adopt_a_legacy_database_and_report_its_revision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    legacy_migrate(make_config(data).effective_database_url, "d9e6d48")
    _private(data)

    def run(*argv: str) -> str:
        assert main(list(argv)) == 0
        return capsys.readouterr().out

    assert run("db", "current", "--data-dir", str(data)).startswith("legacy schema_migrations version 5:")
    assert run("db", "upgrade", "--data-dir", str(data)) == f"database at revision {migrations.HEAD} (head)\n"
    assert run("db", "current", "--data-dir", str(data)) == f"{migrations.HEAD} (head)\n"
    history = run("db", "history").splitlines()
    assert [line.split()[0] for line in history] == [r for r, _ in migrations.history()]
    contract = run("db", "sql", "--from", migrations.BEFORE_DATA_STEPS)
    contract = contract.split("-- Running upgrade 0013 ->")[0]  # later revisions may add tables
    assert "ALTER TABLE escalations DROP COLUMN note;" in contract and "CREATE TABLE" not in contract


def test_note_resealing_interrupted_by_a_kms_outage_resumes_at_the_next_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    legacy_migrate(url, "5fa6877")
    db = Database(url, upgrade=False)
    with db.transaction() as conn:
        conn.execute(sa.text("INSERT INTO escalations (escalation_id, review_clip_id, clip_id, category, note, "
                             "created_by, created_at) VALUES (:e, 'rv', 'c', 1, :n, 'p', 1.0)"),
                     [{"e": f"esc_{i}", "n": f"note {i}"} for i in range(3)])
    db.close()
    db = Database(url)
    assert db.revision == migrations.BEFORE_DATA_STEPS  # the notes wait for the KMS; nothing is dropped yet
    sealed: list[str] = []

    def seal_until_outage(purpose: str, clip_id: str, escalation_id: str, note: str) -> bytes:
        if len(sealed) == 2:
            raise KmsUnavailable("KMS unreachable")
        sealed.append(escalation_id)
        return b"ct:" + note.encode()

    with pytest.raises(KmsUnavailable):
        seal_plaintext(db, seal_until_outage)
    assert db.upgrade() == migrations.BEFORE_DATA_STEPS  # the contract revision refuses while one note is plaintext
    assert seal_plaintext(db, lambda p, c, e, n: b"ct:" + n.encode()) == 1  # only the one left over
    assert db.upgrade() == migrations.HEAD
    with db.read() as conn:
        assert conn.execute(sa.text("SELECT escalation_id, note_ct FROM escalations ORDER BY 1")).all() == [
            (f"esc_{i}", f"ct:note {i}".encode()) for i in range(3)]
    db.close()
