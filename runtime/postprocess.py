"""Postprocessing of label volumes and volume statistics.

Keeping the largest connected liver component never hurt and helped by up to +0.17 Dice on
a shifted scan in a probe; tumours are only kept inside the kept liver.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .geometry import voxel_volume_ml


def bounding_box(mask: np.ndarray, pad: int | Sequence[int] = 0) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask, grown by ``pad`` voxels (one per axis, or one for all)
    and clipped to the array; None if the mask is empty."""
    box = _tight_box(mask)
    if box is None or not np.any(pad):
        return box
    pads = np.broadcast_to(pad, (mask.ndim,))
    return tuple(slice(max(0, s.start - int(p)), min(n, s.stop + int(p))) for s, p, n in zip(box, pads, mask.shape))


def _tight_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Reduces over contiguous memory (rows of the first axis, then a 2D projection), several
    times faster than ``any`` over other axis pairs."""
    first = mask.reshape(mask.shape[0], -1).any(axis=1)  # any() also reads uint8 labels as nonzero
    idx = np.flatnonzero(first)
    if not len(idx):
        return None
    lead = slice(int(idx[0]), int(idx[-1]) + 1)
    if mask.ndim == 1:
        return (lead,)
    rest = _tight_box(mask[lead].any(axis=0))
    return (lead, *rest)


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest 3D connected component (face-connected by default) of a boolean mask."""
    box = bounding_box(mask)
    if box is None:
        return np.zeros(mask.shape, bool)
    sub = mask[box]
    lab, n = ndimage.label(sub, structure=ndimage.generate_binary_structure(mask.ndim, connectivity))
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(lab[sub])  # foreground voxels only: a fraction of the box
    sizes[0] = 0
    out = np.zeros(mask.shape, bool)
    np.equal(lab, sizes.argmax(), out=out[box])
    return out


class StreamingComponents:
    """The largest 3D component of ``labels >= 1``, labelled run by run while the slices arrive.

    The pipeline fills the label volume a batch at a time. Each run of ``chunk`` consecutive
    finished slices is labelled as soon as it is complete (in the thread that placed it, while
    inference goes on), so at the end only the last slices and the seams between runs are left
    and the largest-component step no longer waits for the whole volume. The result is
    identical to ``largest_component(labels >= 1)``, ties included (the component that comes
    first in raster order wins, as with ``ndimage.label``). Face connectivity.
    """

    def __init__(self, labels: np.ndarray, chunk: int = 16):
        self.labels, self.chunk = labels, max(1, chunk)
        self._free = np.zeros(labels.shape[0], bool)  # final slices not yet in a labelled run
        self._runs: list[
            tuple[int, int, tuple[slice, slice], np.ndarray, np.ndarray]
        ] = []  # z0, z1, box, labels, sizes
        self._seams: list[
            tuple[int, int, np.ndarray]
        ] = []  # lower run, upper run, touching (lower, upper) local labels
        self._structure = ndimage.generate_binary_structure(3, 1)

    def add(self, start: int, stop: int) -> None:
        """Slices [start, stop) of ``labels`` are final: label the complete runs of ``chunk`` slices they make."""
        self._free[start:stop] = True
        lo, hi = start, stop
        while lo > 0 and self._free[lo - 1]:
            lo -= 1
        while hi < len(self._free) and self._free[hi]:
            hi += 1
        if start - lo < stop - hi:  # growing upwards: cut runs from the bottom, else from the top
            while hi - lo >= self.chunk:
                self._label(lo, lo + self.chunk)
                lo += self.chunk
        else:
            while hi - lo >= self.chunk:
                self._label(hi - self.chunk, hi)
                hi -= self.chunk

    def _label(self, z0: int, z1: int) -> None:
        self._free[z0:z1] = False
        mask = self.labels[z0:z1] >= 1
        box = bounding_box(mask)
        if box is None:
            return
        lab, n = ndimage.label(mask[box], structure=self._structure)
        run = (z0 + box[0].start, z0 + box[0].stop, box[1:], lab, np.bincount(lab.ravel(), minlength=n + 1))
        self._runs.append(run)
        for i, other in enumerate(self._runs[:-1]):  # the seams with runs labelled before, while inference goes on
            if other[1] == run[0]:
                self._seams.append((i, len(self._runs) - 1, _touching(other, run)))
            elif run[1] == other[0]:
                self._seams.append((len(self._runs) - 1, i, _touching(run, other)))

    def largest(self, box: tuple[slice, ...]) -> np.ndarray:
        """The largest component inside ``box`` (which holds all of the foreground), as a boolean array of its shape."""
        edges = np.flatnonzero(np.diff(np.concatenate([[0], self._free.view(np.int8), [0]])))
        for lo, hi in zip(edges[::2].tolist(), edges[1::2].tolist()):  # what is left: runs shorter than chunk
            self._label(lo, hi)
        out = np.zeros(tuple(s.stop - s.start for s in box), bool)
        if not self._runs:
            return out
        order = sorted(range(len(self._runs)), key=lambda i: self._runs[i][0])
        runs = [self._runs[i] for i in order]
        offsets = np.cumsum([0] + [len(r[4]) - 1 for r in runs])  # global id = offset + local label: raster order
        offset_of = {i: int(offsets[k]) for k, i in enumerate(order)}
        parent = np.arange(offsets[-1] + 1)

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for lower, upper, pairs in self._seams:
            for u, v in (pairs + [offset_of[lower], offset_of[upper]]).tolist():
                ru, rv = find(u), find(v)
                if ru != rv:
                    parent[max(ru, rv)] = min(ru, rv)  # a component's root is its first id in raster order
        roots = np.array([find(i) for i in range(len(parent))])
        sizes = np.concatenate([[0]] + [r[4][1:] for r in runs])
        totals = np.bincount(roots[1:], weights=sizes[1:], minlength=len(parent))
        best = int(np.argmax(totals))  # of equal sizes, the smallest root: the first in raster order
        for r, o in zip(runs, offsets):
            keep = np.flatnonzero(roots[o + 1 : o + len(r[4])] == best) + 1
            if not len(keep):
                continue
            dst = out[
                r[0] - box[0].start : r[1] - box[0].start,
                r[2][0].start - box[1].start : r[2][0].stop - box[1].start,
                r[2][1].start - box[2].start : r[2][1].stop - box[2].start,
            ]
            if len(keep) == 1:
                np.equal(r[3], keep[0], out=dst)
            else:
                lut = np.zeros(len(r[4]), bool)
                lut[keep] = True
                dst[...] = lut[r[3]]
        return out


