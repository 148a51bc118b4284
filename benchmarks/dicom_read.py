"""DICOM series read time per slice against the .nii.gz read of the same 512x512 volume.

Both inputs are written from one phantom (the series with pydicom, one uncompressed file per
slice, as scanners export; the NIfTI as seg-run's tests and demo write it), then each is read
to a canonical Volume several times, alternating, and the medians are compared. The series
scan (grouping files by SeriesInstanceUID, done once when seg-run expands its inputs) is timed
on its own, so the read stage is what seg-run reports as "read". Building a DICOM SEG of the
phantom's labels (what --dicom-seg adds to the "write" stage) is timed too.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .stats import summarize


def measure(slices: int = 60, size: int = 512, repeats: int = 5, compress: str | None = None) -> dict:
    """Median read times (ms per slice) of the same volume as a DICOM series and as .nii.gz, and their ratio."""
    from runtime import dicom
    from runtime.dicom_seg import seg_bytes
    from runtime.dicom_write import write_ct_series
    from runtime.io import read_volume, write_nifti
    from runtime.phantoms import canonical, make_phantom, phantom_images

    ph = make_phantom(seed=4321, index=0, size=size, slices=slices)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        img, _ = phantom_images(ph)
        nifti = write_nifti(img, root / "volume.nii.gz")
        write_ct_series(ph.hu, ph.affine, root / "series", compress=compress)
        scan, dcm, nii = [], [], []
        for _ in range(repeats):
            s = time.perf_counter()
            (series,) = dicom.find_series(root / "series")
            scan.append(time.perf_counter() - s)
            s = time.perf_counter()
            vol = dicom.read_series(series)
            dcm.append(time.perf_counter() - s)
            s = time.perf_counter()
            ref = read_volume(nifti, force=True)  # timing the read, not judging the phantom
            nii.append(time.perf_counter() - s)
        labels = np.ascontiguousarray(canonical(ph)[1])
        seg = []
        for _ in range(min(repeats, 3)):  # building a DICOM SEG of the phantom's own labels (seg-run --dicom-seg)
            s = time.perf_counter()
            seg_bytes(vol, labels, "0" * 64)
            seg.append(time.perf_counter() - s)
        if not np.array_equal(vol.data, ref.data):
            raise RuntimeError(
                "the DICOM and NIfTI reads of the phantom differ; the benchmark would compare apples and pears"
            )
    per_slice = lambda xs: summarize(np.array(xs) * 1000 / slices)  # noqa: E731
    d, n = per_slice(dcm), per_slice(nii)
    return {
        "slices": slices,
        "size": size,
        "repeats": repeats,
        "transfer_syntax": compress or "explicit VR little endian (uncompressed)",
        "dicom_read_ms_per_slice": d,
        "dicom_scan_ms_per_slice": per_slice(scan),
        "nifti_read_ms_per_slice": n,
        "dicom_seg_build_ms_per_slice": per_slice(seg),
        "ratio_dicom_to_nifti": d["median"] / n["median"],
        "goal_ratio": 2.0,
    }


def markdown(res: dict) -> str:
    d, s, n = res["dicom_read_ms_per_slice"], res["dicom_scan_ms_per_slice"], res["nifti_read_ms_per_slice"]
    g = res["dicom_seg_build_ms_per_slice"]
    return (
        f"DICOM read of a {res['size']}x{res['size']}x{res['slices']} series ({res['transfer_syntax']}), "
        f"median of {res['repeats']} runs\n\n"
        "| read | ms per slice (median) | min | max |\n|---|---|---|---|\n"
        f"| DICOM series to Volume | {d['median']:.2f} | {d['min']:.2f} | {d['max']:.2f} |\n"
        f"| DICOM folder scan (once per run) | {s['median']:.2f} | {s['min']:.2f} | {s['max']:.2f} |\n"
        f"| .nii.gz to Volume | {n['median']:.2f} | {n['min']:.2f} | {n['max']:.2f} |\n"
        f"| DICOM SEG of the labels, built (--dicom-seg) | {g['median']:.2f} | {g['min']:.2f} | {g['max']:.2f} |\n\n"
        f"DICOM / NIfTI: {res['ratio_dicom_to_nifti']:.2f}x (goal <= {res['goal_ratio']:.0f}x)\n"
    )
