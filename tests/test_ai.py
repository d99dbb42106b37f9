"""AI on stable studies: real scans, the builtin models, SEG and SR written back, left is left.

Real data from Debian packages (``mricron-data``: the ch2 T1 MRI and its reference brain mask;
``invesalius-examples``: a head CT), wrapped as DICOM series at test time.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from copy import deepcopy
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from sqlalchemy import select

from ai.registry import ModelRegistry
from ai.runs import RunStore, execute_run, plan_study
from archive import Archive
from archive.audit import AuditEventRow
from archive.models import Patient, Study
from config import Settings
from config.settings import AISettings
from tests.ai_data import (
    CH2,
    CH2_BET,
    CRANIUM,
    LAYOUTS,
    SeriesSpec,
    cranium_ct,
    dice,
    grid_affine,
    nifti_as_axial,
    part10,
    points_to_mask,
    seg_points,
    series_datasets,
    stored,
    write_files,
)
from tests.conftest import IN_CI, Backend, RunningServer, require_tool, start_server

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _require(path: Path, package: str) -> None:
    if not path.exists():
        message = f"{path} is missing (apt-get install {package})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def mri_data() -> None:
    _require(CH2, "mricron-data")


def dciodvfy_errors(data: bytes, tmp_path: Path) -> list[str]:
    """The errors dciodvfy (dicom3tools) finds in an object; warnings are not errors."""
    tool = require_tool("dciodvfy")
    path = tmp_path / "verify.dcm"
    path.write_bytes(data)
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def produced(run: dict, modality: str) -> dict:
    [item] = [p for p in run["produced"] if p["modality"] == modality]
    return item


def sr_volumes(sr: Dataset) -> dict[str, float]:
    """Volume measurements (ml) of a TID 1500 report by tracking identifier."""
    volumes: dict[str, float] = {}

    def walk(items: object, group: str | None) -> None:
        for item in items or []:  # type: ignore[attr-defined]
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            if name == "Tracking Identifier":
                group = item.TextValue
            if item.ValueType == "NUM" and name == "Volume":
                value = item.MeasuredValueSequence[0]
                assert value.MeasurementUnitsCodeSequence[0].CodeValue == "ml"
                assert group is not None
                volumes[group] = float(value.NumericValue)
            walk(item.get("ContentSequence"), group)

    for group in sr.ContentSequence:
        if group.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements":
            for measurement in group.ContentSequence:
                tracking = next(
                    i.TextValue
                    for i in measurement.ContentSequence
                    if i.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
                )
                walk(measurement.ContentSequence, tracking)
    return volumes


def seg_segment(seg: Dataset, label: str) -> int:
    return next(s.SegmentNumber for s in seg.SegmentSequence if s.SegmentLabel == label)


# --- a phantom with a lesion on the patient's left, anterior, superior ----------------------

LESION_LPS = np.array([40.0, -30.0, 25.0])  # left, anterior, superior of the centre
LESION_RADIUS = 12.0


def phantom_hu(points: np.ndarray) -> np.ndarray:
    """HU at LPS points: water ellipsoid in air, a bone sphere at LESION_LPS."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    body = (x / 90) ** 2 + (y / 80) ** 2 + (z / 70) ** 2 <= 1.0
    lesion = np.linalg.norm(points - LESION_LPS, axis=-1) <= LESION_RADIUS
    return np.where(lesion, 1000.0, np.where(body, 20.0, -1000.0))


def phantom_series(layout: str, study_uid: str) -> list[Dataset]:
    iop, reverse = LAYOUTS[layout]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    spacing = (3.0, 2.5, 2.5)
    shape = (56, 84, 84)
    centre = (
        np.array(
            [(shape[0] - 1) * spacing[0], (shape[1] - 1) * spacing[1], (shape[2] - 1) * spacing[2]]
        )
        / 2
    )
    first = -(normal * centre[0] + col * centre[1] + row * centre[2])
    affine = grid_affine(iop, first, spacing)
    k, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    points = np.einsum("ab,bijk->ijka", affine[:3, :3], np.stack([k, i, j]).astype(float))
    points += affine[:3, 3]
    return series_datasets(
        phantom_hu(points).astype(np.float32),
        affine,
        SeriesSpec(
            modality="CT",
            study_uid=study_uid,
            series_description=f"phantom {layout}",
            body_part="HEAD",
        ),
        reverse_numbering=reverse,
        rescale=(1.0, -1024.0),
    )


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Archive, ModelRegistry]]:
    settings = Settings(data_dir=tmp_path / "data")
    archive = Archive(settings)
    yield archive, ModelRegistry(settings.ai)
    archive.close()


def run_all(archive: Archive, registry: ModelRegistry, study: str, **kw: object) -> list[dict]:
    planned = plan_study(archive, registry, study, **kw)  # type: ignore[arg-type]
    return [execute_run(archive, registry, p.run_id).to_json() for p in planned]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_left_is_left_in_every_layout(
    local: tuple[Archive, ModelRegistry], layout: str, tmp_path: Path
) -> None:
    archive, registry = local
    study = f"1.2.826.0.1.3680043.10.1506.9.{list(LAYOUTS).index(layout) + 1}"
    for ds in phantom_series(layout, study):
        archive.ingest(part10(ds))
    [run] = run_all(archive, registry, study)
    assert run["status"] == "done", run["error"]
    seg = dcmread(io.BytesIO(stored(archive, produced(run, "SEG")["sop_instance_uid"])))
    points = seg_points(seg, seg_segment(seg, "Bone"))
    centroid = points.mean(axis=0)
    # The lesion is found where it is in the patient, not mirrored in any axis.
    assert np.allclose(centroid, LESION_LPS, atol=2.0), (layout, centroid)
    volume_ml = 4 / 3 * np.pi * LESION_RADIUS**3 / 1000
    assert run["findings"][1]["label"] == "Bone"
    assert run["findings"][1]["volume_ml"] == pytest.approx(volume_ml, rel=0.15)


