"""DICOM CT series in: find series in a folder and read one into the same canonical Volume as a NIfTI.

Geometry comes from the standard, never from file order: slices are ordered by the projection
of ImagePositionPatient on the normal of ImageOrientationPatient, the slice step comes from those
positions (never SliceThickness), and a gantry-tilted series keeps its shear in the affine.
The LPS geometry is turned into a RAS affine and then goes through runtime.io's reorientation,
exactly as a NIfTI file does. pydicom is imported lazily: it is the ``dicom`` extra.

A series travels through the pipeline as a path ``<folder>/<case>.dcmseries`` (it does not
exist on disk): its stem is the case name, and it can be resolved again from the folder alone,
so it survives being passed to a worker process as a string.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation

from .errors import InputError, first_line, require
from .io import Volume, read_volume, to_canonical

SERIES_SUFFIX = ".dcmseries"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_CT_CLASSES = {CT_IMAGE: "CT", ENHANCED_CT_IMAGE: "enhanced CT"}
_KNOWN_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT dose",
    "1.2.840.10008.5.1.4.1.1.7": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.88.67": "an X-ray radiation dose report",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
}
# positions and orientations are written with ~6 significant digits: tolerances allow for that
ORIENTATION_TOL = 1e-4
SPACING_REL_TOL = 0.01
PADDING_HU = -1024
# transfer syntax -> the pixel-data plugin that decodes it
_PLUGINS = {
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls",
    "1.2.840.10008.1.2.4.81": "pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
_HEADER_TAGS = [
    "SOPClassUID",
    "Modality",
    "ImageType",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "StudyDate",
    "SeriesNumber",
    "SeriesDescription",
]


def pydicom():
    """The pydicom module, or a one-line error naming the extra."""
    return require("pydicom", "dicom", "reading DICOM", hint='pip install "unet-edge[dicom]"')


def _blocked(module: str) -> bool:
    import sys

    return module in sys.modules and sys.modules[module] is None


def is_series_path(path: str | os.PathLike) -> bool:
    return str(path).endswith(SERIES_SUFFIX)


@dataclass
class Series:
    """One DICOM series found in a folder: its files and the identifiers a report needs."""

    folder: Path
    uid: str
    study_uid: str
    files: list[Path]
    patient_id: str
    study_date: str
    series_number: str
    case: str = ""

    @property
    def path(self) -> Path:
        return self.folder / f"{self.case}{SERIES_SUFFIX}"


@dataclass
class DicomVolume(Volume):
    """A canonical Volume read from a DICOM series, with what a report and a DICOM SEG need."""

    series: Series | None = None
    sources: list[Any] = field(default_factory=list)  # source datasets (no pixel data), one per file
    frames: list[tuple[int, int]] = field(default_factory=list)  # per file-layout slice: (source, frame)
    sheared: bool = False
    resampled: bool = False  # interpolated onto a uniform grid (--resample-gaps): not on the source slices

    def report(self) -> dict:
        """The identifiers the case's JSON records (never the patient's name)."""
        s = self.series
        return {
            "input_format": "dicom",  # so the "read" timing is the DICOM read
            "dicom": {
                "study_instance_uid": s.study_uid,
                "series_instance_uid": s.uid,
                "series_number": s.series_number,
                "files": len(s.files),
                "folder": str(s.folder),
                "gantry_tilt_sheared": self.sheared,
                "resampled_to_uniform_spacing": self.resampled,
            },
        }


def _sanitise(text: str, fallback: str) -> str:
    out = re.sub(r"[^A-Za-z0-9.-]+", "-", str(text or "").strip()).strip("-.")
    return out[:48] or fallback


def _tty() -> bool:
    import sys

    return sys.stderr.isatty()


def _looks_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom", ".ima")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def find_series(folder: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[Series]:
    """The CT image series under ``folder`` (searched recursively), grouped by SeriesInstanceUID.

    Everything else (localizers, SEG, SR, RTSTRUCT, dose reports, DICOMDIR, other modalities)
    is skipped with one line through ``warn``. Case names ``<PatientID>_<StudyDate>_<SeriesNumber>``
    are made unique with a digest of the series UID where two series would share one.
    """
    dcm = pydicom()
    folder = Path(folder)
    warn = warn or (lambda msg: None)
    groups: dict[str, list[tuple[Path, Any]]] = {}
    skipped: dict[tuple[str, str], list[Path]] = {}
    not_dicom = 0
    from tqdm import tqdm

    files = _files(folder)
    for p in tqdm(files, desc=f"scanning {folder.name or folder}", unit="file", leave=False, disable=not _tty()):
        if p.name.upper() == "DICOMDIR":
            warn(f"{p}: skipped, a DICOMDIR index (the images it lists are read from their own files)")
            continue
        try:
            ds = dcm.dcmread(p, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except Exception:  # not DICOM at all, or a header too broken to parse
            if _looks_dicom(p):
                warn(f"{p}: skipped, its DICOM header cannot be read (corrupt or truncated file)")
            else:
                not_dicom += 1
            continue
        sop = str(getattr(ds, "SOPClassUID", ""))
        uid = str(getattr(ds, "SeriesInstanceUID", "")) or f"no-series-uid:{p.parent}"
        why = None
        if sop not in _CT_CLASSES:
            why = _KNOWN_CLASSES.get(sop) or f"not a CT image (modality {getattr(ds, 'Modality', '?')})"
        elif "LOCALIZER" in [str(v).upper() for v in (getattr(ds, "ImageType", None) or [])]:
            why = "a localizer/scout (ImageType LOCALIZER)"
        if why:
            skipped.setdefault((uid, why), []).append(p)
            continue
        groups.setdefault(uid, []).append((p, ds))
    for (_uid, why), paths in skipped.items():
        where = paths[0] if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more file(s) of its series"
        warn(f"{where}: skipped, {why}")
    if not_dicom:
        warn(f"{folder}: {not_dicom} file(s) that are not DICOM were ignored")
    series = []
    for uid, members in sorted(groups.items()):
        ds = members[0][1]
        series.append(
            Series(
                folder=folder,
                uid=uid,
                study_uid=str(getattr(ds, "StudyInstanceUID", "")),
                files=[p for p, _ in members],
                patient_id=str(getattr(ds, "PatientID", "") or ""),
                study_date=str(getattr(ds, "StudyDate", "") or ""),
                series_number=str(getattr(ds, "SeriesNumber", "") or ""),
            )
        )
    _name(series)
    return series


def _name(series: list[Series]) -> None:
    base = [
        "_".join((_sanitise(s.patient_id, "anon"), _sanitise(s.study_date, "nodate"), _sanitise(s.series_number, "S")))
        for s in series
    ]
    for s, b in zip(series, base):
        clash = base.count(b) > 1
        s.case = f"{b}_{hashlib.sha1(s.uid.encode()).hexdigest()[:8]}" if clash else b


def series_inputs(folder: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[Path]:
    """Pipeline paths (``<folder>/<case>.dcmseries``) for the CT series under ``folder``.

    Without pydicom: [] for a folder with no DICOM files, else a one-line error naming the extra.
    """
    import importlib.util

    if importlib.util.find_spec("pydicom") is None or _blocked("pydicom"):
        if any(_looks_dicom(p) for p in _files(Path(folder))):
            pydicom()  # raises, naming the extra
        return []
    found = find_series(folder, warn)
    for s in found:
        _CACHE[str(s.path)] = s
    return [s.path for s in found]


_CACHE: dict[str, Series] = {}


def file_input(path: Path) -> Path:
    """A single DICOM file given as input stands for its series (found in its folder); other paths pass through."""
    if not (path.is_file() and _looks_dicom(path)):
        return path
    pydicom()
    for s in find_series(path.parent):
        if path.resolve() in {f.resolve() for f in s.files}:
            _CACHE[str(s.path)] = s
            return s.path
    raise InputError(f"{path}: not part of a CT image series (a localizer, SEG, report or other object?)")


def resolve(path: str | os.PathLike) -> Series:
    """The Series behind a ``<folder>/<case>.dcmseries`` path (rescanning the folder when needed)."""
    key = str(path)
    if key not in _CACHE:
        for s in find_series(Path(path).parent):
            _CACHE[str(s.path)] = s
    if key not in _CACHE:
        raise InputError(f"{path}: no DICOM series of that name in {Path(path).parent}; pass the folder itself")
    return _CACHE[key]


def series_sha256(path: str | os.PathLike) -> str:
    """One digest for a series path: sha256 over its files' sha256 in file-name order (what
    --skip-existing checks a DICOM case's outputs against). A FIFO or device is refused."""
    import hashlib

    from .models import file_sha256

    h = hashlib.sha256()
    for f in sorted(resolve(path).files):
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def read_input(path: str | os.PathLike, on_open: Callable[[Volume], None] | None = None) -> Volume:
    """Read a NIfTI file or a DICOM series path into a canonical Volume (the pipeline's reader)."""
    if is_series_path(path):
        vol = read_series(resolve(path))
        if on_open is not None:
            on_open(vol)
        return vol
    return read_volume(path, on_open=on_open)


