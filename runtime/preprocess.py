"""The one preprocessing, shared by training, calibration, parity and inference.

Pure functions of (slices, spacing, spec.preprocess), deterministic, vectorised over slices,
float32. In-plane resampling is linear algebra: each axis is resampled by a small
interpolation matrix, so a stack of slices maps to the model grid with two batched matrix
products, and predictions map back with the matrices of the inverse grid. The same matrices
are exact on any input size, never look at the data's values, and can be embedded in an
ONNX graph as MatMul constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from .errors import InputError
from .spec import Preprocess


def window(hu: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip HU to [lo, hi] and scale to [0, 1], as float32: the definition of the model's
    intensities. to_model_grid computes the same with the scaling moved after resampling."""
    x = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)
    x -= np.float32(lo)
    x *= np.float32(1.0 / (hi - lo))
    return x


@lru_cache(maxsize=64)
def interp_matrix(n_in: int, spacing_in: float, n_out: int, spacing_out: float) -> np.ndarray:
    """(n_out, n_in) float32 matrix resampling one axis between two grids with a common centre.

    Output sample j sits at (j - (n_out-1)/2) * spacing_out mm from the centre. Linear
    interpolation when upsampling; a triangle filter as wide as the output pixel when
    downsampling (antialiasing). Samples outside the input get weight 0 (padding), samples
    near the edge renormalise over the taps that exist.
    """
    scale = spacing_out / spacing_in  # input pixels per output pixel
    half = max(1.0, scale)  # filter half-width in input pixels
    centre_in = (n_in - 1) / 2.0
    x = centre_in + (np.arange(n_out) - (n_out - 1) / 2.0) * scale  # input coordinates
    taps = np.arange(n_in, dtype=np.float64)
    w = np.clip(1.0 - np.abs(taps[None, :] - x[:, None]) / half, 0.0, None)
    inside = (x >= -0.5) & (x <= n_in - 0.5)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(inside[:, None] & (total > 0), w / np.where(total > 0, total, 1.0), 0.0)
    m = w.astype(np.float32)
    m.setflags(write=False)
    return m


@dataclass(frozen=True)
class Band:
    """A banded interpolation matrix as (n_out, taps) source indices and weights.

    Interpolation matrices have at most a few non-zeros per row (2 when upsampling), so
    applying them as gathers is exact and several times cheaper than a dense product, and it
    leaves the BLAS threads to the model.
    """

    idx: np.ndarray  # (n_out, taps) int
    w: np.ndarray  # (n_out, taps) float32, zero where a row has fewer taps

    @classmethod
    def of(cls, m: np.ndarray) -> Band:
        nz = m != 0
        taps = max(1, int(nz.sum(axis=1).max()))
        first = np.where(nz.any(axis=1), nz.argmax(axis=1), 0)
        idx = np.clip(first[:, None] + np.arange(taps)[None, :], 0, m.shape[1] - 1)
        w = np.take_along_axis(m, idx, axis=1)
        # a clipped index repeats the last column: zero its weight so it is not counted twice
        dup = (first[:, None] + np.arange(taps)[None, :]) > m.shape[1] - 1
        w = np.where(dup, 0, w).astype(np.float32)
        return cls(idx, w)

    @property
    def taps(self) -> int:
        return self.idx.shape[1]

    def rows(self, x: np.ndarray) -> np.ndarray:
        """Apply along axis -2."""
        out = x[..., self.idx[:, 0], :] * self.w[:, 0, None]
        for t in range(1, self.idx.shape[1]):
            out += x[..., self.idx[:, t], :] * self.w[:, t, None]
        return out

    def cols(self, x: np.ndarray) -> np.ndarray:
        """Apply along axis -1 (np.take: faster than fancy indexing on the last axis)."""
        out = np.take(x, self.idx[:, 0], axis=-1) * self.w[:, 0]
        for t in range(1, self.idx.shape[1]):
            out += np.take(x, self.idx[:, t], axis=-1) * self.w[:, t]
        return out


