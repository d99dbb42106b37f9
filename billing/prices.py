"""The price list: ChargeItemDefinitions read from the site's CSV or TOML file.

A file is validated as a whole: every bad row is reported with its line number in one
:class:`PriceListError`, and nothing is stored unless every row is good. Money is ``Decimal``
(never float): amounts have at most 2 decimals, factors and percentages at most 4.

Columns (CSV header names; the keys of a TOML ``[[definition]]`` table):

``code_system``, ``code``
    ``loinc``, ``radlex`` (Playbook RPID), ``local`` or ``cpt`` (only for sites with their own
    CPT licence; no CPT content ships with pacsbridge) and the procedure code. Empty for a
    modality + body part row.
``display``
    What the procedure is called.
``kind``
    ``technical`` or ``professional`` (required).
``modality``, ``body_part``, ``laterality``, ``contrast``
    The fallback key of a row without a code: DICOM Modality and Body Part Examined (both
    required there), Laterality ``R``, ``L`` or ``B`` and contrast ``true``/``false``
    (optional: an empty one matches any study).
``effective_from``, ``effective_to``
    ISO dates; both days included; ``effective_to`` empty: open-ended. Two rows of the same key
    and kind may not be in force on the same day.
``base_amount``
    The base price (``120.00``), not negative.
``components``
    CSV: ``type:code:value[:condition]`` items separated by ``;``; TOML: a list of inline tables
    ``{type, code, value, condition, description}``. ``type`` is ``surcharge``, ``discount`` or
    ``tax``; ``value`` is an amount (``25.00``), a factor (``x1.5``) or a percentage (``19%``;
    a tax is always a percentage); ``condition`` names what the study must have for the
    component to apply (``contrast``, ``after_hours``, ``weekend``, ...).

Pricing (:func:`price`): surcharges are computed on the base amount; discounts on the base plus
the surcharges; taxes on the net (base + surcharges - discounts). Each line is rounded to the
cent on its own with ``ROUND_HALF_EVEN`` (banker's rounding, as IEEE 754 and Python's
``decimal`` default), then the rounded lines are summed: the printed lines always add up.

Site tax: a definition with no ``tax`` component at all (conditional ones included) is taxed at
the site's rate, ``billing.tax_percent`` (none by default): one ``tax`` line coded
``billing.tax_code`` (``VAT``), described ``"VAT 19%"``, on the net, rounded as the other lines.
A definition with a tax component of its own is priced by it alone (the site rate is ignored,
even when that component's condition does not apply to the study).
"""

from __future__ import annotations

import csv
import getpass
import hashlib
import io
import itertools
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from billing.models import ChargeItemDefinition, PriceList

COLUMNS = (
    "code_system",
    "code",
    "display",
    "kind",
    "modality",
    "body_part",
    "laterality",
    "contrast",
    "effective_from",
    "effective_to",
    "base_amount",
    "components",
)
REQUIRED_COLUMNS = ("kind", "effective_from", "base_amount")
CODE_SYSTEMS = ("loinc", "radlex", "local", "cpt")
KINDS = ("technical", "professional")
COMPONENT_TYPES = ("surcharge", "discount", "tax")
LATERALITIES = ("R", "L", "B")
CENT = Decimal("0.01")

_CODE_FORMS = {
    "loinc": re.compile(r"(LP)?\d{1,8}-\d"),
    "radlex": re.compile(r"RPID\d{1,6}"),
    "local": re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"),
    "cpt": re.compile(r"\d{4}[0-9FTU]"),
}
_CS = re.compile(r"[A-Z0-9_ ]{1,16}")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CONDITION = re.compile(r"[a-z][a-z0-9_]{0,31}")
_TRUE = {"true", "yes", "1", "y"}
_FALSE = {"false", "no", "0", "n"}