# --- the real CT ---------------------------------------------------------------------------


def test_ct_body_on_the_real_head_ct(local: tuple[Archive, ModelRegistry], tmp_path: Path) -> None:
    _require(CRANIUM, "invesalius-examples")
    archive, registry = local
    hu, spacing = cranium_ct()
    affine = grid_affine((1, 0, 0, 0, 1, 0), (-122.0, -122.0, -80.0), spacing)
    source = series_datasets(
        hu, affine, SeriesSpec(modality="CT", series_description="Cranium"), rescale=(1, -1024)
    )
    for ds in source:
        archive.ingest(part10(ds))
    [run] = run_all(archive, registry, source[0].StudyInstanceUID)
    assert run["status"] == "done", run["error"]
    assert set(run["timings"]) >= {"load", "preprocess", "infer", "postprocess", "encode", "store"}
    volumes = {f["label"]: f["volume_ml"] for f in run["findings"]}
    # A head: a few litres of body, a skull of some hundred ml, some air in sinuses.
    assert 2000 < volumes["Body"] < 5000, volumes
    assert 200 < volumes["Bone"] < 1200, volumes
    assert 5 < volumes["Air inside body"] < 300, volumes

    seg_bytes = stored(archive, produced(run, "SEG")["sop_instance_uid"])
    sr_bytes = stored(archive, produced(run, "SR")["sop_instance_uid"])
    seg = dcmread(io.BytesIO(seg_bytes))
    sr = dcmread(io.BytesIO(sr_bytes))
    assert dciodvfy_errors(seg_bytes, tmp_path) == []
    assert dciodvfy_errors(sr_bytes, tmp_path) == []

    # On the source geometry: every SEG frame lies on a source slice and derives from it.
    positions = {
        tuple(round(float(v), 3) for v in ds.ImagePositionPatient): ds.SOPInstanceUID
        for ds in source
    }
    for frame in seg.PerFrameFunctionalGroupsSequence:
        position = tuple(
            round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient
        )
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert positions[position] == derived.ReferencedSOPInstanceUID
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == source[0].StudyInstanceUID
    assert seg.PatientID == sr.PatientID == source[0].PatientID
    assert seg.SeriesInstanceUID != source[0].SeriesInstanceUID
    assert seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Body", "Bone", "Air inside body"]
    body = seg.SegmentSequence[0]
    assert body.SegmentAlgorithmType == "AUTOMATIC"
    assert body.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "ct-body"
    assert body.SegmentedPropertyTypeCodeSequence[0].CodeValue == "123037004"
    for result in (seg, sr):  # IHE AIR: the algorithm as Contributing Equipment
        [equipment] = [
            e
            for e in result.ContributingEquipmentSequence
            if e.get("ManufacturerModelName") == "ct-body"
        ]
        assert equipment.Manufacturer == "pacsbridge"
        assert equipment.SoftwareVersions == "1.0"
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    # The SR's volumes are those of the SEG's voxels.
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    reported = sr_volumes(sr)
    for segment in seg.SegmentSequence:
        voxels = len(seg_points(seg, segment.SegmentNumber))
        assert reported[segment.SegmentLabel] == pytest.approx(voxels * voxel_ml, rel=0.01)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


# --- failures --------------------------------------------------------------------------------


def test_a_series_no_model_selects_gets_no_run(local: tuple[Archive, ModelRegistry]) -> None:
    archive, registry = local
    source = phantom_series("axial-head-first", "1.2.826.0.1.3680043.10.1506.9.20")
    for ds in source:
        ds.Modality = "NM"  # no model selects nuclear medicine
        archive.ingest(part10(ds))
    assert plan_study(archive, registry, source[0].StudyInstanceUID) == []
    assert RunStore(archive).count() == 0


def test_restable_study_without_new_instances_is_not_run_again(
    local: tuple[Archive, ModelRegistry],
) -> None:
    archive, registry = local
    study = "1.2.826.0.1.3680043.10.1506.9.21"
    source = phantom_series("axial-head-first", study)
    for ds in source[:-1]:
        archive.ingest(part10(ds))
    [first] = run_all(archive, registry, study)
    assert first["status"] == "done"
    assert plan_study(archive, registry, study) == []  # stable again, nothing new
    archive.ingest(part10(source[-1]))  # the series changed: run again, supersede the first
    [second] = run_all(archive, registry, study)
    assert second["status"] == "done"
    runs = {r.id: r for r in RunStore(archive).list(study=study)}
    assert runs[first["id"]].superseded_by == second["id"]
    assert runs[second["id"]].superseded_by is None
    # The first results stay in the archive beside the new ones.
    for run in (first, second):
        for item in run["produced"]:
            assert stored(archive, item["sop_instance_uid"])
    assert produced(first, "SEG")["sop_instance_uid"] != produced(second, "SEG")["sop_instance_uid"]
    # A manual run runs even on what was seen.
    [manual] = run_all(archive, registry, study, trigger="manual")
    assert manual["status"] == "done" and manual["trigger"] == "manual"