@dataclass
class _Frame:
    source: int  # index into the series' files
    frame: int  # frame within that file (0 for single-frame CT)
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]
    slope: float
    intercept: float


def _attr(items, name: str):
    """The first value of ``name`` found in a list of datasets/sequence items (functional groups)."""
    for it in items:
        if it is not None and name in it:
            return it[name].value
    return None


def _frames_of(ds, index: int, path: Path) -> list[_Frame]:
    """One _Frame per image plane of a CT or enhanced CT dataset."""

    def plane(items: list, frame: int) -> _Frame:
        names = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
        ipp, iop, sp = (_attr(items, n) for n in names)
        missing = [n for n, v in zip(names, (ipp, iop, sp)) if v is None]
        if missing:
            raise InputError(f"{path}: lacks {', '.join(missing)}; the slice cannot be placed in space")
        if len(ipp) != 3 or len(iop) != 6 or len(sp) != 2:
            raise InputError(f"{path}: malformed ImagePositionPatient, ImageOrientationPatient or PixelSpacing")
        slope, inter = _attr(items, "RescaleSlope"), _attr(items, "RescaleIntercept")
        return _Frame(
            index,
            frame,
            np.array([float(v) for v in ipp]),
            np.array([float(v) for v in iop]),
            (float(sp[0]), float(sp[1])),
            (int(ds.Rows), int(ds.Columns)),
            1.0 if slope is None else float(slope),
            0.0 if inter is None else float(inter),
        )

    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced CT: geometry lives in functional groups
        shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
        out = []
        for k, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            items = []
            for group in (fg, shared):
                if group is None:
                    continue
                for seq in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence"):
                    if seq in group:
                        items.append(group[seq][0])
                if "PixelValueTransformationSequence" in group:
                    items.append(group.PixelValueTransformationSequence[0])
            out.append(plane(items, k))
        return out
    return [plane([ds], 0)]