class PriceListError(ValueError):
    """A price list file that cannot be loaded; ``errors`` are its ``line N: ...`` messages."""

    def __init__(self, source: str, errors: Sequence[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(f"{source}: {len(self.errors)} error(s)\n" + "\n".join(self.errors))


@dataclass(frozen=True)
class Component:
    type: str
    code: str
    description: str = ""
    amount: Decimal | None = None
    factor: Decimal | None = None
    percent: Decimal | None = None
    condition: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"type": self.type, "code": self.code}
        data["description"] = self.description or self.code
        for name in ("amount", "factor", "percent"):
            value = getattr(self, name)
            if value is not None:
                data[name] = str(value)
        data["condition"] = self.condition
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Component:
        def dec(name: str) -> Decimal | None:
            value = data.get(name)
            return None if value is None else Decimal(str(value))

        return cls(
            type=data["type"],
            code=data["code"],
            description=data.get("description") or "",
            amount=dec("amount"),
            factor=dec("factor"),
            percent=dec("percent"),
            condition=data.get("condition"),
        )


@dataclass(frozen=True)
class ParsedDefinition:
    line: int
    kind: str
    effective_from: date
    base_amount: Decimal
    code_system: str | None = None
    code: str | None = None
    display: str = ""
    modality: str | None = None
    body_part: str | None = None
    laterality: str | None = None
    contrast: bool | None = None
    effective_to: date | None = None
    components: tuple[Component, ...] = ()

    @property
    def key(self) -> tuple[Any, ...]:
        if self.code is not None:
            return ("code", self.code_system, self.code, self.kind)
        return (
            "fallback",
            self.modality,
            self.body_part,
            self.laterality,
            self.contrast,
            self.kind,
        )


@dataclass
class ParsedPriceList:
    source: str
    sha256: str
    definitions: list[ParsedDefinition] = field(default_factory=list)


# --- parsing -------------------------------------------------------------------------------


def load_price_list(path: str | Path) -> ParsedPriceList:
    """Read and validate a price list file (``.toml``: TOML, anything else: CSV).

    Raises :class:`PriceListError` listing every bad row by line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PriceListError(str(path), [f"cannot read the file: {exc.strerror or exc}"]) from exc
    return parse_price_list(data, source=str(path), toml=path.suffix.lower() == ".toml")


def parse_price_list(data: bytes, *, source: str, toml: bool = False) -> ParsedPriceList:
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PriceListError(source, [f"the file is not UTF-8: {exc}"]) from exc
    rows = _toml_rows(text, source) if toml else _csv_rows(text, source)
    errors: list[str] = []
    definitions: list[ParsedDefinition] = []
    for line, row in rows:
        row_errors: list[str] = []
        definition = _definition(line, row, row_errors)
        errors.extend(f"line {line}: {message}" for message in row_errors)
        if definition is not None:
            definitions.append(definition)
    errors.extend(_overlaps(definitions))
    if not definitions and not errors:
        errors.append("the price list has no definitions")
    if errors:
        raise PriceListError(source, errors)
    return ParsedPriceList(source=source, sha256=sha256, definitions=definitions)


def _csv_rows(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    errors: list[str] = []
    start = 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record) or record[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [cell.strip().lower() for cell in record]
                unknown = [name for name in header if name not in COLUMNS]
                missing = [name for name in REQUIRED_COLUMNS if name not in header]
                duplicate = {name for name in header if header.count(name) > 1}
                if unknown:
                    errors.append(f"line {line}: unknown column(s): {', '.join(unknown)}")
                if missing:
                    errors.append(f"line {line}: missing column(s): {', '.join(missing)}")
                if duplicate:
                    errors.append(f"line {line}: repeated column(s): {', '.join(duplicate)}")
                if errors:
                    raise PriceListError(source, errors)
                continue
            if len(record) != len(header):
                errors.append(f"line {line}: {len(record)} fields, the header has {len(header)}")
                continue
            rows.append((line, dict(zip(header, record, strict=True))))
    except csv.Error as exc:
        errors.append(f"line {reader.line_num}: {exc}")
    if header is None:
        errors.append("line 1: no header row")
    if errors:
        raise PriceListError(source, errors)
    return rows


def _toml_rows(text: str, source: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceListError(source, [str(exc)]) from exc
    # tomllib keeps no positions: the n-th ``[[definition]]`` header is the n-th table's line.
    lines = [
        number
        for number, content in enumerate(text.splitlines(), start=1)
        if re.fullmatch(r"\s*\[\[\s*definition\s*\]\]\s*(#.*)?", content)
    ]
    errors: list[str] = []
    unknown_keys = [key for key in document if key != "definition"]
    if unknown_keys:
        errors.append(f"unknown top-level key(s): {', '.join(unknown_keys)}")
    tables = document.get("definition", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        errors.append("'definition' must be an array of tables ([[definition]])")
        tables = []
    rows: list[tuple[int, dict[str, Any]]] = []
    for index, table in enumerate(tables):
        line = lines[index] if index < len(lines) and len(lines) == len(tables) else index + 1
        unknown = [key for key in table if key not in COLUMNS]
        if unknown:
            errors.append(f"line {line}: unknown key(s): {', '.join(unknown)}")
            continue
        rows.append((line, table))
    if errors:
        raise PriceListError(source, errors)
    return rows


def _text(value: Any, name: str, errors: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors.append(f"{name}: expected text, got {type(value).__name__}")
        return None
    value = str(value).strip()
    return value or None


def _decimal(
    value: Any, name: str, errors: list[str], *, places: int, minimum: Decimal | None = None
) -> Decimal | None:
    if isinstance(value, float):
        errors.append(f"{name}: write money as a string ('{value:.2f}'), not a float")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        errors.append(f"{name}: expected a decimal number, got {type(value).__name__}")
        return None
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+(\.\d+)?", text):
        errors.append(f"{name}: {text!r} is not a decimal number (like 120.00)")
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimals
        errors.append(f"{name}: {text!r} is not a decimal number")
        return None
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > places:
        errors.append(f"{name}: {text} has more than {places} decimals")
        return None
    if minimum is not None and number < minimum:
        errors.append(f"{name}: {text} is less than {minimum}")
        return None
    return number


def _date(value: Any, name: str, errors: list[str]) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        errors.append(f"{name}: a date without a time is expected")
        return None
    if isinstance(value, date):
        return value
    if not isinstance(value, str):
        errors.append(f"{name}: expected an ISO date, got {type(value).__name__}")
        return None
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value.strip()):
            raise ValueError
        return date.fromisoformat(value.strip())
    except ValueError:
        errors.append(f"{name}: {value!r} is not an ISO date (YYYY-MM-DD)")
        return None


def _bool(value: Any, name: str, errors: list[str]) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if not text:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    errors.append(f"{name}: {value!r} is not true or false")
    return None


def _definition(line: int, row: dict[str, Any], errors: list[str]) -> ParsedDefinition | None:
    code_system = _text(row.get("code_system"), "code_system", errors)
    code = _text(row.get("code"), "code", errors)
    if code_system is not None:
        code_system = code_system.lower()
        if code_system not in CODE_SYSTEMS:
            errors.append(f"code_system: {code_system!r} is not one of {', '.join(CODE_SYSTEMS)}")
        elif code is None:
            errors.append(f"code: a {code_system} row needs a code")
        elif not _CODE_FORMS[code_system].fullmatch(code):
            errors.append(f"code: {code!r} is not a {code_system} code")
        elif code_system == "loinc" and not _loinc_check_digit_ok(code):
            errors.append(f"code: {code!r}: wrong LOINC check digit")
    elif code is not None:
        errors.append("code_system: a code needs its code_system (loinc, radlex, local, cpt)")
    display = _text(row.get("display"), "display", errors) or ""
    if len(display) > 255:
        errors.append("display: longer than 255 characters")
    kind = (_text(row.get("kind"), "kind", errors) or "").lower()
    if kind not in KINDS:
        errors.append(f"kind: {kind or 'empty'!r} is not technical or professional")
    modality = _cs(row.get("modality"), "modality", errors)
    body_part = _cs(row.get("body_part"), "body_part", errors)
    laterality = _text(row.get("laterality"), "laterality", errors)
    if laterality is not None:
        laterality = laterality.upper()
        if laterality not in LATERALITIES:
            errors.append(f"laterality: {laterality!r} is not R, L or B")
    contrast = _bool(row.get("contrast"), "contrast", errors)
    if code is None and code_system is None and (modality is None or body_part is None):
        errors.append("a row without a procedure code needs modality and body_part")
    effective_from = _date(row.get("effective_from"), "effective_from", errors)
    if effective_from is None and not any(e.startswith("effective_from") for e in errors):
        errors.append("effective_from: required")
    effective_to = _date(row.get("effective_to"), "effective_to", errors)
    if effective_from and effective_to and effective_to < effective_from:
        errors.append("effective_to: before effective_from")
    raw_base = row.get("base_amount")
    base_amount = None
    if raw_base is None or raw_base == "":
        errors.append("base_amount: required")
    else:
        base_amount = _decimal(raw_base, "base_amount", errors, places=2, minimum=Decimal(0))
        if base_amount is not None and base_amount >= Decimal("1e10"):
            errors.append("base_amount: too large for NUMERIC(12,2)")
    components = _components(row.get("components"), errors)
    if errors or effective_from is None or base_amount is None:
        return None
    return ParsedDefinition(
        line=line,
        kind=kind,
        effective_from=effective_from,
        effective_to=effective_to,
        base_amount=base_amount,
        code_system=code_system,
        code=code,
        display=display,
        modality=modality,
        body_part=body_part,
        laterality=laterality,
        contrast=contrast,
        components=tuple(components),
    )


def _cs(value: Any, name: str, errors: list[str]) -> str | None:
    text = _text(value, name, errors)
    if text is None:
        return None
    text = text.upper()
    if not _CS.fullmatch(text):
        errors.append(f"{name}: {text!r} is not a DICOM code string (A-Z, 0-9, _, at most 16)")
        return None
    return text


def _loinc_check_digit_ok(code: str) -> bool:
    """LOINC's Mod 10 check digit (the Luhn algorithm on the digits before the hyphen)."""
    digits, check = code.removeprefix("LP").split("-")
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 == 0 else 1)
        total += value // 10 + value % 10
    return (10 - total % 10) % 10 == int(check)


