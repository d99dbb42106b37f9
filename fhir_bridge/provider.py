"""What a resource type offers (read, search, history, writes) and the search machinery they
share: one SQL query for the page, one for the total, one per ``_include`` (DESIGN.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Select, false, func, or_, select
from sqlalchemy.orm import Session

from fhir_bridge import search
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.search import SearchParam

if TYPE_CHECKING:
    from fhir_bridge.context import Context


@dataclass(frozen=True, slots=True)
class Include:
    """``_include`` (``Source:param``) or ``_revinclude`` of another type."""

    source: str
    param: str
    target: str


@dataclass(slots=True)
class Page:
    total: int | None
    resources: list[dict[str, Any]]
    included: list[dict[str, Any]] = field(default_factory=list)
    offset: int = 0
    count: int = 0
    snapshot: int | None = None
    more: bool = False
    """Whether matches follow this page."""


class Provider(ABC):
    """A resource type: its search parameters, sorts, includes and interactions."""

    type: str = ""
    profile: str = ""
    interactions: tuple[str, ...] = ("read", "search-type")
    versioned: bool = True
    updatable: bool = False
    creatable: bool = False
    conditional_create: bool = False
    documentation: str = ""
    summary_elements: frozenset[str] = frozenset()
    operations: tuple[tuple[str, str], ...] = ()
    """(name, OperationDefinition canonical) of the type's operations."""
    compartment: tuple[str, ...] | None = ()
    """How the type stands to the Patient compartment (FHIR R4
    compartmentdefinition-patient.html): the search parameters whose value ``Patient/<id>``
    (``_id`` for Patient itself) puts a resource in that patient's compartment — the R4
    definition's inclusion criteria, as far as this server holds them. ``()`` (the default): the
    type holds patients' data but is outside the compartment, so nothing of it is visible to a
    request held to one patient. None: the type holds no patient's data (Endpoint, Device,
    ChargeItemDefinition) and stays readable with a scope that names it."""

    def __init__(self) -> None:
        self.params: dict[str, SearchParam] = {}
        self.sorts: dict[str, Any] = {}
        self.includes: dict[str, Include] = {}
        self.revincludes: dict[str, Include] = {}

    # --- to be provided --------------------------------------------------------------------
    def id_column(self) -> Any:
        """The row id the searches order and page by (searchable types only)."""
        raise FHIRError(405, f"{self.type} cannot be searched")

    def base_select(self) -> Select[Any]:
        """``SELECT <row id>`` from the tables the conditions and sorts use (searchable types
        only)."""
        raise FHIRError(405, f"{self.type} cannot be searched")

    @abstractmethod
    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        """The resources of ``row_ids``, in that order."""

    @abstractmethod
    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        """The current version of one resource (404 / 410 when there is none)."""

    @abstractmethod
    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        """Row ids of resources named by their logical ids (for ``_include``)."""

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        current = self.read(ctx, session, resource_id)
        if current["meta"]["versionId"] != version:
            raise FHIRError(
                404,
                f"{self.type}/{resource_id} version {version} is not kept: the current version "
                f"is {current['meta']['versionId']}",
            )
        return current

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        """Every version of one resource, newest first."""
        raise FHIRError(405, f"{self.type} has no history")

    def history_type(
        self, ctx: Context, session: Session, since: datetime | None, offset: int, count: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """(how many, one page of) the versions of every resource of the type, newest first,
        as SQL: the page alone is loaded."""
        raise FHIRError(405, f"{self.type} has no type-level history")

    # --- the patient compartment -------------------------------------------------------------
    def compartment_condition(self, patient: str) -> ColumnElement[bool] | None:
        """SQL on :meth:`base_select`'s tables: the row is in ``patient``'s compartment; None
        when the type holds no patient's data (:attr:`compartment`)."""
        if self.compartment is None:
            return None
        found = [
            self.params[name].condition(patient if name == "_id" else f"Patient/{patient}", None)
            for name in self.compartment
        ]
        return or_(*found) if found else false()

    def visible(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[Any]:
        """Those of ``row_ids`` the request may see (in order): all of them, or for a request
        held to a patient's compartment those in it, chosen by one SQL query."""
        if ctx.compartment is None or not row_ids:
            return list(row_ids)
        condition = self.compartment_condition(ctx.compartment)
        if condition is None:
            return list(row_ids)
        inside = set(
            session.scalars(
                self.base_select().where(self.id_column().in_(list(row_ids)), condition)
            )
        )
        return [row_id for row_id in row_ids if row_id in inside]

    def check_visible(self, ctx: Context, session: Session, resource_id: str) -> None:
        """404 for a resource outside the request's patient compartment: as if it did not
        exist, never 403, which would tell that it does (as HAPI FHIR answers)."""
        if ctx.compartment is None or self.compartment is None:
            return
        if not self.visible(ctx, session, self.row_ids_for(session, [resource_id])):
            raise not_found(self.type, resource_id)

    # --- search -----------------------------------------------------------------------------
    def search(
        self,
        ctx: Context,
        session: Session,
        parsed: search.ParsedSearch,
        *,
        offset: int,
        count: int,
        snapshot: int | None,
        want_total: bool,
        counted: int | None = None,
        extra: Sequence[ColumnElement[bool]] = (),
    ) -> Page:
        """One page of matches. ``snapshot`` (the newest row id the first page saw) and
        ``counted`` (the total the first page counted) come back in the links of later
        pages: the matches of a snapshot do not change while data is added, so a later page
        needs no count of its own."""
        where = [*search.conditions(parsed, self.params), *extra]
        if ctx.compartment is not None:
            restriction = self.compartment_condition(ctx.compartment)
            if restriction is not None:
                where.append(restriction)
        stmt = self.base_select().where(*where)
        if snapshot is not None:
            stmt = stmt.where(self.id_column() <= snapshot)
        order = []
        for key in _sort_keys(parsed):
            descending = key.startswith("-")
            name = key.lstrip("-")
            column = self.sorts.get(name)
            if column is None:
                raise FHIRError(
                    400,
                    f"_sort={name!r}: {self.type} sorts by {', '.join(sorted(self.sorts))}",
                    expression=["_sort"],
                )
            order.append(column.desc() if descending else column.asc())
        order.append(self.id_column().asc())
        row_ids: list[Any] = []
        if count > 0:
            # One row more than the page: a first page that holds every match needs no
            # count and no snapshot.
            row_ids = list(session.scalars(stmt.order_by(*order).offset(offset).limit(count + 1)))
        more = len(row_ids) > count
        row_ids = row_ids[:count]
        total = None
        if count > 0 and not more and (offset == 0 or snapshot is not None):
            total = offset + len(row_ids) if want_total else None
        elif snapshot is not None and counted is not None:
            total = counted if want_total else None
        elif want_total or snapshot is None:
            # One statement for the total and the snapshot: the newest matching row; the next
            # pages leave out rows added since (stable paging). The read transaction of the
            # session saw the page and sees this as of the same moment (SQLite WAL).
            matches = stmt.subquery()
            found, newest = session.execute(
                select(func.count(), func.max(matches.c[0])).select_from(matches)
            ).one()
            total = int(found) if want_total else None
            if snapshot is None:
                snapshot = newest
        resources = self.load(ctx, session, row_ids) if row_ids else []
        return Page(total, resources, offset=offset, count=count, snapshot=snapshot, more=more)


def _sort_keys(parsed: search.ParsedSearch) -> list[str]:
    keys: list[str] = []
    for value in parsed.result.get("_sort", []):
        keys += [part.strip() for part in value.split(",") if part.strip()]
    return keys


def meta(version: str | int, updated: Any) -> dict[str, Any]:
    from fhir_bridge.rest import instant

    return {"versionId": str(version), "lastUpdated": instant(updated)}
