"""AI results as standard DICOM objects (highdicom): a Segmentation (PS3.3 A.51) and a
Comprehensive 3D SR holding a TID 1500 Measurement Report (PS3.16), each in a new series of
the source study. Both name the algorithm in Contributing Equipment, as the IHE Radiology AI
Results (AIR) profile asks, and copy the patient and study attributes from the source
images."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes

from ai.registry import ModelSpec
from ai.uids import derived_uid
from ai.volume import Volume
from config.settings import CodeSettings

__all__ = [
    "ResultUIDs",
    "classification_report",
    "encode",
    "segment_findings",
    "segmentation",
    "segmentation_report",
]

MANUFACTURER = "pacsbridge"
ML = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
MM2 = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")

#: Procedure Reported (TID 1500 row 5, CID 100): the imaging procedure by modality.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("77477000", "SCT", "Computed tomography"),
    "MR": hd.sr.CodedConcept("113091000", "SCT", "Magnetic resonance imaging"),
    "PT": hd.sr.CodedConcept("82918005", "SCT", "Positron emission tomography"),
    "CR": hd.sr.CodedConcept("168537006", "SCT", "Plain radiography"),
    "DX": hd.sr.CodedConcept("168537006", "SCT", "Plain radiography"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


@dataclass(frozen=True, slots=True)
class ResultUIDs:
    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    device: str

    @classmethod
    def for_run(cls, run_uid: str, model: str) -> ResultUIDs:
        return cls(
            seg_series=derived_uid(run_uid, "seg-series"),
            seg_instance=derived_uid(run_uid, "seg"),
            sr_series=derived_uid(run_uid, "sr-series"),
            sr_instance=derived_uid(run_uid, "sr"),
            device=derived_uid(model, "device"),
        )


@dataclass(frozen=True, slots=True)
class SegmentFinding:
    """One label of a segmentation: its voxels, volume and key slice."""

    index: int
    """Position in the model's labels."""
    voxels: int
    volume_ml: float
    key_slice: int | None
    """The slice where the label's area is largest."""


def _coded(code: CodeSettings) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


def _family(spec: ModelSpec) -> hd.sr.CodedConcept:
    if spec.source == "builtin:ct-body":
        return hd.sr.CodedConcept(*_concept(codes.cid7162.MorphologicalOperations))
    return hd.sr.CodedConcept(*_concept(codes.cid7162.ArtificialIntelligence))


def _concept(code: object) -> tuple[str, str, str]:
    return (code.value, code.scheme_designator, code.meaning)  # type: ignore[attr-defined]


def _algorithm(spec: ModelSpec) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=spec.name, family=_family(spec), version=spec.version, source=MANUFACTURER
    )


def _equipment(spec: ModelSpec) -> list[hd.ContributingEquipment]:
    """IHE AIR: the algorithm as Contributing Equipment (manufacturer, model = algorithm name,
    software version = algorithm version), purpose Processing Equipment."""
    return [
        hd.ContributingEquipment(
            manufacturer=MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=spec.name,
            software_versions=spec.version,
            contribution_description=(spec.description or f"AI model {spec.name}")[:64],
        )
    ]