def _touching(a: tuple, b: tuple) -> np.ndarray:
    """(k, 2) distinct pairs of local labels (a's last slice, b's first slice) that touch face to face."""
    rows = slice(max(a[2][0].start, b[2][0].start), min(a[2][0].stop, b[2][0].stop))
    cols = slice(max(a[2][1].start, b[2][1].start), min(a[2][1].stop, b[2][1].stop))
    if rows.stop <= rows.start or cols.stop <= cols.start:
        return np.zeros((0, 2), np.int64)
    last = a[3][
        -1,
        rows.start - a[2][0].start : rows.stop - a[2][0].start,
        cols.start - a[2][1].start : cols.stop - a[2][1].start,
    ]
    first = b[3][
        0,
        rows.start - b[2][0].start : rows.stop - b[2][0].start,
        cols.start - b[2][1].start : cols.stop - b[2][1].start,
    ]
    touch = (last > 0) & (first > 0)
    keys = np.unique(last[touch].astype(np.int64) * len(b[4]) + first[touch])
    return np.stack([keys // len(b[4]), keys % len(b[4])], 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (axial): a 3D fill misses holes that open to another slice."""
    out = mask.copy()
    box = bounding_box(mask)
    if box is None:
        return out
    for k in range(box[0].start, box[0].stop):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def voxels_for_ml(ml: float, geometry) -> int:
    """The voxel count of ``ml`` millilitres on this grid (the volume's affine, or its spacing in mm), rounded up."""
    return int(np.ceil(ml / voxel_volume_ml(geometry) - 1e-9)) if ml > 0 else 0


def drop_small_tumours(labels: np.ndarray, min_voxels: int) -> np.ndarray:
    """Relabel tumour components (3D, face-connected) of fewer than ``min_voxels`` voxels as liver, in place.

    Specks of a few voxels are what a model marks in a tumour-free liver, and LiTS scores such a
    case Dice 0; the lesions it should find are larger.
    """
    box = bounding_box(labels == 2) if min_voxels > 1 else None
    if box is None:
        return labels
    sub = labels[box]
    tumour = sub == 2
    lab, _ = ndimage.label(tumour)
    small = np.bincount(lab[tumour]) < min_voxels  # tumour voxels only: a fraction of the box
    small[0] = False
    sub[small[lab]] = 1
    return labels


def postprocess(
    labels: np.ndarray,
    keep_largest: bool = True,
    holes: bool = False,
    inplace: bool = False,
    components: StreamingComponents | None = None,
) -> np.ndarray:
    """Largest connected liver region (label >= 1); tumour only inside it; optional hole filling.

    Works inside the bounding box of the foreground: outside it everything is background, and
    a full-volume pass costs more than all the rest on a 512x512 volume. ``inplace`` rewrites
    ``labels`` itself, sparing a fresh volume-sized array (its first touch alone costs as much
    as the labelling). ``components``, fed while ``labels`` was filled, has most of the
    labelling done already.
    """
    out = labels if inplace else labels.copy()
    box = bounding_box(out)
    if box is None:
        return out
    sub = out[box]  # a view: edits land in out
    if not keep_largest:
        kept = sub >= 1
    elif components is not None:
        kept = components.largest(box)
    else:
        kept = largest_component(sub >= 1)
    if holes:
        kept = fill_holes(kept)
        sub[...] = kept.view(np.uint8) + (kept & (sub == 2))
    else:
        np.multiply(sub, kept.view(np.uint8), out=sub)  # kept is inside the liver: labels stay or drop to 0
    return out


def volume_stats(labels: np.ndarray, geometry) -> dict:
    """Liver and tumour volumes in mL, tumour count (3D components) and burden.

    ``geometry`` is the volume's affine (right for tilted and sheared grids) or its spacing in mm.
    """
    voxel_ml = voxel_volume_ml(geometry)
    box = bounding_box(labels)
    sub = labels[box] if box is not None else labels[:0]
    liver_ml = float(np.count_nonzero(sub >= 1)) * voxel_ml
    tumour = sub == 2
    tumor_ml = float(np.count_nonzero(tumour)) * voxel_ml
    tbox = bounding_box(tumour) if tumour.size else None
    count = 0 if tbox is None else int(ndimage.label(tumour[tbox])[1])
    return {
        "liver_ml": liver_ml,
        "tumor_ml": tumor_ml,
        "tumor_count": count,
        "tumor_burden": tumor_ml / liver_ml if liver_ml else 0.0,
        "voxel_ml": voxel_ml,
    }
