"""A PostgreSQL server for usagemeter's own PostgreSQL store (`python -m bench.run --store
postgresql`): the hand-rolled peer's throwaway cluster (same server binaries and memory), but
durable, as a user would run it: fsync, synchronous commit and full-page writes stay on, so
the ingest figures pay for every acknowledgement as the SQLite store's do."""

from __future__ import annotations

import psycopg

from bench.peers import postgres as peer

DURABLE = {
    **peer.SETTINGS,
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
}


class StoreCluster(peer.PostgresPeer):
    """A cluster holding one database, ``usagemeter``, for `usagemeter serve --store`."""

    name = "PostgreSQL (usagemeter's store)"
    settings = DURABLE

    def __init__(self) -> None:
        super().__init__()  # initdb, settings, start; it also makes the peer's table
        self.execute("DROP TABLE events")
        self.execute("CREATE DATABASE usagemeter")

    @property
    def url(self) -> str:
        return f"postgresql://bench@/usagemeter?host={self.root}&port={self.port}"

    def postmaster_pid(self) -> int:
        """The server's first process: every backend is its child."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def db_bytes(self) -> int:
        with psycopg.connect(self.url) as conn:
            row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0
