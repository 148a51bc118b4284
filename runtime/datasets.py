"""Discover and check labelled cases in the LiTS or Medical Segmentation Decathlon layout.

LiTS:      DIR/volume-K.nii[.gz] + DIR/segmentation-K.nii[.gz]
Decathlon: DIR/imagesTr/liver_K.nii.gz + DIR/labelsTr/liver_K.nii.gz
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import check_file_holds, expected_bytes, gzip_complete
from .io import load_image, nifti_files

_LITS_VOL = re.compile(r"^volume-(\d+)\.nii(\.gz)?$")
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$")
AFFINE_TOL_MM = 1e-3


@dataclass(frozen=True)
class Case:
    """One labelled CT: a name shared by image and label, and both paths."""

    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class BadCase:
    name: str
    reason: str


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def discover(root: str | Path, require_labels: bool = True) -> tuple[list[Case], list[BadCase]]:
    """Find cases in ``root`` (LiTS or Decathlon layout). Returns (cases, problems).

    Problems are images without labels (when required) or labels without images; the
    caller decides whether they are fatal. Raises InputError when nothing usable is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory; point to a folder of cases (LiTS or Decathlon layout)")
    if (root / "imagesTr").is_dir():
        cases, bad = _pair(
            {_strip(p.name): p for p in nifti_files(root / "imagesTr")},
            {_strip(p.name): p for p in nifti_files(root / "labelsTr")} if (root / "labelsTr").is_dir() else {},
            require_labels,
        )
        layout = "Decathlon (imagesTr/labelsTr)"
    else:
        vols, segs = {}, {}
        for p in root.iterdir():
            if m := _LITS_VOL.match(p.name):
                vols[f"volume-{int(m.group(1))}"] = p
            elif m := _LITS_SEG.match(p.name):
                segs[f"volume-{int(m.group(1))}"] = p
        cases, bad = _pair(vols, segs, require_labels)
        layout = "LiTS (volume-K / segmentation-K)"
    if not cases:
        others = sorted(p.name for p in nifti_files(root))[:3]
        hint = f"; found other NIfTI files such as {others}" if others else ""
        raise InputError(f"{root}: no labelled cases found; expected the {layout} layout{hint}")
    return cases, bad


def images_in(root: str | Path) -> list[Path]:
    """The CT images of a folder, in natural order: Decathlon's imagesTr, or the folder's NIfTI
    files without the LiTS label maps (segmentation-K beside volume-K), which are not CT."""
    root = Path(root)
    if (root / "imagesTr").is_dir():
        root = root / "imagesTr"
    files = nifti_files(root)
    vols = {int(m.group(1)) for p in files if (m := _LITS_VOL.match(p.name))}
    files = [p for p in files if not ((m := _LITS_SEG.match(p.name)) and int(m.group(1)) in vols)]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _strip(name: str) -> str:
    return re.sub(r"\.nii(\.gz)?$", "", name)


def _pair(images: dict[str, Path], labels: dict[str, Path], require_labels: bool) -> tuple[list[Case], list[BadCase]]:
    cases, bad = [], []
    for name in sorted(images, key=_natural_key):
        lab = labels.get(name)
        if lab is None and require_labels:
            bad.append(BadCase(name, f"{images[name].name} has no label file"))
            continue
        cases.append(Case(name, images[name], lab))
    for name in sorted(set(labels) - set(images), key=_natural_key):
        bad.append(BadCase(name, f"{labels[name].name} has no image file"))
    return cases, bad


def check_case(case: Case, num_classes: int = 3) -> str | None:
    """Why a case is unusable (None if fine): readable 3D image and label, same geometry, labels in range."""
    try:
        img = load_image(case.image)
        if len(img.shape) != 3:
            return f"image is {len(img.shape)}D {tuple(img.shape)}, expected 3D"
        check_file_holds(img, case.image)
        need = int(getattr(img.dataobj, "offset", 0) or 0) + expected_bytes(img)
        if str(case.image).endswith(".gz") and not gzip_complete(case.image, need):
            return f"{case.image.name}: voxel data is truncated or corrupt; re-export or re-download it"
        if case.label is None:
            return None
        lab = load_image(case.label)
        if tuple(lab.shape) != tuple(img.shape):
            return f"image shape {tuple(img.shape)} != label shape {tuple(lab.shape)}"
        if not np.allclose(img.affine, lab.affine, atol=AFFINE_TOL_MM):
            return "image and label affines differ (they are not on the same grid)"
        data = np.asanyarray(lab.dataobj)
        values = np.unique(data)
        if values.min() < 0 or values.max() >= num_classes or not np.array_equal(values, np.round(values)):
            return f"label values {values[:8].tolist()} are not classes 0..{num_classes - 1}"
    except InputError as exc:
        return str(exc)
    except Exception as exc:  # truncated gzip etc. surface only when data is read
        return f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    return None


def load_dataset(root: str | Path, num_classes: int = 3, check: bool = True) -> list[Case]:
    """All usable cases in ``root``; raises one InputError listing every bad pair and its reason."""
    cases, bad = discover(root)
    if check:
        for c in cases:
            reason = check_case(c, num_classes)
            if reason:
                bad.append(BadCase(c.name, reason))
    if bad:
        lines = "; ".join(f"{b.name}: {b.reason}" for b in bad)
        raise InputError(f"{root}: {len(bad)} bad case(s), fix or remove them: {lines}")
    return cases
