"""Segmentation metrics as the LiTS challenge scores them.

Liver = label >= 1 (liver including its tumours), tumour = label == 2. Dice per case and
global Dice (pooled over cases); Jaccard/VOE, signed RVD; ASSD and HD95 in millimetres on
the voxel grid's spacing. An empty prediction against a non-empty reference scores Dice 0;
both empty is reported as such ("both empty", value None), never as a silent 1.

Surface distances follow medpy (used by the LiTS scoring code): the border of a mask is
mask XOR its erosion with a face-connected structuring element; distances are Euclidean
distance transforms (with ``sampling`` = spacing) from each border voxel of one mask to the
other mask's border. ASSD is the mean of both directions' distances pooled; HD95 is the
larger of the two directions' 95th percentiles (medpy.metric.hd95).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from .geometry import voxel_volume_ml
from .postprocess import bounding_box

STRUCTURES = {"liver": lambda lab: lab >= 1, "tumor": lambda lab: lab == 2}


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if p + r == 0:
        return None
    return 2.0 * int(np.count_nonzero(pred & ref)) / (p + r)


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float | None:
    union = int(np.count_nonzero(pred | ref))
    return None if union == 0 else int(np.count_nonzero(pred & ref)) / union


def rvd(pred: np.ndarray, ref: np.ndarray) -> float | None:
    r = int(np.count_nonzero(ref))
    return None if r == 0 else (int(np.count_nonzero(pred)) - r) / r


def _border(mask: np.ndarray) -> np.ndarray:
    return mask ^ binary_erosion(mask, structure=generate_binary_structure(mask.ndim, 1), border_value=0)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing, crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pred border -> ref border, ref border -> pred border) distances in mm. Both masks non-empty."""
    if crop:  # distances between borders never leave the joint bounding box (plus one voxel)
        box = bounding_box(pred | ref, pad=1)
        pred, ref = pred[box], ref[box]
    bp, br = _border(pred), _border(ref)
    d_to_ref = distance_transform_edt(~br, sampling=spacing)
    d_to_pred = distance_transform_edt(~bp, sampling=spacing)
    return d_to_ref[bp], d_to_pred[br]


def assd(pred, ref, spacing) -> float | None:
    if not pred.any() or not ref.any():
        return None
    a, b = surface_distances(pred, ref, spacing)
    return float(np.concatenate([a, b]).mean())


def hd95(pred, ref, spacing) -> float | None:
    if not pred.any() or not ref.any():
        return None
    a, b = surface_distances(pred, ref, spacing)
    return float(max(np.percentile(a, 95), np.percentile(b, 95)))