@dataclass(frozen=True)
class SliceGrid:
    """The mapping between a volume's in-plane grid and the model's input grid."""

    rows_fwd: np.ndarray  # (model_rows, rows)
    cols_fwd: np.ndarray  # (model_cols, cols)
    rows_inv: np.ndarray  # (rows, model_rows)
    cols_inv: np.ndarray  # (cols, model_cols)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., rows, cols) -> (..., model_rows, model_cols)."""
        return _apply(x, self.rows_fwd, self.cols_fwd)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """(..., model_rows, model_cols) -> (..., rows, cols)."""
        return _apply(x, self.rows_inv, self.cols_inv)

    @cached_property
    def coverage(self) -> np.ndarray:
        """(model_rows, model_cols) total interpolation weight per model pixel: 1 inside the scan, 0 in padding."""
        return np.outer(self.rows_fwd.sum(axis=1), self.cols_fwd.sum(axis=1)).astype(np.float32)

    @property
    def in_shape(self) -> tuple[int, int]:
        return self.rows_inv.shape[0], self.cols_inv.shape[0]

    @property
    def model_shape(self) -> tuple[int, int]:
        return self.rows_fwd.shape[0], self.cols_fwd.shape[0]


_BANDS: dict[int, tuple[np.ndarray, Band]] = {}


def _band(m: np.ndarray) -> Band:
    """Banded form of an interpolation matrix, cached per matrix object (matrices are cached too)."""
    hit = _BANDS.get(id(m))
    if hit is None or hit[0] is not m:
        if len(_BANDS) > 256:
            _BANDS.clear()
        hit = _BANDS[id(m)] = (m, Band.of(m))
    return hit[1]