def exclusive(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Masks that do not overlap, as a LABELMAP segmentation holds them: where labels overlap,
    the later label keeps the voxel."""
    taken = np.zeros_like(masks[0], dtype=bool)
    out: list[np.ndarray] = []
    for mask in reversed(masks):
        out.append(mask & ~taken)
        taken |= mask
    return out[::-1]


def segment_findings(volume: Volume, masks: Sequence[np.ndarray]) -> list[SegmentFinding]:
    assert volume.geometry is not None
    voxel_ml = volume.geometry.voxel_volume_ml
    findings = []
    for index, mask in enumerate(masks):
        per_slice = mask.reshape(mask.shape[0], -1).sum(axis=1)
        voxels = int(per_slice.sum())
        findings.append(
            SegmentFinding(
                index=index,
                voxels=voxels,
                volume_ml=voxels * voxel_ml,
                key_slice=int(np.argmax(per_slice)) if voxels else None,
            )
        )
    return findings


def _source_frames(volume: Volume, masks: Sequence[np.ndarray]) -> tuple[list[Dataset], np.ndarray]:
    """The source images as highdicom wants them and the masks in their frame order: single
    frame sources sorted by position (one frame each), or the frames of one multi-frame
    source in its own frame order."""
    # (slices, rows, columns, segments), each segment contiguous: highdicom reads it plane by
    # plane and sums over segments (its overlap check), both fast in this layout.
    stacked = np.stack(masks, axis=0).transpose(1, 2, 3, 0)
    if all(ref.frame_number is None for ref in volume.slices):
        return volume.source_headers, stacked
    sources = volume.source_headers
    if len(sources) != 1:
        raise ValueError("a segmentation of several multi-frame instances is not supported")
    frames = int(sources[0].get("NumberOfFrames", 1))
    ordered = np.zeros((frames, *stacked.shape[1:]), dtype=bool)
    for k, ref in enumerate(volume.slices):
        assert ref.frame_number is not None
        ordered[ref.frame_number - 1] = stacked[k]
    return sources, ordered


def segmentation(
    volume: Volume,
    spec: ModelSpec,
    masks: Sequence[np.ndarray],
    findings: Sequence[SegmentFinding],
    uids: ResultUIDs,
    *,
    series_number: int,
    labelmap: bool = False,
) -> hd.seg.Segmentation | None:
    """The DICOM SEG of the non-empty labels (``None`` when all are empty): BINARY (or
    LABELMAP), AUTOMATIC segments with their codes, algorithm and display colour, empty
    frames omitted, per-frame derivation references to the source images."""
    present = [f for f in findings if f.voxels]
    if not present:
        return None
    descriptions = []
    for number, finding in enumerate(present, start=1):
        label = spec.labels[finding.index]
        color = hd.color.CIELabColor.from_rgb(*label.color) if label.color else None
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label.name,
                segmented_property_category=_coded(label.category),
                segmented_property_type=_coded(label.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(spec),
                tracking_uid=derived_uid(uids.seg_instance, f"segment-{number}"),
                tracking_id=label.name,
                display_color=color,
            )
        )
    sources, pixels = _source_frames(volume, [masks[f.index] for f in present])
    seg = _Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=(
            hd.seg.SegmentationTypeValues.LABELMAP
            if labelmap
            else hd.seg.SegmentationTypeValues.BINARY
        ),
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series,
        series_number=series_number,
        sop_instance_uid=uids.seg_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=spec.name,
        software_versions=spec.version,
        device_serial_number=uids.device[-16:],
        series_description=f"AI {spec.name} segmentation"[:64],
        content_label="AI_SEG",
        content_description=f"{spec.name} {spec.version}"[:64],
        omit_empty_frames=True,
        contributing_equipment=_equipment(spec),
    )
    return seg


class _Segmentation(hd.seg.Segmentation):
    """highdicom's Segmentation with a faster overlap check for what we pass it: stacked
    boolean masks of a BINARY segmentation. highdicom sums the masks over the segment axis
    (an int64 per voxel: a second on a 300-slice 512² CT); whether two masks share a voxel is
    found with boolean operations on the masks themselves. Everything else is highdicom's
    (``tests/test_ai.py`` checks both give the same answer)."""

    @classmethod
    def _check_and_cast_pixel_array(  # type: ignore[override]
        cls,
        pixel_array: np.ndarray,
        segment_numbers: np.ndarray,
        segmentation_type: hd.seg.SegmentationTypeValues,
        dtype: type,
    ) -> tuple[np.ndarray, hd.seg.SegmentsOverlapValues]:
        if (
            type(pixel_array) is not np.ndarray
            or pixel_array.ndim != 4
            or pixel_array.dtype != np.bool_
            or segmentation_type != hd.seg.SegmentationTypeValues.BINARY
            or pixel_array.shape[-1] != len(segment_numbers)
        ):
            return super()._check_and_cast_pixel_array(  # type: ignore[return-value]
                pixel_array, segment_numbers, segmentation_type, dtype
            )
        return pixel_array, (
            hd.seg.SegmentsOverlapValues.YES
            if masks_overlap([pixel_array[..., k] for k in range(pixel_array.shape[-1])])
            else hd.seg.SegmentsOverlapValues.NO
        )


def masks_overlap(masks: Sequence[np.ndarray]) -> bool:
    """Whether any voxel is in two of the masks."""
    if len(masks) < 2:
        return False
    union = masks[0].copy()
    for mask in masks[1:]:
        if np.logical_and(union, mask).any():
            return True
        union |= mask
    return False


def _observation_context(spec: ModelSpec, uids: ResultUIDs) -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.device,
                name=spec.name,
                manufacturer_name=MANUFACTURER,
                model_name=spec.name,
            ),
        )
    )


def _procedure(volume: Volume) -> hd.sr.CodedConcept:
    return _PROCEDURES.get(volume.modality.upper(), _IMAGING_PROCEDURE)


def _key_slice_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The outline of the largest region of one slice as a closed polygon of (column, row)
    image coordinates (PS3.3 C.18.6.1.1: SCOORD values are column\\row, from the top left
    corner of the top left pixel)."""
    from skimage import measure

    padded = np.pad(mask.astype(np.uint8), 1)
    contours = measure.find_contours(padded, 0.5)
    if not contours:
        return None
    contour = max(contours, key=len)
    contour = measure.approximate_polygon(contour, tolerance=0.5)
    if len(contour) < 4:
        return None
    # find_contours gives (row, column) of pixel centres in the padded array.
    points = np.stack([contour[:, 1] - 1 + 0.5, contour[:, 0] - 1 + 0.5], axis=1)
    if not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points.astype(np.float32)


def segmentation_report(
    volume: Volume,
    spec: ModelSpec,
    masks: Sequence[np.ndarray],
    findings: Sequence[SegmentFinding],
    seg: hd.seg.Segmentation | None,
    uids: ResultUIDs,
    *,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one volumetric group per segment (referencing the SEG segment, its volume
    in ml) and one planar group per segment with its outline on the key slice; a label the
    model did not find gets a group with volume 0."""
    assert volume.geometry is not None
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name, version=spec.version)
    groups: list = []
    numbers = {f.index: n for n, f in enumerate((f for f in findings if f.voxels), start=1)}
    pixel_area = volume.geometry.pixel_spacing[0] * volume.geometry.pixel_spacing[1]
    for finding in findings:
        label = spec.labels[finding.index]
        volume_measurement = hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=round(finding.volume_ml, 3),
            unit=ML,
            algorithm_id=algorithm,
        )
        tracking = hd.sr.TrackingIdentifier(
            uid=derived_uid(uids.sr_instance, f"volume-{finding.index}"), identifier=label.name
        )
        if seg is None or finding.index not in numbers:
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=_coded(label.type),
                    algorithm_id=algorithm,
                    measurements=[volume_measurement],
                )
            )
            continue
        number = numbers[finding.index]
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=number,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                ),
                finding_type=_coded(label.type),
                finding_category=_coded(label.category),
                algorithm_id=algorithm,
                measurements=[volume_measurement],
            )
        )
        assert finding.key_slice is not None
        polygon = _key_slice_polygon(masks[finding.index][finding.key_slice])
        if polygon is None:
            continue
        ref = volume.slices[finding.key_slice]
        area = float(masks[finding.index][finding.key_slice].sum()) * pixel_area
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uids.sr_instance, f"outline-{finding.index}"),
                    identifier=f"{label.name} (key slice)"[:64],
                ),
                referenced_region=hd.sr.ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: first = last point
                    graphic_data=polygon,
                    source_image=hd.sr.SourceImageForRegion(
                        ref.sop_class_uid,
                        ref.sop_instance_uid,
                        [ref.frame_number] if ref.frame_number else None,
                    ),
                ),
                finding_type=_coded(label.type),
                finding_category=_coded(label.category),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Area, value=round(area, 2), unit=MM2, algorithm_id=algorithm
                    )
                ],
            )
        )
    evidence = list(volume.source_headers)
    if seg is not None:
        evidence.append(seg)
    return _report(volume, spec, uids, groups, evidence, series_number)


def classification_report(
    volume: Volume,
    spec: ModelSpec,
    probabilities: np.ndarray,
    uids: ResultUIDs,
    *,
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one group per image: for each class a qualitative evaluation (present
    at ``threshold`` or more, else absent) and its probability."""
    algorithm = hd.sr.AlgorithmIdentification(name=spec.name, version=spec.version)
    threshold = spec.settings.threshold
    groups: list = []
    for k, ref in enumerate(volume.slices):
        evaluations = []
        measurements = []
        for c, label in enumerate(spec.labels):
            p = float(probabilities[k, c])
            evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name=_coded(label.type),
                    value=codes.SCT.Present if p >= threshold else codes.SCT.Absent,
                )
            )
            measurements.append(
                hd.sr.Measurement(
                    name=PROBABILITY,
                    value=round(p, 4),
                    unit=NO_UNITS,
                    algorithm_id=algorithm,
                    derivation=None,
                    method=None,
                    qualifier=None,
                    finding_sites=None,
                    properties=None,
                    referenced_images=None,
                    tracking_identifier=hd.sr.TrackingIdentifier(identifier=label.name[:64]),
                )
            )
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(uids.sr_instance, f"image-{k}"),
                    identifier=f"image {k + 1}",
                ),
                finding_type=codes.DCM.Finding,
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=evaluations,
                source_images=[
                    hd.sr.SourceImageForMeasurementGroup(
                        ref.sop_class_uid,
                        ref.sop_instance_uid,
                        [ref.frame_number] if ref.frame_number else None,
                    )
                ],
            )
        )
    return _report(volume, spec, uids, groups, list(volume.source_headers), series_number)


