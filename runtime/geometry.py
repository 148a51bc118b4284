"""Checks on what a volume's header and voxels claim, made before its data is trusted.

A volume in mL comes from |det| of the affine's 3x3 part (``voxel_volume_ml``): the column
lengths overstate the voxel of a tilted or sheared grid (+10 % at a 25 degree gantry tilt).
Geometry that cannot belong to a CT (zero, negative or NaN voxel size, a singular affine,
pixels outside 0.05-20 mm or slices outside 0.05-50 mm) and voxels that cannot be CT in HU
(one constant value, a range no CT has) are refused with the reason; ``force`` lets the
plausibility checks through and returns their reasons, so that the report can say so.
A header that promises more voxels than its file can hold, or than the free memory can,
is refused before anything is allocated.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import InputError

IN_PLANE_MM = (0.05, 20.0)
SLICE_MM = (0.05, 50.0)
# deflate never compresses better than about 1032:1, so a .nii.gz smaller than this fraction
# of its voxel bytes cannot hold them
MAX_DEFLATE_RATIO = 1032
# what a read holds besides the voxels: the canonical float copy of a scaled volume, the mask
MEMORY_FACTOR = 2.5


def voxel_volume_ml(geometry: np.ndarray | Sequence[float]) -> float:
    """The volume of one voxel in mL: |det| of an affine's 3x3 part, or the product of a spacing (mm).

    Every volume the project reports goes through here, so a tilted or sheared grid is
    measured by the parallelepiped its voxel spans, not by its column lengths.
    """
    g = np.asarray(geometry, dtype=float)
    m = g[:3, :3] if g.ndim == 2 else np.diag(g)
    return float(abs(np.linalg.det(m))) / 1000.0


def stored_pixdim(path: str | os.PathLike, header) -> np.ndarray:
    """The voxel size as the file stores it: nibabel replaces a zero or negative one when loading."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        block = f.read(header.sizeof_hdr)
    raw = type(header)(binaryblock=block, endianness=header.endianness, check=False)
    return np.asarray(raw["pixdim"][1:4], float)


def geometry_problems(
    header, affine: np.ndarray, spacing: tuple[float, float, float], path: str | os.PathLike | None = None
) -> list[str]:
    """Why the geometry is implausible for a CT (empty when it is fine). ``spacing`` is canonical (z, y, x);
    with ``path`` the voxel size the file stores is checked too."""
    problems = []
    coded = int(header["qform_code"]) > 0 or int(header["sform_code"]) > 0
    pixdim = stored_pixdim(path, header) if path is not None else np.asarray(header["pixdim"][1:4], float)
    if not coded and not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        problems.append(
            f"voxel size (pixdim) {_mm(pixdim)} mm is zero, negative or NaN and the file has no orientation "
            "(qform/sform codes 0)"
        )
    z, y, x = spacing
    lo, hi = IN_PLANE_MM
    if not (lo <= y <= hi and lo <= x <= hi):
        problems.append(f"pixel size {x:.4g} x {y:.4g} mm is outside the {lo}-{hi} mm of CT")
    lo, hi = SLICE_MM
    if not lo <= z <= hi:
        problems.append(f"slice spacing {z:.4g} mm is outside the {lo}-{hi} mm of CT")
    return problems


def check_affine(affine: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse an affine nothing can be measured with: non-finite or singular (no ``force`` for these)."""
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{path}: the affine holds NaN or Inf; the file's geometry header is broken")
    if voxel_volume_ml(affine) < 1e-12:
        raise InputError(f"{path}: the affine is singular (zero voxel volume); the file's geometry header is broken")


def intensity_sample(data: np.ndarray) -> np.ndarray:
    """Every 16th slice and every 4th voxel in-plane: a quarter million voxels of a CT, plenty for
    its range, and cheap next to segmenting it."""
    return data[:: max(1, data.shape[0] // 16), ::4, ::4]


def percentiles_1_99(sample: np.ndarray) -> tuple[float, float]:
    p1, p99 = np.percentile(sample, [1, 99])
    return float(p1), float(p99)


def not_ct_reason(data: np.ndarray) -> str | None:
    """Why voxels cannot be a CT in HU (None if they can): one constant value, or a range no CT has."""
    sample = intensity_sample(data)
    lo, hi = float(np.min(sample)), float(np.max(sample))
    if lo == hi and float(np.min(data)) == float(np.max(data)):
        return f"every voxel is {lo:g}: an empty or blank volume, not a CT"
    p1, p99 = percentiles_1_99(sample)
    if p99 - p1 < 50:
        return f"intensities span only {p1:.4g}..{p99:.4g} (1st-99th percentile): not a CT in HU"
    if p99 > 5000:  # not the low end: padding outside the field of view may be stored as -32768
        return f"intensities span {p1:.0f}..{p99:.0f} (1st-99th percentile), beyond the -1024..+3071 HU of CT"
    if p99 < -500:
        return f"intensities span {p1:.0f}..{p99:.0f} HU (1st-99th percentile): air only, no tissue"
    return None


def expected_bytes(img) -> int:
    """Bytes of voxel data the header promises."""
    return int(np.prod([int(n) for n in img.shape], dtype=object)) * int(img.get_data_dtype().itemsize)


def check_file_holds(img, path: str | os.PathLike) -> None:
    """Refuse a header whose dimensions need more bytes than the file can hold, before any allocation."""
    p = Path(path)
    need = expected_bytes(img)
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    size = p.stat().st_size
    dims = "x".join(str(int(n)) for n in img.shape)
    if str(p).endswith(".gz"):
        if need > size * MAX_DEFLATE_RATIO:
            raise InputError(
                f"{p}: the header claims {dims} voxels ({_size(need)}) but the {_size(size)} file cannot hold them; "
                "the file is truncated or its header is corrupt"
            )
    elif size < offset + need:
        raise InputError(
            f"{p}: the header claims {dims} voxels ({_size(need)} from byte {offset}) but the file has {_size(size)}; "
            "the file is truncated or its header is corrupt"
        )


def gzip_complete(path: str | os.PathLike, need: int) -> bool:
    """Whether a .nii.gz inflates to at least ``need`` bytes (header included) with a valid trailer.

    The gzip trailer's length (mod 2^32) answers at once for a usual single-member file;
    otherwise (several members, extra bytes, or a mismatch) the stream is inflated without
    keeping it.
    """
    p = Path(path)
    with open(p, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return False
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == need % (1 << 32):
            return True
    got = 0
    try:
        with gzip.open(p, "rb") as g:
            while chunk := g.read(1 << 22):
                got += len(chunk)
    except (OSError, EOFError, ValueError):
        return False
    return got >= need


def check_memory(img, path: str | os.PathLike) -> None:
    """Refuse a volume whose read needs more memory than is free, before allocating it."""
    free = available_memory()
    need = int(expected_bytes(img) * MEMORY_FACTOR)
    if free is not None and need > free:
        dims = "x".join(str(int(n)) for n in img.shape)
        raise InputError(
            f"{path}: a {dims} volume needs about {_size(need)} of memory, {_size(free)} is free; "
            "free memory or crop the volume"
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _mm(v) -> str:
    return " x ".join(f"{float(x):.4g}" for x in v)


def _size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"