def _pixels(ds, path: Path) -> np.ndarray:
    """Stored pixel values (frames, rows, cols), decoded by pydicom's handlers."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError(f"{path}: holds no pixel data; re-export the series with its images")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    try:
        arr = ds.pixel_array
    except Exception as exc:
        plugin = _PLUGINS.get(ts)
        name = getattr(ds.file_meta.TransferSyntaxUID, "name", ts) if ts else "unknown"
        msg = first_line(exc)
        if plugin and ("missing" in msg.lower() or "plugin" in msg.lower() or "handler" in msg.lower()):
            raise InputError(
                f"{path}: pixel data is compressed as {name} and no decoder is installed; "
                f'pip install {plugin} (or pip install "unet-edge[dicom]")'
            ) from exc
        raise InputError(f"{path}: pixel data cannot be decoded ({msg}); the file may be corrupt or truncated") from exc
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(f"{path}: pixel data has shape {arr.shape}; expected grey-scale CT frames")
    return arr


def _check_same(frames: list[_Frame], files: list[Path]) -> None:
    ref = frames[0]
    for what, key in (
        ("image size", lambda f: f.size),
        ("pixel spacing", lambda f: tuple(round(v, 4) for v in f.spacing)),
    ):
        values = {}
        for f in frames:
            values.setdefault(key(f), f)
        if len(values) > 1:
            (a, fa), (b, fb) = list(values.items())[:2]
            raise InputError(
                f"mixed {what}s in one series: {files[fa.source].name} has {a}, {files[fb.source].name} has {b}; "
                "export each image set as its own series"
            )
    for f in frames:
        if np.abs(f.iop - ref.iop).max() > ORIENTATION_TOL:
            raise InputError(
                f"mixed orientations in one series: {files[ref.source].name} and {files[f.source].name} differ in "
                "ImageOrientationPatient; export each orientation as its own series"
            )


def _order(
    frames: list[_Frame], files: list[Path], resample: bool = False
) -> tuple[list[_Frame], np.ndarray, np.ndarray, np.ndarray | None]:
    """Frames sorted along the normal, their positions along it, the mean step vector between the
    volume's slices (LPS, mm), and with ``resample`` on a non-uniform series, the uniform positions to
    interpolate to (else None)."""
    iop = frames[0].iop
    normal = np.cross(iop[:3], iop[3:])
    d = np.array([f.ipp @ normal for f in frames])
    order = np.argsort(d, kind="stable")
    frames, d = [frames[i] for i in order], d[order]
    if len(frames) < 2:
        raise InputError(f"{files[0]}: the series has a single slice; a 3D volume needs at least 2")
    gaps = np.diff(d)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise InputError(
            f"{files[a.source].name} and {files[b.source].name} lie at the same position ({d[dup[0]]:.2f} mm "
            "along the normal); the folder mixes two acquisitions of one series"
        )
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SPACING_REL_TOL * step + 1e-3)
    if bad.size and resample:
        n = int(round((d[-1] - d[0]) / step)) + 1
        return frames, d, (frames[-1].ipp - frames[0].ipp) / (n - 1), np.linspace(d[0], d[-1], n)
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"non-uniform slice spacing: a gap of {gaps[i]:.2f} mm (expected {step:.2f} mm) after position "
            f"{d[i]:.2f} mm along the normal ({files[frames[i].source].name}); "
            f"{_gap_kind(gaps[i], step)}; re-export the complete series, or pass --resample-gaps"
        )
    return frames, d, (frames[-1].ipp - frames[0].ipp) / (len(frames) - 1), None


def _gap_kind(gap: float, step: float) -> str:
    if gap > 1.5 * step:
        return f"about {round(gap / step) - 1} slice(s) missing"
    return "slices unevenly spaced" if gap > step else "slices closer than the rest"


def _header(affine: np.ndarray, shape: tuple[int, int, int], zooms: np.ndarray, sheared: bool) -> nib.Nifti1Header:
    img = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), None)
    hdr = img.header
    hdr.set_data_shape(shape)
    hdr.set_xyzt_units("mm")
    hdr.set_sform(affine, code=1)  # scanner coordinates
    if sheared:  # a quaternion cannot hold a shear: only the sform describes the grid
        hdr.set_qform(None, code=0)
        hdr.set_zooms(tuple(float(z) for z in zooms))
    else:
        hdr.set_qform(affine, code=1)
    return hdr


_RESAMPLE_GAPS = False


def set_resample_gaps(enabled: bool) -> None:
    """seg-run --resample-gaps: interpolate series with a missing slice or uneven spacing instead of refusing them."""
    global _RESAMPLE_GAPS
    _RESAMPLE_GAPS = bool(enabled)


def _resample(data: np.ndarray, positions: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Slices at sorted ``positions`` linearly interpolated to ``targets`` (mm along the normal)."""
    lo = np.clip(np.searchsorted(positions, targets, side="right") - 1, 0, len(positions) - 2)
    w = ((targets - positions[lo]) / (positions[lo + 1] - positions[lo])).astype(np.float32)
    out = np.empty((len(targets), *data.shape[1:]), data.dtype)
    for k, (i, wk) in enumerate(zip(lo, w)):
        plane = data[i] * (1 - wk) + data[i + 1] * wk
        out[k] = np.rint(plane) if data.dtype.kind == "i" else plane
    return out