def structure_metrics(pred: np.ndarray, ref: np.ndarray, spacing, surface: bool = True, affine=None) -> dict:
    """Overlap, volume (mL, from ``affine`` when given: right for tilted grids) and surface metrics of one structure."""
    p, r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    inter = int(np.count_nonzero(pred & ref))
    voxel_ml = voxel_volume_ml(spacing if affine is None else affine)
    note = None
    if p == 0 and r == 0:
        note = "both empty"
    elif p == 0:
        note = "prediction empty"
    elif r == 0:
        note = "reference empty"
    out = {
        "dice": None if p + r == 0 else 2.0 * inter / (p + r),
        "voe": None if p + r == 0 else 1.0 - inter / (p + r - inter),
        "rvd": None if r == 0 else (p - r) / r,
        "assd": None,
        "hd95": None,
        "pred_voxels": p,
        "ref_voxels": r,
        "intersection": inter,
        "pred_ml": p * voxel_ml,
        "ref_ml": r * voxel_ml,
        "note": note,
    }
    if surface and p and r:
        a, b = surface_distances(pred, ref, spacing)
        out["assd"] = float(np.concatenate([a, b]).mean())
        out["hd95"] = float(max(np.percentile(a, 95), np.percentile(b, 95)))
    return out


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing, surface: bool = True, affine=None) -> dict:
    """Liver and tumour metrics of one case (label arrays on the same grid)."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(
            f"prediction shape {pred_labels.shape} != reference shape {ref_labels.shape}; they must share a grid"
        )
    return {
        name: structure_metrics(sel(pred_labels), sel(ref_labels), spacing, surface, affine)
        for name, sel in STRUCTURES.items()
    }


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(per_case: dict[str, dict]) -> dict:
    """Per structure: mean per-case Dice (over defined cases), global Dice pooled over cases, other means."""
    out = {}
    for name in STRUCTURES:
        rows = [m[name] for m in per_case.values()]
        denom = sum(r["pred_voxels"] + r["ref_voxels"] for r in rows)
        out[name] = {
            "dice_per_case_mean": _mean(r["dice"] for r in rows),
            "dice_global": (2.0 * sum(r["intersection"] for r in rows) / denom) if denom else None,
            "voe_mean": _mean(r["voe"] for r in rows),
            "rvd_mean": _mean(r["rvd"] for r in rows),
            "assd_mean": _mean(r["assd"] for r in rows),
            "hd95_mean": _mean(r["hd95"] for r in rows),
            "cases": len(rows),
            "cases_both_empty": sum(r["note"] == "both empty" for r in rows),
        }
    return out


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


_COLUMNS = [
    ("liver", "dice", "Liver Dice", 4),
    ("tumor", "dice", "Tumour Dice", 4),
    ("liver", "voe", "Liver VOE", 4),
    ("liver", "rvd", "Liver RVD", 4),
    ("liver", "assd", "Liver ASSD mm", 2),
    ("liver", "hd95", "Liver HD95 mm", 2),
    ("tumor", "assd", "Tumour ASSD mm", 2),
    ("tumor", "hd95", "Tumour HD95 mm", 2),
]


def _rows(per_case: dict[str, dict], summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["case"] + [c[2] for c in _COLUMNS] + ["note"]
    rows = []
    for name, m in per_case.items():
        notes = [f"{s}: {m[s]['note']}" for s in STRUCTURES if m[s]["note"]]
        rows.append([name] + [_fmt(m[s][k], d) for s, k, _, d in _COLUMNS] + ["; ".join(notes)])
    key = {"dice": "dice_per_case_mean", "voe": "voe_mean", "rvd": "rvd_mean", "assd": "assd_mean", "hd95": "hd95_mean"}
    rows.append(["mean per case"] + [_fmt(summary[s][key[k]], d) for s, k, _, d in _COLUMNS] + [""])
    rows.append(
        ["global (pooled)"]
        + [_fmt(summary[s]["dice_global"], d) if k == "dice" else "" for s, k, _, d in _COLUMNS]
        + [""]
    )
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns with a rule under the header, for the terminal."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(per_case: dict[str, dict], summary: dict) -> str:
    """The LiTS metric table of a set of cases, for the terminal."""
    return text_table(*_rows(per_case, summary))


def markdown_table(per_case: dict[str, dict], summary: dict) -> str:
    header, rows = _rows(per_case, summary)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def paired_dice(
    base: dict[str, dict], other: dict[str, dict], structure: str = "tumor", resamples: int = 10000, seed: int = 0
) -> dict:
    """Per-case Dice of ``other`` against ``base`` (per-case dicts as ``case_metrics`` gives
    them), paired on the cases whose reference holds the structure: the mean difference, a
    percentile-bootstrap 95 % interval of it over the cases, and on how many cases each is
    better. Cases without the structure count only as false positives (a Dice of 0 there
    against "both empty" is a detection error, not a worse outline).

    Two trainings differ on a few hard cases by chance; an interval that spans 0 says the
    mean difference is no larger than resampling the cases makes it. Differences under
    0.0005 (below the tables' rounding) count as the same.
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {', '.join(STRUCTURES)}")
    common = [n for n in base if n in other]
    for n in common:
        if base[n][structure]["ref_voxels"] != other[n][structure]["ref_voxels"]:
            raise ValueError(f"{n} has different reference labels in the two")
    names = [n for n in common if base[n][structure]["ref_voxels"]]
    if not names:
        raise ValueError(f"no case holds a {structure} in both")
    a = np.array([base[n][structure]["dice"] for n in names], float)
    b = np.array([other[n][structure]["dice"] for n in names], float)
    d = b - a
    boot = d[np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    same = np.abs(d) < 5e-4
    empty = [n for n in common if not base[n][structure]["ref_voxels"]]
    return {
        "structure": structure,
        "cases": names,
        "base": a.tolist(),
        "other": b.tolist(),
        "mean_base": float(a.mean()),
        "mean_other": float(b.mean()),
        "mean_diff": float(d.mean()),
        "ci95": [float(lo), float(hi)],
        "better": int((~same & (d > 0)).sum()),
        "worse": int((~same & (d < 0)).sum()),
        "same": int(same.sum()),
        "cases_without": len(empty),
        "false_positive_cases": [sum(bool(m[n][structure]["pred_voxels"]) for n in empty) for m in (base, other)],
        "only_base": sorted(set(base) - set(other)),
        "only_other": sorted(set(other) - set(base)),
    }
