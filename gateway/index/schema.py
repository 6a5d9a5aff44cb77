"""Tables, engines and state names of the index, shared by every stage module.

Each stage owns its table or columns (see :mod:`gateway.index`); this module
holds what they all build on: the SQLAlchemy metadata, the state enums stored
in the ``state`` columns, engine creation with the SQLite pragmas, and
:class:`IndexBase`, whose ``_tx``/``_ro`` every stage's methods run in.

SQLite (WAL, ``synchronous=FULL``) is the embedded default; PostgreSQL works
through the same code for multi-node sites. Writers on SQLite take the lock at
``BEGIN IMMEDIATE`` so two writers never deadlock on a lock upgrade; readers
use a second engine with ordinary deferred transactions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any, TypeVar, Unpack

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "IndexBase",
    "IndexUnavailable",
    "JobState",
    "SendState",
    "SeriesState",
    "conflicts_t",
    "from_row",
    "instances_t",
    "jobs_t",
    "metadata",
    "outputs_t",
    "sends_t",
    "series_t",
]

_RowT = TypeVar("_RowT")


class SeriesState(str, Enum):
    """Values of ``series.state``: a series is receiving until completion routes it."""

    RECEIVING = "receiving"
    ROUTED = "routed"
    UNROUTED = "unrouted"


class JobState(str, Enum):
    """Values of ``jobs.state``."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # outputs written, sends pending
    FAILED = "failed"  # gave up: permanent error or retries exhausted
    SENT = "sent"  # every output delivered
    SUPERSEDED = "superseded"  # a later version of its series came before it ran: it never will


class SendState(str, Enum):
    """Values of ``sends.state``."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"  # permanent rejection or retries exhausted: the dead-letter list


metadata = sa.MetaData()

series_t = sa.Table(
    "series",
    metadata,
    sa.Column("series_uid", sa.String(64), primary_key=True),
    sa.Column("study_uid", sa.String(64), nullable=False, index=True),
    sa.Column("modality", sa.String(16), nullable=False, default=""),
    sa.Column("calling_ae", sa.String(16), nullable=False, default=""),
    sa.Column("first_arrival", sa.Float, nullable=False),
    sa.Column("last_arrival", sa.Float, nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False, default=0),
    sa.Column("total_bytes", sa.BigInteger, nullable=False, default=0),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False, default=1),
    sa.Column("quiet_seconds", sa.Float, nullable=False),
    sa.Column("deadline", sa.Float, nullable=True, index=True),
    sa.Column("expected_instances", sa.Integer, nullable=True),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("completed_by", sa.String(16), nullable=True),  # timer, hint, release, forced
)

instances_t = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("series_version", sa.Integer, nullable=False),
    sa.Column("headers", sa.Text, nullable=False),
)

conflicts_t = sa.Table(
    "conflicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("calling_ae", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)

jobs_t = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_version", sa.Integer, nullable=False),
    sa.Column("route", sa.String(64), nullable=False),
    sa.Column("pipeline", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("owner", sa.String(128), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("outputs", sa.Integer, nullable=False, default=0),
    sa.UniqueConstraint("series_uid", "series_version", "route", name="uq_job_series_route"),
)

#: What each job put out: so a rerun's result can reference (and reject) the one it supersedes.
#: A table of its own, so that an index made by an earlier version gains it by create_all.
outputs_t = sa.Table(
    "outputs",
    metadata,
    sa.Column("job_id", sa.Integer, primary_key=True),
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
)

sends_t = sa.Table(
    "sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, nullable=False, index=True),  # 0: forwarded original
    sa.Column("sop_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Float, nullable=False),
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=True),
    sa.UniqueConstraint("job_id", "sop_instance_uid", "destination", name="uq_send"),
)


def from_row(cls: Callable[..., _RowT], row: sa.Row[Unpack[tuple[Any, ...]]]) -> _RowT:
    """Build a typed row object from a SQL row whose column labels are its field names.

    The stage modules' row dataclasses name their fields like the columns they
    select, so one keyword call converts them; a column added to a table but
    not to its dataclass fails here loudly instead of being dropped.
    """
    return cls(**row._asdict())


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    """A SQLite engine with durable WAL pragmas; ``immediate`` writers lock at BEGIN."""
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's events control BEGIN, not the sqlite3 module.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before it returns ("acknowledged means durable").
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class IndexUnavailable(RuntimeError):
    """The index database cannot be opened (unreachable, refused, or a damaged SQLite file)."""


def _opened(url: str, engine: Engine) -> None:
    """Create the tables; an error becomes :class:`IndexUnavailable`, naming the database without its password."""
    try:
        metadata.create_all(engine)
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        where = sa.engine.make_url(url).render_as_string(hide_password=True)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        hint = ""
        if url.startswith("sqlite") and ("malformed" in reason or "not a database" in reason):
            hint = (
                "; the file is damaged (the instances in the data dir's store/ are not): move it and its "
                "-wal and -shm files aside to start with an empty index, or restore it from a backup"
            )
        raise IndexUnavailable(f"the index {where} cannot be opened: {reason}{hint}") from exc


class IndexBase:
    """The engines and transaction helpers that every stage's methods share.

    The stage classes derive from this one and :class:`gateway.index.Index`
    combines them, so one instance owns one pair of engines and every method
    sees the same database.

    Parameters
    ----------
    url
        SQLAlchemy URL; ``sqlite...`` gets a writer engine that begins with
        ``BEGIN IMMEDIATE`` and a separate deferred reader engine, anything
        else one pooled engine for both.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            self._write = _sqlite_engine(url, immediate=True)
            self._read = _sqlite_engine(url, immediate=False)
        else:
            self._write = sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
            self._read = self._write
        _opened(url, self._write)

    def close(self) -> None:
        """Dispose of the engines' connection pools."""
        self._write.dispose()
        if self._read is not self._write:
            self._read.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction (on SQLite, holding the write lock from its start)."""
        with self._write.begin() as conn:
            yield conn

    @contextmanager
    def _ro(self) -> Iterator[Connection]:
        """A read-only connection that never waits for the write lock."""
        with self._read.connect() as conn:
            yield conn

    def ping(self) -> bool:
        """True when a write transaction can be opened (readiness probe)."""
        try:
            with self._tx() as conn:
                conn.execute(sa.select(sa.literal(1)))
            return True
        except Exception:
            return False
