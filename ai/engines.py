"""Loaded models: each turns a :class:`~ai.volume.Volume` into masks on the volume's own grid
(segmentation) or class probabilities (classification), timing its stages.

Everything runs under ``torch.inference_mode()``, on CUDA (with automatic mixed precision
unless switched off) when the model's ``device`` is ``auto`` and a GPU is there, else on the
CPU. Networks are loaded once per process (see :class:`ai.registry.ModelRegistry`).
"""

from __future__ import annotations

import abc
import contextlib
import json
import threading
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ai.registry import ModelError, ModelSpec, deepbet_weights
from ai.stages import ClassificationOutput, SegmentationOutput, Timings
from ai.volume import Volume

__all__ = [
    "ClassificationOutput",
    "SegmentationOutput",
    "Timings",
    "load_runner",
    "select_device",
]

#: LPS (DICOM) to RAS (NIfTI, MONAI) world coordinates.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def select_device(setting: str) -> torch.device:
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise ModelError("the model asks for device = cuda, and no CUDA device is available")
        return torch.device("cuda")
    if setting == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _load_torchscript(path: Any, device: torch.device) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():
            # TorchScript is what deepbet and many sites' exported models are: keep reading it.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise ModelError(f"the TorchScript file {path} cannot be loaded: {exc}") from exc
    module.eval()
    return module


class Runner(abc.ABC):
    """Base of the loaded models; ``lock`` serialises use of one network between threads."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.device = select_device(spec.settings.device)
        self.amp = spec.settings.amp
        self.lock = threading.Lock()

    @property
    def needs_geometry(self) -> bool:
        return self.spec.kind == "segmentation"

    @abc.abstractmethod
    def run(self, volume: Volume, timings: Timings) -> SegmentationOutput | ClassificationOutput:
        """The model's output for ``volume``, its stages timed in ``timings``."""


# --- brain-mr: deepbet's networks in our pipeline -------------------------------------------


def _largest_component(mask: torch.Tensor) -> torch.Tensor:
    from monai.transforms import KeepLargestConnectedComponent

    if not bool(mask.any()):
        return mask
    keep = KeepLargestConnectedComponent(applied_labels=[1], connectivity=3)
    return torch.as_tensor(keep(mask[None].to(torch.uint8))[0] > 0)


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    from monai.transforms import FillHoles

    return torch.as_tensor(FillHoles(applied_labels=[1])(mask[None].to(torch.uint8))[0] > 0)


class BrainMR(Runner):
    """Brain extraction with deepbet 1.0.2's two networks (Fisch et al., "deepbet: Fast brain
    extraction of T1-weighted MRI using Convolutional Neural Networks", Comput Biol Med 2024),
    reproducing its pipeline: canonical (RAS) orientation; a bounding-box network on the
    volume resized to 128³; the box (plus 10% margin) resized to 256³ for the segmentation
    network; percentile (0.5-99.5%) normalisation; threshold 0.5; the largest connected
    component and hole filling inside the box. The mask goes back to the series' own grid."""

    SMALL = (128, 128, 128)
    SHAPE = (256, 256, 256)
    MARGIN = 0.1

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        bbox_path, model_path = deepbet_weights()
        self.bbox_model = _load_torchscript(bbox_path, self.device)
        self.model = _load_torchscript(model_path, self.device)

    @staticmethod
    def _normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = ((x - low) / (high - low)).clamp(0, 1)
        x = (x - x.mean()) / x.std()
        return 0.226 * x + 0.449

    def _bbox(self, mask_small: torch.Tensor, shape: tuple[int, ...]) -> tuple[slice, ...]:
        ranges = [
            torch.where(mask_small.float().mean(dims) > 0.02)[0]
            for dims in ((1, 2), (0, 2), (0, 1))
        ]
        if any(r.numel() == 0 for r in ranges):
            raise ModelError("no brain found: the bounding-box network found no foreground")
        scale = torch.tensor(shape, dtype=torch.float64) / torch.tensor(mask_small.shape)
        center = torch.tensor([(r.max() + 1 + r.min()) / 2 for r in ranges]) * scale
        size = torch.tensor([(r.max() + 1) - r.min() for r in ranges]) * scale
        size = (1 + 2 * self.MARGIN) * size
        center, size = center.round(), size.round()
        return tuple(
            slice(max(0, int(c - s / 2)), min(n, int(c + s / 2)))
            for c, s, n in zip(center.tolist(), size.tolist(), shape, strict=True)
        )

    def run(self, volume: Volume, timings: Timings) -> SegmentationOutput:
        import nibabel.orientations as nio

        assert volume.geometry is not None
        with timings.stage("preprocess"):
            ornt = nio.io_orientation(LPS_TO_RAS @ volume.geometry.affine)
            canonical = nio.apply_orientation(volume.array, ornt)
            x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(canonical)).to(self.device))
            x_small = F.interpolate(x[None, None], self.SMALL, mode="nearest-exact")[0, 0]
            low, high = x_small.quantile(0.005), x_small.quantile(0.995)
            if not bool(high > low):
                raise ModelError("the image has no contrast (its intensities are all equal)")
        with self.lock, torch.inference_mode(), timings.stage("infer"):
            with _autocast(self.device, self.amp):
                small = self.bbox_model(self._normalize(x_small, low, high)[None, None])[0, 1]
            mask_small = _largest_component((small.float() > 0.5).cpu())
            box = self._bbox(mask_small, tuple(x.shape))
            crop = F.interpolate(x[box][None, None], self.SHAPE, mode="nearest-exact")
            with _autocast(self.device, self.amp):
                out = self.model(self._normalize(crop, low, high))[0, 1]
            probabilities = torch.zeros_like(x)
            probabilities[box] = F.interpolate(
                out.float()[None, None], probabilities[box].shape, mode="nearest-exact"
            )[0, 0]
        with timings.stage("postprocess"):
            mask = (probabilities > 0.5).cpu()
            inside = _fill_holes(_largest_component(mask[box]))
            mask[box] = inside
            back = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), ornt)
            result = nio.apply_orientation(mask.numpy(), back).astype(bool)
        return SegmentationOutput([np.ascontiguousarray(result)])


