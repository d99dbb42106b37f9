"""Hostile input at the HTTP edge: every case gets the exact 4xx and message it should, the
server still serves afterwards, and the instances stored before are byte-identical afterwards.

One `pacsbridge serve` per module and index (SQLite, PostgreSQL: the numeric and paging cases
depend on the index's column types), driven with httpx, raw sockets and pynetdicom.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from starlette.requests import Request

from archive.query import COMPUTED, INDEXED, QueryLevel
from config import Settings
from dicomweb.common import base_url
from tests.conftest import Backend, RunningServer, start_server
from tests.dicomweb_fixtures import ct_study, module_server, multipart_body, parse_multipart, part10

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
DICOM_JSON = "application/dicom+json"
OCTET = "application/octet-stream"
#: Keeps the test of the header deadline short.
HEADER_TIMEOUT = "1"
#: Long enough that a server that never closes fails the test rather than hanging it.
SOCKET_WAIT = 60.0


@dataclass
class Stored:
    """What the module stores first: the studies, and every blob's bytes as stored."""

    studies: list[list[Dataset]]
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def first(self) -> Dataset:
        return self.studies[0][0]


@pytest.fixture(
    scope="module",
    params=[("sqlite", "file"), ("postgresql", "file")],
    ids=["sqlite", "postgresql"],
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from module_server(
        request, tmp_path_factory, PACSBRIDGE_HTTP_HEADER_TIMEOUT=HEADER_TIMEOUT
    )


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.http, timeout=120) as client:
        yield client


def _blobs(server: RunningServer) -> dict[str, bytes]:
    root = Path(server.backend.settings.data_dir) / "blobs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