def test_a_repeated_run_stores_the_same_instances_once(
    local: tuple[Archive, ModelRegistry],
) -> None:
    archive, registry = local
    study = "1.2.826.0.1.3680043.10.1506.9.22"
    for ds in phantom_series("axial-head-first", study):
        archive.ingest(part10(ds))
    [planned] = plan_study(archive, registry, study)
    RunStore(archive).started(planned.run_id)  # a worker died while running it
    first = execute_run(archive, registry, planned.run_id).to_json()
    before = archive.stats().instances
    with archive.db.write_session() as s:  # as if it had died before recording the end
        from sqlalchemy import update

        from archive.models import AIRun

        s.execute(update(AIRun).where(AIRun.id == planned.run_id).values(status="running"))
    again = execute_run(archive, registry, planned.run_id).to_json()
    assert [p["sop_instance_uid"] for p in again["produced"]] == [
        p["sop_instance_uid"] for p in first["produced"]
    ]
    assert {p["outcome"] for p in again["produced"]} == {"duplicate"}
    assert archive.stats().instances == before


def _models(tmp_path: Path, **models: dict) -> tuple[Archive, ModelRegistry]:
    settings = Settings(
        data_dir=tmp_path / "data", ai=AISettings.model_validate({"models": models})
    )
    return Archive(settings), ModelRegistry(settings.ai)


_LABEL = {"name": "Dense", "type": {"value": "3138006", "scheme": "SCT", "meaning": "Bone tissue"}}
_CT = {"modality": ["CT"]}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("missing.pt", "does not exist"),
        ("corrupt.pt", "cannot be loaded"),
        ("broken-bundle", "cannot be loaded"),
    ],
)
def test_model_errors_fail_the_run_and_leave_the_archive_as_it_was(
    tmp_path: Path, source: str, expected: str
) -> None:
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 not a TorchScript archive" * 10)
    bundle = tmp_path / "broken-bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "inference.json").write_text('{"preprocessing": {"_target_": ')
    (bundle / "models" / "model.pt").write_bytes(b"")
    archive, registry = _models(
        tmp_path,
        **{"ct-body": {"enabled": False}, "brain-mr": {"enabled": False}},
        bad={
            "kind": "segmentation",
            "source": str(tmp_path / source),
            "selector": _CT,
            "labels": [_LABEL],
            "roi_size": [32, 32, 32],
        },
    )
    try:
        study = "1.2.826.0.1.3680043.10.1506.9.30"
        for ds in phantom_series("axial-head-first", study):
            archive.ingest(part10(ds))
        before = archive.stats()
        [run] = run_all(archive, registry, study)
        assert run["status"] == "failed"
        assert expected in run["error"], run["error"]
        assert run["produced"] == []
        assert archive.stats() == before  # nothing half-written
    finally:
        archive.close()


def test_mixed_orientations_are_refused_with_a_clear_error(
    local: tuple[Archive, ModelRegistry],
) -> None:
    archive, registry = local
    study = "1.2.826.0.1.3680043.10.1506.9.31"
    source = phantom_series("axial-head-first", study)
    source[5].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    for ds in source:
        archive.ingest(part10(ds))
    before = archive.stats()
    [run] = run_all(archive, registry, study)
    assert run["status"] == "failed"
    assert "mixes image orientations" in run["error"]
    assert archive.stats() == before
    # The next study is still processed.
    other = "1.2.826.0.1.3680043.10.1506.9.32"
    for ds in phantom_series("axial-head-first", other):
        archive.ingest(part10(ds))
    [ok] = run_all(archive, registry, other)
    assert ok["status"] == "done"


def test_uneven_spacing_and_missing_geometry_are_refused(
    local: tuple[Archive, ModelRegistry],
) -> None:
    archive, registry = local
    uneven = phantom_series("axial-head-first", "1.2.826.0.1.3680043.10.1506.9.33")
    del uneven[20:23]  # a gap of four slices
    nogeometry = phantom_series("axial-head-first", "1.2.826.0.1.3680043.10.1506.9.34")
    for ds in nogeometry:
        del ds.ImagePositionPatient
    for ds in uneven + nogeometry:
        archive.ingest(part10(ds))
    [a] = run_all(archive, registry, uneven[0].StudyInstanceUID)
    [b] = run_all(archive, registry, nogeometry[0].StudyInstanceUID)
    assert a["status"] == b["status"] == "failed"
    assert "not evenly spaced" in a["error"]
    assert "Image Position (Patient) missing" in b["error"]


def test_exact_duplicate_slices_are_dropped(local: tuple[Archive, ModelRegistry]) -> None:
    archive, registry = local
    study = "1.2.826.0.1.3680043.10.1506.9.35"
    source = phantom_series("axial-head-first", study)
    copy = deepcopy(source[10])
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for ds in [*source, copy]:
        archive.ingest(part10(ds))
    [run] = run_all(archive, registry, study)
    assert run["status"] == "done", run["error"]
    assert run["input"]["duplicates_dropped"] == 1
    assert run["input"]["slices"] == len(source)