# --- ct-body: classical --------------------------------------------------------------------


class CTBody(Runner):
    """Body, bone and air inside the body on CT, by Hounsfield units and morphology:

    - body: above -400 HU (soft tissue and fat; air and lung below), opened slice by slice
      (detaches the table and the blanket), the largest 3D connected component, holes in
      each axial slice filled;
    - bone: 226 HU or more inside the body (InVesalius' bone preset: 226-3071 HU);
    - air inside the body: below -400 HU inside the filled body outline (lungs, airways,
      sinuses, bowel gas).

    Slice-wise operations act in the plane of the slices."""

    BODY_HU = -400.0
    BONE_HU = 226.0

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.device = torch.device("cpu")  # NumPy and SciPy: no network to put on a GPU

    def run(self, volume: Volume, timings: Timings) -> SegmentationOutput:
        from scipy import ndimage

        with timings.stage("preprocess"):
            hu = volume.array
        with timings.stage("infer"):
            raw = hu > self.BODY_HU
            structure = ndimage.generate_binary_structure(2, 1)
            opened = np.empty_like(raw)
            for k in range(raw.shape[0]):
                opened[k] = ndimage.binary_opening(raw[k], structure, iterations=2)
            labels, count = ndimage.label(opened)
            if count == 0:
                body = opened
            else:
                sizes = np.bincount(labels.ravel())
                sizes[0] = 0
                body = labels == int(np.argmax(sizes))
            del labels
            filled = np.empty_like(body)
            for k in range(body.shape[0]):
                filled[k] = ndimage.binary_fill_holes(body[k])
        with timings.stage("postprocess"):
            bone = (hu >= self.BONE_HU) & filled
            air = (hu <= self.BODY_HU) & filled
        return SegmentationOutput([filled, bone, air])


# --- TorchScript and MONAI bundles ---------------------------------------------------------


def _meta_tensor(volume: Volume) -> Any:
    """The volume as a channel-first MONAI MetaTensor with its RAS affine."""
    from monai.data import MetaTensor

    assert volume.geometry is not None
    affine = torch.as_tensor(LPS_TO_RAS @ volume.geometry.affine, dtype=torch.float64)
    return MetaTensor(torch.from_numpy(volume.array)[None], affine=affine)


def _masks_from_labels(labelmap: np.ndarray, spec: ModelSpec) -> list[np.ndarray]:
    return [labelmap == spec.label_value(i) for i in range(len(spec.labels))]


