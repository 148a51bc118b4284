"""Whole-volume inference through the one slice pipeline, for any backend's ``infer``.

Training validation, export parity checks, benchmarks and seg-run all segment volumes with
``predict_labels``, so every number the project reports comes from the same code path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .preprocess import logits_to_labels, make_batch, slice_grid
from .spec import ModelSpec

InferFn = Callable[[np.ndarray], np.ndarray]  # (n, C, H, W) float32 -> (n, K, H, W) logits


def predict_labels(
    volume: np.ndarray, spacing: tuple[float, float, float], spec: ModelSpec, infer: InferFn,
    batch_size: int = 8, progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Canonical (slices, rows, cols) HU -> uint8 labels on the same grid (no postprocessing)."""
    pre = spec.preprocess
    grid = slice_grid(volume.shape[1:], spacing[1:], pre)
    out = np.empty(volume.shape, dtype=np.uint8)
    for start in range(0, volume.shape[0], batch_size):
        stop = min(start + batch_size, volume.shape[0])
        logits = infer(make_batch(volume, spacing, pre, start, stop, grid))
        out[start:stop] = logits_to_labels(logits, grid, spec.io.activation)
        if progress:
            progress(stop - start)
    return out