# --- a MONAI bundle and a TorchScript classifier, built here -------------------------------


def make_bundle(root: Path) -> Path:
    """A bundle in the Model Zoo's layout (the spleen CT bundle's config shape: LoadImaged,
    EnsureChannelFirstd, Orientationd, Spacingd, ScaleIntensityRanged; a sliding-window
    inferer; Activationsd, Invertd, AsDiscreted, SaveImaged) whose network is a 1x1x1
    convolution with set weights: label 1 where the scaled intensity is above one half."""
    import torch

    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/nonexistent",
        "datalist": [],
        "device": "$torch.device('cpu')",
        "network_def": {
            "_target_": "torch.nn.Conv3d",
            "in_channels": 1,
            "out_channels": 2,
            "kernel_size": 1,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {
                    "_target_": "Spacingd",
                    "keys": "image",
                    "pixdim": [3.0, 3.0, 3.0],
                    "mode": "bilinear",
                },
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 1500,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 32],
            "sw_batch_size": 2,
            "overlap": 0.25,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"},
            ],
        },
    }
    metadata = {
        "version": "0.1.0",
        "monai_version": "1.4.0",
        "name": "dense tissue test",
        "task": "segmentation of dense tissue",
        "network_data_format": {"outputs": {"pred": {"num_channels": 2}}},
    }
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata))
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-10.0, 10.0]).reshape(2, 1, 1, 1, 1))
        assert conv.bias is not None
        conv.bias.copy_(torch.tensor([5.0, -5.0]))
    torch.save(conv.state_dict(), root / "models" / "model.pt")
    return root


def test_a_monai_bundle_runs_with_its_own_pre_and_post_processing(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "dense_bundle")
    archive, registry = _models(
        tmp_path,
        **{"ct-body": {"enabled": False}},
        dense={"kind": "segmentation", "source": str(bundle), "selector": _CT, "labels": [_LABEL]},
    )
    try:
        study = "1.2.826.0.1.3680043.10.1506.9.40"
        for ds in phantom_series("axial-right-to-left", study):
            archive.ingest(part10(ds))
        [run] = run_all(archive, registry, study)
        assert run["status"] == "done", run["error"]
        seg = dcmread(io.BytesIO(stored(archive, produced(run, "SEG")["sop_instance_uid"])))
        points = seg_points(seg, 1)
        # Scaled intensity above one half is above 250 HU: the bone lesion, where it is.
        assert np.allclose(points.mean(axis=0), LESION_LPS, atol=2.5)
        volume_ml = 4 / 3 * np.pi * LESION_RADIUS**3 / 1000
        assert run["findings"][0]["volume_ml"] == pytest.approx(volume_ml, rel=0.25)
        assert not (bundle / "eval").exists()  # its writer was replaced by ours
        spec = registry.get("dense")
        assert spec is not None and spec.source_kind == "bundle"
        assert spec.weights_sha256 == run["weights_sha256"]
    finally:
        archive.close()


def make_classifier(path: Path) -> Path:
    """A TorchScript classifier of two classes: 'dense' when the mean scaled intensity is
    high."""
    import torch

    class Brightness(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mean = x.mean(dim=(1, 2, 3))
            return torch.stack([(0.5 - mean) * 8, (mean - 0.5) * 8], dim=1)

    torch.jit.script(Brightness()).save(str(path))
    return path


def radiograph(study: str, level: float) -> Dataset:
    affine = grid_affine((1, 0, 0, 0, 1, 0), (0.0, 0.0, 0.0), (1.0, 0.2, 0.2))
    image = np.full((1, 128, 96), level, dtype=np.float32)
    image[0, 40:80, 30:60] = 1000.0
    [ds] = series_datasets(
        image,
        affine,
        SeriesSpec(
            modality="CT", study_uid=study, body_part="CHEST", series_description="Chest PA"
        ),
    )
    ds.Modality = "DX"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "SliceThickness",
        "FrameOfReferenceUID",
        "RescaleType",
        "KVP",
    ):
        delattr(ds, keyword)
    ds.ImagerPixelSpacing = ds.PixelSpacing
    del ds.PixelSpacing
    ds.PixelRepresentation = 0
    ds.PixelData = np.clip(image[0], 0, 4095).astype(np.uint16).tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
    return ds


def test_a_torchscript_classifier_gives_an_sr_with_findings_and_probabilities(
    tmp_path: Path,
) -> None:
    classifier = make_classifier(tmp_path / "dense.pt")
    archive, registry = _models(
        tmp_path,
        chest={
            "kind": "classification",
            "source": str(classifier),
            "selector": {"modality": ["DX", "CR"]},
            "labels": [
                {
                    "name": "Normal",
                    "type": {"value": "17621005", "scheme": "SCT", "meaning": "Normal"},
                },
                {
                    "name": "Dense",
                    "type": {"value": "263852007", "scheme": "SCT", "meaning": "Dense"},
                },
            ],
            "roi_size": [64, 64],
            "intensity_range": [0, 1000],
        },
    )
    try:
        study = "1.2.826.0.1.3680043.10.1506.9.41"
        dark, bright = radiograph(study, 50.0), radiograph(study + ".1", 900.0)
        archive.ingest(part10(dark))
        archive.ingest(part10(bright))
        [dark_run] = run_all(archive, registry, study)
        [bright_run] = run_all(archive, registry, study + ".1")
        for run, dense in ((dark_run, False), (bright_run, True)):
            assert run["status"] == "done", run["error"]
            assert [p["modality"] for p in run["produced"]] == ["SR"]
            by_label = {f["label"]: f for f in run["findings"]}
            assert by_label["Dense"]["present"] is dense
            assert by_label["Normal"]["present"] is not dense
            total = by_label["Dense"]["probability"] + by_label["Normal"]["probability"]
            assert total == pytest.approx(1.0, abs=1e-3)
            data = stored(archive, produced(run, "SR")["sop_instance_uid"])
            assert dciodvfy_errors(data, tmp_path) == []
            sr = dcmread(io.BytesIO(data))
            text = str(sr)
            assert "Dense" in text and "Probability" in text
            assert ("Present" in text) and ("Absent" in text)
        # The probability in the SR is the network's.
        bright_mean = (np.clip(radiograph("1.2", 900.0).pixel_array, 0, 1000) / 1000).mean()
        expected = 1 / (1 + np.exp(-16 * (bright_mean - 0.5)))
        dense = next(f for f in bright_run["findings"] if f["label"] == "Dense")
        assert dense["probability"] == pytest.approx(expected, abs=0.02)
    finally:
        archive.close()


# --- the whole path: storescu -> stable study -> job -> SEG + SR in the archive -------------


@pytest.fixture(scope="module")
def ai_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("ai-serve")
    env = {
        "PACSBRIDGE_DATA_DIR": str(tmp / "data"),
        "PACSBRIDGE_STABLE_AGE": "1",
        "PACSBRIDGE_STABLE_SCAN_INTERVAL": "0.5",
        "PACSBRIDGE_WORKER_POLL_INTERVAL": "0.2",
    }
    server = start_server(Backend("sqlite", "file", Settings(data_dir=tmp / "data"), env), tmp)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def wait_for_runs(server: RunningServer, study: str, count: int, timeout: float = 240) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.get(f"{server.http}/api/ai/runs", params={"study": study}).json()
        if len(runs) >= count and all(r["status"] in ("done", "failed") for r in runs):
            return runs
        time.sleep(0.5)
    raise AssertionError(f"AI runs did not end: {runs}\n{server.log()[-3000:]}")


