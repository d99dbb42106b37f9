"""The model registry: what models exist (builtin and declared in ``[ai.models.<name>]``),
where their weights are on disk, what they select, and each one loaded once per process.

Sources (never downloaded):

- ``builtin:brain-mr``: brain extraction on T1-weighted head MRI with the pretrained networks
  published in the ``deepbet`` 1.0.2 wheel (MIT licence), installed with pacsbridge;
- ``builtin:ct-body``: body, bone and air-inside-body on CT by Hounsfield thresholds and
  morphology (no learning);
- a TorchScript file (``*.pt`` / ``*.ts``): a segmentation or classification network;
- a MONAI bundle directory (``configs/inference.json``, ``configs/metadata.json``,
  ``models/model.pt`` or ``models/model.ts``), run with its own pre- and post-processing.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from config.settings import (
    AILabelSettings,
    AIModelSettings,
    AISettings,
    CodeSettings,
    SeriesSelectorSettings,
)

SourceKind = Literal["builtin", "torchscript", "bundle"]

BUILTIN_NAMES = ("brain-mr", "ct-body")
#: The version of the ct-body rules (thresholds and morphology): change it with them.
CT_BODY_VERSION = "1.0"


class ModelError(Exception):
    """A model cannot be loaded or run; the message says why (shown as the run's error)."""


def _code(value: str, scheme: str, meaning: str) -> CodeSettings:
    return CodeSettings(value=value, scheme=scheme, meaning=meaning)


_ANATOMY = _code("91723000", "SCT", "Anatomical Structure")
_SUBSTANCE = _code("91720002", "SCT", "Body Substance")

BUILTIN_DEFAULTS: dict[str, AIModelSettings] = {
    "brain-mr": AIModelSettings(
        kind="segmentation",
        source="builtin:brain-mr",
        description="Brain extraction on T1-weighted head MRI (deepbet 1.0.2 networks)",
        selector=SeriesSelectorSettings(
            modality=["MR"], body_part=["HEAD", "BRAIN", "SKULL"], min_slices=20
        ),
        labels=[
            AILabelSettings(
                name="Brain",
                value=1,
                category=_ANATOMY,
                type=_code("12738006", "SCT", "Brain"),
                color=(230, 159, 0),
            )
        ],
    ),
    "ct-body": AIModelSettings(
        kind="segmentation",
        source="builtin:ct-body",
        description="Body, bone and air inside the body on CT (Hounsfield thresholds)",
        selector=SeriesSelectorSettings(modality=["CT"], min_slices=10),
        labels=[
            AILabelSettings(
                name="Body",
                value=1,
                category=_ANATOMY,
                type=_code("123037004", "SCT", "Body structure"),
                color=(240, 228, 66),
            ),
            AILabelSettings(
                name="Bone",
                value=2,
                category=_SUBSTANCE,
                type=_code("3138006", "SCT", "Bone tissue"),
                color=(230, 230, 230),
            ),
            AILabelSettings(
                name="Air inside body",
                value=3,
                category=_SUBSTANCE,
                type=_code("53706006", "SCT", "Air"),
                color=(86, 180, 233),
            ),
        ],
    ),
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model as the registry knows it (nothing loaded yet)."""

    name: str
    kind: Literal["segmentation", "classification"]
    source: str
    source_kind: SourceKind
    path: Path | None
    weights: tuple[Path, ...]
    settings: AIModelSettings
    selector: SeriesSelectorSettings
    labels: tuple[AILabelSettings, ...]
    description: str
    error: str | None = None
    """Why the model cannot be used (missing weights…); its runs fail with this reason."""
    _hash: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def weights_sha256(self) -> str | None:
        """SHA-256 over the weight files (in order), computed once."""
        if self._hash:
            return self._hash[0]
        if not self.weights or any(not p.is_file() for p in self.weights):
            return None
        digest = hashlib.sha256()
        for path in self.weights:
            with path.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        self._hash.append(digest.hexdigest())
        return self._hash[0]

    @property
    def version(self) -> str:
        if self.settings.version:
            return self.settings.version
        if self.source == "builtin:ct-body":
            return CT_BODY_VERSION
        weights = self.weights_sha256
        return weights[:12] if weights else "unknown"

    def label_value(self, index: int) -> int:
        label = self.labels[index]
        return label.value if label.value is not None else index + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "description": self.description,
            "enabled": self.settings.enabled,
            "weights": [str(p) for p in self.weights],
            "weights_sha256": self.weights_sha256,
            "version": self.version,
            "selector": self.selector.model_dump(exclude_defaults=True),
            "labels": [label.name for label in self.labels],
            "device": self.settings.device,
            "error": self.error,
        }


def deepbet_weights() -> tuple[Path, Path]:
    """The deepbet 1.0.2 wheel's TorchScript networks: (bounding box, segmentation)."""
    try:
        dist = metadata.distribution("deepbet")
    except metadata.PackageNotFoundError as exc:
        raise ModelError("the deepbet package (its published weights) is not installed") from exc
    if dist.version != "1.0.2":
        raise ModelError(f"deepbet {dist.version} is installed; brain-mr is built on 1.0.2")
    bbox = Path(str(dist.locate_file("data/models/bbox_model.pt")))
    model = Path(str(dist.locate_file("data/models/model.pt")))
    return bbox, model


def _merge(name: str, given: AIModelSettings | None) -> AIModelSettings:
    base = BUILTIN_DEFAULTS.get(name)
    if base is None:
        assert given is not None
        return given
    if given is None:
        return base
    overrides = given.model_dump(exclude_unset=True)
    return base.model_copy(update=overrides)


def _spec(name: str, settings: AIModelSettings) -> ModelSpec:
    source = settings.source or ""
    error: str | None = None
    path: Path | None = None
    weights: tuple[Path, ...] = ()
    kind: SourceKind
    if source.startswith("builtin:"):
        kind = "builtin"
        builtin = source.removeprefix("builtin:")
        if builtin == "brain-mr":
            try:
                weights = deepbet_weights()
                missing = [str(p) for p in weights if not p.is_file()]
                if missing:
                    error = f"weights file missing: {', '.join(missing)}"
            except ModelError as exc:
                error = str(exc)
        elif builtin != "ct-body":
            error = f"no builtin model {builtin!r} (builtins: {', '.join(BUILTIN_NAMES)})"
    elif not source:
        kind = "torchscript"
        error = "the model has no source"
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            kind = "bundle"
            candidates = [path / "models" / "model.ts", path / "models" / "model.pt"]
            found = [p for p in candidates if p.is_file()]
            weights = tuple(found[:1])
            if not (path / "configs" / "inference.json").is_file():
                error = f"bundle {path} has no configs/inference.json"
            elif not found:
                error = f"bundle {path} has no models/model.ts or models/model.pt"
        else:
            kind = "torchscript"
            weights = (path,)
            if not path.is_file():
                error = f"weights file {path} does not exist"
    model_kind = settings.kind or "segmentation"
    labels = tuple(settings.labels or ())
    if not labels and error is None:
        error = "the model declares no labels (ai.models.<name>.labels)"
    return ModelSpec(
        name=name,
        kind=model_kind,
        source=source,
        source_kind=kind,
        path=path,
        weights=weights,
        settings=settings,
        selector=settings.selector or SeriesSelectorSettings(),
        labels=labels,
        description=settings.description or "",
        error=error,
    )


class ModelRegistry:
    """The models of one process's settings; :meth:`runner` loads each once and keeps it."""

    def __init__(self, settings: AISettings) -> None:
        self.settings = settings
        names = list(BUILTIN_NAMES) + [n for n in settings.models if n not in BUILTIN_NAMES]
        self.specs: dict[str, ModelSpec] = {
            name: _spec(name, _merge(name, settings.models.get(name))) for name in names
        }
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> list[ModelSpec]:
        return [spec for spec in self.specs.values() if spec.settings.enabled]

    def get(self, name: str) -> ModelSpec | None:
        return self.specs.get(name)

    def runner(self, spec: ModelSpec) -> Any:
        """The loaded model (weights read once per process, then reused)."""
        if spec.error:
            raise ModelError(spec.error)
        with self._lock:
            runner = self._runners.get(spec.name)
            if runner is None:
                from ai.engines import load_runner
                from ai.writers import warm_up

                runner = load_runner(spec)
                if not self._runners:
                    warm_up()  # once per process, with the first model
                self._runners[spec.name] = runner
            return runner