@pytest.fixture(scope="module")
def stored(server: RunningServer, http: httpx.Client) -> Stored:
    studies = [
        ct_study(3, size=16, patient_id="HOSTILE-1", patient_name="DOE^JANE"),
        ct_study(2, size=16, patient_id="HOSTILE-2", patient_name="ROE^RICHARD"),
    ]
    for datasets in studies:
        body, content_type = multipart_body([part10(ds) for ds in datasets])
        response = http.post(
            "/dicom-web/studies", content=body, headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, response.text
    result = Stored(studies)
    result.blobs = _blobs(server)
    assert len(result.blobs) == 5
    return result


def instance_path(ds: Dataset) -> str:
    return (
        f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )


def assert_intact(server: RunningServer, http: httpx.Client, stored: Stored) -> None:
    """The server answers a search and a retrieve, and every stored file is as it was."""
    search = http.get("/dicom-web/studies", params={"PatientID": "HOSTILE-*"})
    assert search.status_code == 200, search.text
    assert {s["00100020"]["Value"][0] for s in search.json()} == {"HOSTILE-1", "HOSTILE-2"}
    ds = stored.first
    retrieve = http.get(instance_path(ds), headers={"Accept": AS_STORED})
    assert retrieve.status_code == 200, retrieve.text
    [(_headers, content)] = parse_multipart(retrieve.content, retrieve.headers["content-type"])
    assert content in stored.blobs.values()
    assert _blobs(server) == stored.blobs


def qido(http: httpx.Client, path: str, params: dict[str, str]) -> httpx.Response:
    """A search, its query percent-encoded but for "*" and "," (httpx would encode those
    too, and a value of 30,000 wildcards would no longer fit in a URL)."""
    query = "&".join(
        f"{urllib.parse.quote(k, safe='*,')}={urllib.parse.quote(v, safe='*,')}"
        for k, v in params.items()
    )
    return http.get(f"/dicom-web{path}?{query}")


def detail(response: httpx.Response) -> str:
    body = response.json()
    assert isinstance(body["detail"], str), body
    return body["detail"]


# --- QIDO-RS: every key, SQL metacharacters and huge values -----------------------------------

_PATHS = {
    QueryLevel.PATIENT: "/studies",
    QueryLevel.STUDY: "/studies",
    QueryLevel.SERIES: "/series",
    QueryLevel.IMAGE: "/instances",
}
#: Every key the index matches, at its own level; and keys matched on the stored JSON.
QIDO_KEYS = [
    *((_PATHS[attr.level], keyword) for keyword, attr in INDEXED.items()),
    *((_PATHS[level], keyword) for keyword, level in COMPUTED.items()),
    ("/instances", "SliceThickness"),  # DS
    ("/instances", "AcquisitionNumber"),  # IS
    ("/instances", "ImageComments"),  # LT
]


def _kind(keyword: str) -> str:
    vr = dictionary_VR(keyword)
    if vr == "UI":
        return "uid"
    if vr in ("IS", "US", "SS", "UL", "SL", "DS", "FL", "FD"):
        return "number"
    if vr in ("DA", "TM", "DT"):
        return "date"
    return "text"


#: SQL metacharacters, LIKE wildcards, quotes, an invalid UTF-8 byte (%ff decodes to U+FFFD):
#: none of them matches a stored value; none is longer than the shortest text VR (16).
METACHARACTERS = [
    "'",
    '"',
    ";",
    "--",
    "' OR '1'='1",
    "x';DROP TABLE x",
    "%",
    "_",
    "*%*",
    "_*",
    "\\x",
    "\ufffd",
]
#: Values no VR holds: each is refused with a message that names the key.
HUGE = ["*A" * 30000, "9" * 12000, "A" * 12000]
#: Numbers no integer or decimal VR holds, nor a date or time.
NOT_NUMBERS = ["1e400", "inf", "-inf", "nan", "99999999999999999999"]


@pytest.mark.parametrize(("path", "keyword"), QIDO_KEYS, ids=[k for _p, k in QIDO_KEYS])
def test_every_qido_key_with_metacharacters_and_huge_values(
    server: RunningServer, http: httpx.Client, stored: Stored, path: str, keyword: str
) -> None:
    kind = _kind(keyword)
    everything = qido(http, path, {"limit": "100"})
    assert everything.status_code == 200
    for value in METACHARACTERS:
        response = qido(http, path, {keyword: value})
        if kind == "text":
            assert response.status_code == 200, (value, response.text)
            assert response.json() == [], value
        else:
            assert response.status_code == 400, (value, response.text)
            assert detail(response).startswith(f"{keyword}: "), (value, detail(response))
    for value in HUGE:
        response = qido(http, path, {keyword: value})
        assert response.status_code == 400, (value[:20], response.text[:300])
        assert detail(response).startswith(f"{keyword}: "), detail(response)
    for value in NOT_NUMBERS if kind in ("number", "date") else []:
        response = qido(http, path, {keyword: value})
        assert response.status_code == 400, (value, response.text[:300])
        message = detail(response)
        assert message.startswith(f"{keyword}: '"), message
        assert " is not a" in message or " is outside the range of" in message, message
    # A NUL inside a value; only '*': universal matching, whatever the number of '*'.
    response = qido(http, path, {keyword: "1\x002"})
    assert response.status_code == 400
    assert detail(response) == f"{keyword}: the matching value holds a NUL character"
    response = qido(http, path, {keyword: "*" * 30000, "limit": "100"})
    if kind == "text":
        assert response.status_code == 200, response.text[:300]
        assert len(response.json()) == len(everything.json())
    else:
        assert response.status_code == 400
        assert detail(response).startswith(f"{keyword}: ")
    assert_intact(server, http, stored)


@pytest.mark.parametrize(
    ("path", "keyword", "value", "message"),
    [
        ("/series", "SeriesNumber", "1e400", "SeriesNumber: '1e400' is not an integer (IS)"),
        ("/series", "SeriesNumber", "inf", "SeriesNumber: 'inf' is not an integer (IS)"),
        ("/series", "SeriesNumber", "-inf", "SeriesNumber: '-inf' is not an integer (IS)"),
        ("/series", "SeriesNumber", "nan", "SeriesNumber: 'nan' is not an integer (IS)"),
        ("/series", "SeriesNumber", "1.5", "SeriesNumber: '1.5' is not an integer (IS)"),
        (
            "/series",
            "SeriesNumber",
            "99999999999999999999",
            "SeriesNumber: '99999999999999999999' is outside the range of IS "
            "(-2147483648 to 2147483647, PS3.5 6.2)",
        ),
        (
            "/series",
            "SeriesNumber",
            "2147483648",
            "SeriesNumber: '2147483648' is outside the range of IS",
        ),
        (
            "/series",
            "SeriesNumber",
            "-2147483649",
            "SeriesNumber: '-2147483649' is outside the range of IS",
        ),
        (
            "/instances",
            "InstanceNumber",
            "9223372036854775808",
            "InstanceNumber: '9223372036854775808' is outside the range of IS",
        ),
        ("/instances", "Rows", "65536", "Rows: '65536' is outside the range of US (0 to 65535"),
        ("/instances", "Columns", "-1", "Columns: '-1' is outside the range of US"),
        ("/instances", "NumberOfFrames", "1e400", "NumberOfFrames: '1e400' is not an integer"),
        (
            "/studies",
            "NumberOfStudyRelatedInstances",
            "99999999999999999999",
            "NumberOfStudyRelatedInstances: '99999999999999999999' is outside the range of IS",
        ),
        (
            "/series",
            "NumberOfSeriesRelatedInstances",
            "inf",
            "NumberOfSeriesRelatedInstances: 'inf' is not an integer",
        ),
        (
            "/studies",
            "NumberOfPatientRelatedStudies",
            "1e400",
            "NumberOfPatientRelatedStudies: '1e400' is not an integer",
        ),
        (
            "/instances",
            "SliceThickness",
            "1e400",
            "SliceThickness: '1e400' is not a finite decimal number (DS)",
        ),
        ("/instances", "SliceThickness", "nan", "SliceThickness: 'nan' is not a finite decimal"),
        (
            "/studies",
            "PatientName",
            "*A" * 30000,
            "PatientName: a matching value holds at most 1024 characters per component group, "
            "wildcards aside; this one has 30000",
        ),
        (
            "/studies",
            "StudyDescription",
            "*A" * 30000,
            "StudyDescription: a matching value holds at most 1024 characters, wildcards "
            "aside; this one has 30000",
        ),
        (
            "/studies",
            "AccessionNumber",
            "A" * 1025,
            "AccessionNumber: a matching value holds at most 1024 characters",
        ),
        (
            "/studies",
            "PatientName",
            "A*" * 33,
            "PatientName: a matching value holds at most 32 '*' wildcards; this one has 33",
        ),
        (
            "/studies",
            "PatientName",
            "A=B=C=D",
            "PatientName: a person name has at most 3 component groups",
        ),
        (
            "/studies",
            "StudyInstanceUID",
            "1." + "2" * 63,
            "StudyInstanceUID: a UI value holds at most 64 characters per value",
        ),
        (
            "/studies",
            "StudyInstanceUID",
            "1.2.3*",
            "StudyInstanceUID: wildcards are not allowed in UIDs",
        ),
        ("/studies", "StudyInstanceUID", "1.2.x", "StudyInstanceUID: '1.2.x' is not a UID"),
        (
            "/studies",
            "StudyInstanceUID",
            ",".join(["1"] * 10001),
            "StudyInstanceUID: a list holds at most 10000 values; this one has 10001",
        ),
        ("/studies", "StudyDate", "99999999", "StudyDate: '99999999' is not a DICOM date"),
        ("/studies", "StudyDate", "20241301", "StudyDate: '20241301' is not a DICOM date"),
        ("/studies", "StudyDate", "-20240132", "StudyDate: '20240132' is not a DICOM date"),
        ("/studies", "StudyTime", "25", "StudyTime: '25' is not a DICOM time"),
        ("/studies", "StudyTime", "1261", "StudyTime: '1261' is not a DICOM time"),
        ("/studies", "offset", "9223372036854775808", "offset must be an integer from 0 to"),
        ("/studies", "limit", "9223372036854775808", "limit must be an integer from 0 to"),
        ("/studies", "offset", "9" * 5000, "offset must be an integer from 0 to"),
        ("/studies", "limit", "-1", "limit must be an integer from 0 to 9223372036854775807"),
        ("/studies", "limit", "abc", "limit must be an integer from 0 to"),
        ("/studies", "fuzzymatching", "maybe", "fuzzymatching must be true or false"),
        ("/studies", "includefield", "NoSuchKeyword", "includefield: 'NoSuchKeyword' is neither"),
        (
            "/studies",
            "includefield",
            ",".join(f"0009{n:04X}" for n in range(257)),
            "includefield names more than 256 attributes",
        ),
    ],
)
def test_values_beyond_their_vr_are_refused(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    path: str,
    keyword: str,
    value: str,
    message: str,
) -> None:
    response = qido(http, path, {keyword: value})
    assert response.status_code == 400, response.text[:300]
    assert detail(response).startswith(message), detail(response)
    assert_intact(server, http, stored)


def test_fuzzy_matching_holds_names_to_the_same_bounds(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    params = {"fuzzymatching": "true", "PatientName": "*A" * 30000}
    response = qido(http, "/studies", params)
    assert response.status_code == 400
    assert detail(response).startswith(
        "PatientName: a matching value holds at most 1024 characters"
    )
    # A word with many wildcards against a name that almost matches: answered at once.
    params = {"fuzzymatching": "true", "PatientName": "D*O*E*J*A*N*E*X"}
    response = http.get("/dicom-web/studies", params=params)
    assert response.status_code == 200
    assert response.json() == []
    assert_intact(server, http, stored)


def test_values_longer_than_their_vr_match_what_they_match(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    """A RIS whose accession numbers are longer than SH allows is answered, not refused: such
    a value matches nothing the index holds (ingest keeps values within their VR)."""
    for path, params in (
        ("/studies", {"AccessionNumber": "RIS2024000012345678"}),
        ("/series", {"StationName": "STATION_NAME_LONGER"}),
        ("/studies", {"StudyDescription": "D" * 70}),
        ("/studies", {"AccessionNumber": "RIS20240000*12345678"}),
    ):
        response = http.get(f"/dicom-web{path}", params=params)
        assert response.status_code == 200, (params, response.text[:300])
        assert response.json() == [], params
    assert_intact(server, http, stored)


def test_values_within_range_reach_the_index_and_match_nothing(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    """The largest values each key holds are compared by the index (SQLite and PostgreSQL's
    int4 columns alike), without an error."""
    for path, params in [
        ("/series", {"SeriesNumber": "2147483647"}),
        ("/series", {"SeriesNumber": "-2147483648"}),
        ("/instances", {"InstanceNumber": "+2147483647"}),
        ("/instances", {"Rows": "65535"}),
        ("/studies", {"NumberOfStudyRelatedSeries": "2147483647"}),
        ("/studies", {"offset": "9223372036854775807"}),
        ("/studies", {"offset": "9223372036854775807", "limit": "9223372036854775807"}),
        (
            "/studies",
            {"offset": "9223372036854775807", "fuzzymatching": "true", "PatientName": "doe"},
        ),
        ("/studies", {"StudyDate": "20200101-20190101"}),  # an empty range
        ("/studies", {"ModalitiesInStudy": ",".join(["XX"] * 5000)}),
        ("/studies", {"StudyInstanceUID": ",".join(["1"] * 10000)}),
    ]:
        response = qido(http, path, params)
        assert response.status_code == 200, (params, response.text[:300])
        assert response.json() == [], params
    response = http.get(
        "/dicom-web/series", params={"SeriesNumber": "+1", "PatientID": "HOSTILE-1"}
    )
    assert len(response.json()) == 1
    assert_intact(server, http, stored)


def test_duplicate_keys_and_accept_headers(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    response = http.get("/dicom-web/studies?PatientName=A&PatientName=B")
    assert response.status_code == 400
    assert detail(response) == "PatientName is given 2 times; give it once"
    for accept in ["x" * 60000, ";;;,,,q=nan", "application/dicom+json;q=inf, */*;q=-1"]:
        response = http.get("/dicom-web/studies", headers={"Accept": accept})
        if accept.startswith("application/dicom+json"):
            assert response.status_code == 200
        else:
            assert response.status_code == 406, accept[:40]
            assert detail(response).startswith("QIDO-RS answers in application/dicom+json")
    assert_intact(server, http, stored)


# --- UIDs in paths, on every DICOMweb route -----------------------------------------------------

ROUTES = [
    "/studies/{s}/series",
    "/studies/{s}/instances",
    "/studies/{s}/series/{se}/instances",
    "/studies/{s}",
    "/studies/{s}/series/{se}",
    "/studies/{s}/series/{se}/instances/{i}",
    "/studies/{s}/metadata",
    "/studies/{s}/series/{se}/metadata",
    "/studies/{s}/series/{se}/instances/{i}/metadata",
    "/studies/{s}/series/{se}/instances/{i}/frames/1",
    "/studies/{s}/series/{se}/instances/{i}/bulkdata/7FE00010",
    "/studies/{s}/rendered",
    "/studies/{s}/series/{se}/rendered",
    "/studies/{s}/series/{se}/instances/{i}/rendered",
    "/studies/{s}/series/{se}/instances/{i}/frames/1/rendered",
    "/studies/{s}/thumbnail",
    "/studies/{s}/series/{se}/thumbnail",
    "/studies/{s}/series/{se}/instances/{i}/thumbnail",
    "/studies/{s}/series/{se}/instances/{i}/frames/1/thumbnail",
    "POST /studies/{s}",
]
_NAMES = {"s": "Study Instance UID", "se": "Series Instance UID", "i": "SOP Instance UID"}
#: As sent on the request line: wildcards, traversal, percent-encodings of both, NUL, an
#: invalid UTF-8 byte, a space, quotes, letters, and a UID one character too long.
BAD_UIDS = [
    "*",
    "%2A",
    "1.2.*",
    "..",
    "%2e%2e",
    "%2E%2E",
    ".",
    "%00",
    "1.2.3%00",
    "%ff",
    "1.2%203",
    "'",
    "1.2.abc",
    "%3F",
    "1." + "2" * 63,
    "9" * 5000,
]


@pytest.mark.parametrize("route", ROUTES)
def test_path_uids_are_uids_on_every_route(
    server: RunningServer, http: httpx.Client, stored: Stored, route: str
) -> None:
    method, _, template = route.rpartition(" ")
    method = method or "GET"
    ds = stored.first
    real = {"s": ds.StudyInstanceUID, "se": ds.SeriesInstanceUID, "i": ds.SOPInstanceUID}
    body, content_type = multipart_body([part10(stored.studies[1][0])])
    kwargs: dict[str, Any] = {}
    if method == "POST":
        kwargs = {"content": body, "headers": {"Content-Type": content_type}}

    def send(uids: dict[str, str]) -> httpx.Response:
        target = "/dicom-web" + template.format(**uids)
        # The target goes on the request line as it is: no client normalises "..".
        return http.request(
            method, "/dicom-web/", extensions={"target": target.encode("latin-1")}, **kwargs
        )

    for position in [name for name in ("s", "se", "i") if "{" + name + "}" in template]:
        for bad in BAD_UIDS:
            response = send({**real, position: bad})
            assert response.status_code == 400, (position, bad[:20], response.text[:200])
            assert f"is not a valid {_NAMES[position]}: a UID is at most 64 digits and dots" in (
                detail(response)
            ), detail(response)
        # A well-formed UID that names nothing is not refused as malformed (STOW-RS: the
        # instance is not of that study, 409).
        response = send({**real, position: "1.2.3"})
        assert response.status_code in (200, 404, 409), response.text[:200]
        assert "is not a valid" not in response.text
    assert_intact(server, http, stored)


def test_a_wildcard_study_matches_nothing(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    response = http.get("/dicom-web/studies/*/instances")
    assert response.status_code == 400
    assert detail(response) == (
        "'*' is not a valid Study Instance UID: a UID is at most 64 digits and dots (PS3.5 9.1)"
    )
    assert_intact(server, http, stored)


# --- Range ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "status", "span"),
    [
        ("bytes=0-3", 206, (0, 4)),
        ("bytes=0-0", 206, (0, 1)),
        ("BYTES = 2 - 5", 206, (2, 6)),
        ("bytes=500-", 206, (500, 512)),
        ("bytes=-12", 206, (500, 512)),
        ("bytes=0-" + "9" * 5000, 206, (0, 512)),
        ("bytes=-" + "9" * 5000, 206, (0, 512)),
        ("bytes=" + "9" * 5000 + "-", 416, None),
        ("bytes=" + "9" * 5000 + "-" + "9" * 5001, 416, None),
        ("bytes=512-", 416, None),
        ("bytes=-0", 416, None),
        ("bytes=" + "9" * 5000, 200, (0, 512)),
        ("bytes=5-3", 200, (0, 512)),
        ("bytes=0-1,3-4", 200, (0, 512)),
        ("bytes=x-y", 200, (0, 512)),
        ("bytes=--1", 200, (0, 512)),
        ("bytes=1-2-3", 200, (0, 512)),
        ("bytes=", 200, (0, 512)),
        ("items=0-1", 200, (0, 512)),
        ("bytes=\u0661-\u0662", 200, (0, 512)),  # Arabic-Indic digits are not digits here
    ],
)
def test_range_headers_on_bulk_data(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    header: str,
    status: int,
    span: tuple[int, int] | None,
) -> None:
    ds = stored.first
    pixels = bytes(ds.PixelData)
    assert len(pixels) == 512
    response = http.get(
        f"{instance_path(ds)}/bulkdata/7FE00010",
        headers=[(b"Accept", OCTET.encode()), (b"Range", header.encode("utf-8"))],
    )
    assert response.status_code == status, response.text[:200]
    if span is None:
        assert response.headers["content-range"] == "bytes */512"
        assert "is outside the 512 bytes" in detail(response)
    else:
        assert response.content == pixels[span[0] : span[1]]
        if status == 206:
            assert response.headers["content-range"] == f"bytes {span[0]}-{span[1] - 1}/512"
    assert_intact(server, http, stored)


# --- the HTTP API: peers and jobs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field_name", "message"),
    [
        ('{"ae_title": "A", "host": "h", "port": NaN}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": Infinity}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": -Infinity}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": 1e400}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": true}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": false}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": "104"}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": 104.0}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": null}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": [104]}', "port", "valid integer"),
        ('{"ae_title": "A", "host": "h", "port": 99999999999999999999}', "port", "65535"),
        ('{"ae_title": "A", "host": "h", "port": 0}', "port", "greater than or equal to 1"),
        ('{"ae_title": 123, "host": "h", "port": 104}', "ae_title", "valid string"),
        ('{"ae_title": true, "host": "h", "port": 104}', "ae_title", "valid string"),
        ('{"ae_title": ["A"], "host": "h", "port": 104}', "ae_title", "valid string"),
        ('{"ae_title": "A\\\\B", "host": "h", "port": 104}', "ae_title", "without backslash"),
        ('{"ae_title": "A", "host": 10, "port": 104}', "host", "valid string"),
        ('{"ae_title": "A", "host": "a b", "port": 104}', "host", "host name or an IP"),
        ('{"ae_title": "A", "host": "h", "port": 104, "prot": 1}', "prot", "Extra inputs"),
        ('{"ae_title": "A", "port": 104}', "host", "Field required"),
    ],
)
def test_peer_bodies_are_strictly_typed(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    body: str,
    field_name: str,
    message: str,
) -> None:
    response = http.put(
        "/api/peers/hostile", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    errors = json.loads(response.text)["detail"]  # strict JSON: no NaN, no Infinity
    assert [e["loc"][-1] for e in errors] == [field_name], errors
    assert message in errors[0]["msg"], errors
    assert http.get("/api/peers/hostile").status_code == 404
    assert_intact(server, http, stored)


def test_peer_bodies_that_are_not_objects(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    for body in [b"[]", b'"x"', b"{", b"", b"NaN", b"\xff"]:
        response = http.put(
            "/api/peers/hostile", content=body, headers={"Content-Type": "application/json"}
        )
        # Not UTF-8: FastAPI cannot even read it as text (400).
        assert response.status_code == (400 if body == b"\xff" else 422), (body, response.text)
        assert json.loads(response.text)["detail"]
    response = http.put(
        "/api/peers/hostile", json={"ae_title": "HOSTILE", "host": "127.0.0.1", "port": 104}
    )
    assert response.status_code == 201, response.text
    assert response.json()["port"] == 104
    assert http.delete("/api/peers/hostile").status_code == 204
    assert_intact(server, http, stored)


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/api/jobs/9223372036854775808", 404, "no job 9223372036854775808"),
        ("GET", "/api/jobs/9223372036854775807", 404, "no job 9223372036854775807"),
        ("GET", "/api/jobs/2147483648", 404, "no job 2147483648"),
        ("GET", "/api/jobs/0", 404, "no job 0"),
        ("GET", "/api/jobs/-1", 404, "no job -1"),
        ("POST", "/api/jobs/9223372036854775808/requeue", 404, "no job 9223372036854775808"),
        ("POST", "/api/jobs/2147483648/requeue", 404, "no job 2147483648"),
        ("GET", "/api/jobs/" + "9" * 5000, 422, "exceeded maximum size"),
        ("GET", "/api/jobs/abc", 422, "valid integer"),
        (
            "GET",
            "/api/jobs?offset=9223372036854775808",
            422,
            "less than or equal to 9223372036854775807",
        ),
        ("GET", "/api/jobs?offset=-1", 422, "greater than or equal to 0"),
        ("GET", "/api/jobs?limit=9223372036854775808", 422, "less than or equal to 1000"),
        ("GET", "/api/jobs?limit=0", 422, "greater than or equal to 1"),
        ("GET", "/api/jobs?status=bogus", 422, "queued"),
    ],
)
def test_job_ids_and_paging_beyond_the_index(
    server: RunningServer,
    http: httpx.Client,
    stored: Stored,
    method: str,
    path: str,
    status: int,
    message: str,
) -> None:
    response = http.request(method, path)
    assert response.status_code == status, response.text[:300]
    text = response.json()["detail"]
    assert message in (text if isinstance(text, str) else text[0]["msg"]), text
    response = http.get("/api/jobs", params={"offset": "9223372036854775807"})
    assert response.status_code == 200
    assert response.json() == []
    assert_intact(server, http, stored)


# --- HTTP connection limits -----------------------------------------------------------------------


def _read_until_closed(sock: socket.socket) -> bytes:
    sock.settimeout(SOCKET_WAIT)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open; it sent {received[:200]!r}")
    return received


def test_unfinished_request_headers_are_timed_out(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    address = ("127.0.0.1", server.http_port)
    half = [socket.create_connection(address) for _ in range(50)]
    silent = socket.create_connection(address)
    for sock in half:
        sock.sendall(b"GET /dicom-web/stu")
    try:
        for sock in half:
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:100]
            assert b"connection: close" in answer
            assert answer.endswith(b"the request's headers did not arrive within 1 s")
        # A connection that says nothing is closed without an answer.
        assert _read_until_closed(silent) == b""
    finally:
        for sock in [*half, silent]:
            sock.close()
    # A keep-alive connection: a whole request is answered, the next half one is timed out.
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\nGET /heal")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"HTTP/1.1 408 Request Timeout\r\n" in answer
    # Empty lines after a finished exchange begin no request (RFC 9112 2.2), but they start
    # the clock all the same: the connection is closed, with nothing to answer.
    with socket.create_connection(address) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.settimeout(SOCKET_WAIT)
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        while len(body) < length:
            body += sock.recv(65536)
        sock.sendall(b"\r\n")
        assert _read_until_closed(sock) == b""
    assert_intact(server, http, stored)


def test_request_headers_are_limited_in_size(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        # 66,000 bytes of headers that never end, and then nothing: the server has read all
        # of it when it answers and closes.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\nX-Filler: " + b"a" * 65960)
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:100]
    assert answer.endswith(b"the request line and headers exceed 65536 bytes")
    # Headers over the limit that arrive complete (one write, so mostly one read; two writes;
    # a large Authorization header; a request pipelined after a good one) are refused alike,
    # before the application sees them: /health would answer 200.
    request = b"GET /health HTTP/1.1\r\nHost: a\r\n"
    for filler in (b"X-Filler: " + b"a" * 69_000, b"Authorization: Bearer " + b"e" * 69_000):
        for writes in (1, 2):
            whole = request + filler + b"\r\n\r\n"
            half = len(whole) // 2
            parts = [whole] if writes == 1 else [whole[:half], whole[half:]]
            with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
                for part in parts:
                    sock.sendall(part)
                answer = _read_until_closed(sock)
            assert answer is not None, (filler[:20], writes)
            assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), (
                filler[:20],
                writes,
                answer[:100],
            )
            assert answer.endswith(b"the request line and headers exceed 65536 bytes")
            assert answer.count(b"HTTP/1.1 ") == 1
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(request + b"\r\n" + request + b"X-Filler: " + b"a" * 69_000 + b"\r\n\r\n")
        answer = _read_until_closed(sock)
    assert answer is not None
    first, _, second = answer.partition(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert first.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100]
    assert second.endswith(b"the request line and headers exceed 65536 bytes"), answer[-100:]
    # Under the limit, complete headers of 60 KB are served, and so are 30 KB of headers
    # followed in the same write by a body that takes the bytes read past the limit (body
    # bytes are no headers).
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(request + b"X-Filler: " + b"a" * 60_000 + b"\r\n\r\n")
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["status"] == "ok"
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        body = b"{" * 40_000
        sock.sendall(
            b"POST /health HTTP/1.1\r\nHost: a\r\nX-Filler: "
            + b"a" * 30_000
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = _read_response(sock)
    assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer[:100]
    assert_intact(server, http, stored)


def _read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, the connection left open."""
    sock.settimeout(SOCKET_WAIT)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received[:200]!r}"
        received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    found = re.search(rb"(?im)^content-length: *([0-9]+)\r?$", head)
    assert found is not None, head
    length = int(found[1])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {received[:200]!r}"
        rest += chunk
    return head + b"\r\n\r\n" + rest


# --- Warning headers ----------------------------------------------------------------------------


def test_warning_headers_are_capped_and_printable(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    def warning(query: str) -> str:
        response = http.get(f"/dicom-web/studies?{query}")
        assert response.status_code == 200, response.text[:200]
        return response.headers["warning"]

    many = warning("&".join(f"a{n}.b" for n in range(3000)))
    assert len(many) < 4096
    assert many.count('299 pacsbridge "') == 6
    assert many.startswith('299 pacsbridge "a0.b: matching inside sequences is not supported')
    assert many.endswith('299 pacsbridge "and 2995 more warnings"')
    # 12,000 times the same parameter: one warning.
    same = warning("&".join(["a.b"] * 12000))
    assert same == (
        '299 pacsbridge "a.b: matching inside sequences is not supported; the key was ignored"'
    )
    # Line breaks, quotes and characters beyond Latin-1 in a parameter's name.
    odd = warning("x%0D%0AX-Injected:%201%22%E4%B8%AD.y=1")
    assert odd == (
        '299 pacsbridge "x\\\\x0d\\\\x0aX-Injected: 1\\"\\\\u4e2d.y: matching inside sequences '
        'is not supported; the key was ignored"'
    )
    response = http.get("/dicom-web/studies", params={"x" * 1000 + ".y": "1"})
    assert response.status_code == 200
    assert response.headers["warning"].startswith('299 pacsbridge "xxxxxxxx')
    assert response.headers["warning"].endswith('xxx..."')
    assert len(response.headers["warning"]) == len('299 pacsbridge ""') + 200
    assert "x-injected" not in {name.lower() for name in response.headers}
    assert_intact(server, http, stored)


# --- URLs in answers: the Host header -----------------------------------------------------------


def test_urls_come_from_a_valid_host_header(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    ds = stored.first
    search = {"StudyInstanceUID": ds.StudyInstanceUID}
    for host, root in [
        ("pacs.local:8042", "http://pacs.local:8042/dicom-web"),
        ("127.0.0.1:9", "http://127.0.0.1:9/dicom-web"),
        ("[::1]:8042", "http://[::1]:8042/dicom-web"),
    ]:
        response = http.get("/dicom-web/studies", params=search, headers={"Host": host})
        assert response.status_code == 200, response.text
        [study] = response.json()
        assert study["00081190"]["Value"] == [f"{root}/studies/{ds.StudyInstanceUID}"]
    metadata = http.get(f"{instance_path(ds)}/metadata", headers={"Host": "pacs.local:8042"})
    assert metadata.status_code == 200
    bulk = metadata.json()[0]["7FE00010"]["BulkDataURI"]
    assert bulk == f"http://pacs.local:8042{instance_path(ds)}/bulkdata/7FE00010"
    for host in ['evil"><script', "a b", "user@host", "host/path", "h:99999", "[::1", "h:x"]:
        for path in ["/dicom-web/studies", f"{instance_path(ds)}/metadata"]:
            response = http.get(path, headers={"Host": host})
            assert response.status_code == 400, (host, response.text)
            assert detail(response) == (
                f"the Host header {host!r} is not a valid host[:port] (RFC 9110 7.2); the "
                "server's URLs are built from it unless PACSBRIDGE_PUBLIC_URL is set"
            )
    body, content_type = multipart_body([part10(ds)])
    response = http.post(
        "/dicom-web/studies",
        content=body,
        headers={"Content-Type": content_type, "Host": 'evil"><script'},
    )
    assert response.status_code == 400
    assert "is not a valid host[:port]" in detail(response)
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(
            b"GET /dicom-web/studies HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n"
        )
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(
        b'{"detail":"the request has several Host headers (RFC 9110 7.2 allows one)"}'
    )
    assert_intact(server, http, stored)


# --- C-FIND: the same bounds ------------------------------------------------------------------


def test_c_find_refuses_what_qido_refuses(
    server: RunningServer, http: httpx.Client, stored: Stored
) -> None:
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    study = stored.first.StudyInstanceUID

    def find(level: str, **keys: Any) -> tuple[int, str | None, int]:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, (vr, value) in keys.items():
            ds.add_new(keyword, vr, value)
        responses = list(assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind))
        status = responses[-1][0]
        return int(status.Status), status.get("ErrorComment"), len(responses) - 1

    try:
        cases: list[tuple[str, dict[str, Any], str]] = [
            (
                "STUDY",
                {"PatientName": ("PN", "*A" * 30000)},
                "PatientName: a matching value holds at most 1024",
            ),
            (
                "STUDY",
                {"StudyDescription": ("LO", "*A" * 30000)},
                "StudyDescription: a matching value holds",
            ),
            (
                "SERIES",
                {"StudyInstanceUID": ("UI", study), "SeriesNumber": ("LO", "2147483648")},
                "SeriesNumber: '2147483648' is outside the range of IS",
            ),
            (
                "SERIES",
                {"StudyInstanceUID": ("UI", study), "SeriesNumber": ("LO", "nan")},
                "SeriesNumber: 'nan' is not an integer (IS)",
            ),
            (
                "STUDY",
                {"NumberOfStudyRelatedSeries": ("IS", "99999999999")},
                "NumberOfStudyRelatedSeries: '99999999999' is outside",
            ),
            (
                "STUDY",
                {"StudyInstanceUID": ("UI", "\\".join(f"1.2.{n}" for n in range(20000)))},
                "StudyInstanceUID: a list holds at most 10000 values",
            ),
            ("STUDY", {"StudyDate": ("DA", "20241399")}, "StudyDate: '20241399' is not a DICO"),
            ("STUDY", {"PatientName": ("PN", "A\x00B")}, "PatientName: the matching value hol"),
        ]
        for level, keys, comment in cases:
            status, error, matches = find(level, **keys)
            assert (status, matches) == (0xA900, 0), (keys.keys(), hex(status), error)
            # The Error Comment is the message, cut to the 64 characters of an LO.
            assert error is not None
            shared = min(len(error), len(comment))
            assert shared >= 25 and error[:shared] == comment[:shared], (error, comment)
        # 1e400 is not even an IS pydicom can read: the identifier cannot be decoded.
        status, error, _ = find(
            "SERIES", StudyInstanceUID=("UI", study), SeriesNumber=("LO", "1e400")
        )
        assert status in (0xA900, 0xC000) and error
        # The association still answers.
        status, _error, matches = find(
            "STUDY", PatientID=("LO", "HOSTILE-1"), StudyInstanceUID=("UI", "")
        )
        assert (status, matches) == (0x0000, 1)
    finally:
        assoc.release()
    assert_intact(server, http, stored)


# --- PACSBRIDGE_PUBLIC_URL ----------------------------------------------------------------------


def test_public_url_makes_every_url(tmp_path: Path, make_backend: Any) -> None:
    backend: Backend = make_backend("sqlite", "file", worker_in_serve=False)
    server = start_server(backend, tmp_path, PACSBRIDGE_PUBLIC_URL="https://pacs.example/")
    try:
        with httpx.Client(base_url=server.http, timeout=60) as http:
            [ds] = ct_study(1, size=16)
            body, content_type = multipart_body([part10(ds)])
            stow = http.post(
                "/dicom-web/studies",
                content=body,
                headers={"Content-Type": content_type, "Host": 'evil"><script'},
            )
            assert stow.status_code == 200, stow.text
            study_url = f"https://pacs.example/dicom-web/studies/{ds.StudyInstanceUID}"
            assert stow.json()["00081190"]["Value"] == [study_url]
            # The Host header is neither copied nor needed.
            search = http.get("/dicom-web/studies", headers={"Host": 'evil"><script'})
            assert search.status_code == 200
            assert search.json()[0]["00081190"]["Value"] == [study_url]
            metadata = http.get(f"{instance_path(ds)}/metadata")
            bulk = metadata.json()[0]["7FE00010"]["BulkDataURI"]
            assert bulk == f"https://pacs.example{instance_path(ds)}/bulkdata/7FE00010"
    finally:
        assert server.stop() == 0, server.log()[-2000:]


def _request(settings: Settings, host: bytes) -> Request:
    class _State:
        pass

    app = _State()
    app.state = _State()  # type: ignore[attr-defined]
    app.state.settings = settings  # type: ignore[attr-defined]
    scope = {
        "type": "http",
        "app": app,
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "path": "/dicom-web/studies",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", host)],
    }
    return Request(scope)


def test_dicomweb_base_url_overrides_public_url(tmp_path: Path) -> None:
    public = Settings(data_dir=tmp_path, public_url="https://pacs.example/")
    assert base_url(_request(public, b"a:1")) == "https://pacs.example/dicom-web"
    both = Settings(
        data_dir=tmp_path,
        public_url="https://pacs.example",
        dicomweb_base_url="https://pacs.example/imaging/",
    )
    assert base_url(_request(both, b"a:1")) == "https://pacs.example/imaging"
    neither = Settings(data_dir=tmp_path)
    assert base_url(_request(neither, b"pacs.local:8042")) == "http://pacs.local:8042/dicom-web"
    for bad in ["ftp://pacs.example", "https://pacs.example/?x=1", 'https://ev"il']:
        with pytest.raises(ValueError, match="is not an http\\(s\\) URL"):
            Settings(data_dir=tmp_path, public_url=bad)
