"""Engine and sessions for the index, on SQLite (embedded default) and PostgreSQL alike."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Connection, DateTime, Engine, create_engine, event, func, literal, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import ColumnElement

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_UPGRADE_LOCK = threading.Lock()
_MIGRATION_LOCK = 0x70616373  # "pacs": the advisory lock key that serialises migrations


class _WriterLock:
    """One writer at a time on a SQLite index: the threads of this process (a lock) and the
    processes sharing the file (``flock`` on a file next to it).

    SQLite serialises writers by itself, but a writer that finds the database locked sleeps in
    SQLite's busy handler (1, 2, 5, 10 ms...) before it tries again, however soon the lock is
    free; with several DIMSE processes ingesting at once, that sleeping bounded the rate.
    ``flock`` wakes the next writer as soon as the lock is released. Without a lock file (an
    in-memory index, a directory that cannot be written) SQLite's own locking remains.
    """

    def __init__(self, path: str | None) -> None:
        self._threads = threading.Lock()
        self._path = path
        self._fd: int | None = None
        self._pid = 0

    def _descriptor(self) -> int | None:
        # Opened per process: a descriptor inherited across fork shares its lock.
        if self._path is None:
            return None
        if self._pid != os.getpid():
            self._pid = os.getpid()
            try:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._fd = None
        return self._fd

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            fd = self._descriptor()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._fd is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def close(self) -> None:
        with self._threads:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd, self._pid = None, 0


class Database:
    """The index database: an engine, a session factory and the write discipline.

    On SQLite only one writer can hold the database at a time. Write transactions therefore
    start with ``BEGIN IMMEDIATE`` (no late lock upgrade that fails with "database is locked")
    and are serialised inside the process; other processes wait on ``busy_timeout``.
    PostgreSQL needs neither: concurrent writers rely on row locks and unique constraints.
    """

    def __init__(
        self, url: str, *, sqlite_synchronous: str = "NORMAL", pool_size: int = 10
    ) -> None:
        self._head: str | None = None
        """The newest Alembic revision the code knows (read once, by schema_revisions)."""
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        database = self.url.database if self.is_sqlite else None
        self._write_lock = _WriterLock(
            f"{database}.write-lock" if database and database != ":memory:" else None
        )
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 60}
            kwargs["pool_size"] = pool_size
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size * 2
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            self._configure_sqlite(self.engine, sqlite_synchronous)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_engine = self.engine.execution_options(pacsbridge_write=True)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    @staticmethod
    def _configure_sqlite(engine: Engine, synchronous: str) -> None:
        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event decide how a transaction starts.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA cache_size=-65536")
            # LIKE is case-sensitive, as DICOM wildcard matching is for all but person names
            # (PS3.4 C.2.2.2.4); person names are matched on upper-cased copies.
            cur.execute("PRAGMA case_sensitive_like=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            # Straight to the driver: one of these starts every ingest transaction.
            statement = (
                "BEGIN IMMEDIATE"
                if conn.get_execution_options().get("pacsbridge_write")
                else "BEGIN"
            )
            try:
                conn.connection.dbapi_connection.execute(statement)
            except sqlite3.Error as exc:
                raise DBAPIError.instance(statement, (), exc, sqlite3.Error) from exc

    def session(self) -> Session:
        """A session for reading (and incidental writes on PostgreSQL)."""
        return self._sessions()

    @contextmanager
    def write_session(self) -> Iterator[Session]:
        """A session for one write transaction; commits on success, rolls back on error."""
        if self.is_sqlite:
            with self._write_lock, self._write_sessions() as session, session.begin():
                yield session
        else:
            with self._write_sessions() as session, session.begin():
                yield session

    @contextmanager
    def write_connection(self) -> Iterator[Connection]:
        """A Core connection in one write transaction (the ingest hot path: no ORM)."""
        if self.is_sqlite:
            with self._write_lock, self._write_engine.begin() as conn:
                yield conn
        else:
            with self._write_engine.begin() as conn:
                yield conn

    @contextmanager
    def direct(self) -> Iterator[DirectConnection]:
        """A pooled DBAPI connection for statements run on the driver itself (the ingest hot
        path, ``archive.ingest._DirectStatement``): SQLAlchemy's Connection and transaction
        objects, and their events, cost more than the few statements an instance needs."""
        pooled = self.engine.raw_connection()
        try:
            yield DirectConnection(self, pooled.dbapi_connection)
        finally:
            pooled.close()  # the pool rolls back whatever is left open

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision.

        Several processes may start at once on one PostgreSQL index: a session advisory lock
        lets one migrate while the others wait (and then find nothing left to do).
        """
        # On SQLite the migration runs in one BEGIN IMMEDIATE transaction: several processes
        # starting on a new index wait for each other (busy_timeout) instead of failing on a
        # read-to-write lock upgrade ("database is locked").
        engine = self._write_engine if self.is_sqlite else self.engine
        with _UPGRADE_LOCK, engine.connect() as conn:  # Alembic's context is global
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK})
                conn.commit()
            try:
                cfg = alembic_config(self.engine)
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            finally:
                if not self.is_sqlite:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK})
                    conn.commit()

    def schema_revisions(self) -> tuple[str | None, str | None]:
        """(the index's Alembic revision, the newest this code knows): equal when the
        migrations are applied."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        head = self._head
        if head is None:  # the migration files do not change while the process runs
            head = self._head = ScriptDirectory.from_config(
                alembic_config(self.engine)
            ).get_current_head()
        with self.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        return current, head

    def dispose(self) -> None:
        self.engine.dispose()
        self._write_lock.close()


class DirectConnection:
    """A DBAPI connection of :meth:`Database.direct`. Outside :meth:`transaction` a statement
    runs on its own on SQLite (autocommit); on PostgreSQL the driver opens a transaction that
    :meth:`transaction` then completes."""

    def __init__(self, db: Database, dbapi: Any) -> None:
        self.db = db
        self.dbapi = dbapi
        self._error: type[Exception] = db.engine.dialect.loaded_dbapi.Error

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """One write transaction (``BEGIN IMMEDIATE`` and the writer lock on SQLite):
        committed when the block ends, rolled back when it raises. Driver errors of the begin
        and the commit are raised as SQLAlchemy's."""
        dbapi = self.dbapi
        if self.db.is_sqlite:
            with self.db._write_lock:
                self._on_driver("BEGIN IMMEDIATE", dbapi.execute, "BEGIN IMMEDIATE")
                yield from self._committed()
        else:
            yield from self._committed()  # psycopg2 began with the first statement

    def _committed(self) -> Iterator[Any]:
        try:
            yield self.dbapi
        except BaseException:
            with contextlib.suppress(Exception):
                self.dbapi.rollback()
            raise
        self._on_driver("COMMIT", self.dbapi.commit)

    def _on_driver(self, statement: str, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except self._error as exc:
            raise DBAPIError.instance(statement, (), exc, self._error) from exc


# --- leases and late commits (the event dispatcher, the audit export) -------------------------
def server_now(db: Database) -> ColumnElement[datetime]:
    """Now, by the clock of the index server on PostgreSQL (leases held across hosts compare
    one clock), by this process's on SQLite (one host)."""
    if db.is_sqlite:
        return literal(datetime.now(UTC), DateTime(timezone=True))
    return func.now()


def server_after(db: Database, seconds: float) -> ColumnElement[datetime]:
    """:func:`server_now` plus ``seconds``."""
    if db.is_sqlite:
        return literal(datetime.now(UTC) + timedelta(seconds=seconds), DateTime(timezone=True))
    return func.now() + timedelta(seconds=seconds)


def current_snapshot(db: Database) -> str | None:
    """PostgreSQL: the current transaction snapshot (``txid_current_snapshot``), to learn
    later (:func:`snapshot_passed`) whether every transaction running now has ended; None on
    SQLite (one writer at a time: ids commit in their order).

    On PostgreSQL an id of a ``serial``/``identity`` column is taken when a transaction
    inserts its row, not when it commits: a reader following a table by id can see a later id
    before an earlier one. A missing id whose transaction was running at the snapshot is
    either committed (visible) or rolled back (never) once the snapshot has passed."""
    if db.is_sqlite:
        return None
    with db.engine.connect() as conn:
        return str(conn.execute(text("SELECT txid_current_snapshot()::text")).scalar_one())


def snapshot_passed(db: Database, token: str) -> bool:
    """Whether every transaction that was running at ``token`` (:func:`current_snapshot`) has
    committed or rolled back: the oldest transaction still running is newer than any of them
    (PostgreSQL ``txid_snapshot_xmin`` / ``txid_snapshot_xmax``)."""
    with db.engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT txid_snapshot_xmin(txid_current_snapshot()) >= "
                    "txid_snapshot_xmax(CAST(:token AS txid_snapshot))"
                ),
                {"token": token},
            ).scalar_one()
        )


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg
