"""DICOM SEG out: the final mask as a DICOM Segmentation on the source series (highdicom).

Two segments, coded with SNOMED CT: 1 liver (the liver without its tumours, label 1) and 2 liver
tumour (label 2), so that placing segment 1 as 1 and segment 2 as 2 gives back the NIfTI mask.
The object references the source instances and their frame of reference, so viewers (3D Slicer,
OHIF, a PACS) overlay it on the scan; it carries the source's patient and study modules, as the
standard requires, and the algorithm's name, version and model sha256.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, require
from .io import Volume

ALGORITHM_NAME = "unet-edge"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unet-edge")
    except PackageNotFoundError:
        return "0+unknown"


def _codes(hd):
    concept = hd.sr.CodedConcept
    liver = concept("10200004", "SCT", "Liver")
    return {
        "liver": (concept("123037004", "SCT", "Anatomical Structure"), liver, None),
        "tumour": (
            concept("49755003", "SCT", "Morphologically Altered Structure"),
            concept("108369006", "SCT", "Neoplasm"),
            liver,
        ),
    }


def segmentation(vol: Volume, labels: np.ndarray, model_sha256: str | None, series_number: int | None = None):
    """A highdicom Segmentation of the canonical ``labels`` (0/1/2) on the series ``vol`` was read from."""
    from .dicom import DicomVolume

    if not isinstance(vol, DicomVolume):
        raise InputError(f"{vol.path}: --dicom-seg needs a DICOM series as input (this is not one)")
    if vol.resampled:
        raise InputError(
            f"{vol.path}: the series was resampled to uniform spacing (--resample-gaps), so a DICOM SEG cannot lie "
            "on its slices; drop --dicom-seg or --resample-gaps for this series"
        )
    hd = require("highdicom", "dicom", "writing a DICOM SEG", hint='pip install "unet-edge[dicom]"')
    from highdicom.seg import SegmentAlgorithmTypeValues, SegmentationTypeValues, SegmentDescription

    # canonical (z, y, x) -> file layout (column, row, slice) -> (slice, row, column) in the series' order
    planes = np.ascontiguousarray(vol.to_file_layout(labels).transpose(2, 1, 0), dtype=np.uint8)
    algo = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"),
        version=_version(),
        parameters={"model_sha256": model_sha256 or "unknown"},
    )
    segments = []
    for number, (key, label) in enumerate((("liver", "Liver"), ("tumour", "Liver tumour")), start=1):
        category, kind, region = _codes(hd)[key]
        segments.append(
            SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algo,
                tracking_uid=hd.UID(),
                tracking_id=f"{ALGORITHM_NAME} {label.lower()}",
                anatomic_regions=[region] if region is not None else None,
            )
        )
    if len(vol.sources) == 1 and len(vol.frames) > 1:  # enhanced CT: frames in the source's own frame order
        sources = vol.sources
        pixel_array = np.empty_like(planes)
        for k, (_src, frame) in enumerate(vol.frames):
            pixel_array[frame] = planes[k]
    else:
        sources = [vol.sources[src] for src, _frame in vol.frames]
        pixel_array = planes
    first = sources[0]
    number = series_number if series_number is not None else int(first.get("SeriesNumber", 0) or 0) + 1000
    charset = first.get("SpecificCharacterSet") or None  # empty means the default repertoire
    with warnings.catch_warnings():
        # highdicom's warnings quote source attributes (the patient's name among them): keep them out of logs
        warnings.simplefilter("ignore")
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel_array,
            segmentation_type=SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=hd.UID(),
            series_number=max(1, number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=f"{ALGORITHM_NAME} seg-run",
            software_versions=_version(),
            device_serial_number=(model_sha256 or "unknown")[:16],
            series_description="Liver and liver tumour (automatic)",
            content_label="LIVER",
            content_description="Liver and liver tumour segmentation by unet-edge",
            specific_character_set=charset,
        )


def seg_bytes(vol: Volume, labels: np.ndarray, model_sha256: str | None) -> bytes:
    """The DICOM SEG as file bytes (built before anything is written, so a failure leaves no output)."""
    buf = io.BytesIO()
    segmentation(vol, labels, model_sha256).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def prepare(
    enabled: bool, vol: Volume, labels: np.ndarray, model_sha256: str | None, path: Path
) -> tuple[Path, bytes] | None:
    """``(path, SEG bytes)`` when ``--dicom-seg`` was asked for and the input is a DICOM series, else None.
    Built in memory, so it joins the mask's all-or-nothing write (runtime.outputs.write_group_atomic)."""
    from .dicom import DicomVolume

    return (Path(path), seg_bytes(vol, labels, model_sha256)) if enabled and isinstance(vol, DicomVolume) else None
