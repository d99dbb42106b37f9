"""Search parameters (FHIR R4 search.html) turned into SQL conditions on the index.

A request's parameters become :class:`Criterion` values (name, modifier, chain, the
comma-separated alternatives); each resource declares its :class:`SearchParam` values, whose
``condition`` builds the SQL of one value. Repeated parameters AND, commas OR.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal, DecimalException, InvalidOperation
from typing import Any

from sqlalchemy import ColumnElement, and_, false, not_, or_, true

from fhir_bridge.errors import FHIRError

_DIGITS = re.compile(r"[0-9]{1,18}")


def row_id(value: str | None) -> int | None:
    """The integer of an id made of ASCII digits (at most 18: a 64-bit row id), else None
    (``str.isdigit`` also takes other scripts' digits)."""
    return int(value) if value and _DIGITS.fullmatch(value) else None


def count_value(value: str, name: str, limit: int = 9) -> int:
    """A non-negative integer parameter (``_count``, ``_offset``); 400 otherwise."""
    if not re.fullmatch(rf"[0-9]{{1,{limit}}}", value):
        raise FHIRError(400, f"{name}={value!r}: not a non-negative integer", expression=[name])
    return int(value)


# Parameters every search takes (search.html#all, #count, #sort, #include, #elements…).
RESULT_PARAMETERS = {
    "_count",
    "_sort",
    "_include",
    "_revinclude",
    "_elements",
    "_summary",
    "_total",
    "_format",
    "_pretty",
    "_offset",
    "_snapshot",
    "_counted",
}

Condition = ColumnElement[bool]


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    modifier: str | None
    chain: str | None
    values: tuple[str, ...]
    raw_name: str


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter of a resource type, as the CapabilityStatement lists it."""

    name: str
    type: str  # string, token, reference, date, number, quantity, uri
    documentation: str
    condition: Callable[[str, str | None], Condition]
    """SQL of one value with a modifier (None when given without)."""
    modifiers: frozenset[str] = frozenset()
    definition: str | None = None
    chain: Callable[[str, str | None, str], Condition] | None = None
    """For a reference: SQL of ``name.<param>=value`` (param, modifier, value)."""
    targets: tuple[str, ...] = ()


@dataclass(slots=True)
class ParsedSearch:
    criteria: list[Criterion] = field(default_factory=list)
    result: dict[str, list[str]] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)


_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)(?::([A-Za-z0-9_\-]+))?(?:\.(.+))?$")


def split_values(value: str) -> tuple[str, ...]:
    """Comma-separated alternatives; ``\\,`` is a literal comma (search.html#escaping)."""
    parts = re.split(r"(?<!\\),", value)
    return tuple(part.replace("\\,", ",").replace("\\|", "|").replace("\\$", "$") for part in parts)


def parse(
    items: Sequence[tuple[str, str]], params: dict[str, SearchParam], *, strict: bool
) -> ParsedSearch:
    """Sort the request's parameters into criteria, result parameters and unknown ones (400
    under ``Prefer: handling=strict``; else reported back in the Bundle)."""
    parsed = ParsedSearch()
    for raw_name, value in items:
        if raw_name in RESULT_PARAMETERS:
            parsed.result.setdefault(raw_name, []).append(value)
            continue
        match = _NAME.match(raw_name)
        known = match is not None and match.group(1) in params
        if match is not None and known:
            name, modifier, chain = match.groups()
            param = params[name]
            if chain is not None and param.chain is None:
                known = False
            elif modifier is not None and modifier not in param.modifiers:
                if param.type == "reference" and modifier in param.targets:
                    pass
                else:
                    known = False
        if not known or match is None:
            if strict:
                raise FHIRError(
                    400,
                    f"unknown or unsupported search parameter {raw_name!r} "
                    f"(supported: {', '.join(sorted(params))})",
                    code="not-supported",
                    expression=[raw_name],
                )
            parsed.unknown.append(raw_name)
            continue
        name, modifier, chain = match.groups()
        parsed.criteria.append(Criterion(name, modifier, chain, split_values(value), raw_name))
    return parsed


def conditions(parsed: ParsedSearch, params: dict[str, SearchParam]) -> list[Condition]:
    out: list[Condition] = []
    for criterion in parsed.criteria:
        param = params[criterion.name]
        alternatives: list[Condition] = []
        for value in criterion.values:
            if criterion.modifier == "missing" and "missing" in param.modifiers:
                alternatives.append(param.condition(value, "missing"))
            elif criterion.chain is not None:
                assert param.chain is not None
                chained, _, chained_modifier = criterion.chain.partition(":")
                if "." in chained:
                    raise FHIRError(
                        400,
                        f"{criterion.raw_name}: chains of more than one step are not supported",
                        code="not-supported",
                        expression=[criterion.raw_name],
                    )
                alternatives.append(param.chain(chained, chained_modifier or None, value))
            else:
                modifier = criterion.modifier
                if param.type == "reference" and modifier in param.targets:
                    value = f"{modifier}/{value}" if "/" not in value else value
                    modifier = None
                alternatives.append(param.condition(value, modifier))
        out.append(or_(*alternatives) if len(alternatives) > 1 else alternatives[0])
    return out


# --- tokens -------------------------------------------------------------------------------


def token(value: str) -> tuple[str | None, str | None]:
    """(system, code) of ``system|code``, ``|code`` (system ''), ``system|`` (code None) or
    ``code`` (system None)."""
    if "|" not in value:
        return None, value
    system, _, code = value.partition("|")
    return system, (code or None)


def token_condition(
    value: str,
    codes: Callable[[str], Condition],
    *,
    system_ok: Callable[[str | None], bool],
    system_only: Callable[[str], Condition] | None = None,
) -> Condition:
    system, code = token(value)
    if code is None:
        if system is None or not system_ok(system):
            return false()
        return system_only(system) if system_only else true()
    if system is not None and not system_ok(system):
        return false()
    return codes(code)


# --- strings ------------------------------------------------------------------------------


def like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def string_pattern(value: str, modifier: str | None) -> tuple[str, bool]:
    """(LIKE pattern on the upper-cased text, exact) for a string search value: starts with by
    default, ``:contains`` anywhere, ``:exact`` the whole text (search.html#string)."""
    text = like_escape(value.upper())
    if modifier == "exact":
        return text, True
    if modifier == "contains":
        return f"%{text}%", False
    return f"{text}%", False


# --- dates --------------------------------------------------------------------------------

DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_DATE = re.compile(
    r"^([0-9]{4})(?:-([0-9]{2})(?:-([0-9]{2})(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})"
    r"(\.[0-9]{1,9})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?$"
)


@dataclass(frozen=True, slots=True)
class DateRange:
    prefix: str
    low: datetime
    high: datetime  # inclusive end of the value's precision
    zoned: bool


def parse_date(value: str, name: str) -> DateRange:
    prefix = "eq"
    if value[:2] in DATE_PREFIXES and not value[:2].isdigit():
        prefix, value = value[:2], value[2:]
    match = _DATE.match(value)
    if not match:
        raise FHIRError(
            400,
            f"{name}={value!r}: not a FHIR date, dateTime or instant "
            "(YYYY[-MM[-DD[Thh:mm[:ss[.fff]][Z|±hh:mm]]]])",
            expression=[name],
        )
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    if not 1 < int(year) < 9999:
        raise FHIRError(400, f"{name}={value!r}: years 0002 to 9998 only", expression=[name])
    if zone and zone != "Z" and (int(zone[1:3]) > 14 or int(zone[4:6]) > 59):
        raise FHIRError(400, f"{name}={value!r}: no such time zone offset", expression=[name])
    try:
        low = datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            min(round(float(fraction) * 1e6), 999999) if fraction else 0,
        )
    except ValueError as exc:
        raise FHIRError(400, f"{name}={value!r}: {exc}", expression=[name]) from exc
    if fraction:
        high = low
    elif second:
        high = low + timedelta(seconds=1)
    elif minute:
        high = low + timedelta(minutes=1)
    elif day:
        high = low + timedelta(days=1)
    elif month:
        high = (low.replace(day=28) + timedelta(days=4)).replace(day=1)
    else:
        high = low.replace(year=low.year + 1)
    if high != low:
        high -= timedelta(microseconds=1)
    if zone:
        offset = UTC if zone == "Z" else _offset(zone)
        low = low.replace(tzinfo=offset)
        high = high.replace(tzinfo=offset)
    return DateRange(prefix, low, high, bool(zone))


def _offset(zone: str) -> Any:
    from datetime import timezone

    sign = 1 if zone[0] == "+" else -1
    hours, minutes = zone[1:].split(":")
    return timezone(sign * timedelta(hours=int(hours), minutes=int(minutes)))


def date_condition(
    rng: DateRange, low: Any, high: Any, convert: Callable[[datetime], Any]
) -> Condition:
    """SQL of a date search (search.html#date) on a resource value whose range is
    [``low``, ``high``] (SQL expressions), with ``convert`` turning a bound into their type."""
    lo, hi = convert(rng.low), convert(rng.high)
    match rng.prefix:
        case "eq":
            return and_(low >= lo, high <= hi)
        case "ne":
            return not_(and_(low >= lo, high <= hi))
        case "gt":
            return high > hi
        case "lt":
            return low < lo
        case "ge":
            return high >= lo
        case "le":
            return low <= hi
        case "sa":
            return low > hi
        case "eb":
            return high < lo
        case _:  # ap: within 10 % of the distance from now (search.html#prefix)
            now = datetime.now(rng.low.tzinfo)
            slack = max(abs(now - rng.low) * 0.1, rng.high - rng.low, timedelta(seconds=1))
            return and_(
                high >= convert(_shift(rng.low, -slack)), low <= convert(_shift(rng.high, slack))
            )


def _shift(value: datetime, delta: timedelta) -> datetime:
    """``value + delta``, held within the years a search takes (0002 to 9998)."""
    try:
        shifted = value + delta
    except OverflowError:
        shifted = value.replace(year=2 if delta < timedelta(0) else 9998)
    if shifted.year < 2:
        return shifted.replace(year=2)
    return shifted if shifted.year < 9999 else shifted.replace(year=9998)


def dicom_bound_in(zone: tzinfo) -> Callable[[datetime], str]:
    """Bounds as DICOM DA+TM text (``YYYYMMDDHHMMSS[.ffffff]``, to compare with DA || TM),
    with a zoned search value first converted to ``zone``, the zone DICOM values are in."""

    def bound(value: datetime) -> str:
        if value.tzinfo is not None:
            value = value.astimezone(zone).replace(tzinfo=None)
        text = value.strftime("%Y%m%d%H%M%S")
        # A stored TM without a fraction ("101500") must equal the bound of the same instant.
        return f"{text}.{value.microsecond:06d}" if value.microsecond else text

    return bound


def day_prefilter(rng: DateRange, day: Any, bound: Callable[[datetime], str]) -> Condition:
    """A condition on a DA column alone that every match of a date search on DA || TM also
    meets: it lets the index on the date narrow the rows (the combined text has none)."""
    low_day, high_day = bound(rng.low)[:8], bound(rng.high)[:8]
    match rng.prefix:
        case "eq":
            return and_(day >= low_day, day <= high_day)
        case "gt" | "sa":
            return day >= high_day
        case "lt" | "eb":
            return day <= low_day
        case "ge":
            return day >= low_day
        case "le":
            return day <= high_day
        case _:
            return true()


def utc_bound(value: datetime) -> datetime:
    """A bound for a timestamp column: zone-less values are read as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- numbers and quantities ---------------------------------------------------------------


def parse_number(value: str, name: str) -> tuple[str, Decimal]:
    prefix = "eq"
    if value[:2] in DATE_PREFIXES and not value[:2].isdigit():
        prefix, value = value[:2], value[2:]
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise FHIRError(400, f"{name}: {value!r} is not a number", expression=[name]) from exc
    if not number.is_finite() or not math.isfinite(float(number)) or abs(float(number)) > 1e300:
        raise FHIRError(400, f"{name}: {value!r} is out of range", expression=[name])
    return prefix, number


def number_condition(prefix: str, number: Decimal, column: Any) -> Condition:
    """search.html#number: ``eq`` matches the range of the value's precision (100 matches
    [99.5, 100.5)), the other prefixes compare with the value."""
    exponent = number.as_tuple().exponent
    try:
        half = Decimal(5).scaleb(int(exponent) - 1) if isinstance(exponent, int) else Decimal(0)
    except DecimalException:
        half = Decimal(0)
    try:
        low, high, value = float(number - half), float(number + half), float(number)
    except DecimalException:
        low = high = value = float(number)
    match prefix:
        case "eq":
            return and_(column >= low, column < high)
        case "ne":
            return not_(and_(column >= low, column < high))
        case "gt" | "sa":
            return column > value
        case "lt" | "eb":
            return column < value
        case "ge":
            return column >= value
        case "le":
            return column <= value
        case _:  # ap: within 10 %
            slack = abs(value) * 0.1
            return and_(column >= value - slack, column <= value + slack)


# --- references -----------------------------------------------------------------------------


def reference_id(value: str, resource_type: str, base: str | None = None) -> str | None:
    """The id of a reference search value (``id``, ``Type/id`` or an absolute URL on this
    server) to a ``resource_type``; None when it names another type."""
    if base and value.startswith(base + "/"):
        value = value[len(base) + 1 :]
    if "/" in value:
        kind, _, rest = value.rpartition("/")
        kind = kind.rsplit("/", 1)[-1]
        if kind != resource_type:
            return None
        value = rest
    return value or None