def _components(value: Any, errors: list[str]) -> list[Component]:
    if value is None or value == "":
        return []
    items: list[dict[str, Any]] = []
    if isinstance(value, str):
        for number, text in enumerate(value.split(";"), start=1):
            if not text.strip():
                continue
            parts = [part.strip() for part in text.split(":")]
            if len(parts) not in (3, 4):
                errors.append(
                    f"components #{number}: {text.strip()!r} is not type:code:value[:condition]"
                )
                continue
            items.append(
                {
                    "type": parts[0],
                    "code": parts[1],
                    "value": parts[2],
                    "condition": parts[3] if len(parts) == 4 else None,
                }
            )
    elif isinstance(value, list) and all(isinstance(item, dict) for item in value):
        items = value
    else:
        errors.append("components: expected type:code:value[:condition] items or tables")
        return []
    components: list[Component] = []
    for number, item in enumerate(items, start=1):
        component = _component(number, item, errors)
        if component is not None:
            components.append(component)
    return components


def _component(number: int, item: dict[str, Any], errors: list[str]) -> Component | None:
    where = f"components #{number}"
    start = len(errors)
    unknown = [
        key for key in item if key not in ("type", "code", "value", "condition", "description")
    ]
    if unknown:
        errors.append(f"{where}: unknown key(s) {', '.join(unknown)}")
    kind = str(item.get("type") or "").lower()
    if kind not in COMPONENT_TYPES:
        errors.append(f"{where}: type {kind or 'empty'!r} is not surcharge, discount or tax")
    code = str(item.get("code") or "")
    if not _TOKEN.fullmatch(code):
        errors.append(f"{where}: code {code!r} is not 1 to 64 letters, digits, '.', '_', '-'")
    condition = item.get("condition") or None
    if condition is not None and not (
        isinstance(condition, str) and _CONDITION.fullmatch(condition)
    ):
        errors.append(f"{where}: condition {condition!r} is not a lower-case name")
    description = item.get("description") or ""
    if not isinstance(description, str):
        errors.append(f"{where}: description must be text")
        description = ""
    raw = item.get("value")
    amount = factor = percent = None
    if isinstance(raw, str) and raw.strip().lower().startswith("x"):
        factor = _decimal(raw.strip()[1:], f"{where} factor", errors, places=4)
        if factor is not None:
            if kind == "surcharge" and factor < 1:
                errors.append(f"{where}: a surcharge factor is 1 or more")
            elif kind == "discount" and not Decimal(0) <= factor <= 1:
                errors.append(f"{where}: a discount factor is between 0 and 1")
    elif isinstance(raw, str) and raw.strip().endswith("%"):
        percent = _decimal(
            raw.strip()[:-1], f"{where} percentage", errors, places=4, minimum=Decimal(0)
        )
        if percent is not None and kind == "discount" and percent > 100:
            errors.append(f"{where}: a discount is at most 100%")
    elif raw is None or raw == "":
        errors.append(f"{where}: a value is required (25.00, x1.5 or 19%)")
    else:
        amount = _decimal(raw, f"{where} amount", errors, places=2, minimum=Decimal(0))
    if kind == "tax" and percent is None and len(errors) == start:
        errors.append(f"{where}: a tax is a percentage (tax:VAT:19%)")
    if len(errors) > start:
        return None
    return Component(
        type=kind,
        code=code,
        description=description,
        amount=amount,
        factor=factor,
        percent=percent,
        condition=condition,
    )


