"""MetaDB: where sessions, instances, functions and tenants are recorded (the source of truth)."""

from __future__ import annotations

from pathlib import Path

from hutch.metadb.base import MetaDB


def open_metadb(url: str, data_dir: Path) -> MetaDB:
    """A MetaDB for a URL: `sqlite:///path`, `sqlite://` (in the data dir), `:memory:`, or
    `postgresql://user:password@host:port/database` (shared by many gateways and nodes)."""
    from hutch.errors import InvalidArgument
    from hutch.metadb.sqlite import SQLiteMetaDB

    if url in ("", "sqlite://"):
        return SQLiteMetaDB(data_dir / "metadb.sqlite3")
    if url == ":memory:":
        return SQLiteMetaDB(":memory:")
    if url.startswith("sqlite:///"):
        return SQLiteMetaDB(url[len("sqlite://") :])
    if url.startswith(("postgresql://", "postgres://")):
        from hutch.metadb.postgres import PostgresMetaDB

        return PostgresMetaDB(url)
    raise InvalidArgument(f"unsupported MetaDB URL {url!r} (use sqlite:///PATH or postgresql://HOST/DB)")
