"""SMART on FHIR scopes (App Launch 2.0 "Scopes and Launch Context"), checked on top of the
role: a token that carries SMART scopes may do only what one of them grants.

A scope is ``<context>/<resource>.<permissions>``: context ``patient``, ``user`` or ``system``;
resource a FHIR type or ``*``; permissions v2 ``cruds`` letters in that order (create, read,
update, delete, search) or v1 ``read`` (= ``rs``), ``write`` (= ``cud``) or ``*``. Scopes with a
query (``patient/Observation.rs?category=…``) narrow by search parameters, which are not
enforced here, and ``patient/`` scopes need a patient compartment, not built yet: neither grants
anything (a token is never given more than it says). Other scopes (``openid``, ``fhirUser``,
``offline_access``, ``launch``) are not about data and are ignored; a token with no SMART scope
at all is held to its role alone.

Requests map onto a FHIR type and a letter: FHIR as its interactions (a type search or
``_search`` is ``s``, a read, vread or history of one resource ``r``, ``POST`` ``c``, ``PUT``
``u``, ``DELETE`` ``d``, an operation ``r``); DICOMweb as ``ImagingStudy`` (QIDO-RS searches
``s``, WADO-RS ``r``, STOW-RS ``c``); the administrative API (``/api/…``) as ``*`` (only a
scope on every type grants it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTEXTS = ("patient", "user", "system")
_SCOPE = re.compile(r"^(patient|user|system)/(\*|[A-Z][A-Za-z]+)\.([a-z*]+)(\?.*)?$")
_V1 = {"read": "rs", "write": "cud", "*": "cruds"}


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
        if method == "POST":
            return "ImagingStudy", "c"
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        return "ImagingStudy", "s" if tail in ("studies", "series", "instances") else "r"
    if path.startswith("/api/"):
        return "*", "r" if method in ("GET", "HEAD") else "c"
    return None


def permitted(scope: str, method: str, path: str) -> bool | None:
    """Whether the token's SMART scopes grant the request; None when it has none (the role
    alone decides)."""
    scopes = parse(scope)
    if not scopes and not any("/" in s for s in scope.split()):
        return None
    wanted = request_of(method, path)
    if wanted is None:
        return True  # no FHIR data behind it (discovery, the token endpoint)
    resource, letter = wanted
    for granted in scopes:
        if granted.context == "patient" or granted.narrowed:
            continue
        if granted.resource not in ("*", resource):
            continue
        if letter in granted.permissions:
            return True
    return False
