"""Where an export of the audit trail stands: the ``audit_export`` table's statements.

An export (the IHE ATNA syslog export, ``pacsbridge.atna``) follows the append-only
``audit_event`` table by id. Its position (``cursor``: the last id it has passed) is kept in
the index, one row per destination, so that it resumes where it stopped: after a restart, the
events every process recorded meanwhile are sent. A lease (``locked_by`` until
``locked_until``, by the index server's clock on PostgreSQL) lets one process export at a
time; another takes over once the lease has passed. The cursor moves by compare-and-set on
the value the round read, while the lease is held: a process whose lease lapsed during a long
round never moves it back over the one that took over.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement

from archive.audit import AuditEventRow, AuditExportRow
from archive.db import Database, server_after, server_now

_EXPORT = cast(Table, AuditExportRow.__table__)


@dataclass(frozen=True, slots=True)
class ExportState:
    cursor: int
    free: bool
    """Whether the lease is this owner's to take (free, lapsed or held by it already)."""


class AuditExports:
    """The position and the lease of one export (``name``) for one owner (a process)."""

    def __init__(self, db: Database, name: str, owner: str) -> None:
        self.db = db
        self.name = name
        self.owner = owner

    def start(self) -> int:
        """The stored cursor; on the first start of this export (no row yet), the newest
        event id, stored: a new destination gets the events recorded from now on."""
        with self.db.write_connection() as conn:
            cursor = conn.execute(
                select(_EXPORT.c.cursor).where(_EXPORT.c.name == self.name)
            ).scalar()
            if cursor is not None:
                return int(cursor)
            head = int(
                conn.execute(select(func.coalesce(func.max(AuditEventRow.id), 0))).scalar_one()
            )
            dialect = sqlite if self.db.is_sqlite else postgresql
            conn.execute(
                dialect.insert(_EXPORT)
                .values(name=self.name, cursor=head, updated_at=datetime.now(UTC))
                .on_conflict_do_nothing(index_elements=["name"])
            )
            # Another process may have stored its start first: that one stands.
            return int(
                conn.execute(
                    select(_EXPORT.c.cursor).where(_EXPORT.c.name == self.name)
                ).scalar_one()
            )

    def _free(self) -> ColumnElement[bool]:
        return or_(
            _EXPORT.c.locked_by == self.owner,
            _EXPORT.c.locked_by.is_(None),
            _EXPORT.c.locked_until.is_(None),
            _EXPORT.c.locked_until < server_now(self.db),
        )

    def state(self) -> ExportState | None:
        """The cursor and whether the lease can be taken (a read: no write transaction)."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(_EXPORT.c.cursor, self._free().label("free")).where(
                    _EXPORT.c.name == self.name
                )
            ).first()
        return None if row is None else ExportState(int(row.cursor), bool(row.free))

    def take_lease(self, seconds: float) -> int | None:
        """Hold the export for ``seconds`` (renewed when this owner holds it already): the
        cursor, or None while another owner holds a lease that has not passed."""
        with self.db.write_connection() as conn:
            cursor = conn.execute(
                update(_EXPORT)
                .where(_EXPORT.c.name == self.name, self._free())
                .values(locked_by=self.owner, locked_until=server_after(self.db, seconds))
                .returning(_EXPORT.c.cursor)
            ).scalar()
        return None if cursor is None else int(cursor)

    def advance(self, read_cursor: int, cursor: int, seconds: float) -> bool:
        """Move the cursor from ``read_cursor`` (the one the round started from) to ``cursor``
        and renew the lease, only while this owner holds it and the cursor has not moved:
        False (nothing written) otherwise."""
        with self.db.write_connection() as conn:
            changed = conn.execute(
                update(_EXPORT)
                .where(
                    _EXPORT.c.name == self.name,
                    _EXPORT.c.locked_by == self.owner,
                    _EXPORT.c.cursor == read_cursor,
                )
                .values(
                    cursor=cursor,
                    locked_until=server_after(self.db, seconds),
                    updated_at=datetime.now(UTC),
                )
            ).rowcount
        return bool(changed)

    def release(self) -> None:
        """Give the lease back (at shutdown: another process takes over at once)."""
        with self.db.write_connection() as conn:
            conn.execute(
                update(_EXPORT)
                .where(_EXPORT.c.name == self.name, _EXPORT.c.locked_by == self.owner)
                .values(locked_by=None, locked_until=None)
            )

    def rows(self, after: int, limit: int) -> list[AuditEventRow]:
        """At most ``limit`` events with an id above ``after``, in id order, as rows (an event
        is built from its row by the export, one at a time: a row that cannot be built is
        skipped, never the batch)."""
        with self.db.session() as session:
            return list(
                session.scalars(
                    select(AuditEventRow)
                    .where(AuditEventRow.id > after)
                    .order_by(AuditEventRow.id)
                    .limit(limit)
                ).all()
            )


__all__ = ["AuditExports", "ExportState"]