class TorchScriptSegmentation(Runner):
    """A 3D segmentation network in TorchScript: optional resampling to ``spacing`` and
    intensity scaling (MONAI transforms), MONAI sliding-window inference over ``roi_size``
    patches, argmax over the output channels, the label map resampled back to the series'
    grid."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.network = _load_torchscript(spec.path, self.device)

    def run(self, volume: Volume, timings: Timings) -> SegmentationOutput:
        from monai.inferers import sliding_window_inference
        from monai.transforms import ScaleIntensityRange, Spacing, SpatialResample

        settings = self.spec.settings
        with timings.stage("preprocess"):
            image = _meta_tensor(volume)
            original_affine, original_shape = image.affine.clone(), image.shape[1:]
            if settings.spacing:
                image = Spacing(pixdim=settings.spacing, mode="bilinear")(image)
            if settings.intensity_range:
                low, high = settings.intensity_range
                image = ScaleIntensityRange(low, high, 0.0, 1.0, clip=True)(image)
        roi = tuple(settings.roi_size or (96, 96, 96))
        if len(roi) != 3:
            raise ModelError(f"roi_size {list(roi)} is not three sizes for a 3D network")
        with self.lock, torch.inference_mode(), timings.stage("infer"):
            inputs = image.as_tensor()[None].float().to(self.device)
            try:
                with _autocast(self.device, self.amp):
                    logits = sliding_window_inference(
                        inputs,
                        roi,
                        settings.sw_batch_size,
                        self.network,
                        overlap=settings.overlap,
                        mode="gaussian",
                        sw_device=self.device,
                        device=torch.device("cpu"),
                    )
            except Exception as exc:
                raise ModelError(f"the network failed on the volume: {exc}") from exc
            if not isinstance(logits, torch.Tensor) or logits.ndim != 5:
                raise ModelError("the network did not return (batch, channels, x, y, z) logits")
            labels = torch.argmax(logits[0].float(), dim=0, keepdim=True).to(torch.int16)
        with timings.stage("postprocess"):
            if settings.spacing:
                from monai.data import MetaTensor

                labels = SpatialResample(mode="nearest")(
                    MetaTensor(labels, affine=image.affine),
                    dst_affine=original_affine,
                    spatial_size=original_shape,
                )
            labelmap = np.asarray(torch.as_tensor(labels)[0].cpu().numpy())
        return SegmentationOutput(_masks_from_labels(labelmap, self.spec))


class TorchScriptClassifier(Runner):
    """A 2D classification network in TorchScript: each image resized to ``roi_size``
    (default 224²), scaled to 0..1 (by ``intensity_range`` or the image's own range), given as
    ``(1, 1, H, W)``; logits to probabilities by softmax (sigmoid when ``multi_label``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        assert spec.path is not None
        self.network = _load_torchscript(spec.path, self.device)

    @property
    def needs_geometry(self) -> bool:
        return False

    def run(self, volume: Volume, timings: Timings) -> ClassificationOutput:
        from monai.transforms import Resize, ScaleIntensity, ScaleIntensityRange

        settings = self.spec.settings
        size = tuple(settings.roi_size or (224, 224))
        if len(size) != 2:
            raise ModelError(f"roi_size {list(size)} is not two sizes for a 2D classifier")
        with timings.stage("preprocess"):
            scale: Any = (
                ScaleIntensityRange(*settings.intensity_range, 0.0, 1.0, clip=True)
                if settings.intensity_range
                else ScaleIntensity(minv=0.0, maxv=1.0)
            )
            resize = Resize(size, mode="area")
            batch = torch.stack(
                [
                    torch.as_tensor(resize(scale(torch.from_numpy(image)[None])))
                    for image in volume.array
                ]
            ).float()
        with self.lock, torch.inference_mode(), timings.stage("infer"):
            try:
                with _autocast(self.device, self.amp):
                    logits = self.network(batch.to(self.device))
            except Exception as exc:
                raise ModelError(f"the network failed on the images: {exc}") from exc
            if not isinstance(logits, torch.Tensor) or logits.shape != (
                len(batch),
                len(self.spec.labels),
            ):
                raise ModelError(
                    f"the network returned {tuple(getattr(logits, 'shape', ()))}, not "
                    f"(images, {len(self.spec.labels)} classes)"
                )
        with timings.stage("postprocess"):
            logits = logits.float().cpu()
            probabilities = (
                torch.sigmoid(logits) if settings.multi_label else torch.softmax(logits, dim=1)
            )
        return ClassificationOutput(probabilities.numpy())


class BundleSegmentation(Runner):
    """A MONAI bundle (Model Zoo layout) run with its own ``preprocessing``, ``inferer`` and
    ``postprocessing`` from ``configs/inference.json`` through ``monai.bundle``: its image
    loader (``LoadImage``/``LoadImaged``) is replaced by our in-memory volume with its RAS
    affine, and its writer (``SaveImage``/``SaveImaged``) by our DICOM SEG. ``Invertd`` in its
    post-processing takes the prediction back to the series' grid as it would to a file's."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        from monai.bundle import ConfigParser

        assert spec.path is not None
        root = spec.path
        try:
            parser = ConfigParser()
            parser.read_config(str(root / "configs" / "inference.json"))
            metadata_file = root / "configs" / "metadata.json"
            if metadata_file.is_file():
                parser.read_meta(str(metadata_file))
            parser["bundle_root"] = str(root)
            parser["device"] = str(self.device)
            preprocessing = parser.get_parsed_content("preprocessing")
            self.channel_first = self._loads_channel_first(preprocessing)
            self.preprocessing = self._without(preprocessing, ("LoadImage", "LoadImaged"))
            self.inferer = parser.get_parsed_content("inferer")
            self.postprocessing = (
                self._without(
                    parser.get_parsed_content("postprocessing"), ("SaveImage", "SaveImaged")
                )
                if "postprocessing" in parser
                else None
            )
            weights = spec.weights[0]
            if weights.suffix == ".ts":
                self.network: Any = _load_torchscript(weights, self.device)
            else:
                self.network = parser.get_parsed_content("network_def").to(self.device)
                state = torch.load(str(weights), map_location=self.device, weights_only=True)
                if isinstance(state, dict) and "model" in state and len(state) <= 3:
                    state = state["model"]
                self.network.load_state_dict(state)
                self.network.eval()
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"the bundle {root} cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc
        self.image_key = "image"
        self.pred_key = "pred"
        try:
            meta = json.loads((root / "configs" / "metadata.json").read_text())
            self.bundle_version = str(meta.get("version", ""))
        except (OSError, ValueError):
            self.bundle_version = ""

    @staticmethod
    def _loads_channel_first(transform: Any) -> bool:
        """Whether the bundle's loader adds the channel dimension itself
        (``ensure_channel_first``); else its own ``EnsureChannelFirstd`` does."""
        for t in getattr(transform, "transforms", ()):
            if type(t).__name__ in ("LoadImage", "LoadImaged"):
                loader = getattr(t, "_loader", t)
                return bool(getattr(loader, "ensure_channel_first", False))
        return False

    def _image(self, volume: Volume) -> Any:
        """The volume as the bundle's loader would give it: a MetaTensor without channel
        (``original_channel_dim`` = ``no_channel``) with its RAS affine, or channel-first if
        the loader adds the channel."""
        from monai.data import MetaTensor

        assert volume.geometry is not None
        affine = torch.as_tensor(LPS_TO_RAS @ volume.geometry.affine, dtype=torch.float64)
        meta = {
            "original_channel_dim": "no_channel",
            "spatial_shape": np.array(volume.array.shape),
            "original_affine": affine.clone(),
            "filename_or_obj": volume.series_instance_uid,
        }
        image = MetaTensor(torch.from_numpy(volume.array), affine=affine, meta=meta)
        if self.channel_first:
            from monai.transforms import EnsureChannelFirst

            return EnsureChannelFirst()(image)
        return image

    @staticmethod
    def _without(transform: Any, names: tuple[str, ...]) -> Any:
        from monai.transforms import Compose

        if isinstance(transform, Compose):
            kept = [t for t in transform.transforms if type(t).__name__ not in names]
            return Compose(kept)
        return transform

    def run(self, volume: Volume, timings: Timings) -> SegmentationOutput:
        with timings.stage("preprocess"):
            try:
                data = self.preprocessing({self.image_key: self._image(volume)})
            except Exception as exc:
                raise ModelError(f"the bundle's preprocessing failed: {exc}") from exc
        with self.lock, torch.inference_mode(), timings.stage("infer"):
            try:
                inputs = data[self.image_key][None].to(self.device)
                with _autocast(self.device, self.amp):
                    data[self.pred_key] = self.inferer(inputs, self.network)[0]
            except Exception as exc:
                raise ModelError(f"the bundle's inference failed: {exc}") from exc
        with timings.stage("postprocess"):
            try:
                if self.postprocessing is not None:
                    data = self.postprocessing(data)
            except Exception as exc:
                raise ModelError(f"the bundle's postprocessing failed: {exc}") from exc
            pred = torch.as_tensor(data[self.pred_key]).cpu()
            if pred.ndim == 4 and pred.shape[0] > 1:
                pred = torch.argmax(pred, dim=0, keepdim=True)
            labelmap = np.asarray(pred[0].numpy()).round().astype(np.int32)
            if labelmap.shape != volume.array.shape:
                raise ModelError(
                    f"the bundle's prediction has shape {labelmap.shape}, not the series' "
                    f"{volume.array.shape} (does its postprocessing invert its preprocessing?)"
                )
        return SegmentationOutput(_masks_from_labels(labelmap, self.spec))


def load_runner(spec: ModelSpec) -> Runner:
    """Load a model's weights (once per process: the registry keeps the result)."""
    if spec.source_kind == "builtin":
        if spec.source == "builtin:brain-mr":
            return BrainMR(spec)
        return CTBody(spec)
    if spec.source_kind == "bundle":
        return BundleSegmentation(spec)
    if spec.kind == "classification":
        return TorchScriptClassifier(spec)
    return TorchScriptSegmentation(spec)
