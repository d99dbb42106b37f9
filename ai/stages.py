"""What a model run produces and how long each of its stages took (no torch here: the HTTP
and CLI processes import this without loading PyTorch)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ai.metrics import AI_STAGE_SECONDS

__all__ = ["ClassificationOutput", "SegmentationOutput", "Timings"]


@dataclass(slots=True)
class Timings:
    """Seconds per stage (load, preprocess, infer, postprocess, encode, store)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            AI_STAGE_SECONDS.labels(name).observe(elapsed)

    def to_json(self) -> dict[str, float]:
        return {name: round(value, 4) for name, value in self.seconds.items()}


@dataclass(slots=True)
class SegmentationOutput:
    """One boolean mask ``(slices, rows, columns)`` per label of the model, on the volume's
    grid, in label order."""

    masks: list[np.ndarray]


@dataclass(slots=True)
class ClassificationOutput:
    """Probabilities ``(images, classes)``, one row per image of the volume."""

    probabilities: np.ndarray
