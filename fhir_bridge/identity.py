"""How DICOM values map to FHIR ones: patient identifier systems, coding systems, dates.

References: the FHIR R4 ImagingStudy page (imagingstudy.html, "DICOM mapping"), PS3.18
Annex ... for ``urn:dicom:uid`` / ``urn:oid:`` identifiers (RFC 3001), PS3.16 for the DCM
coding scheme, and DICOM PS3.5 6.2 for DA, TM and PN.
"""

from __future__ import annotations

import re
from datetime import date, datetime, time, tzinfo
from functools import lru_cache
from typing import Any

from config.settings import FHIRSettings

DICOM_UID_SYSTEM = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
LOINC = "http://loinc.org"
SNOMED_CT = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
RFC3986 = "urn:ietf:rfc:3986"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# PS3.16 Table 8-1 Coding Scheme Designators and the FHIR systems of HL7's terminology page.
_SCHEMES = {
    "DCM": DCM,
    "LN": LOINC,
    "SCT": SNOMED_CT,
    "SRT": "http://snomed.info/srt",
    "UCUM": UCUM,
    "UMLS": "http://terminology.hl7.org/CodeSystem/umls",
    "FMA": "http://purl.org/sig/ont/fma",
    "RADLEX": "http://radlex.org",
    "99PACSBRIDGE": "urn:pacsbridge:code",
}
_SYSTEMS = {system: scheme for scheme, system in _SCHEMES.items()}

_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def coding_system(scheme: str | None) -> str | None:
    if not scheme:
        return None
    return _SCHEMES.get(scheme.upper()) or f"urn:dicom:coding-scheme:{scheme}"


def coding_scheme(system: str | None) -> str | None:
    """The DICOM Coding Scheme Designator of a FHIR system (None when unknown)."""
    if system is None:
        return None
    if system in _SYSTEMS:
        return _SYSTEMS[system]
    if system.startswith("urn:dicom:coding-scheme:"):
        return system.rsplit(":", 1)[1]
    return None


def coding(scheme: str | None, code: str | None, meaning: str | None) -> dict[str, Any]:
    item: dict[str, Any] = {}
    system = coding_system(scheme)
    if system:
        item["system"] = system
    if code:
        item["code"] = code
    if meaning:
        item["display"] = meaning
    return item


def concept(scheme: str | None, code: str | None, meaning: str | None) -> dict[str, Any]:
    value: dict[str, Any] = {"coding": [coding(scheme, code, meaning)]}
    if meaning:
        value["text"] = meaning
    return value


# --- patient identifiers ------------------------------------------------------------------


def system_for_issuer(settings: FHIRSettings, issuer: str) -> str:
    """The identifier system of Patient IDs issued by ``issuer`` (Issuer of Patient ID)."""
    if not issuer:
        return settings.patient_identifier_system
    mapped = settings.issuer_systems.get(issuer)
    if mapped:
        return mapped
    if _OID.match(issuer):
        return f"urn:oid:{issuer}"
    return f"{settings.patient_identifier_system}:{issuer}"


def issuer_for_system(settings: FHIRSettings, system: str | None) -> str | None:
    """The Issuer of Patient ID of an identifier system; None when no issuer maps to it."""
    if system is None:
        return None
    if system == settings.patient_identifier_system:
        return ""
    for issuer, mapped in settings.issuer_systems.items():
        if mapped == system:
            return issuer
    prefix = settings.patient_identifier_system + ":"
    if system.startswith(prefix) and len(system) > len(prefix):
        return system[len(prefix) :]
    if system.startswith("urn:oid:") and _OID.match(system[8:]):
        return system[8:]
    return None


# --- person names ---------------------------------------------------------------------------


def human_name(pn: str | None) -> dict[str, Any] | None:
    """A HumanName from the alphabetic group of a DICOM PN (family^given^middle^prefix^suffix)."""
    if not pn:
        return None
    alphabetic = pn.split("=", 1)[0]
    parts = (alphabetic.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = (part.strip() for part in parts)
    name: dict[str, Any] = {"use": "official"}
    text = " ".join(p for p in (prefix, given, middle, family, suffix) if p)
    if text:
        name["text"] = text
    if family:
        name["family"] = family
    givens = [g for g in (given, middle) if g]
    if givens:
        name["given"] = givens
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name if len(name) > 1 else None


@lru_cache(maxsize=4096)
def person_display(pn: str | None) -> str | None:
    name = human_name(pn)
    return None if name is None else name.get("text")


def pn_from_human_name(name: dict[str, Any] | None) -> str | None:
    """A DICOM PN (``Family^Given Middle``) from a FHIR HumanName."""
    if not name:
        return None
    family = name.get("family") or ""
    given = " ".join(name.get("given") or [])
    if not family and not given:
        text = name.get("text")
        return text or None
    return f"{family}^{given}" if given else family


def search_name(pn: str | None) -> str | None:
    """The upper-cased ``FAMILY^GIVEN…`` matched by name searches."""
    return pn.split("=", 1)[0].upper() if pn else None


GENDER_OF_SEX = {"M": "male", "F": "female", "O": "other", "U": "unknown"}
SEX_OF_GENDER = {gender: sex for sex, gender in GENDER_OF_SEX.items()}


# --- dates ----------------------------------------------------------------------------------


def fhir_date(da: str | None) -> str | None:
    """A FHIR date from a DICOM DA (``YYYYMMDD``; ACR-NEMA ``YYYY.MM.DD`` too)."""
    if not da:
        return None
    text = da.replace(".", "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])).isoformat()
    except (ValueError, IndexError):
        return None


def dicom_date(value: str | None) -> str | None:
    """A DICOM DA from a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD: only full dates map)."""
    if value and re.match(r"^\d{4}-\d{2}-\d{2}$", value):
        return value.replace("-", "")
    return None


def _time(tm: str) -> time | None:
    text = tm.replace(":", "").strip()
    try:
        hour = int(text[0:2])
        minute = int(text[2:4]) if len(text) >= 4 else 0
        second = int(text[4:6]) if len(text) >= 6 else 0
        micro = round(float("0" + text[6:]) * 1e6) if len(text) > 7 else 0
        return time(hour, minute, min(second, 59), min(micro, 999999))
    except ValueError:
        return None


@lru_cache(maxsize=4096)
def fhir_datetime(da: str | None, tm: str | None, tz: tzinfo) -> str | None:
    """A FHIR dateTime from DICOM DA + TM: with a time it carries a zone (R4 requires one)."""
    day = fhir_date(da)
    if day is None:
        return None
    clock = _time(tm) if tm else None
    if clock is None:
        return day
    value = datetime.combine(date.fromisoformat(day), clock, tzinfo=tz)
    return value.isoformat(timespec="seconds" if not clock.microsecond else "milliseconds")


def fhir_instant_or_datetime(value: datetime | None) -> str | None:
    if value is None:
        return None
    from fhir_bridge.rest import instant

    return instant(value)
