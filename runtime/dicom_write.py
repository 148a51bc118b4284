"""Write a HU volume (NIfTI layout and RAS affine) as a single-frame CT Image series with pydicom.

It makes realistic DICOM inputs for tests and benchmarks from the synthetic phantoms: one file
per slice along the array's third axis, positions and orientation from the affine (a sheared
affine gives a gantry-tilted series), stored values with a rescale intercept, optional pixel
padding and compression. Needs the ``dicom`` extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dicom import CT_IMAGE, pydicom


@dataclass
class SeriesIds:
    """Identifiers for a generated series (same study and frame of reference unless changed)."""

    study_uid: str
    series_uid: str
    frame_uid: str
    patient_id: str = "PHANTOM01"
    patient_name: str = "Doe^Jane"
    study_date: str = "20260101"
    series_number: int = 3


def new_ids(**kw) -> SeriesIds:
    from pydicom.uid import generate_uid

    pydicom()
    return SeriesIds(generate_uid(), generate_uid(), generate_uid(), **kw)


def write_ct_series(
    hu: np.ndarray,
    affine: np.ndarray,
    folder: str | os.PathLike,
    ids: SeriesIds | None = None,
    names: list[str] | None = None,
    intercepts: list[float] | None = None,
    padding: int | None = None,
    compress: str | None = None,
) -> list[Path]:
    """Write ``hu`` (i, j, k) with RAS ``affine`` as one CT file per k; returns the files in k order.

    ``names`` gives each slice's file name (default ``IM{k:04d}.dcm``); ``intercepts`` a
    per-slice RescaleIntercept (stored = HU - intercept, as uint16); ``padding`` a stored
    PixelPaddingValue written where HU <= -1024 - 1 (outside the scan's circle); ``compress``
    a transfer syntax UID to encode with (pydicom's encoders: RLE, JPEG-LS, JPEG 2000 lossless).
    """
    dcm = pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ids = ids or new_ids()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    iop = np.concatenate([lps[:3, 0] / col_mm, lps[:3, 1] / row_mm])
    n = hu.shape[2]
    written = []
    for k in range(n):
        ipp = (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]
        inter = float(intercepts[k]) if intercepts is not None else -1024.0
        plane = hu[:, :, k].T.astype(np.int32)  # (rows = j, columns = i)
        stored = plane - int(inter)
        if padding is not None:
            stored = np.where(plane < -1024, padding, stored)
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError(f"slice {k}: HU do not fit uint16 with intercept {inter}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = ids.patient_name, ids.patient_id
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = ids.study_uid, ids.study_date, "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
        ds.Modality, ds.Manufacturer = "CT", "unet-edge phantom"
        ds.SeriesInstanceUID, ds.SeriesNumber = ids.series_uid, ids.series_number
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids.frame_uid, ""
        ds.InstanceNumber, ds.AcquisitionNumber = k + 1, 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
        ds.PixelSpacing = [f"{row_mm:.6f}", f"{col_mm:.6f}"]
        ds.SliceThickness = f"{abs(lps[2, 2]):.6f}"
        ds.KVP = "120"
        ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{inter:g}", "1", "HU"
        if padding is not None:
            ds.PixelPaddingValue = int(padding)
        ds.PixelData = np.ascontiguousarray(stored.astype("<u2")).tobytes()
        if compress:
            ds.compress(compress)
        path = folder / (names[k] if names else f"IM{k:04d}.dcm")
        dcm.dcmwrite(path, ds, enforce_file_format=True)
        written.append(path)
    return written


def write_enhanced_ct(
    hu: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    ids: SeriesIds | None = None,
    frame_order: list[int] | None = None,
) -> Path:
    """Write ``hu`` (i, j, k) with RAS ``affine`` as one Enhanced CT (multi-frame) file.

    Geometry goes into the functional groups: orientation, pixel measures and rescale shared,
    one plane position per frame; ``frame_order`` lists which k each frame holds (default 0..n-1).
    """
    dcm = pydicom()
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from .dicom import ENHANCED_CT_IMAGE

    ids = ids or new_ids()
    order = list(range(hu.shape[2])) if frame_order is None else list(frame_order)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    col_mm, row_mm = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])

    def item(**kw) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ENHANCED_CT_IMAGE, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT_IMAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = ids.patient_name, ids.patient_id, "", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = ids.study_uid, ids.study_date, "120000"
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "A1", ""
    ds.Modality, ds.Manufacturer = "CT", "unet-edge phantom"
    ds.SeriesInstanceUID, ds.SeriesNumber = ids.series_uid, ids.series_number
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = ids.frame_uid, ""
    ds.InstanceNumber, ds.ImageType = 1, ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = ids.study_date, "120000", 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = int(hu.shape[1]), int(hu.shape[0]), len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PlaneOrientationSequence=Sequence(
                    [item(ImageOrientationPatient=[f"{v:.6f}" for v in (*lps[:3, 0] / col_mm, *lps[:3, 1] / row_mm)])]
                ),
                PixelMeasuresSequence=Sequence(
                    [item(PixelSpacing=[f"{row_mm:.6f}", f"{col_mm:.6f}"], SliceThickness=f"{abs(lps[2, 2]):.6f}")]
                ),
                PixelValueTransformationSequence=Sequence(
                    [item(RescaleIntercept="-1024", RescaleSlope="1", RescaleType="HU")]
                ),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [
            item(
                PlanePositionSequence=Sequence(
                    [item(ImagePositionPatient=[f"{v:.6f}" for v in (lps @ np.array([0.0, 0.0, k, 1.0]))[:3]])]
                )
            )
            for k in order
        ]
    )
    frames = np.stack([hu[:, :, k].T.astype(np.int32) + 1024 for k in order])
    ds.PixelData = np.ascontiguousarray(frames.astype("<u2")).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dcm.dcmwrite(path, ds, enforce_file_format=True)
    return path