@pytest.fixture(scope="module")
def brain_study(
    ai_server: RunningServer, mri_data: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict]:
    """The ch2 T1 MRI, axial, sent with DCMTK storescu; its brain-mr run once it is stable."""
    storescu = require_tool("storescu")
    volume, affine = nifti_as_axial(CH2, "axial-head-first")
    source = series_datasets(volume, affine, SeriesSpec())
    files = write_files(source, tmp_path_factory.mktemp("ch2"))
    sent = subprocess.run(
        [
            storescu,
            "-aec",
            ai_server.ae_title,
            "127.0.0.1",
            str(ai_server.dimse_port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert sent.returncode == 0, sent.stderr
    study = source[0].StudyInstanceUID
    [run] = wait_for_runs(ai_server, study, 1)
    return study, run


def test_real_mri_gets_a_brain_seg_and_sr_that_match_the_reference(
    ai_server: RunningServer, brain_study: tuple[str, dict], tmp_path: Path
) -> None:
    import nibabel as nib

    study, run = brain_study
    assert run["status"] == "done", run["error"]
    assert run["model"] == "brain-mr" and run["trigger"] == "stable"
    assert len(run["weights_sha256"]) == 64
    assert set(run["timings"]) >= {
        "load",
        "preprocess",
        "infer",
        "postprocess",
        "encode",
        "store",
        "total",
    }
    client = DICOMwebClient(f"{ai_server.http}/dicom-web")
    seg_item, sr_item = produced(run, "SEG"), produced(run, "SR")
    seg = client.retrieve_instance(
        study, seg_item["series_instance_uid"], seg_item["sop_instance_uid"]
    )
    sr = client.retrieve_instance(
        study, sr_item["series_instance_uid"], sr_item["sop_instance_uid"]
    )
    # The brain, placed by the SEG's own plane positions, is the reference brain.
    reference = nib.load(str(CH2_BET))
    ref_affine = reference.affine  # type: ignore[attr-defined]
    truth = np.asarray(reference.dataobj) > 0  # type: ignore[attr-defined]
    points = seg_points(seg, seg_segment(seg, "Brain"))
    found = points_to_mask(points, ref_affine, truth.shape)
    assert dice(found, truth) >= 0.90
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "12738006"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    # The SR's volume is the SEG's voxel volume (1 mm voxels: 1000 voxels per ml).
    assert sr_volumes(sr)["Brain"] == pytest.approx(len(points) / 1000, rel=0.01)
    assert run["findings"][0]["volume_ml"] == pytest.approx(len(points) / 1000, rel=0.01)
    for data in (seg, sr):
        buffer = io.BytesIO()
        data.save_as(buffer, enforce_file_format=True)
        assert dciodvfy_errors(buffer.getvalue(), tmp_path) == []
    # Visible like any other series: QIDO-RS lists the results in the study.
    series = {
        s["0020000E"]["Value"][0]: s["00080060"]["Value"][0]
        for s in client.search_for_series(study)
    }
    assert series[seg_item["series_instance_uid"]] == "SEG"
    assert series[sr_item["series_instance_uid"]] == "SR"
    # The results stabilise the study again: no new run (no model selects SEG or SR).
    time.sleep(3)
    assert len(httpx.get(f"{ai_server.http}/api/ai/runs", params={"study": study}).json()) == 1


def test_fhir_shows_the_ai_report_with_the_sr_volume_and_the_algorithm(
    ai_server: RunningServer, brain_study: tuple[str, dict]
) -> None:
    """The AI's TID 1500 SR as FHIR: a DiagnosticReport whose Observation carries the SR's
    brain volume in UCUM ml, derived from the ImagingStudy, made by a Device that names the
    algorithm (HL7 DICOM SR to FHIR IG; IHE AIR algorithm identification)."""
    from fhir.resources.R4B import get_fhir_model_class

    def fhir(path: str, **params: str) -> dict:
        answer = httpx.get(f"{ai_server.http}/fhir/{path}", params=params, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        get_fhir_model_class(body["resourceType"]).model_validate(body)
        return body

    study, run = brain_study
    sr_item = produced(run, "SR")
    client = DICOMwebClient(f"{ai_server.http}/dicom-web")
    sr = client.retrieve_instance(
        study, sr_item["series_instance_uid"], sr_item["sop_instance_uid"]
    )
    bundle = fhir(
        "DiagnosticReport",
        identifier=f"urn:dicom:uid|urn:oid:{sr_item['sop_instance_uid']}",
        _include="DiagnosticReport:result",
    )
    [report] = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
    observations = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "include"]
    assert report["id"] == sr_item["sop_instance_uid"]
    assert report["status"] == "preliminary"  # the AI's SR is UNVERIFIED
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study}"}]
    assert {o["id"] for o in observations} == {
        r["reference"].split("/")[1] for r in report["result"]
    }
    [volume] = [o for o in observations if o["code"]["coding"][0].get("display") == "Volume"]
    assert volume["valueQuantity"]["value"] == pytest.approx(sr_volumes(sr)["Brain"])
    assert volume["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert volume["valueQuantity"]["code"] == "ml"
    assert volume["derivedFrom"] == [{"reference": f"ImagingStudy/{study}"}]
    assert volume["subject"] == report["subject"]
    [finding] = volume["component"]  # the measurement group's Finding: the brain (SNOMED CT)
    assert finding["code"]["coding"][0]["code"] == "121071"
    assert finding["valueCodeableConcept"]["coding"][0]["code"] == "12738006"
    tracking_uids = [i["value"] for i in volume["identifier"] if i.get("system")]
    assert tracking_uids and tracking_uids[0].startswith("urn:oid:")
    device = fhir(volume["device"]["reference"])
    assert device["deviceName"][0]["name"] == "brain-mr"
    assert device["version"][0]["value"]
    assert device["manufacturer"] == "pacsbridge"
    # Search by what was measured, and by the value.
    found = fhir(
        "Observation",
        code=volume["code"]["coding"][0]["code"],
        **{"derived-from": f"ImagingStudy/{study}"},
    )
    assert volume["id"] in {e["resource"]["id"] for e in found["entry"]}
    value = volume["valueQuantity"]["value"]
    found = fhir("Observation", **{"value-quantity": f"ge{value - 1}|http://unitsofmeasure.org|ml"})
    assert volume["id"] in {e["resource"]["id"] for e in found["entry"]}
    found = fhir("Observation", **{"value-quantity": f"gt{value + 1}"})
    assert volume["id"] not in {e["resource"]["id"] for e in found.get("entry", [])}


def test_runs_over_http(ai_server: RunningServer, brain_study: tuple[str, dict]) -> None:
    study, run = brain_study
    api = f"{ai_server.http}/api/ai"
    assert httpx.get(f"{api}/runs/{run['id']}").json()["produced"] == run["produced"]
    assert httpx.get(f"{api}/runs/999999").status_code == 404
    assert httpx.get(f"{api}/runs/99999999999999999999").status_code in (404, 422)
    models = {m["name"]: m for m in httpx.get(f"{api}/models").json()}
    assert models["brain-mr"]["weights_sha256"] == run["weights_sha256"]
    assert models["ct-body"]["selector"]["modality"] == ["CT"]
    unknown = httpx.post(f"{api}/runs", json={"study_instance_uid": "1.2.3.4"})
    assert unknown.status_code == 404
    assert httpx.post(f"{api}/runs", json={"study_instance_uid": "1.2.3*"}).status_code == 422
    nomodel = httpx.post(f"{api}/runs", json={"study_instance_uid": study, "model": "nope"})
    assert nomodel.status_code == 422 and "nope" in nomodel.text
    noseries = httpx.post(f"{api}/runs", json={"study_instance_uid": study, "model": "ct-body"})
    assert noseries.status_code == 422 and "no series" in noseries.text
    # A manual run runs again on the same series and supersedes the first.
    again = httpx.post(f"{api}/runs", json={"study_instance_uid": study, "model": "brain-mr"})
    assert again.status_code == 202, again.text
    [queued] = again.json()
    assert queued["trigger"] == "manual" and queued["series"] == run["series"]
    runs = wait_for_runs(ai_server, study, 2)
    newest = next(r for r in runs if r["id"] == queued["id"])
    assert newest["status"] == "done", newest["error"]
    first = next(r for r in runs if r["id"] == run["id"])
    assert first["superseded_by"] == newest["id"]
    assert newest["findings"][0]["voxels"] == run["findings"][0]["voxels"]  # deterministic


def test_cli_lists_models_and_runs(ai_server: RunningServer, brain_study: tuple[str, dict]) -> None:
    from tests.conftest import VENV_BIN

    env = {"PACSBRIDGE_DATA_DIR": str(ai_server.backend.settings.data_dir), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "ai", "models", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    names = {m["name"]: m for m in json.loads(out)}
    assert names["brain-mr"]["labels"] == ["Brain"] and names["brain-mr"]["error"] is None
    study, _run = brain_study
    done = subprocess.run(
        [
            str(VENV_BIN / "pacsbridge"),
            "ai",
            "run",
            study,
            "--model",
            "brain-mr",
            "--wait",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [finished] = json.loads(done.stdout)
    assert finished["status"] == "done" and finished["trigger"] == "manual"
    # Who asked is audited (Application Activity, as POST /api/ai/runs), with the patient.
    with closing(ai_server.archive()) as arc, arc.db.session() as session:
        asked = session.scalars(
            select(AuditEventRow).where(
                AuditEventRow.source == "cli", AuditEventRow.study_uid == study
            )
        ).all()
        patient = session.scalars(
            select(Patient.patient_id).join(Study).where(Study.study_instance_uid == study)
        ).one()
    assert [(a.type_code, a.action, a.entity, a.query) for a in asked] == [
        ("110100", "E", f"ai run {study}", "model=brain-mr")
    ]
    assert asked[0].agent.startswith("os:") and asked[0].patient_id == patient
    listed = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "ai", "runs", "--study", study],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout.splitlines()
    assert json.loads(listed[0])["id"] == finished["id"]
    missing = subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "ai", "run", study, "--model", "nope"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert missing.returncode == 2 and "no model" in missing.stdout + missing.stderr


def enhanced_ct(slices: list[Dataset], order: list[int]) -> Dataset:
    """The slices as one Enhanced CT Image (PS3.3 A.38) whose frames are in ``order``, with
    the geometry and rescale in functional groups (PS3.3 C.7.6.16)."""
    first = slices[0]
    ds = deepcopy(first)
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "InstanceNumber",
    ):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2.1")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared = Dataset()
    measures, plane, transform = Dataset(), Dataset(), Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    plane.ImageOrientationPatient = first.ImageOrientationPatient
    transform.RescaleSlope, transform.RescaleIntercept = "1", "-1024"
    transform.RescaleType = "HU"
    shared.PixelMeasuresSequence = [measures]
    shared.PlaneOrientationSequence = [plane]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for index in order:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = slices[index].ImagePositionPatient
        item.PlanePositionSequence = [position]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = b"".join(slices[index].PixelData for index in order)
    return ds


def test_enhanced_multiframe_ct_is_sorted_by_its_functional_groups(
    local: tuple[Archive, ModelRegistry], tmp_path: Path
) -> None:
    archive, registry = local
    study = "1.2.826.0.1.3680043.10.1506.9.36"
    slices = phantom_series("axial-reversed", study)
    order = list(np.random.default_rng(7).permutation(len(slices)))
    archive.ingest(part10(enhanced_ct(slices, order)))
    [run] = run_all(archive, registry, study)
    assert run["status"] == "done", run["error"]
    seg_bytes = stored(archive, produced(run, "SEG")["sop_instance_uid"])
    seg = dcmread(io.BytesIO(seg_bytes))
    centroid = seg_points(seg, seg_segment(seg, "Bone")).mean(axis=0)
    assert np.allclose(centroid, LESION_LPS, atol=2.0), centroid
    assert dciodvfy_errors(seg_bytes, tmp_path) == []
    # Each SEG frame derives from the source frame at its position.
    source_positions = [tuple(float(v) for v in slices[i].ImagePositionPatient) for i in order]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        position = tuple(float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
        number = int(source.ReferencedFrameNumber)
        assert np.allclose(source_positions[number - 1], position, atol=1e-3)


def test_selector_rules() -> None:
    from ai.selector import SeriesInfo, matches, plane_of
    from config.settings import SeriesSelectorSettings as Selector

    assert plane_of([1, 0, 0, 0, 1, 0]) == "axial"
    assert plane_of([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert plane_of([1, 0, 0, 0, 0, -1]) == "coronal"
    assert plane_of(["x"]) is None
    series = SeriesInfo(
        "1",
        "2",
        "MR",
        "HEAD",
        "T1 MPRAGE sag",
        frozenset({"1.2.840.10008.5.1.4.1.1.4"}),
        ("ORIGINAL", "PRIMARY", "M"),
        "sagittal",
        176,
    )
    assert matches(Selector(modality=["mr"], body_part=["HEA*"]), series)
    assert matches(Selector(series_description="mprage|t1w"), series)
    assert not matches(Selector(series_description="^flair"), series)
    assert not matches(Selector(orientation="axial"), series)
    assert not matches(Selector(min_slices=200), series)
    assert not matches(Selector(image_type=["DERIVED"]), series)
    assert matches(Selector(image_type=["original"]), series)
    assert not matches(Selector(sop_class_uid=["1.2.840.10008.5.1.4.1.1.2"]), series)
    seg = SeriesInfo("1", "3", "SEG", "", "", frozenset(), (), None, 10)
    assert not matches(Selector(), seg)  # derived objects are never a model's input
    with pytest.raises(ValueError, match="regular expression"):
        Selector(series_description="(")


def test_model_settings_override_builtins_and_declare_models(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        ai=AISettings.model_validate(
            {
                "models": {
                    "brain-mr": {"enabled": False, "device": "cpu"},
                    "x": {"source": str(tmp_path / "none.ts"), "labels": [_LABEL]},
                }
            }
        ),
    )
    registry = ModelRegistry(settings.ai)
    brain = registry.get("brain-mr")
    assert brain is not None and not brain.settings.enabled
    assert brain.settings.device == "cpu" and brain.labels[0].name == "Brain"  # kept
    assert [spec.name for spec in registry.enabled] == ["ct-body", "x"]
    x = registry.get("x")
    assert x is not None and x.error is not None and "does not exist" in x.error
    with pytest.raises(ValueError, match="the model name"):
        AISettings.model_validate({"models": {"bad name/..": {}}})


def test_labelmap_segmentation_on_request(tmp_path: Path) -> None:
    archive, registry = _models(tmp_path, **{"ct-body": {"segmentation_type": "LABELMAP"}})
    try:
        study = "1.2.826.0.1.3680043.10.1506.9.42"
        for ds in phantom_series("axial-head-first", study):
            archive.ingest(part10(ds))
        [run] = run_all(archive, registry, study)
        assert run["status"] == "done", run["error"]
        data = stored(archive, produced(run, "SEG")["sop_instance_uid"])
        seg = dcmread(io.BytesIO(data))
        assert seg.SegmentationType == "LABELMAP"
        # Label Map Segmentation Storage (PS3.3 A.51.2, Sup 243, 2024) is newer than Debian's
        # dicom3tools: it knows neither the IOD nor its background segment 0. Nothing else.
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"
        assert set(dciodvfy_errors(data, tmp_path)) <= {
            "Error - Information Object Not found",
            "Error - SegmentNumber not monotonically increasing from one by one - have "
            "SegmentSequence item number 1 (from one) with SegmentNumber of 0",
        }
        labels = seg.pixel_array
        # Overlapping labels: the later one keeps the voxel (bone inside the body).
        bone = seg_segment(seg, "Bone")
        assert (labels == bone).sum() == run["findings"][1]["voxels"]
        assert sr_volumes(
            dcmread(io.BytesIO(stored(archive, produced(run, "SR")["sop_instance_uid"])))
        )["Body"] == pytest.approx(run["findings"][0]["volume_ml"], rel=0.01)
    finally:
        archive.close()


def test_a_refused_sr_takes_its_seg_back_out(tmp_path: Path) -> None:
    """The archive gets the SEG and the SR, or neither: here it refuses the SR's SOP class."""
    settings = Settings(
        data_dir=tmp_path / "data", refused_sop_classes=["Comprehensive3DSRStorage"]
    )
    archive = Archive(settings)
    try:
        registry = ModelRegistry(settings.ai)
        study = "1.2.826.0.1.3680043.10.1506.9.43"
        for ds in phantom_series("axial-head-first", study):
            archive.ingest(part10(ds))
        before = archive.stats()
        [run] = run_all(archive, registry, study)
        assert run["status"] == "failed"
        assert "SR was refused" in run["error"]
        assert archive.stats() == before
    finally:
        archive.close()


@pytest.mark.parametrize("overlapping", [False, True])
def test_the_faster_overlap_check_answers_as_highdicom_does(overlapping: bool) -> None:
    import highdicom as hd

    from ai.writers import _Segmentation

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(6, 20, 30))
    masks = np.stack([labels == k for k in (1, 2, 3)], axis=-1)
    if overlapping:
        masks[2, 5, 7, :] = True
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    ours = _Segmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(masks, numbers, binary, np.uint8)
    assert ours[1] == theirs[1]
    assert ours[1] == (
        hd.seg.SegmentsOverlapValues.YES if overlapping else hd.seg.SegmentsOverlapValues.NO
    )
    assert np.array_equal(ours[0], np.asarray(theirs[0]))


def test_a_radiograph_beyond_max_voxels_is_refused(tmp_path: Path) -> None:
    classifier = make_classifier(tmp_path / "dense.pt")
    settings = Settings(
        data_dir=tmp_path / "data",
        ai=AISettings.model_validate(
            {
                "max_voxels": 1000,
                "models": {
                    "chest": {
                        "kind": "classification",
                        "source": str(classifier),
                        "selector": {"modality": ["DX"]},
                        "labels": [_LABEL, _LABEL],
                    }
                },
            }
        ),
    )
    archive = Archive(settings)
    try:
        study = "1.2.826.0.1.3680043.10.1506.9.44"
        archive.ingest(part10(radiograph(study, 50.0)))
        before = archive.stats()
        [run] = run_all(archive, ModelRegistry(settings.ai), study)
        assert run["status"] == "failed"
        assert "more than the 1000 pixels" in run["error"]
        assert archive.stats() == before
    finally:
        archive.close()
