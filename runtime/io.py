"""NIfTI volume I/O: read to canonical axial slices, write masks back in the input's geometry.

Canonical layout: the image is reoriented to the closest RAS+ orientation and held as an
array of shape (slices, rows, cols) = (S->I axis z, y, x), so ``data[k]`` is always the k-th
axial slice, whatever the file's affine. Reorientation is a view (transpose and flips), so
it costs no copy. Masks are mapped back by the exact inverse and written atomically.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from .errors import InputError, first_line
from .geometry import (
    check_affine,
    check_file_holds,
    check_memory,
    geometry_problems,
    intensity_sample,
    not_ct_reason,
    percentiles_1_99,
    voxel_volume_ml,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
# gzip level 1: masks and phantoms compress well already, and level 1 is several times faster.
GZIP_LEVEL = 1


class Arrival:
    """Which canonical slices of a volume that is still being read are in memory.

    A NIfTI file stores its last axis slowest, so when that axis is the scan's axial one the
    slices arrive in order, from one end of the canonical stack (the superior end when the
    file runs head to foot). ``wait`` blocks until a range of slices is in.
    """

    def __init__(self, num_slices: int, from_end: bool):
        self.num_slices, self.from_end = num_slices, from_end
        self._have = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def publish(self, count: int) -> None:
        """``count`` slices, in file order, are complete."""
        with self._cond:
            self._have = count
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wait(self, lo: int, hi: int) -> None:
        """Block until canonical slices [lo, hi) are in; raise the read's error if it failed first."""
        need = self.num_slices - lo if self.from_end else hi
        with self._cond:
            self._cond.wait_for(lambda: self._have >= need or self._error is not None)
            if self._have < need:
                raise self._error


@dataclass
class Volume:
    """A CT volume in canonical orientation plus what is needed to write results back."""

    data: np.ndarray  # (slices, rows, cols); int16/float32 HU; may be a non-contiguous view
    spacing: tuple[float, float, float]  # mm along (slices, rows, cols)
    affine: np.ndarray  # the file's affine (4x4)
    header: Any  # the file's NIfTI header (geometry and codes are copied to outputs)
    shape: tuple[int, int, int]  # the file's array shape
    ornt: np.ndarray  # nibabel orientation of the file relative to RAS
    path: Path | None = None
    arrival: Arrival | None = None  # for a streamed read: which slices are in yet (see read_volume)
    forced: list[str] = field(default_factory=list)  # checks that failed and were let through with force

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[0])

    def to_file_layout(self, arr: np.ndarray) -> np.ndarray:
        """Map a canonical (slices, rows, cols) array back to the file's voxel layout."""
        return from_canonical(arr, self.ornt)

    def voxel_volume_ml(self) -> float:
        """One voxel in mL, from |det| of the affine (right for tilted and sheared grids too)."""
        return voxel_volume_ml(self.affine)


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def nifti_files(folder: str | os.PathLike) -> list[Path]:
    """The NIfTI files of a folder, unsorted; hidden ones (such as macOS ._ copies) left out."""
    return [p for p in Path(folder).iterdir() if is_nifti(p) and not p.name.startswith(".")]


