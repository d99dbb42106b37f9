"""Routing rules (``[routes.<name>]``): which studies and instances go where.

A rule's criteria (calling AE title, modality, SOP class, body part, study description) are
DICOM wildcards (``*``, ``?``) matched case-insensitively; every criterion given must match.
For a stable study a criterion matches when any instance of the study does; on arrival it is
matched against the instance itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

from archive.summary import StudyFacts
from config import RouteSettings, Settings


@cache
def _pattern(wildcard: str) -> re.Pattern[str]:
    body = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in wildcard.strip()
    )
    return re.compile(body, re.IGNORECASE | re.DOTALL)


def matches(pattern: str | None, values: Iterable[str | None]) -> bool:
    if pattern is None or pattern.strip() in ("", "*"):
        return True
    compiled = _pattern(pattern)
    return any(v is not None and compiled.fullmatch(v.strip()) for v in values)


def _sop_class(pattern: str | None) -> str | None:
    """A SOP class criterion may be a UID or a keyword (``CTImageStorage``)."""
    if pattern is None or any(c.isalpha() for c in pattern) is False:
        return pattern
    from pydicom._uid_dict import UID_dictionary

    for uid, entry in UID_dictionary.items():
        if entry[4] == pattern:
            return uid
    return pattern


@dataclass(frozen=True, slots=True)
class Delivery:
    route: str
    destination: str


def route_study(route: RouteSettings, facts: StudyFacts) -> bool:
    return (
        matches(route.calling_ae_title, facts.calling_ae_titles)
        and matches(route.modality, facts.modalities)
        and matches(_sop_class(route.sop_class_uid), facts.sop_class_uids)
        and matches(route.body_part_examined, facts.body_parts)
        and matches(route.study_description, [facts.study_description])
    )


def route_instance(
    route: RouteSettings,
    *,
    calling_ae_title: str,
    modality: str | None,
    sop_class_uid: str,
    body_part_examined: str | None,
    study_description: str | None,
) -> bool:
    return (
        matches(route.calling_ae_title, [calling_ae_title])
        and matches(route.modality, [modality])
        and matches(_sop_class(route.sop_class_uid), [sop_class_uid])
        and matches(route.body_part_examined, [body_part_examined])
        and matches(route.study_description, [study_description])
    )


def deliveries_for_study(settings: Settings, facts: StudyFacts) -> list[Delivery]:
    """Where a stable study goes: one delivery per matching rule and destination."""
    return [
        Delivery(name, destination)
        for name, route in sorted(settings.routes.items())
        if route.on == "stable" and route_study(route, facts)
        for destination in route.destinations
    ]
