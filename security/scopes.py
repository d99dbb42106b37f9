"""SMART on FHIR scopes (App Launch 2.0 "Scopes and Launch Context"), checked on top of the
role: a token that carries SMART scopes may do only what one of them grants.

A scope is ``<context>/<resource>.<permissions>``: context ``patient``, ``user`` or ``system``;
resource a FHIR type or ``*``; permissions v2 ``cruds`` letters in that order (create, read,
update, delete, search) or v1 ``read`` (= ``rs``), ``write`` (= ``cud``) or ``*``. Scopes with a
query (``patient/Observation.rs?category=…``) narrow by search parameters, which are not
enforced here: they grant nothing (a token is never given more than it says). Other scopes
(``openid``, ``fhirUser``, ``offline_access``, ``launch``) are not about data and are ignored; a
token with no SMART scope at all is held to its role alone.

``patient/`` scopes grant only with a patient launch context (the token's ``patient``, SMART
App Launch 2.0 "Launch context"), only on FHIR and DICOMweb, and only to read and search
(``r``, ``s``): a request they alone grant is held to that patient's compartment (FHIR R4
compartmentdefinition-patient.html; :func:`compartment`), which the FHIR searches and QIDO-RS
apply as SQL and WADO-RS as a check of the study in the path. Writes (STOW-RS, deletions),
operations and the administrative API have no compartment here, so ``patient/`` scopes grant
none of them.

Requests map onto a FHIR type and a letter: FHIR as its interactions (a type search or
``_search`` is ``s``, a read, vread or history of one resource ``r``, ``POST`` ``c``, ``PUT``
``u``, ``DELETE`` ``d``, an operation ``r``); DICOMweb as ``ImagingStudy`` (QIDO-RS searches
``s``, WADO-RS ``r``, STOW-RS ``c``, ``PUT`` ``u``, ``DELETE`` ``d``), as FHIR R4 maps a
DICOM study onto ImagingStudy; the administrative API (``/api/…``) as ``*`` (only a scope on
every type grants it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTEXTS = ("patient", "user", "system")
_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(\?.*)?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
"""A FHIR logical id (R4 datatypes.html#id)."""
_DICOMWEB_CHANGES = {"POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
"""DICOMweb requests that change the archive (STOW-RS ``c``), as FHIR's interactions."""


def patient_context(value: object) -> str | None:
    """A ``patient`` launch context as a token carries it: a FHIR Patient id; ValueError for
    anything else (a token whose patient is not an id restricts nothing safely)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _FHIR_ID.fullmatch(value):
        raise ValueError(f"the patient context {str(value)[:80]!r} is not a FHIR id")
    return value


@dataclass(frozen=True, slots=True)
class SmartScope:
    context: str
    resource: str
    permissions: frozenset[str]
    narrowed: bool
    """With a query part (not enforced, so granting nothing)."""


def parse(scope: str) -> list[SmartScope]:
    out = []
    for item in scope.split():
        found = _SCOPE.match(item)
        if found is None:
            continue
        context, resource, letters, query = found.groups()
        letters = _V1.get(letters, letters)
        if not re.fullmatch(r"c?r?u?d?s?", letters) or not letters:
            continue  # not a valid permission string: grants nothing
        out.append(SmartScope(context, resource, frozenset(letters), bool(query)))
    return out


def request_of(method: str, path: str) -> tuple[str, str] | None:
    """(resource type or ``*``, letter) of a request; None for a path scopes say nothing of."""
    if path.startswith("/fhir/"):
        parts = path[len("/fhir/") :].split("/")
        kind = parts[0]
        if not kind:
            return None
        rest = parts[1:]
        if method in ("GET", "HEAD"):
            if not rest or rest == ["_history"]:
                return kind, "s"
            return kind, "r"
        if method == "POST":
            if rest == ["_search"]:
                return kind, "s"
            if rest and rest[-1].startswith("$"):
                return kind, "r"
            return kind, "c"
        if method == "PUT":
            return kind, "u"
        if method == "DELETE":
            return kind, "d"
        return None
    if path == "/dicom-web" or path.startswith("/dicom-web/"):
        if method not in ("GET", "HEAD"):
            return "ImagingStudy", _DICOMWEB_CHANGES.get(method, "u")
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return "ImagingStudy", "s" if tail in ("studies", "series", "instances") else "r"
    if path.startswith("/api/"):
        return "*", "r" if method in ("GET", "HEAD") else "c"
    return None


def _compartment_read(method: str, path: str) -> bool:
    """A FHIR or DICOMweb read or search (what a patient compartment restricts)."""
    if path.startswith("/dicom-web/"):
        return method in ("GET", "HEAD")
    if not path.startswith("/fhir/"):
        return False
    return method in ("GET", "HEAD") or (method == "POST" and path.endswith("/_search"))


def _grants(granted: SmartScope, resource: str, letter: str) -> bool:
    return (
        not granted.narrowed
        and granted.resource in ("*", resource)
        and letter in granted.permissions
    )


def permitted(scope: str, method: str, path: str, patient: str | None = None) -> bool | None:
    """Whether the token's SMART scopes grant the request; None when it has none (the role
    alone decides). ``patient``: the token's patient launch context, without which
    ``patient/`` scopes grant nothing."""
    scopes = parse(scope)
    if not scopes and not any("/" in s for s in scope.split()):
        if patient is None:
            return None
        # Held to a patient but granted no data scope (asked only for ``openid``, say, or an
        # external token with a patient claim and no SMART scope): its role must not open
        # every patient's data to it, so it reaches none.
        return request_of(method, path) is None
    wanted = request_of(method, path)
    if wanted is None:
        return True  # no FHIR data behind it (discovery, the token endpoint)
    resource, letter = wanted
    for granted in scopes:
        if granted.context == "patient" and (
            not patient or letter not in "rs" or not _compartment_read(method, path)
        ):
            continue
        if _grants(granted, resource, letter):
            return True
    return False


def compartment(scope: str, method: str, path: str, patient: str | None) -> str | None:
    """The patient whose compartment holds the request: ``patient`` when only ``patient/``
    scopes grant it (a ``user/`` or ``system/`` scope that grants it is not held to one
    patient, SMART scopes adding up), else None."""
    if not patient or permitted(scope, method, path, patient) is not True:
        return None
    wanted = request_of(method, path)
    if wanted is None:
        return None
    resource, letter = wanted
    if any(g.context != "patient" and _grants(g, resource, letter) for g in parse(scope)):
        return None
    return patient