def _overlaps(definitions: list[ParsedDefinition]) -> list[str]:
    errors: list[str] = []
    by_key: dict[tuple[Any, ...], list[ParsedDefinition]] = {}
    for definition in definitions:
        by_key.setdefault(definition.key, []).append(definition)
    for group in by_key.values():
        group.sort(key=lambda d: d.effective_from)
        for earlier, later in itertools.pairwise(group):
            if earlier.effective_to is None or earlier.effective_to >= later.effective_from:
                errors.append(
                    f"line {later.line}: in force on the same days as line {earlier.line} "
                    f"(same key and kind; from {later.effective_from.isoformat()})"
                )
    return sorted(errors, key=lambda e: int(e.split()[1].rstrip(":")))


# --- storing -------------------------------------------------------------------------------


class _HasDb(Protocol):
    @property
    def db(self) -> Any: ...


def store_price_list(
    archive: _HasDb,
    parsed: ParsedPriceList,
    name: str,
    sha256: str | None = None,
    *,
    currency: str | None = None,
    loaded_by: str | None = None,
) -> int:
    """Store a validated price list as a new version, in one transaction: the definitions of
    earlier versions stay (for the charges that reference them) but become inactive.
    Returns the new ``price_list`` id."""
    if currency is None:
        settings = getattr(archive, "settings", None)
        currency = settings.billing.currency if settings is not None else "EUR"
    with archive.db.write_session() as session:
        session.execute(
            update(ChargeItemDefinition)
            .where(ChargeItemDefinition.active.is_(True))
            .values(active=False)
        )
        price_list = PriceList(
            name=name,
            source=parsed.source,
            sha256=sha256 or parsed.sha256,
            loaded_at=datetime.now(UTC),
            loaded_by=(loaded_by or "cli")[:64],
            row_count=len(parsed.definitions),
        )
        session.add(price_list)
        session.flush()
        for d in parsed.definitions:
            session.add(
                ChargeItemDefinition(
                    price_list_fk=price_list.id,
                    line=d.line,
                    code_system=d.code_system,
                    code=d.code,
                    display=d.display,
                    kind=d.kind,
                    modality=d.modality,
                    body_part=d.body_part,
                    laterality=d.laterality,
                    contrast=d.contrast,
                    effective_from=d.effective_from,
                    effective_to=d.effective_to,
                    base_amount=d.base_amount,
                    currency=currency,
                    components=[c.to_json() for c in d.components],
                    active=True,
                )
            )
        return price_list.id


