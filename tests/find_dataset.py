"""A deterministic synthetic archive for C-FIND differential tests (see test_find_vs_orthanc.py).

About 300 studies of about 120 patients: person names in mixed case, with several components,
non-ASCII in ISO_IR 192 (UTF-8) and ISO_IR 100 (Latin-1), study dates over six years, times to
the second (some with fractions), 1-3 series of 1-2 tiny (4x4) instances, eight modalities.
Everything is derived from one seed, and every attribute a test matches on is kept in the plain
Python records below so that the expected answer of a query can be computed without any DICOM
code.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import UID

from tests.dicom_factory import ct_slice

SEED = 20240521
UID_ROOT = "1.2.826.0.1.3680043.10.1506.77."  # pacsbridge test data root, differential tests

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "SR": "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
}

# (surname, given names, ...) as they are written in the data set: case is kept as is.
ASCII_NAMES = [
    "SMITH^JOHN",
    "Smith^Anna",
    "smith^paul",
    "SMITH^JOHN^PETER^DR^",
    "SMYTHE^JO",
    "SMITHSON^KATE",
    "BLACKSMITH^TOM",
    "O'BRIEN^SEAN",
    "van der Berg^Anna^^Dr",
    "DOE^JANE^M",
    "Doe^John",
    "JOHNSON^MARY",
    "Johnson^Mary-Kate",
    "LEE^KIM",
    "Lee^Robert^^Mr",
    "NGUYEN^VAN^ANH",
    "MACDONALD^ANGUS",
    "McDonald^Fiona",
    "BROWN",
    "Browning^Robert",
    "WHITE^WALTER",
    "Whitehead^Alfred",
    "GARCIA^MARIA",
    "garcia lopez^jose",
    "NUNEZ^ANA",
    "MULLER^KARL",
    "ODEGARD^NILS",
]
# Names that need more than ASCII, with the character set they are written in.
NON_ASCII_NAMES = [
    ("Müller^Jürgen", "ISO_IR 192"),
    ("MÜLLER^ANNA", "ISO_IR 192"),
    ("müller^hans", "ISO_IR 192"),
    ("Müller^Karl", "ISO_IR 100"),
    ("Ñúñez^José", "ISO_IR 192"),
    ("ÑÚÑEZ^MARÍA", "ISO_IR 100"),
    ("Ødegård^Åse", "ISO_IR 192"),
    ("ØDEGÅRD^NILS", "ISO_IR 100"),
    ("Østergaard^Søren", "ISO_IR 192"),
    ("Gonçalves^João", "ISO_IR 100"),
    ("François^Chloé", "ISO_IR 100"),
    ("山田^太郎", "ISO_IR 192"),
    ("山本^花子", "ISO_IR 192"),
    ("Παπαδοπούλου^Ζωή", "ISO_IR 192"),
    ("Иванов^Иван", "ISO_IR 192"),
]
DESCRIPTIONS = [
    "CT HEAD",
    "CT Head w/o contrast",
    "ct head perfusion",
    "CT CHEST",
    "MR KNEE LEFT",
    "mr brain",
    "MR BRAIN W/WO",
    "Chest PA/LAT",
    "CHEST 2 VIEWS",
    "US ABDOMEN",
    "PET-CT WHOLE BODY",
    "Thorax",
    "",
]
REFERRERS = ["HOUSE^GREGORY", "Wilson^James", "cuddy^lisa", "Grey^Meredith^^Dr", "", "CHASE^R"]
MODALITY_MIXES = [
    ("CT",),
    ("CT",),
    ("CT", "SR"),
    ("MR",),
    ("MR", "MR"),
    ("MR", "MR", "SR"),
    ("US",),
    ("CR",),
    ("CR", "DX"),
    ("DX",),
    ("PT", "CT"),
]
BODY_PARTS = {
    "CT": ["HEAD", "CHEST", "ABDOMEN"],
    "MR": ["BRAIN", "KNEE", "SPINE"],
    "US": ["ABDOMEN"],
    "CR": ["CHEST"],
    "DX": ["CHEST", "HAND"],
    "PT": ["WHOLEBODY"],
    "SR": [""],
}


@dataclass
class InstanceRecord:
    uid: str
    number: int


@dataclass
class SeriesRecord:
    uid: str
    modality: str
    number: int
    description: str
    body_part: str
    instances: list[InstanceRecord] = field(default_factory=list)


@dataclass
class PatientRecord:
    patient_id: str
    name: str
    charset: str | None  # None: the default repertoire (no Specific Character Set)
    birth_date: str
    sex: str


@dataclass
class StudyRecord:
    uid: str
    patient: PatientRecord
    date: str
    time: str
    accession: str
    description: str
    referrer: str
    series: list[SeriesRecord] = field(default_factory=list)

    @property
    def modalities(self) -> set[str]:
        return {s.modality for s in self.series}


def _uid(rng: random.Random, kind: int) -> str:
    return f"{UID_ROOT}{kind}.{rng.getrandbits(60)}"


def generate(seed: int = SEED, studies: int = 300) -> list[StudyRecord]:
    """``studies`` studies of about ``studies / 2.5`` patients, all derived from ``seed``."""
    rng = random.Random(seed)
    names: list[tuple[str, str | None]] = [(n, None) for n in ASCII_NAMES]
    names += NON_ASCII_NAMES
    patients: list[PatientRecord] = []
    count = max(len(names), round(studies / 2.5))
    for index in range(count):
        if index < len(names):
            name, charset = names[index]
        else:  # more patients with the same names (different IDs): common in real archives
            name, charset = rng.choice(names)
        if charset is None:
            charset = rng.choice([None, "ISO_IR 192", "ISO_IR 100"])
        birth = date(1930, 1, 1) + timedelta(days=rng.randrange(365 * 85))
        patients.append(
            PatientRecord(
                patient_id=rng.choice(["PB", "pb-", "MRN"]) + f"{index:05d}",
                name=name,
                charset=charset,
                birth_date=birth.strftime("%Y%m%d"),
                sex=rng.choice(["M", "F", "O", ""]),
            )
        )
    records: list[StudyRecord] = []
    first_day = date(2019, 1, 1)
    for index in range(studies):
        patient = patients[index] if index < len(patients) else rng.choice(patients)
        day = first_day + timedelta(days=rng.randrange(6 * 365))
        seconds = rng.randrange(24 * 3600)
        time = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        if index % 7 == 0:
            time += f".{rng.randrange(1000000):06d}"
        study = StudyRecord(
            uid=_uid(rng, 1),
            patient=patient,
            date=day.strftime("%Y%m%d"),
            time=time,
            accession=rng.choice(["A", "acc", "RAD-"]) + f"{rng.randrange(10**6):06d}"
            if index % 11
            else "",
            description=rng.choice(DESCRIPTIONS),
            referrer=rng.choice(REFERRERS),
        )
        for number, modality in enumerate(rng.choice(MODALITY_MIXES), start=1):
            series = SeriesRecord(
                uid=_uid(rng, 2),
                modality=modality,
                number=number,
                description=rng.choice(["AXIAL", "Axial 1mm", "sag T1", "LOCALIZER", ""]),
                body_part=rng.choice(BODY_PARTS[modality]),
            )
            for n in range(rng.choice([1, 1, 2])):
                series.instances.append(InstanceRecord(_uid(rng, 3), n + 1))
            study.series.append(series)
        records.append(study)
    # Edge cases the query table relies on: times at and inside a range bound, a fraction, a
    # time without seconds (PS3.5 TM allows "HHMM"), and one study whose series the SERIES and
    # IMAGE level queries look into.
    records[0].time = "120000"
    records[1].time = "120030"
    records[2].time = "115959.999999"
    records[3].date, records[3].time = "20210310", "0930"
    records[4].series = [
        SeriesRecord(_uid(rng, 2), "CT", 1, "LOCALIZER", "HEAD"),
        SeriesRecord(_uid(rng, 2), "CT", 2, "AXIAL", "HEAD"),
        SeriesRecord(_uid(rng, 2), "CT", 3, "Axial 1mm", "HEAD"),
        SeriesRecord(_uid(rng, 2), "SR", 4, "Dose report", ""),
    ]
    for series in records[4].series:
        series.instances = [InstanceRecord(_uid(rng, 3), n) for n in (1, 2, 3)]
    return records


def datasets(records: list[StudyRecord]) -> Iterator[Dataset]:
    for study_number, study in enumerate(records, start=1):
        patient = study.patient
        for series in study.series:
            for instance in series.instances:
                ds = ct_slice(
                    study_uid=study.uid,
                    series_uid=series.uid,
                    sop_uid=instance.uid,
                    index=instance.number - 1,
                    size=4,
                    patient_id=patient.patient_id,
                    patient_name=patient.name,
                    study_date=study.date,
                )
                if patient.charset is None:
                    del ds.SpecificCharacterSet
                else:
                    ds.SpecificCharacterSet = patient.charset
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(
                    SOP_CLASSES[series.modality]
                )
                ds.PatientBirthDate = patient.birth_date
                ds.PatientSex = patient.sex
                ds.StudyTime = study.time
                ds.AccessionNumber = study.accession
                ds.StudyDescription = study.description
                ds.ReferringPhysicianName = study.referrer
                ds.StudyID = str(study_number)
                ds.Modality = series.modality
                ds.SeriesNumber = series.number
                ds.SeriesDescription = series.description
                ds.BodyPartExamined = series.body_part
                ds.FrameOfReferenceUID = study.uid + ".1"
                yield ds


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
