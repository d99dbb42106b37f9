"""A radiologist's report as a DICOM Enhanced SR document (SOP Class
1.2.840.10008.5.1.4.1.1.88.22, PS3.3 A.35.2) holding a PS3.16 TID 2000 "Basic Diagnostic
Imaging Report", built with highdicom.

The report comes in as a plain :class:`ReportDraft` (this module knows no FHIR): a title, the
findings and the impression as free text, the completion and verification state, the author
and the verifier. The document joins the study it reports on (patient and study attributes
copied from a header of one of its instances) in a series of its own, so PACS viewers list it
next to the images, and an amendment names the report it replaces in the Predecessor
Documents Sequence (PS3.3 C.17.2, Table C.17-2 "SR Document General Module")."""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo

import highdicom as hd
from highdicom.sr.utils import collect_evidence
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

__all__ = [
    "DIAGNOSTIC_IMAGING_REPORT",
    "Code",
    "PriorDocument",
    "ReportDraft",
    "encode",
    "write_report",
]


@dataclass(frozen=True, slots=True)
class Code:
    """A coded concept: coding scheme designator ("LN", "DCM", "SCT"), code value, meaning."""

    scheme: str
    value: str
    meaning: str


@dataclass(frozen=True, slots=True)
class PriorDocument:
    """The SR document an amendment replaces (PS3.3 Table C.17-2, Predecessor Documents
    Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


#: CID 7000 "Diagnostic Imaging Report Document Title": the generic title.
DIAGNOSTIC_IMAGING_REPORT = Code("LN", "18748-4", "Diagnostic imaging report")


@dataclass(frozen=True, slots=True)
class ReportDraft:
    """What a radiologist reports, before it is a DICOM document."""

    title: Code
    """The document title (CID 7000), e.g. :data:`DIAGNOSTIC_IMAGING_REPORT`."""
    conclusion: str | None
    """The impression: section "Impressions" (121072, DCM), TEXT "Impression" (121073, DCM)."""
    findings: str | None
    """Section "Findings" (121070, DCM), TEXT "Finding" (121071, DCM)."""
    complete: bool
    """Completion Flag COMPLETE, else PARTIAL."""
    verified: bool
    """Verification Flag VERIFIED (and Preliminary Flag FINAL), else UNVERIFIED."""
    author: str | None
    """DICOM PN "Family^Given": the Person Observer Name of the observation context."""
    verifier: str | None
    """DICOM PN: the Verifying Observer Name of a verified report; the author when absent."""
    verifying_organization: str
    observed_at: datetime
    """Timezone-aware: Content Date/Time and, when verified, the Verification DateTime."""
    predecessor: PriorDocument | None
    evidence: Sequence[Dataset] = ()
    """Headers of the instances the report is about: the Current Requested Procedure
    Evidence Sequence, those of other studies the Pertinent Other Evidence Sequence (PS3.3
    C.17.2.3: a complete report lists every instance of its procedure the writer knows of).
    A minimal dataset per instance will do: StudyInstanceUID, SeriesInstanceUID,
    SOPClassUID, SOPInstanceUID."""


# PS3.16 CID 7001 "Diagnostic Imaging Report Heading" and CID 7002 "Diagnostic Imaging Report
# Element": the sections TID 2000 CONTAINS and the TEXT items TID 2002 "Report Narrative" puts
# in them.
_FINDINGS = hd.sr.CodedConcept("121070", "DCM", "Findings")
_FINDING = hd.sr.CodedConcept("121071", "DCM", "Finding")
_IMPRESSIONS = hd.sr.CodedConcept("121072", "DCM", "Impressions")
_IMPRESSION = hd.sr.CodedConcept("121073", "DCM", "Impression")
#: TID 1204 "Language of Content Item and Descendants", CID 5000 "Language".
_ENGLISH_US = hd.sr.CodedConcept("en-US", "RFC5646", "English (United States)")
#: UTF-8 (PS3.3 C.12.1.1.2): names and text in any script survive.
_UTF8 = "ISO_IR 192"

#: Patient and study attributes the document copies from the study's header (PS3.3 A.35.2:
#: the Patient, General Study and Patient Study modules), besides what highdicom copies
#: itself; SpecificCharacterSet is always UTF-8 (values are decoded on reading, so
#: re-encoding them as UTF-8 loses nothing).
_COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
#: Type 2 attributes of those modules that highdicom reads from its first evidence dataset.
_TYPE_2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)
_INSTANCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _person_name(value: str | None) -> str | None:
    """A PN value (PS3.5 6.2): ``None`` when blank; a family name alone gets its trailing
    component separator ("Smith" and "Smith^" are the same name, and highdicom refuses a
    name without one)."""
    if _blank(value):
        return None
    assert value is not None
    value = value.strip()
    if "^" not in value and "=" not in value:
        value += "^"
    return value


def _check(draft: ReportDraft, study: Dataset) -> None:
    missing = [kw for kw in _INSTANCE_UIDS if not study.get(kw)]
    if missing:
        raise ValueError(
            "the study header must be the header of an instance of the study; it lacks "
            + ", ".join(missing)
        )
    if _blank(draft.conclusion) and _blank(draft.findings):
        raise ValueError("the report has neither a conclusion (impression) nor findings")
    if draft.verified and not draft.complete:
        # PS3.3 Table C.17-2, Verification Flag: 'A value of "VERIFIED" shall be used only
        # when the value of Completion Flag (0040,A491) is "COMPLETE".'
        raise ValueError("a verified report must be complete (Completion Flag COMPLETE)")
    if draft.verified and _person_name(draft.verifier) is None and _blank(draft.author):
        # PS3.3 Table C.17-2: Verifying Observer Sequence (with its Type 1 Verifying
        # Observer Name) is required when the Verification Flag is VERIFIED.
        raise ValueError("a verified report needs a verifier (or an author): both are missing")
    if draft.observed_at.tzinfo is None or draft.observed_at.utcoffset() is None:
        raise ValueError("observed_at must be timezone-aware")
    for item in draft.evidence:
        absent = [kw for kw in _INSTANCE_UIDS if not item.get(kw)]
        if absent:
            raise ValueError(f"an evidence dataset lacks {', '.join(absent)}")


def _offset_text(delta: timedelta) -> str:
    """A UTC offset as TimezoneOffsetFromUTC and DT write it: "+HHMM" / "-HHMM"."""
    minutes = round(delta.total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    hours, rest = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{rest:02d}"


def _parse_offset(text: object) -> tzinfo | None:
    value = str(text or "").strip()
    if not re.fullmatch(r"[+-][0-9]{4}", value):
        return None
    delta = timedelta(hours=int(value[1:3]), minutes=int(value[3:5]))
    return timezone(-delta if value[0] == "-" else delta)


def _time_text(moment: datetime) -> str:
    text = moment.strftime("%H%M%S")
    return f"{text}.{moment.microsecond:06d}" if moment.microsecond else text


def _datetime_text(moment: datetime) -> str:
    """A DT value with its own UTC offset (PS3.5 6.2)."""
    offset = moment.utcoffset()
    assert offset is not None
    return moment.strftime("%Y%m%d") + _time_text(moment) + _offset_text(offset)


def _section(
    heading: hd.sr.CodedConcept, element: hd.sr.CodedConcept, text: str
) -> hd.sr.ContainerContentItem:
    """TID 2000: CONTAINS CONTAINER (CID 7001 heading) > CONTAINS TEXT (CID 7002 element,
    TID 2002). The text is stored as given: TextValue is UT (PS3.5 6.2), 2^32-2 bytes."""
    section = hd.sr.ContainerContentItem(
        name=heading,
        is_content_continuous=True,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    section.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=element,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    return section


def _content(draft: ReportDraft) -> hd.sr.ContentSequence:
    """The content tree of PS3.16 TID 2000 "Basic Diagnostic Imaging Report"."""
    # Root: CONTAINER, concept name from CID 7000 (the document title, PS3.3 C.17.3.1),
    # identified by its template (PS3.3 C.18.8 Container Macro, Content Template Sequence:
    # TemplateIdentifier "2000", MappingResource "DCMR"). Its sections stand apart, so its
    # Continuity of Content is SEPARATE; each section's text is CONTINUOUS.
    title = hd.sr.CodedConcept(draft.title.value, draft.title.scheme, draft.title.meaning)
    root = hd.sr.ContainerContentItem(name=title, is_content_continuous=False, template_id="2000")
    items = hd.sr.ContentSequence()
    # TID 2000: HAS CONCEPT MOD, TID 1204 Language of Content Item and Descendants.
    items.extend(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH_US))
    # TID 2000: HAS OBS CONTEXT, TID 1001 Observation Context > TID 1002 Observer Context >
    # TID 1003 Person Observer Identifying Attributes (Person Observer Name). Without an
    # author the tree names no observer: TID 1001's rows are all conditional or optional.
    author = _person_name(draft.author)
    if author is not None:
        items.extend(
            hd.sr.ObservationContext(
                observer_person_context=hd.sr.ObserverContext(
                    observer_type=codes.DCM.Person,
                    observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                        name=author
                    ),
                )
            )
        )
    # TID 2000: CONTAINS the sections, each with TID 2002 Report Narrative.
    if draft.findings is not None and not _blank(draft.findings):
        items.append(_section(_FINDINGS, _FINDING, draft.findings))
    if draft.conclusion is not None and not _blank(draft.conclusion):
        items.append(_section(_IMPRESSIONS, _IMPRESSION, draft.conclusion))
    root.ContentSequence = items
    return hd.sr.ContentSequence([root], is_root=True)


def _anchor(study: Dataset) -> Dataset:
    """The study header as highdicom's first evidence dataset, from which it takes the
    patient and study: Type 2 attributes it reads are present (empty when unknown)."""
    anchor = Dataset()
    anchor.update(study)
    for keyword in _TYPE_2:
        if keyword not in anchor:
            setattr(anchor, keyword, None)
    return anchor


def _evidence(
    sr: Dataset, draft: ReportDraft, content: hd.sr.ContentSequence, study_uid: str
) -> None:
    """PS3.3 C.17.2.3: the draft's evidence, split by study into the Current Requested
    Procedure Evidence Sequence (this study) and the Pertinent Other Evidence Sequence
    (other studies). highdicom needs at least one evidence dataset to take the patient and
    study from; that was the study header, which is no evidence of its own (one instance
    of the study would claim to be all of it), so its entry is replaced here. Without
    evidence neither sequence is present: both are Type 1C (PS3.3 Table C.17-2), the first
    required when the writer knows of the procedure's instances or the tree references
    any; this tree references none."""
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        if keyword in sr:
            delattr(sr, keyword)
    if not draft.evidence:
        return
    same_study, other_studies = collect_evidence(
        list(draft.evidence), content[0], study_instance_uid=study_uid
    )
    if same_study:
        sr.CurrentRequestedProcedureEvidenceSequence = same_study
    if other_studies:
        sr.PertinentOtherEvidenceSequence = other_studies


def _predecessor(prior: PriorDocument) -> Dataset:
    """A minimal header of the replaced document: highdicom reads these four UIDs from it."""
    ds = Dataset()
    ds.StudyInstanceUID = prior.study_instance_uid
    ds.SeriesInstanceUID = prior.series_instance_uid
    ds.SOPClassUID = prior.sop_class_uid
    ds.SOPInstanceUID = prior.sop_instance_uid
    return ds


def write_report(
    study: Dataset,
    draft: ReportDraft,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str,
    institution_name: str | None = None,
) -> Dataset:
    """The Enhanced SR document of ``draft`` in the study of ``study`` (the header of any of
    its instances), ready to encode as a Part 10 file (Explicit VR Little Endian).

    Raises ``ValueError`` naming what is missing or inconsistent: a draft with neither
    conclusion nor findings, a verified draft that is not complete or names no verifier,
    a naive ``observed_at``, a study header without its instance UIDs."""
    _check(draft, study)
    # All times of the document are in one offset (PS3.3 Table C.12-1, SOP Common: Timezone
    # Offset From UTC applies to every DA/TM/DT of the instance without an offset of its
    # own): the study's when its header has one (its StudyDate/StudyTime are copied
    # unchanged), else the report's.
    observed_tz = draft.observed_at.tzinfo
    assert observed_tz is not None
    zone = _parse_offset(study.get("TimezoneOffsetFromUTC")) or observed_tz
    observed = draft.observed_at.astimezone(zone)
    offset = observed.utcoffset()
    assert offset is not None
    created = datetime.now(zone)

    content = _content(draft)
    verifier = _person_name(draft.verifier) or _person_name(draft.author)
    predecessors = [_predecessor(draft.predecessor)] if draft.predecessor else None
    sr = hd.sr.EnhancedSR(
        evidence=[_anchor(study)],
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        # PS3.3 Table C.17-2: Completion Flag, Verification Flag; Preliminary Flag FINAL once
        # verified (the definitive report), PRELIMINARY before.
        is_complete=draft.complete,
        is_final=draft.verified,
        is_verified=draft.verified,
        institution_name=institution_name,
        verifying_observer_name=verifier if draft.verified else None,
        verifying_organization=draft.verifying_organization if draft.verified else None,
        previous_versions=predecessors,
        series_description=draft.title.meaning[:64],
        content_date=observed.strftime("%Y%m%d"),
        content_time=_time_text(observed),
        specific_character_set=_UTF8,
    )
    for keyword in _COPIED:
        if keyword in study:
            sr.add(deepcopy(study[keyword]))
    sr.TimezoneOffsetFromUTC = _offset_text(offset)
    sr["InstanceCreationDate"].value = created.strftime("%Y%m%d")
    sr["InstanceCreationTime"].value = _time_text(created)
    # highdicom stamps these in the machine's local time without an offset.
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = _datetime_text(created)
    if draft.verified:
        # highdicom stamps the moment of writing; the report was verified when observed.
        sr.VerifyingObserverSequence[0].VerificationDateTime = _datetime_text(observed)
    _evidence(sr, draft, content, str(study.StudyInstanceUID))
    return sr


def encode(ds: Dataset) -> bytes:
    """A Part 10 file (PS3.10 7.1): preamble, file meta information, data set."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