def os_user() -> str:
    """Who loads a price list: the OS user, else ``cli``."""
    try:
        return getpass.getuser() or "cli"
    except Exception:
        return "cli"


# --- finding and pricing -------------------------------------------------------------------


def _in_force(on: date) -> Any:
    return (
        ChargeItemDefinition.active.is_(True),
        ChargeItemDefinition.effective_from <= on,
        or_(ChargeItemDefinition.effective_to.is_(None), ChargeItemDefinition.effective_to >= on),
    )


def find_definition(
    session: Session,
    *,
    kind: str,
    on: date,
    procedure_codes: Iterable[tuple[str, str]] = (),
    modality: str | None = None,
    body_part: str | None = None,
    laterality: str | None = None,
    contrast: bool | None = None,
) -> ChargeItemDefinition | None:
    """The active definition in force on ``on`` that prices a study.

    A procedure code match wins (the first of ``procedure_codes``, in the order given, that has
    a definition); else a modality + body part row whose laterality and contrast, where it names
    them, equal the study's. The most specific of those wins: one naming laterality over one
    naming only contrast over one naming neither. A study whose laterality or contrast is not
    known (None) matches only rows that do not name it."""
    conditions = (*_in_force(on), ChargeItemDefinition.kind == kind)
    for system, code in procedure_codes:
        row = session.scalars(
            select(ChargeItemDefinition)
            .where(
                *conditions,
                ChargeItemDefinition.code_system == system.lower(),
                ChargeItemDefinition.code == code,
            )
            .order_by(ChargeItemDefinition.id)
            .limit(1)
        ).first()
        if row is not None:
            return row
    if not modality or not body_part:
        return None
    candidates = session.scalars(
        select(ChargeItemDefinition).where(
            *conditions,
            ChargeItemDefinition.code.is_(None),
            ChargeItemDefinition.modality == modality.upper(),
            ChargeItemDefinition.body_part == body_part.upper(),
        )
    ).all()
    side = laterality.upper() if laterality else None
    matching = [
        c
        for c in candidates
        if (c.laterality is None or c.laterality == side)
        and (c.contrast is None or c.contrast == contrast)
    ]
    if not matching:
        return None
    return max(
        matching,
        key=lambda c: (2 * (c.laterality is not None) + (c.contrast is not None), -c.id),
    )