def read_series(series: Series, resample: bool | None = None) -> DicomVolume:
    """Read one CT series into a canonical DicomVolume (HU; int16 when the rescale allows, else float32).

    ``resample`` (default: as set by ``set_resample_gaps``) interpolates a series with uneven
    spacing onto a uniform grid; such a volume no longer lies on the source slices (no DICOM SEG).
    """
    dcm = pydicom()
    files = series.files
    datasets, frames, pixels = [], [], []
    for i, p in enumerate(files):
        try:
            ds = dcm.dcmread(p)
        except Exception as exc:
            msg = first_line(exc)
            raise InputError(f"{p}: cannot be read as DICOM ({msg}); the file may be corrupt or truncated") from exc
        planes = _frames_of(ds, i, p)
        frames += planes
        arr = _pixels(ds, p)
        if len(arr) != len(planes):
            raise InputError(f"{p}: holds {len(arr)} frames but geometry for {len(planes)}; re-export the series")
        pad = ds.get("PixelPaddingValue")
        if pad is not None:
            lim = ds.get("PixelPaddingRangeLimit", pad)
            lo, hi = min(int(pad), int(lim)), max(int(pad), int(lim))
            arr = np.where((arr >= lo) & (arr <= hi), np.iinfo(np.int32).min, arr.astype(np.int32))
        pixels.append(arr)
        for tag in ("PixelData", "FloatPixelData"):
            if tag in ds:
                del ds[tag]
        datasets.append(ds)
    try:
        _check_same(frames, files)
        frames, positions, step, targets = _order(frames, files, _RESAMPLE_GAPS if resample is None else resample)
    except InputError as exc:
        where = f"{files[0].parent} (series {series.case or series.uid})"
        raise InputError(f"{where}: {exc}" if not str(exc).startswith(str(files[0].parent)) else str(exc)) from None
    ref = frames[0]
    rows, cols = ref.size
    n = len(frames)
    integral = all(f.slope == 1.0 and f.intercept == round(f.intercept) for f in frames)
    data = np.empty((n, rows, cols), np.int16 if integral else np.float32)  # (slice, row, col)
    for k, f in enumerate(frames):
        raw = pixels[f.source][f.frame]
        padded = raw == np.iinfo(np.int32).min if raw.dtype == np.int32 else None
        hu = raw * f.slope + f.intercept if not integral else raw.astype(np.int32) + int(f.intercept)
        if padded is not None:
            hu = np.where(padded, PADDING_HU, hu)
        if integral and (hu.min() < -32768 or hu.max() > 32767):
            raise InputError(f"{files[f.source]}: values outside the int16 range after rescale; is this CT in HU?")
        data[k] = hu
    if targets is not None:
        data = _resample(data, positions, targets)
    # LPS voxel (i = column, j = row, k = slice) -> mm; then LPS -> RAS as NIfTI holds it
    r, c = ref.iop[:3], ref.iop[3:]
    lps = np.eye(4)
    lps[:3, 0] = r * ref.spacing[1]
    lps[:3, 1] = c * ref.spacing[0]
    lps[:3, 2] = step
    lps[:3, 3] = ref.ipp
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    normal = np.cross(r, c)
    sheared = bool(np.linalg.norm(step - (step @ normal) * normal) > 1e-3 * np.linalg.norm(step))
    file_layout = data.transpose(2, 1, 0)  # (i, j, k) view of the (slice, row, col) array
    ornt = io_orientation(affine)
    # spacing along the slice axis is the distance between planes, so spacing products are |det|
    zooms = np.array([ref.spacing[1], ref.spacing[0], abs(float(step @ normal))])
    canon = np.empty(3)
    for file_axis, (ras_axis, _flip) in enumerate(ornt):
        canon[int(ras_axis)] = zooms[file_axis]
    return DicomVolume(
        data=to_canonical(file_layout, ornt),
        spacing=(float(canon[2]), float(canon[1]), float(canon[0])),
        affine=affine,
        header=_header(affine, file_layout.shape, np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), sheared),
        shape=tuple(int(s) for s in file_layout.shape),
        ornt=ornt,
        path=series.path,
        series=series,
        sources=datasets,
        frames=[] if targets is not None else [(f.source, f.frame) for f in frames],
        sheared=sheared,
        resampled=targets is not None,
    )


