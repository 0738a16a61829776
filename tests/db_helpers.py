"""Every byte the metadata store holds, for tests that prove something never reaches it."""

from __future__ import annotations

from clipstore.server import ClipstoreServer


def database_bytes(server: ClipstoreServer) -> list[tuple[str, bytes]]:
    """Every byte the metadata store holds: the SQLite files, or every PostgreSQL row as text."""
    app = server.app
    if app.db.is_sqlite:
        files = list(app.config.data_dir.glob("clipstore.db*"))
        assert files
        return [(path.name, path.read_bytes()) for path in files]
    import sqlalchemy as sa

    from clipstore.store.schema import metadata as tables
    out = []
    with app.db.read() as conn:
        for table in tables.sorted_tables:
            rows = conn.execute(sa.select(table)).all()
            out.append((table.name, repr(rows).encode() + b"".join(
                v for r in rows for v in r if isinstance(v, bytes))))
    return out