class PricedLine(NamedTuple):
    type: str
    code: str
    description: str
    amount: Decimal
    """Signed: a discount is negative."""


class Price(NamedTuple):
    """``net`` (base + surcharges - discounts) and the lines applied, base first; taxes are
    lines too, on top of the net (``tax``, ``total``)."""

    net: Decimal
    lines: list[PricedLine]

    @property
    def tax(self) -> Decimal:
        return sum((line.amount for line in self.lines if line.type == "tax"), Decimal("0.00"))

    @property
    def total(self) -> Decimal:
        return self.net + self.tax


class _Priceable(Protocol):
    @property
    def base_amount(self) -> Decimal: ...

    @property
    def components(self) -> Any: ...


def cents(value: Decimal) -> Decimal:
    """Round to the cent with ROUND_HALF_EVEN (banker's rounding)."""
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


def price(
    definition: _Priceable,
    conditions: Iterable[str] = (),
    *,
    site_tax_percent: Decimal | None = None,
    site_tax_code: str = "VAT",
) -> Price:
    """Price a definition for a study with ``conditions`` (``{"contrast", "after_hours"}``).

    A component with a condition applies only when the condition is among ``conditions``.
    Surcharges are computed on the base amount, discounts on base + surcharges, taxes on the net.
    A definition with no tax component at all (whatever their conditions) is taxed at
    ``site_tax_percent`` when one is given (``billing.tax_percent``): one ``tax`` line coded
    ``site_tax_code``, described ``"<code> <rate>%"``, on the net.
    Rounding rule: every line is rounded to the cent on its own with ``ROUND_HALF_EVEN``
    (banker's rounding, Python ``decimal``'s default, IEEE 754 roundTiesToEven), and the net
    and tax are the sums of the rounded lines, so a printed price list adds up exactly."""
    present = set(conditions)
    base = cents(Decimal(definition.base_amount))
    lines = [PricedLine("base", "base", "base amount", base)]
    components = [
        c if isinstance(c, Component) else Component.from_json(c) for c in definition.components
    ]
    applied = [c for c in components if c.condition is None or c.condition in present]

    def line_amount(c: Component, on: Decimal) -> Decimal:
        if c.amount is not None:
            return cents(c.amount)
        if c.factor is not None:  # x1.25: a quarter more; x0.9: a tenth off
            return cents(on * abs(c.factor - 1))
        assert c.percent is not None
        return cents(on * c.percent / 100)

    surcharges = Decimal("0.00")
    for c in applied:
        if c.type == "surcharge":
            amount = line_amount(c, base)
            surcharges += amount
            lines.append(PricedLine(c.type, c.code, c.description or c.code, amount))
    subtotal = base + surcharges
    discounts = Decimal("0.00")
    for c in applied:
        if c.type == "discount":
            amount = min(line_amount(c, subtotal), subtotal - discounts)
            discounts += amount
            lines.append(PricedLine(c.type, c.code, c.description or c.code, -amount))
    net = subtotal - discounts
    for c in applied:
        if c.type == "tax":
            lines.append(PricedLine(c.type, c.code, c.description or c.code, line_amount(c, net)))
    if site_tax_percent is not None and not any(c.type == "tax" for c in components):
        rate = Decimal(site_tax_percent)
        amount = cents(net * rate / 100)
        lines.append(PricedLine("tax", site_tax_code, f"{site_tax_code} {rate}%", amount))
    return Price(net, lines)


def definitions(
    session: Session, *, all_versions: bool = False, on: date | None = None
) -> list[ChargeItemDefinition]:
    """The active definitions in force on ``on`` (default today), or every definition of every
    loaded version (``all_versions``), by price list then line."""
    query = select(ChargeItemDefinition)
    if not all_versions:
        query = query.where(*_in_force(on or date.today()))
    return list(
        session.scalars(
            query.order_by(ChargeItemDefinition.price_list_fk, ChargeItemDefinition.line)
        ).all()
    )


def definition_json(d: ChargeItemDefinition) -> dict[str, Any]:
    return {
        "id": d.id,
        "price_list": d.price_list_fk,
        "line": d.line,
        "code_system": d.code_system,
        "code": d.code,
        "display": d.display,
        "kind": d.kind,
        "modality": d.modality,
        "body_part": d.body_part,
        "laterality": d.laterality,
        "contrast": d.contrast,
        "effective_from": d.effective_from.isoformat(),
        "effective_to": d.effective_to.isoformat() if d.effective_to else None,
        "base_amount": str(cents(Decimal(d.base_amount))),
        "currency": d.currency,
        "components": d.components,
        "active": d.active,
    }
