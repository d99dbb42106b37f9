"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

The same matcher as C-FIND (``archive.query``) runs every search, relationally
(``hierarchical=False``: any level's keys may be combined). What is DICOMweb-specific lives here:
query parameters (keywords or tags, comma- or backslash-separated UID lists, ``includefield``,
``limit``/``offset``, ``fuzzymatching``), the default return attributes of PS3.18
Tables 10.6.3-3/-4/-5, RetrieveURL, and errors as JSON with Warning headers. A request held
to one patient's compartment (a SMART ``patient/`` token) searches that patient's studies only:
the archive query gets the patient row as an exact condition, whatever the keys say.
"""

from __future__ import annotations

import functools
import re
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import bindparam, select

from archive.metrics import observe_query
from archive.models import Instance
from archive.query import (
    COMPUTED,
    INDEXED,
    Key,
    Query,
    QueryError,
    QueryLevel,
    QueryModel,
    check_key,
    find,
    glob_matcher,
    shown,
)
from dicomweb.common import (
    ERROR_RESPONSES,
    archive_of,
    base_url,
    compartment_patient,
    dicom_json_response,
    fail,
    instance_url,
    json_body,
    series_url,
    settings_of,
    study_url,
    warning_value,
)
from dicomweb.media import accepts_json

router = APIRouter()

_LEVEL_ORDER = [QueryLevel.PATIENT, QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]

#: Default return attributes (PS3.18 Tables 10.6.3-3, -4, -5), plus Study Description, which
#: every study browser shows. RetrieveURL and InstanceAvailability are added to each result.
STUDY_DEFAULTS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_DEFAULTS = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
    "RequestAttributesSequence",
)
INSTANCE_DEFAULTS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
)

#: Query parameters of PS3.18 8.3.4 that this server does not implement: ignored, with a Warning.
UNSUPPORTED_PARAMETERS = frozenset({"emptyvaluematching", "multiplevaluematching", "orderby"})
#: The largest ``limit`` and ``offset``: what a signed 64-bit LIMIT / OFFSET holds (SQLite,
#: PostgreSQL's bigint).
MAX_PAGING = 2**63 - 1
#: The most attributes ``includefield`` may name (``all`` names every one).
MAX_INCLUDE_FIELDS = 256

_RETRIEVE_URL = "00081190"
_AVAILABILITY = "00080056"
_QUERY_LEVEL = "00080052"
_NAME_SEPARATORS = re.compile(r"[\^\s,=]+")


@dataclass
class Search:
    """A QIDO-RS request, parsed and validated."""

    level: QueryLevel
    keys: dict[int, str | None] = field(default_factory=dict)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    warnings: list[str] = field(default_factory=list)
    empty: bool = False
    """A key contradicts the URL: nothing can match."""


@functools.lru_cache(maxsize=4096)
def _tag(name: str) -> int | None:
    tag = tag_for_keyword(name)
    if tag is not None:
        return int(tag)
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    return None


@functools.lru_cache(maxsize=4096)
def _vr(tag: int) -> str:
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return "UN"
    return "US" if vr == "US or SS" else ("OB" if " or " in vr else vr)


def _level_of(keyword: str) -> QueryLevel | None:
    if keyword in INDEXED:
        return INDEXED[keyword].level
    return COMPUTED.get(keyword)


_DIGITS = re.compile(r"\s*\+?[0-9]{1,19}\s*")


def _integer(name: str, text: str) -> int:
    """A ``limit`` or ``offset``: 0 to :data:`MAX_PAGING`."""
    if not _DIGITS.fullmatch(text) or int(text) > MAX_PAGING:
        fail(400, f"{name} must be an integer from 0 to {MAX_PAGING}, not {shown(text)}")
    return int(text)


def parse_search(request: Request, level: QueryLevel, fixed: dict[str, str]) -> Search:
    """Read the query string (values are URL-decoded by the framework) into a :class:`Search`."""
    search = Search(level)
    values: dict[int, list[str]] = {}
    for name, value in request.query_params.multi_items():
        name = name.strip()
        lowered = name.lower()
        if not name:
            continue
        if lowered == "limit":
            search.limit = _integer("limit", value)
        elif lowered == "offset":
            search.offset = _integer("offset", value)
        elif lowered == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                fail(400, f"fuzzymatching must be true or false, not {value!r}")
            search.fuzzy = value.lower() == "true"
        elif lowered == "includefield":
            for item in value.split(","):
                item = item.strip()
                if not item:
                    continue
                if item.lower() == "all":
                    search.include_all = True
                    continue
                tag = _tag(item)
                if tag is None:
                    fail(
                        400,
                        f"includefield: {shown(item)} is neither a keyword nor a tag (ggggeeee)",
                    )
                search.include.add(tag)
                if len(search.include) > MAX_INCLUDE_FIELDS:
                    fail(
                        400,
                        f"includefield names more than {MAX_INCLUDE_FIELDS} attributes; "
                        "name fewer, or all",
                    )
        elif lowered in UNSUPPORTED_PARAMETERS:
            search.warnings.append(f"the {name} parameter is not supported and was ignored")
        elif "." in name:
            search.warnings.append(
                f"{name}: matching inside sequences is not supported; the key was ignored"
            )
        else:
            tag = _tag(name)
            if tag is None:
                fail(
                    400,
                    f"unknown query parameter {shown(name)}: give an attribute keyword "
                    "(PatientName) or tag (00100010), or limit, offset, includefield, "
                    "fuzzymatching",
                )
            values.setdefault(tag, []).append(value)
    for tag, given in values.items():
        keyword = keyword_for_tag(tag) or f"{tag:08X}"
        owner = _level_of(keyword)
        if owner is not None and _LEVEL_ORDER.index(owner) > _LEVEL_ORDER.index(level):
            hint = " (use ModalitiesInStudy)" if keyword == "Modality" else ""
            fail(
                400,
                f"{keyword} is a {owner.value.lower()}-level attribute: it cannot match "
                f"{level.value.lower()}-level results{hint}",
            )
        vr = _vr(tag)
        if len(given) > 1 and vr != "UI":
            fail(400, f"{keyword} is given {len(given)} times; give it once")
        if vr in ("UI", "CS"):
            # PS3.18 8.3.4.1: a list of UIDs is comma- or backslash-separated.
            parts = [p.strip() for v in given for p in re.split(r"[,\\]", v)]
            search.keys[tag] = "\\".join(p for p in parts if p)
        else:
            search.keys[tag] = given[0]
    for keyword, uid in fixed.items():
        tag = int(tag_for_keyword(keyword))  # type: ignore[arg-type]
        asked = search.keys.get(tag)
        if asked and uid not in asked.split("\\"):
            search.empty = True
        search.keys[tag] = uid
    return search


def _return_keywords(level: QueryLevel, scoped: set[str]) -> list[str]:
    """Defaults of the level, and of the levels above unless the URL fixes them."""
    keywords: list[str] = []
    if level is QueryLevel.STUDY or "StudyInstanceUID" not in scoped:
        keywords += STUDY_DEFAULTS
    if level is QueryLevel.SERIES or (
        level is QueryLevel.IMAGE and "SeriesInstanceUID" not in scoped
    ):
        keywords += SERIES_DEFAULTS
    if level is QueryLevel.IMAGE:
        keywords += INSTANCE_DEFAULTS
    return keywords


@functools.lru_cache(maxsize=64)
def _return_tags(level: QueryLevel, scoped: frozenset[str], include_all: bool) -> tuple[int, ...]:
    """Tags of the attributes every result of this search returns."""
    names = _return_keywords(level, set(scoped))
    if include_all:
        names += _all_keywords(level)
    return tuple(int(tag_for_keyword(keyword)) for keyword in names)  # type: ignore[arg-type]


def _all_keywords(level: QueryLevel) -> list[str]:
    index = _LEVEL_ORDER.index(level)
    return [
        keyword
        for keyword in (*INDEXED, *COMPUTED)
        if _LEVEL_ORDER.index(_level_of(keyword) or QueryLevel.IMAGE) <= index
    ]


def _fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _words(text: str) -> list[str]:
    return [w for w in _NAME_SEPARATORS.split(_fold(text)) if w]


def fuzzy_name_match(pattern: str, element: dict[str, Any] | None) -> bool:
    """``fuzzymatching=true`` for person names: every word of the pattern (split on ``^``,
    spaces, commas) must begin some word of the name, ignoring case and accents, in any of
    its component groups; ``*`` and ``?`` keep their meaning inside a word."""
    words = _words(pattern)
    if not words:
        return True
    # A word of the pattern is a prefix of a name's word: the word and "*" matches it whole.
    prefixes = [glob_matcher(w + "*") for w in words]
    for value in (element or {}).get("Value", []) or []:
        groups = value.values() if isinstance(value, dict) else [str(value or "")]
        for group in groups:
            name_words = _words(str(group))
            if all(any(matches(w) for w in name_words) for matches in prefixes):
                return True
    return False


def _run(request: Request, search: Search, fixed: dict[str, str]) -> Response:
    archive = archive_of(request)
    settings = settings_of(request)
    warnings = list(search.warnings)
    limit = search.limit
    if limit is None:
        limit = settings.qido_default_limit
        default_limit = True
    else:
        default_limit = False
        if limit > settings.qido_max_limit:
            warnings.append(
                f"limit {limit} exceeds this server's maximum of {settings.qido_max_limit}; "
                f"at most {settings.qido_max_limit} results are returned"
            )
            limit = settings.qido_max_limit
    if limit == 0:
        limit = settings.qido_max_limit

    wanted = dict.fromkeys(_return_tags(search.level, frozenset(fixed), search.include_all))
    for tag in search.include:
        wanted.setdefault(tag, None)
    fuzzy_keys: dict[int, str] = {}
    for tag, value in search.keys.items():
        if search.fuzzy and _vr(tag) == "PN" and value and value.strip("*"):
            try:
                check_key(Key(tag, "PN", value))  # the bounds of every PN matching value
            except QueryError as exc:
                fail(400, str(exc))
            fuzzy_keys[tag] = value
            wanted[tag] = None
        else:
            wanted[tag] = value
    keys = [Key(tag, _vr(tag), value) for tag, value in wanted.items()]
    query = Query(
        search.level,
        QueryModel.STUDY_ROOT,
        keys,
        hierarchical=False,
        case_insensitive_pn=settings.query_case_insensitive_pn,
        limit=None if fuzzy_keys else limit + 1,
        offset=0 if fuzzy_keys else search.offset,
        # Held to one patient's compartment: that patient's studies only, in the SQL.
        patient=compartment_patient(request.scope),
    )
    results: list[dict[str, Any]] = []
    more = False
    if not search.empty:
        try:
            matches: Iterator[dict[str, Any]] = find(archive.db, query)
            skipped = 0
            for result in matches:
                if fuzzy_keys and not all(
                    fuzzy_name_match(p, result.get(f"{t:08X}")) for t, p in fuzzy_keys.items()
                ):
                    continue
                if fuzzy_keys and skipped < search.offset:
                    skipped += 1
                    continue
                if len(results) == limit:
                    more = True
                    break
                results.append(result)
        except QueryError as exc:
            fail(400, str(exc))
    if more and default_limit:
        warnings.append(
            f"more than {limit} results match; "
            f"ask for the next ones with offset={search.offset + limit}"
        )
    base = base_url(request)
    if search.include_all and search.level is QueryLevel.IMAGE and results:
        _merge_instance_json(request, results, base)
    body = [_finish(result, search.level, base) for result in results]
    headers = {"Warning": warning_value(warnings)} if warnings else None
    return dicom_json_response(request, json_body(body), headers=headers)


def _uid(result: dict[str, Any], tag: str) -> str:
    values = result.get(tag, {}).get("Value") or [""]
    return str(values[0])


def _finish(result: dict[str, Any], level: QueryLevel, base: str) -> dict[str, Any]:
    result.pop(_QUERY_LEVEL, None)
    study = _uid(result, "0020000D")
    if level is QueryLevel.STUDY:
        url = study_url(base, study)
    elif level is QueryLevel.SERIES:
        url = series_url(base, study, _uid(result, "0020000E"))
    else:
        url = instance_url(base, study, _uid(result, "0020000E"), _uid(result, "00080018"))
    result[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    result[_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    return dict(sorted(result.items()))


_MERGE_CHUNK = 500
_MERGE_SELECT = select(Instance.sop_instance_uid, Instance.dicom_json).where(
    Instance.sop_instance_uid.in_(bindparam("sops", expanding=True))
)


def _merge_instance_json(request: Request, results: list[dict[str, Any]], base: str) -> None:
    """``includefield=all`` at the instance level: every attribute of the stored instance, with
    BulkDataURIs made absolute."""
    by_sop = {_uid(r, "00080018"): r for r in results}
    sops = list(by_sop)
    rows: list[Any] = []
    with archive_of(request).db.engine.connect() as conn:
        # A few hundred UIDs a statement: however large the limit, far below the database's
        # bind-parameter limit.
        for start in range(0, len(sops), _MERGE_CHUNK):
            rows += conn.execute(_MERGE_SELECT, {"sops": sops[start : start + _MERGE_CHUNK]})
    for sop, document in rows:
        result = by_sop[sop]
        prefix = instance_url(base, _uid(result, "0020000D"), _uid(result, "0020000E"), sop)
        for tag, element in document.items():
            if tag in result and "Value" in result[tag]:
                continue
            if "BulkDataURI" in element:
                element = {**element, "BulkDataURI": f"{prefix}/{element['BulkDataURI']}"}
            result[tag] = element


_SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Matching studies, series or instances as DICOM JSON (PS3.18 F.2); "
        "`[]` when nothing matches. A `Warning: 299` header reports ignored parameters and "
        "results cut by the limit.",
        "content": {
            "application/dicom+json": {"schema": {"type": "array", "items": {"type": "object"}}}
        },
    },
    **ERROR_RESPONSES,
}


def _search(request: Request, level: QueryLevel, **fixed: str) -> Response:
    if not accepts_json(request.headers.get("accept")):
        fail(406, "QIDO-RS answers in application/dicom+json (or application/json) only")
    started = time.perf_counter()
    try:
        return _run(request, parse_search(request, level, fixed), fixed)
    finally:
        observe_query("QIDO-RS", level.value, time.perf_counter() - started)


_DOC = (
    "Query parameters: attribute keywords or tags (`PatientName=smith*`, `00100020=123`, "
    "`StudyDate=20240101-20240131`, UID lists separated by commas or backslashes), "
    "`includefield` (keywords/tags, repeated or comma-separated, or `all`), `limit`, `offset`, "
    "`fuzzymatching=true` (person names: each word is a case- and accent-insensitive prefix)."
)


@router.get(
    "/studies",
    summary="Search for studies (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_studies(request: Request) -> Response:
    return _search(request, QueryLevel.STUDY)


@router.get(
    "/series",
    summary="Search for series (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_series(request: Request) -> Response:
    return _search(request, QueryLevel.SERIES)


@router.get(
    "/studies/{study}/series",
    summary="Search for series of a study (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_study_series(request: Request, study: str) -> Response:
    return _search(request, QueryLevel.SERIES, StudyInstanceUID=study)


@router.get(
    "/instances",
    summary="Search for instances (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_instances(request: Request) -> Response:
    return _search(request, QueryLevel.IMAGE)


@router.get(
    "/studies/{study}/instances",
    summary="Search for instances of a study (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_study_instances(request: Request, study: str) -> Response:
    return _search(request, QueryLevel.IMAGE, StudyInstanceUID=study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="Search for instances of a series (QIDO-RS)",
    description=_DOC,
    response_class=Response,
    responses=_SEARCH_RESPONSES,
)
def search_series_instances(request: Request, study: str, series: str) -> Response:
    return _search(request, QueryLevel.IMAGE, StudyInstanceUID=study, SeriesInstanceUID=series)