def case_name(path: str | os.PathLike) -> str:
    """File name without .nii/.nii.gz."""
    name = Path(path).name
    for suf in (".nii.gz", ".nii"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def to_canonical(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """File-layout (i, j, k) array -> canonical (z, y, x) view."""
    ras = apply_orientation(arr, ornt_transform(ornt, _RAS))
    return ras.transpose(2, 1, 0)


def from_canonical(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Canonical (z, y, x) array -> file-layout (i, j, k) view; inverse of to_canonical."""
    ras = arr.transpose(2, 1, 0)
    return apply_orientation(ras, ornt_transform(_RAS, ornt))


def canonical_spacing(affine: np.ndarray, ornt: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along canonical (z, y, x), valid for oblique affines too."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # per file axis
    ras = np.empty(3)
    for file_axis, (ras_axis, _flip) in enumerate(ornt):
        ras[int(ras_axis)] = zooms[file_axis]
    return float(ras[2]), float(ras[1]), float(ras[0])


def load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file (header only) with errors a user can act on."""
    p = Path(path)
    if not p.exists():
        if p.is_symlink() or os.path.lexists(p):
            raise InputError(f"{p}: is a symbolic link that leads nowhere (dangling or a loop); fix the link")
        raise InputError(f"{p}: no such file; check the path")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a .nii or .nii.gz file")
    if not is_nifti(p):
        raise InputError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
    if not p.is_file():  # reading a FIFO or a device would block or never end
        raise InputError(f"{p}: not a regular file (a FIFO, device or socket); give a .nii or .nii.gz file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: cannot read the file (permission denied)")
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # nibabel logs the header fields it mends
            img = nib.load(str(p))
    except Exception as exc:  # nibabel raises several types for garbage/truncated headers
        raise InputError(f"{p}: cannot be read as NIfTI ({first_line(exc)}); is the file complete?") from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{p}: not a NIfTI-1/2 image ({type(img).__name__})")
    return img


def _check_shape(img: nib.Nifti1Image, path: str | os.PathLike) -> None:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise InputError(
            f"{path}: image has {len(shape)} dimensions {tuple(shape)}; expected a 3D volume"
            + (" (split the 4D series into 3D volumes first)" if len(shape) == 4 else "")
        )
    if min(shape[:3]) == 0:
        raise InputError(f"{path}: image shape {tuple(shape)} has an axis of length 0: it holds no voxels")
    if min(shape[:3]) < 2:
        raise InputError(f"{path}: image shape {tuple(shape)} is a single slice; expected a 3D volume")


def _corrupt(path: str | os.PathLike, exc: BaseException) -> InputError:
    return InputError(f"{path}: voxel data is corrupt or truncated ({first_line(exc)}); re-export or re-download it")


_READ_ERRORS = (OSError, EOFError, zlib.error, ValueError)


def read_array(img: nib.Nifti1Image, path: str | os.PathLike) -> np.ndarray:
    """Voxel data in file layout, as int16/uint8 when stored unscaled, else float32."""
    _check_shape(img, path)
    # a huge scale factor overflows to Inf while nibabel scales: that is reported below, in one line
    with np.errstate(all="ignore"):
        try:
            data = _read_gz_isal(img, path)
            if data is None:
                data = np.asanyarray(img.dataobj)
        except _READ_ERRORS as exc:
            raise _corrupt(path, exc) from exc
        if data.ndim == 4:
            data = data[..., 0]
        if data.dtype.kind == "c":
            raise InputError(f"{path}: complex voxel type {data.dtype}; expected real CT values in HU")
        if data.dtype.kind == "f" and data.dtype != np.float32:
            data = data.astype(np.float32)
    if data.dtype.kind == "f":
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        if bad:
            raise InputError(f"{path}: {bad} voxels are NaN or Inf; replace them (e.g. with -1024 HU) and retry")
    elif data.dtype.kind not in "iub":
        raise InputError(f"{path}: unsupported voxel type {data.dtype}")
    return data


def _isal_plain(img: nib.Nifti1Image, path: str | os.PathLike) -> bool:
    """Whether ISA-L can inflate the voxels straight into an array: an unscaled .nii.gz in
    Fortran order, with isal installed."""
    px = img.dataobj
    if not str(path).endswith(".gz") or getattr(px, "order", None) != "F" or not hasattr(px, "offset"):
        return False
    if (px.slope, px.inter) not in ((1.0, 0.0), (None, None)) or px.dtype.kind not in "iuf":
        return False
    try:
        import isal  # noqa: F401
    except ImportError:
        return False
    return True


def _read_gz_isal(
    img: nib.Nifti1Image,
    path: str | os.PathLike,
    out: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray | None:
    """Voxels of an unscaled .nii.gz inflated by ISA-L straight into the array, or None.

    ISA-L (the ``isal`` package) inflates 2-3x faster than zlib, and reading into the final
    array skips nibabel's intermediate buffer: on a 200x512x512 CT this is most of the
    read time. None (nibabel reads it) when isal is missing or the file is not the plain
    case: uncompressed, scaled, or not in Fortran order. ``out`` (Fortran order, the file's
    dtype) receives the voxels; ``progress`` hears how many bytes of them are in.
    """
    if not _isal_plain(img, path):
        return None
    from isal import igzip, isal_zlib

    px = img.dataobj
    if out is None:
        out = np.empty(tuple(int(n) for n in px.shape), px.dtype, order="F")
    buf = memoryview(out.reshape(-1, order="A")).cast("B")
    step = len(buf) if progress is None else 1 << 22
    try:
        with igzip.open(path, "rb") as f:
            skip = int(px.offset)
            while skip:
                chunk = f.read(min(skip, 1 << 20))
                if not chunk:
                    raise EOFError("file ends inside the header")
                skip -= len(chunk)
            got = 0
            while got < len(buf):
                n = f.readinto(buf[got : got + step])
                if not n:
                    raise EOFError(f"expected {len(buf)} bytes of voxel data, file holds {got}")
                got += n
                if progress is not None:
                    progress(got)
            f.read(1)  # reaches the end of the stream, so gzip's CRC and length are checked
    except isal_zlib.error as exc:  # not an OSError, unlike zlib's
        raise OSError(f"corrupt compressed data ({exc})") from exc
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))


def read_volume(
    path: str | os.PathLike,
    on_open: Callable[[Volume], None] | None = None,
    force: bool = False,
    ct: bool = False,
) -> Volume:
    """Read a 3D NIfTI CT and present it as canonical axial slices (no copy).

    Degenerate geometry, a header that promises more than the file or the free memory holds,
    and (``ct``) voxels that cannot be CT in HU are refused; ``force`` lets the implausible
    geometry and the not-CT refusals through and lists their reasons in ``vol.forced``.

    ``on_open`` receives the volume as soon as it can be used. For an unscaled integer
    .nii.gz whose stored slices are axial (the usual CT) that is before its voxels are in:
    they are inflated here after the call, ``vol.arrival`` tells which slices are ready, and
    segmentation can start on the first slices while the rest arrive. Otherwise it receives
    the volume fully read.
    """
    img = load_image(path)
    _check_shape(img, path)
    affine = img.affine
    check_affine(affine, path)
    ornt = io_orientation(affine)
    spacing = canonical_spacing(affine, ornt)
    forced = geometry_problems(img.header, affine, spacing, path)
    if forced and not force:
        raise InputError(f"{path}: {forced[0]}; check the file's header, or pass --force to segment it anyway")
    check_file_holds(img, path)
    check_memory(img, path)
    dtype = img.dataobj.dtype
    stream = (
        on_open is not None
        and int(ornt[2][0]) == 2
        and dtype.kind in "iu"
        and dtype.isnative
        and _isal_plain(img, path)
    )
    data = np.empty(img.shape[:3], dtype, order="F") if stream else read_array(img, path)
    vol = Volume(
        data=to_canonical(data, ornt),
        spacing=spacing,
        affine=affine,
        header=img.header,
        shape=tuple(int(s) for s in data.shape),
        ornt=ornt,
        path=Path(path),
        arrival=Arrival(data.shape[2], from_end=ornt[2][1] < 0) if stream else None,
        forced=forced,
    )
    if not stream and ct:
        check_ct(vol, force)
    if on_open is not None:
        on_open(vol)
    if stream:
        per_slice = data.shape[0] * data.shape[1] * data.itemsize
        try:
            _read_gz_isal(img, path, out=data, progress=lambda got: vol.arrival.publish(got // per_slice))
        except BaseException as exc:
            err = _corrupt(path, exc) if isinstance(exc, _READ_ERRORS) else exc
            vol.arrival.fail(err)
            if err is exc:
                raise
            raise err from exc
        vol.arrival.publish(data.shape[2])
        if ct:
            check_ct(vol, force)
    return vol


def check_ct(vol: Volume, force: bool) -> None:
    """Refuse voxels that cannot be a CT in HU (runtime.geometry.not_ct_reason), unless forced:
    then the reason is listed in ``vol.forced``."""
    reason = not_ct_reason(vol.data)
    if reason and not force:
        raise InputError(f"{vol.path}: {reason}; give a CT in HU, or pass --force to segment it anyway")
    if reason:
        vol.forced.append(reason)


def read_labels(path: str | os.PathLike, num_classes: int = 3) -> Volume:
    """Read a label volume and check its values are integer classes in [0, num_classes)."""
    vol = read_volume(path)
    data = vol.data
    if data.dtype.kind == "f":
        if not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: label file holds non-integer values; expected classes 0..{num_classes - 1}")
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= num_classes:
        values = np.unique(data)
        raise InputError(
            f"{path}: label values {values[:8].tolist()} outside 0..{num_classes - 1} "
            "(0 background, 1 liver, 2 tumour); relabel the file"
        )
    vol.data = data.astype(np.uint8, copy=False)
    return vol


def intensity_warning(data: np.ndarray) -> str | None:
    """A warning when a volume does not look like CT in Hounsfield units (e.g. MR or normalised)."""
    lo, hi = percentiles_1_99(intensity_sample(data))
    if lo > -500 or hi < 0 or hi > 4000:
        return (
            f"intensities span {lo:.0f}..{hi:.0f} (1st-99th percentile), not the -1000..+1000 HU of CT; "
            "results will be meaningless unless this is CT in HU"
        )
    return None


def mask_image(mask_canonical: np.ndarray, ref: Volume) -> nib.Nifti1Image:
    """A uint8 NIfTI image of a canonical mask in the reference's layout, affine and codes."""
    if tuple(mask_canonical.shape) != tuple(ref.data.shape):
        raise ValueError(f"mask shape {mask_canonical.shape} != canonical volume shape {ref.data.shape}")
    # Fortran order: NIfTI stores the first axis fastest, so the file-layout view of a C-order
    # canonical (z, y, x) array usually needs no copy, and nibabel writes it without one
    arr = np.asfortranarray(ref.to_file_layout(mask_canonical.astype(np.uint8, copy=False)))
    return _image_like(arr, ref, 1.0)


def probability_image(prob_canonical: np.ndarray, ref: Volume) -> nib.Nifti1Image:
    """A 4D (i, j, k, class) NIfTI of canonical (class, z, y, x) uint8 probabilities x 255, in
    the reference's layout and affine; its scale slope 1/255 makes readers see [0, 1]."""
    if tuple(prob_canonical.shape[1:]) != tuple(ref.data.shape):
        raise ValueError(f"probability shape {prob_canonical.shape[1:]} != canonical volume shape {ref.data.shape}")
    layout = [ref.to_file_layout(p) for p in prob_canonical]  # views, no copies
    arr = np.empty((*layout[0].shape, len(layout)), np.uint8, order="F")  # one copy, in NIfTI's order
    for c, view in enumerate(layout):
        arr[..., c] = view
    return _image_like(arr, ref, 1.0 / 255.0)


def _image_like(arr: np.ndarray, ref: Volume, slope: float) -> nib.Nifti1Image:
    hdr = ref.header.copy()
    hdr.set_data_dtype(np.uint8)
    img = (
        nib.Nifti1Image(arr, ref.affine, hdr)
        if isinstance(hdr, nib.Nifti1Header)
        else nib.Nifti2Image(arr, ref.affine, hdr)
    )
    qform, qcode = ref.header.get_qform(coded=True)
    sform, scode = ref.header.get_sform(coded=True)
    img.set_qform(qform if qform is not None else ref.affine, code=int(qcode or 0))
    img.set_sform(sform if sform is not None else ref.affine, code=int(scode or 0))
    img.header.set_slope_inter(slope, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    from .outputs import STAMP

    img.header["descrip"] = STAMP  # recognised as ours, so never read back as an input
    return img


def write_mask(mask_canonical: np.ndarray, ref: Volume, path: str | os.PathLike) -> Path:
    """Write a canonical label mask with the input's shape, orientation and affine, atomically."""
    return write_nifti(mask_image(mask_canonical, ref), path)


def nifti_bytes(img: nib.Nifti1Image, path: str | os.PathLike) -> bytes:
    """Serialise an image as .nii or deterministic .nii.gz (no timestamp in the gzip header)."""
    raw = img.to_bytes()
    if not str(path).endswith(".gz"):
        return raw
    try:  # ISA-L deflates a 200x512x512 mask ~10x faster than zlib, and smaller
        from isal import igzip
    except ImportError:
        return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)
    return igzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)


def write_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Write a NIfTI image atomically; same image, same bytes."""
    return write_bytes_atomic(path, nifti_bytes(img, path))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file of ours in the target directory, then rename over the target
    (runtime.outputs.write_group_atomic with one file): a full disk is one DiskFullError, a
    folder that cannot be written one InputError."""
    from .outputs import write_group_atomic

    p = Path(path)
    try:
        write_group_atomic([(p, data)])
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        parent = p.parent if str(p.parent) else Path(".")
        raise InputError(
            f"{parent}: cannot write there ({first_line(exc)}); choose a writable output directory"
        ) from exc
    return p


def json_bytes(obj: Any) -> bytes:
    """Strict, indented JSON as file bytes (see ``json_text``)."""
    return (json_text(obj, indent=2) + "\n").encode()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write strict JSON atomically."""
    return write_bytes_atomic(path, json_bytes(obj))


def json_text(obj: Any, indent: int | None = None) -> str:
    """Strict JSON of ``obj``: NaN and Inf, which JSON has no words for, become null.

    Every JSON file the project writes goes through here, so no reader meets ``NaN``.
    """
    return json.dumps(_finite(obj), indent=indent, default=_json_default, allow_nan=False)


def _finite(o: Any) -> Any:
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, np.ndarray):
        return _finite(o.tolist())
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):  # numpy integers, floats and bools
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def check_creatable_dir(path: str | os.PathLike, option: str = "-o") -> None:
    """Refuse, before any work, an output folder that cannot be made: a path below a regular
    file, or under a folder that cannot be written. Nothing is created here."""
    p = Path(path)
    if not str(path).strip():
        raise InputError(f"{option}: the output path is empty; name an output folder")
    probe = p
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is" if probe == p else f"lies below {probe}, which is"
        raise InputError(f"{p}: {what} a file, not a folder; choose another {option}")
    if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{probe}: cannot write there (permission denied); choose another {option}")
