"""DICOMweb with real clients: the dicomweb-client library and its CLI, DCMTK storescu/findscu
and pynetdicom. Studies go in over C-STORE and out over QIDO/WADO-RS, and in over STOW-RS and
out over C-FIND, on the embedded backend and on PostgreSQL + S3."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import VENV_BIN, RunningServer, require_tool
from tests.dicomweb_fixtures import BACKEND_IDS, BACKENDS, ct_study, module_server, study_dir

pytestmark = pytest.mark.dcmtk


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKEND_IDS)
def dw_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    yield from module_server(request, tmp_path_factory)


@pytest.fixture
def client(dw_server: RunningServer) -> DICOMwebClient:
    return DICOMwebClient(url=f"{dw_server.http}/dicom-web")


def _uid(item: dict, tag: str) -> str:
    return str(item[tag]["Value"][0])


def _c_find(server: RunningServer, level: str, **keys: str) -> list[Dataset]:
    ae = AE(ae_title="DWTEST")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
    assert assoc.is_established
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        found = []
        for status, ds in assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            assert status.Status in (0x0000, 0xFF00, 0xFF01), hex(status.Status)
            if ds is not None and status.Status != 0x0000:
                found.append(ds)
        return found
    finally:
        assoc.release()


def test_stow_with_dicomweb_client_then_c_find(
    dw_server: RunningServer, client: DICOMwebClient
) -> None:
    datasets = ct_study(3, series=2, patient_id="DW-STOW-1", patient_name="STOW^IN")
    study = str(datasets[0].StudyInstanceUID)
    response = client.store_instances(datasets)
    stored = response.ReferencedSOPSequence
    assert {str(i.ReferencedSOPInstanceUID) for i in stored} == {
        str(d.SOPInstanceUID) for d in datasets
    }
    assert all(
        str(i.RetrieveURL).startswith(f"{dw_server.http}/dicom-web/studies/{study}/series/")
        for i in stored
    )
    assert str(response.RetrieveURL) == f"{dw_server.http}/dicom-web/studies/{study}"
    assert len(response.get("FailedSOPSequence", [])) == 0

    # Out over C-FIND (pynetdicom) ...
    studies = _c_find(
        dw_server, "STUDY", StudyInstanceUID=study, PatientName="", ModalitiesInStudy=""
    )
    assert len(studies) == 1 and str(studies[0].PatientName) == "STOW^IN"
    series = _c_find(dw_server, "SERIES", StudyInstanceUID=study, SeriesInstanceUID="")
    assert len(series) == 2
    found = {
        str(image.SOPInstanceUID)
        for item in series
        for image in _c_find(
            dw_server,
            "IMAGE",
            StudyInstanceUID=study,
            SeriesInstanceUID=str(item.SeriesInstanceUID),
            SOPInstanceUID="",
        )
    }
    assert found == {str(d.SOPInstanceUID) for d in datasets}
    # ... and over DCMTK findscu.
    findscu = require_tool("findscu")
    result = subprocess.run(
        [
            findscu, "-S", "-aec", dw_server.ae_title, "127.0.0.1", str(dw_server.dimse_port),
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
            "-k", "SeriesInstanceUID", "-k", "NumberOfSeriesRelatedInstances",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert len(re.findall(r"\(0020,000e\) UI \[", output)) == 2, output
    assert output.count("(0020,1209) IS [3") == 2, output


def test_c_store_then_dicomweb_client_search_and_retrieve(
    dw_server: RunningServer, client: DICOMwebClient, tmp_path: Path
) -> None:
    datasets = ct_study(4, size=32, patient_id="DW-CSTORE-1", patient_name="Müller^Jürgen")
    study = str(datasets[0].StudyInstanceUID)
    series = str(datasets[0].SeriesInstanceUID)
    storescu = require_tool("storescu")
    subprocess.run(
        [storescu, "-aec", dw_server.ae_title, "+sd", "127.0.0.1", str(dw_server.dimse_port),
         str(study_dir(tmp_path / "in", datasets))],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip

    # QIDO-RS
    found = client.search_for_studies(search_filters={"PatientID": "DW-CSTORE-1"})
    assert [_uid(s, "0020000D") for s in found] == [study]
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "Müller^Jürgen"
    assert found[0]["00201208"]["Value"] == [4]
    assert found[0]["00081190"]["Value"][0] == f"{dw_server.http}/dicom-web/studies/{study}"
    fuzzy = client.search_for_studies(search_filters={"PatientName": "muller"}, fuzzymatching=True)
    assert study in [_uid(s, "0020000D") for s in fuzzy]
    assert [_uid(s, "0020000E") for s in client.search_for_series(study)] == [series]
    instances = client.search_for_instances(study, series, fields=["ImagePositionPatient"])
    by_sop = {_uid(i, "00080018"): i for i in instances}
    assert set(by_sop) == {str(d.SOPInstanceUID) for d in datasets}
    assert all(i["00200032"]["Value"] for i in instances)
    assert client.search_for_studies(search_filters={"PatientID": "nobody-at-all"}) == []

    # WADO-RS: whole study, series and one instance, byte for byte what was sent
    sent = {str(d.SOPInstanceUID): d for d in datasets}
    retrieved = client.retrieve_study(study)
    assert {str(d.SOPInstanceUID) for d in retrieved} == set(sent)
    for ds in retrieved:
        assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len(client.retrieve_series(study, series)) == 4
    one = datasets[2]
    instance = client.retrieve_instance(study, series, str(one.SOPInstanceUID))
    assert instance.PixelData == one.PixelData

    # metadata, frames, bulk data
    metadata = client.retrieve_study_metadata(study)
    assert len(metadata) == 4
    assert client.retrieve_series_metadata(study, series)[0]["0020000D"]["Value"] == [study]
    meta = client.retrieve_instance_metadata(study, series, str(one.SOPInstanceUID))
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.startswith(f"{dw_server.http}/dicom-web/studies/{study}/series/{series}/instances/")
    frames = client.retrieve_instance_frames(study, series, str(one.SOPInstanceUID), [1])
    assert frames == [one.PixelData]
    assert client.retrieve_bulkdata(uri) == [one.PixelData]
    assert client.retrieve_bulkdata(uri, byte_range=(100, 199)) == [one.PixelData[100:200]]


def test_dicomweb_client_cli(
    dw_server: RunningServer, client: DICOMwebClient, tmp_path: Path
) -> None:
    cli = str(VENV_BIN / "dicomweb_client")
    url = f"{dw_server.http}/dicom-web"
    datasets = ct_study(2, size=16, patient_id="DW-CLI-1")
    study = str(datasets[0].StudyInstanceUID)
    series = str(datasets[0].SeriesInstanceUID)
    sop = str(datasets[0].SOPInstanceUID)
    files = study_dir(tmp_path / "in", datasets)

    def run(*args: str) -> str:
        result = subprocess.run(
            [cli, "--url", url, *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    run("store", "instances", *map(str, sorted(files.glob("*.dcm"))))
    studies = json.loads(run("search", "studies", "--filter", "PatientID=DW-CLI-1"))
    assert [_uid(s, "0020000D") for s in studies] == [study]
    instances = json.loads(run("search", "instances", "--study", study))
    assert len(instances) == 2
    metadata = json.loads(run("retrieve", "studies", "--study", study, "metadata"))
    assert len(metadata) == 2
    out = tmp_path / "out"
    out.mkdir()
    run("retrieve", "instances", "--study", study, "--series", series, "--instance", sop,
        "full", "--save", "--output-dir", str(out))  # fmt: skip
    saved = list(out.iterdir())
    assert len(saved) == 1 and pydicom.dcmread(saved[0]).SOPInstanceUID == sop
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    run("retrieve", "instances", "--study", study, "--series", series, "--instance", sop,
        "frames", "--numbers", "1", "--save", "--output-dir", str(frames_dir))  # fmt: skip
    assert [p.read_bytes() for p in frames_dir.iterdir()] == [datasets[0].PixelData]