def _apply(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ x @ cols.T over the last two axes, as banded gathers (dense products for wide bands)."""
    br, bc = _band(rows), _band(cols)
    if br.taps > MAX_TAPS or bc.taps > MAX_TAPS:  # extreme downsampling: the dense product is cheaper
        return resample(np.asarray(x, dtype=np.float32), rows, cols)
    if x.dtype.kind not in "iu":  # integers stay as they are: the first gather's product makes them float32
        x = np.asarray(x, dtype=np.float32)
    return _apply_bands(x, br, bc)


MAX_TAPS = 16


def _apply_bands(x: np.ndarray, br: Band, bc: Band) -> np.ndarray:
    # a gather along the last axis costs ~2x one along rows (strided, not whole rows): run the
    # cheaper order, which for upsampling means columns first, on the smaller array
    n_rows, n_cols = br.idx.shape[0], bc.idx.shape[0]
    rows_first = n_rows * x.shape[-1] * br.taps + 2 * n_rows * n_cols * bc.taps
    cols_first = 2 * x.shape[-2] * n_cols * bc.taps + n_rows * n_cols * br.taps
    if rows_first <= cols_first:
        return bc.cols(br.rows(x))
    return br.rows(bc.cols(x))


def _reach(band: Band, lo: int, hi: int) -> slice:
    """The output positions whose interpolation reads any input position in [lo, hi)."""
    hits = ((band.idx >= lo) & (band.idx < hi) & (band.w != 0)).any(axis=1)
    where = np.flatnonzero(hits)
    return slice(int(where[0]), int(where[-1]) + 1) if len(where) else slice(0, 0)


def model_spacing(in_shape: tuple[int, int], in_spacing: tuple[float, float], pre: Preprocess) -> tuple[float, float]:
    """The physical spacing (mm) of the model grid for a slice of this shape and spacing."""
    if pre.mode == "spacing":
        return float(pre.spacing_mm), float(pre.spacing_mm)
    return (
        in_shape[0] * in_spacing[0] / pre.size[0],
        in_shape[1] * in_spacing[1] / pre.size[1],
    )


def slice_grid(in_shape: tuple[int, int], in_spacing: tuple[float, float], pre: Preprocess) -> SliceGrid:
    """Grid mapping for slices of ``in_shape`` (rows, cols) at ``in_spacing`` (mm)."""
    (r, c), (sr, sc) = in_shape, in_spacing
    mr, mc = pre.size
    out_sr, out_sc = model_spacing(in_shape, in_spacing, pre)
    # round the spacings so that grids of equal geometry share cached matrices
    sr, sc, out_sr, out_sc = (round(float(v), 6) for v in (sr, sc, out_sr, out_sc))
    return SliceGrid(
        rows_fwd=interp_matrix(r, sr, mr, out_sr),
        cols_fwd=interp_matrix(c, sc, mc, out_sc),
        rows_inv=interp_matrix(mr, out_sr, r, sr),
        cols_inv=interp_matrix(mc, out_sc, c, sc),
    )


def resample(stack: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply per-axis matrices to the last two axes: rows @ x @ cols.T, for any leading dims."""
    # the cheaper association first: shrink the larger reduction early
    if rows.shape[0] * stack.shape[-1] <= cols.shape[0] * stack.shape[-2]:
        return np.matmul(np.matmul(rows, stack), cols.T)
    return np.matmul(rows, np.matmul(stack, cols.T))


def to_model_grid(slices_hu: np.ndarray, grid: SliceGrid, pre: Preprocess) -> np.ndarray:
    """(n, rows, cols) HU -> (n, model_rows, model_cols) float32 in [0, 1]; padding is 0.

    The same as resampling ``window(slices_hu)``, but only the clip runs at the scan's full
    resolution: the window's shift and scale are affine and resampling is linear, so they move
    to the model grid, where a pixel's shift is weighted by its coverage (0 for padding).
    """
    lo, hi = pre.window
    dt = slices_hu.dtype
    if (
        dt.kind in "iu"
        and float(lo).is_integer()
        and float(hi).is_integer()
        and np.iinfo(dt).min <= lo <= hi <= np.iinfo(dt).max
    ):
        x = np.clip(slices_hu, int(lo), int(hi))  # the usual int16 CT: clipped in half the bytes
    else:
        x = np.clip(slices_hu, np.float32(lo), np.float32(hi), dtype=np.float32)
    y = np.ascontiguousarray(grid.forward(x), dtype=np.float32)
    y -= np.float32(lo) * grid.coverage
    y *= np.float32(1.0 / (hi - lo))
    return y


def context_indices(indices: np.ndarray, num_slices: int, k: int) -> np.ndarray:
    """(n, 2k+1) slice indices of each slice's neighbourhood, edge-replicated."""
    offsets = np.arange(-k, k + 1)
    return np.clip(np.asarray(indices)[:, None] + offsets[None, :], 0, num_slices - 1)


def make_batch(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    pre: Preprocess,
    start: int,
    stop: int,
    grid: SliceGrid | None = None,
) -> np.ndarray:
    """Model input (n, 2k+1, model_rows, model_cols) for canonical slices [start, stop).

    ``volume`` is canonical (slices, rows, cols) in HU; each slice is preprocessed once and
    the context channels are gathered from the preprocessed neighbours.
    """
    return SliceBatcher(volume, spacing, pre, grid)(start, stop)


class SliceBatcher:
    """Model inputs for consecutive batches of one volume, preprocessing every slice once.

    Context channels make neighbouring batches share 2k slices; a fresh batcher per batch
    (make_batch) would window and resample those again for every batch (at batch size 1 and
    k = 1, three times each slice). The batcher keeps the preprocessed slices of the last
    batch, so the next batch up or down the volume reuses the 2k it shares. The batches are
    identical to make_batch's, in any order of requests.
    """

    def __init__(
        self, volume: np.ndarray, spacing: tuple[float, float, float], pre: Preprocess, grid: SliceGrid | None = None
    ):
        self.volume, self.pre = volume, pre
        self.grid = grid or slice_grid(volume.shape[1:], spacing[1:], pre)
        self._lo = 0
        self._prepped = np.empty((0, *self.grid.model_shape), np.float32)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        n_slices, k = self.volume.shape[0], self.pre.context
        lo, hi = max(0, start - k), min(n_slices, stop + k)
        have_lo, have_hi = self._lo, self._lo + len(self._prepped)
        if have_lo <= lo < have_hi:  # moving up the volume
            reuse = self._prepped[lo - have_lo : min(hi, have_hi) - have_lo]
            rest = to_model_grid(self.volume[have_hi:hi], self.grid, self.pre) if hi > have_hi else reuse[:0]
            prepped = np.concatenate([reuse, rest]) if len(rest) else reuse
        elif lo < have_lo < hi <= have_hi:  # moving down
            prepped = np.concatenate(
                [to_model_grid(self.volume[lo:have_lo], self.grid, self.pre), self._prepped[: hi - have_lo]]
            )
        else:
            prepped = to_model_grid(self.volume[lo:hi], self.grid, self.pre)
        self._lo, self._prepped = lo, prepped
        idx = context_indices(np.arange(start, stop), n_slices, k) - lo
        if len(idx) == 1 and idx[0, -1] - idx[0, 0] == 2 * k:  # one slice off the edges: its context is a run of
            return prepped[idx[0, 0] : idx[0, -1] + 1][None]  # contiguous slices, a view (prepped is never written)
        return prepped[idx]


def preprocess_volume(volume: np.ndarray, spacing: tuple[float, float, float], pre: Preprocess) -> np.ndarray:
    """The whole volume as model input (slices, 2k+1, model_rows, model_cols)."""
    return make_batch(volume, spacing, pre, 0, volume.shape[0])


def labels_to_model_grid(labels: np.ndarray, grid: SliceGrid, num_classes: int) -> np.ndarray:
    """(n, rows, cols) labels -> model grid by resampling one-hot maps, then argmax (uint8)."""
    onehot = (labels[:, None] == np.arange(num_classes, dtype=labels.dtype)[None, :, None, None]).astype(np.float32)
    # padding (all weights 0) must become background, so give background a tiny head start
    onehot[:, 0] += 1e-6
    return grid.forward(onehot).argmax(axis=1).astype(np.uint8)


def check_logits(logits: np.ndarray, grid: SliceGrid) -> None:
    """Refuse model outputs that are not (n, C, model_rows, model_cols) for the grid the input was made on."""
    want = (grid.rows_inv.shape[1], grid.cols_inv.shape[1])
    if logits.ndim != 4 or tuple(logits.shape[2:]) != want or logits.shape[1] < 1:
        raise InputError(
            f"the model's output is {'x'.join(map(str, logits.shape))} for input slices of {want[0]}x{want[1]}; "
            f"expected (batch, classes, {want[0]}, {want[1]}): the model does not match its spec, re-export it"
        )


def logits_to_labels(logits: np.ndarray, grid: SliceGrid, activation: str = "softmax") -> np.ndarray:
    """(n, C, model_rows, model_cols) logits -> (n, rows, cols) uint8 labels on the input grid.

    Logits are resampled (linearly) to the input grid, then argmax'ed. For softmax outputs
    only the C-1 differences to the background logit are resampled: interpolation is linear,
    so the argmax is the same and one channel of work is saved. Pixels outside the model's
    field of view get background.

    Only the output window that interpolates from a foreground model pixel is computed: the
    weights are non-negative, so where every score the window reads is <= 0 the result is
    background anyway. Slices without liver cost nothing, which halves the host time of a
    typical abdominal volume; the labels are identical to resampling everything.
    """
    logits = np.asarray(logits, dtype=np.float32)
    check_logits(logits, grid)
    scores = logits[:, :1] if activation == "sigmoid" else logits[:, 1:] - logits[:, :1]
    n = logits.shape[0]
    out = np.zeros((n, *grid.in_shape), np.uint8)
    br, bc = _band(grid.rows_inv), _band(grid.cols_inv)
    if br.taps > MAX_TAPS or bc.taps > MAX_TAPS:
        return argmax_with_background(grid.inverse(scores))
    fg = (scores > 0).any(axis=1)  # (n, model_rows, model_cols)
    for k0 in np.flatnonzero(fg.any(axis=(1, 2))):
        rows_any, cols_any = fg[k0].any(axis=1), fg[k0].any(axis=0)
        r = _reach(br, int(np.argmax(rows_any)), len(rows_any) - int(np.argmax(rows_any[::-1])))
        c = _reach(bc, int(np.argmax(cols_any)), len(cols_any) - int(np.argmax(cols_any[::-1])))
        if r.stop > r.start and c.stop > c.start:
            up = _apply_bands(scores[k0], Band(br.idx[r], br.w[r]), Band(bc.idx[c], bc.w[c]))
            out[k0, r, c] = argmax_with_background(up[None])[0]
    return out


def logits_to_probabilities(logits: np.ndarray, grid: SliceGrid, activation: str = "softmax") -> np.ndarray:
    """(n, C, model_rows, model_cols) logits -> (C, n, rows, cols) uint8 probabilities x 255 on
    the input grid (softmax or sigmoid at the model grid, then linear resampling, which keeps
    them in [0, 1] and summing to 1). uint8 keeps a 3-class 512x512x200 map at 157 MB."""
    logits = np.asarray(logits, dtype=np.float32)
    check_logits(logits, grid)
    if activation == "sigmoid":
        prob = 1.0 / (1.0 + np.exp(-logits[:, :1]))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        prob = e / e.sum(axis=1, keepdims=True)
    up = grid.inverse(prob)  # (n, C, rows, cols); 0 outside the model's field of view
    if activation == "softmax":
        up[:, 0] += 1.0 - up.sum(axis=1)  # outside the field of view: background
    return np.rint(np.clip(up, 0.0, 1.0) * 255.0).astype(np.uint8).transpose(1, 0, 2, 3)


def argmax_with_background(diff: np.ndarray) -> np.ndarray:
    """Labels from (n, C-1, ...) foreground-minus-background scores: 0 unless some score > 0.

    A running compare instead of np.argmax: several times faster on large slices, and ties
    go to the lower class, as argmax does.
    """
    best = np.maximum(diff[:, 0], 0.0)
    labels = (diff[:, 0] > 0).view(np.uint8).copy()
    for c in range(1, diff.shape[1]):
        better = diff[:, c] > best
        labels[better] = c + 1
        np.maximum(best, diff[:, c], out=best)
    return labels
