"""Whole-volume inference through the one slice pipeline, for any backend's ``infer``.

Training validation, export parity checks, benchmarks and seg-run all segment volumes through
runtime.pipeline.segment_canonical, so every number the project reports comes from the same
code path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .spec import ModelSpec

InferFn = Callable[[np.ndarray], np.ndarray]  # (n, C, H, W) float32 -> (n, K, H, W) logits


def predict_labels(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    spec: ModelSpec,
    infer: InferFn,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Canonical (slices, rows, cols) HU -> uint8 labels on the same grid (no postprocessing)."""
    from .pipeline import SegmentOptions, segment_canonical

    return segment_canonical(volume, spacing, spec, infer, SegmentOptions(batch_size=batch_size, progress=progress))