def _report(
    volume: Volume,
    spec: ModelSpec,
    uids: ResultUIDs,
    groups: list,
    evidence: list[Dataset],
    series_number: int,
) -> hd.sr.Comprehensive3DSR:
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(spec, uids),
        procedure_reported=_procedure(volume),
        imaging_measurements=groups,
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=series_number,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        series_description=f"AI {spec.name} report"[:64],
        contributing_equipment=_equipment(spec),
    )


def encode(dataset: Dataset) -> bytes:
    """A Part 10 file (PS3.10 7.1) of a highdicom object."""
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def warm_up() -> None:
    """Build and encode a tiny SEG and SR once: highdicom's first use in a process reads its
    tables of the standard (about two seconds), which belongs to loading a model, not to the
    first study's results."""
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    from ai.volume import Geometry, SliceRef
    from config.settings import AILabelSettings, AIModelSettings

    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    headers: dict[str, Dataset] = {}
    refs = []
    for k in range(2):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "0", "", "", ""
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "", "", "", ""
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber = "", "CT", 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, k]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        headers[ds.SOPInstanceUID] = ds
        refs.append(SliceRef(ds.SOPInstanceUID, CTImageStorage, None, (0.0, 0.0, float(k))))
    volume = Volume(
        array=np.zeros((2, 4, 4), dtype=np.float32),
        geometry=Geometry(
            origin=np.zeros(3),
            row_cosine=np.array([1.0, 0, 0]),
            column_cosine=np.array([0, 1.0, 0]),
            pixel_spacing=(1.0, 1.0),
            slice_step=np.array([0, 0, 1.0]),
            frame_of_reference_uid=frame_of_reference,
        ),
        slices=refs,
        headers=headers,
        study_instance_uid=study,
        series_instance_uid=series,
        modality="CT",
    )
    from ai.registry import _spec

    spec = _spec(
        "warm-up",
        AIModelSettings(
            source="builtin:ct-body",
            version="0",
            labels=[
                AILabelSettings(
                    name="x",
                    type=CodeSettings(value="123037004", scheme="SCT", meaning="Body structure"),
                )
            ],
        ),
    )
    mask = np.zeros((2, 4, 4), dtype=bool)
    mask[:, 1:3, 1:3] = True
    uids = ResultUIDs.for_run(generate_uid(), "warm-up")
    findings = segment_findings(volume, [mask])
    seg = segmentation(volume, spec, [mask], findings, uids, series_number=1)
    encode(seg)  # type: ignore[arg-type]
    encode(segmentation_report(volume, spec, [mask], findings, seg, uids, series_number=2))
