"""Billing tables on the archive's declarative ``Base`` (one schema, one Alembic history).

``price_list`` is one loaded version of the site's price list file; ``charge_item_definition``
holds its rows. Loading a new version marks the earlier definitions inactive (no new charge is
priced by them) but keeps them: charges made earlier reference their definition's id.
"""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
)
from sqlalchemy.orm import Mapped, mapped_column

from archive.models import Base

# As the archive's tables (``archive.models._NEVER_REUSE_IDS``): SQLite never hands a deleted
# row's id to a new row, as PostgreSQL sequences never do; charges will reference these ids.
_NEVER_REUSE_IDS = {"sqlite_autoincrement": True}

#: Money columns: NUMERIC(12,2), read back as ``Decimal``.
Money = Numeric(12, 2, asdecimal=True)


class PriceList(Base):
    """One loaded version of a price list file."""

    __tablename__ = "price_list"
    __table_args__ = (_NEVER_REUSE_IDS,)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    """The name given at load (default: the file's name)."""
    source: Mapped[str] = mapped_column(String(1024), nullable=False)
    """The file loaded (its path as given)."""
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    loaded_by: Mapped[str] = mapped_column(String(64), nullable=False)
    row_count: Mapped[int] = mapped_column(Integer, nullable=False)


class ChargeItemDefinition(Base):
    """One priced procedure: keyed by a procedure code, else by modality + body part
    (+ laterality, + contrast where given); technical or professional; in force from
    ``effective_from`` to ``effective_to`` (both days included; open-ended when NULL)."""

    __tablename__ = "charge_item_definition"
    __table_args__ = (
        Index(None, "code_system", "code"),
        Index(None, "modality", "body_part"),
        _NEVER_REUSE_IDS,
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    price_list_fk: Mapped[int] = mapped_column(
        ForeignKey("price_list.id", ondelete="RESTRICT"), nullable=False, index=True
    )
    line: Mapped[int] = mapped_column(Integer, nullable=False)
    """The line of the file the definition was read from."""
    code_system: Mapped[str | None] = mapped_column(String(16))
    """``loinc``, ``radlex``, ``local`` or ``cpt``; NULL for a modality + body part row."""
    code: Mapped[str | None] = mapped_column(String(64))
    display: Mapped[str] = mapped_column(String(255), nullable=False, default="")
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    """``technical`` or ``professional``."""
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(16))
    laterality: Mapped[str | None] = mapped_column(String(1))
    contrast: Mapped[bool | None] = mapped_column(Boolean)
    effective_from: Mapped[date] = mapped_column(Date, nullable=False)
    effective_to: Mapped[date | None] = mapped_column(Date)
    base_amount: Mapped[Decimal] = mapped_column(Money, nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    components: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False)
    """``[{"type", "code", "description", "amount" | "factor" | "percent", "condition"}]``,
    numbers as decimal strings (see ``billing.prices``)."""
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    """Whether new charges may be priced by it (only the latest loaded version's are)."""