def report_fields(vol: Volume) -> dict:
    """Extra JSON fields for a case read from DICOM (empty for NIfTI)."""
    return vol.report() if isinstance(vol, DicomVolume) else {}


def nifti_image(vol: Volume) -> nib.Nifti1Image:
    """The volume in its series' own geometry (file layout and affine) as a NIfTI image."""
    arr = np.asfortranarray(vol.to_file_layout(vol.data))
    img = nib.Nifti1Image(arr, vol.affine, vol.header.copy())
    img.header.set_data_dtype(arr.dtype)
    sform, scode = vol.header.get_sform(coded=True)
    qform, qcode = vol.header.get_qform(coded=True)
    img.set_sform(vol.affine, code=int(scode or 1))
    img.set_qform(qform if qcode else None, code=int(qcode or 0))
    img.header.set_slope_inter(1.0, 0.0)
    return img


def convert_to_nifti(paths: list[Path], out_dir: Path, echo: Callable[..., None]) -> int:
    """``seg-run --to-nifti``: write each DICOM series as ``<case>.nii.gz``; returns the number that failed."""
    from .errors import SegError
    from .io import write_nifti

    failed = 0
    for p in paths:
        try:
            if not is_series_path(p):
                raise InputError(f"{p}: --to-nifti converts DICOM series; this input is not one")
            vol = read_series(resolve(p))
            dest = write_nifti(nifti_image(vol), Path(out_dir) / f"{Path(p).stem}.nii.gz")
            echo(f"{p}: {vol.num_slices} slices, spacing {', '.join(f'{v:.3g}' for v in vol.spacing)} mm -> {dest}")
        except SegError as exc:
            failed += 1
            echo(f"error: {exc}", err=True)
    return failed
