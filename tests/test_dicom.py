"""DICOM CT series in and DICOM SEG out: series written with pydicom from phantoms in tmp_path, and
a real GE series with a dcmqi SEG of its liver."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom", reason='needs the dicom extra: pip install "unet-edge[dicom]"')
pytest.importorskip("highdicom", reason='needs the dicom extra: pip install "unet-edge[dicom]"')

import pydicom  # noqa: E402

from benchmarks.tiny_models import threshold_model  # noqa: E402
from runtime import dicom  # noqa: E402
from runtime.cli import cli  # noqa: E402
from runtime.dicom_write import new_ids, write_ct_series  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from runtime.io import read_labels, read_volume, to_canonical, write_nifti  # noqa: E402
from runtime.phantoms import canonical, make_phantom, phantom_images  # noqa: E402
from tests.conftest import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dicom"
needs_real = pytest.mark.skipif(not (REAL / "liver_seg.dcm").exists(), reason=f"real DICOM data not found at {REAL}")
PATIENT_NAME = "Doe^Jane"


@pytest.fixture(autouse=True)
def _no_resampling_left_over():
    yield
    dicom.set_resample_gaps(False)  # seg-run --resample-gaps sets it for the process


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(3, 0, size=64, slices=16)


@pytest.fixture
def model(tmp_path):
    return threshold_model(tmp_path / "m.onnx", tumour_level=0.7)


def only_series(folder) -> dicom.Series:
    found = dicom.find_series(folder)
    assert len(found) == 1, found
    return found[0]


def reversed_lps(ph):
    """The same world content stored with its slice axis reversed (files run the other way)."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, ph.hu.shape[2] - 1
    return ph.hu[:, :, ::-1].copy(), ph.affine @ flip


def sheared(ph, degrees: float = 20.0):
    """A gantry tilt: each slice shifted along y by tan(tilt) x the slice step; planes stay axial."""
    aff = ph.affine.copy()
    aff[1, 2] = np.tan(np.radians(degrees)) * aff[2, 2]
    return ph.hu, aff


# ---- geometry -------------------------------------------------------------------------------------------


def test_series_reads_to_the_same_canonical_volume_as_the_nifti(tmp_path, phantom):
    hu, _, spacing = canonical(phantom)
    names = [f"{n:03d}.dcm" for n in np.random.default_rng(1).permutation(phantom.hu.shape[2])]
    write_ct_series(phantom.hu, phantom.affine, tmp_path / "shuffled", names=names)  # file order means nothing
    rev_hu, rev_aff = reversed_lps(phantom)
    write_ct_series(rev_hu, rev_aff, tmp_path / "reversed")
    for folder in ("shuffled", "reversed"):
        vol = dicom.read_series(only_series(tmp_path / folder))
        np.testing.assert_array_equal(vol.data, hu)
        np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-5)
        assert not vol.sheared


def test_per_slice_rescale_and_padding(tmp_path, phantom):
    hu = phantom.hu.copy()
    hu[:4, :4, :] = -3024  # outside the scan's circle: stored as the padding value
    intercepts = [-1024 if k % 2 else -1100 for k in range(hu.shape[2])]
    write_ct_series(hu, phantom.affine, tmp_path / "s", intercepts=intercepts, padding=65535)
    vol = dicom.read_series(only_series(tmp_path / "s"))
    expect = np.where(hu < -1024, -1024, hu)
    np.testing.assert_array_equal(vol.to_file_layout(vol.data), expect)


def test_tilted_series_gets_a_sheared_affine_and_right_volumes(tmp_path, phantom):
    hu, aff = sheared(phantom)
    write_ct_series(hu, aff, tmp_path / "tilted")
    vol = dicom.read_series(only_series(tmp_path / "tilted"))
    assert vol.sheared
    np.testing.assert_allclose(vol.affine[:3, 2], aff[:3, 2], atol=1e-4)
    # voxel volume is |det| (the distance between planes x pixel area), not the slant step
    assert np.prod(vol.spacing) == pytest.approx(abs(np.linalg.det(aff[:3, :3])), rel=1e-5)
    assert np.prod(vol.spacing) == pytest.approx(np.prod(canonical(phantom)[2]), rel=1e-5)
    sform, scode = vol.header.get_sform(coded=True)
    assert scode == 1 and np.allclose(sform, vol.affine, atol=1e-4)


@needs_real
def test_real_series_geometry_is_the_one_its_seg_implies():
    import highdicom as hd

    vol = dicom.read_series(only_series(REAL / "ct-3slice"))
    theirs = hd.seg.segread(REAL / "liver_seg.dcm")
    positions = np.array(
        [
            [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
            for fg in theirs.PerFrameFunctionalGroupsSequence
        ]
    )
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    ours = np.array([(lps @ [0, 0, k, 1])[:3] for k in range(vol.shape[2])])
    assert sorted(map(tuple, np.round(ours, 3))) == sorted(map(tuple, np.round(positions, 3)))
    spacing = theirs.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert vol.spacing == pytest.approx(
        (float(spacing.SpacingBetweenSlices), *map(float, spacing.PixelSpacing)), rel=1e-5
    )
    assert vol.data.dtype == np.int16 and vol.data.min() == -1024  # the GE padding (-2000 stored) is air
    # their liver outline sits on liver-like HU in our volume: its median is soft tissue
    uids = [vol.sources[src].SOPInstanceUID for src, _frame in vol.frames]  # in our slice order
    mask = theirs.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0]
    liver_hu = vol.to_file_layout(vol.data).transpose(2, 1, 0)[mask > 0]
    assert 30 < np.median(liver_hu) < 200


@needs_real
def test_our_seg_of_the_real_series_matches_theirs_in_frame_of_reference_and_planes(tmp_path):
    import highdicom as hd

    from runtime.dicom_seg import seg_bytes

    vol = dicom.read_series(only_series(REAL / "ct-3slice"))
    theirs = hd.seg.segread(REAL / "liver_seg.dcm")
    uids = [vol.sources[src].SOPInstanceUID for src, _frame in vol.frames]  # in our slice order
    planes = theirs.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], ignore_spatial_locations=True
    )[..., 0]
    labels = to_canonical(planes.transpose(2, 1, 0).astype(np.uint8), vol.ornt)
    (tmp_path / "ours.dcm").write_bytes(seg_bytes(vol, labels, "0" * 64))
    ours = hd.seg.segread(tmp_path / "ours.dcm")
    assert ours.FrameOfReferenceUID == theirs.FrameOfReferenceUID

    def frames(seg):
        return sorted(
            tuple(round(float(v), 3) for v in fg.PlanePositionSequence[0].ImagePositionPatient)
            for fg in seg.PerFrameFunctionalGroupsSequence
        )

    assert frames(ours) == frames(theirs)
    back = ours.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    np.testing.assert_array_equal(back, planes)
    assert ours.StudyInstanceUID == vol.series.study_uid
    refs = {r.ReferencedSOPInstanceUID for s in ours.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert refs == set(uids)


# ---- seg-run end to end -----------------------------------------------------------------------------------


def nifti_reference(tmp_path, ph, model, capsys):
    img, _ = phantom_images(ph)
    (tmp_path / "nifti").mkdir()
    write_nifti(img, tmp_path / "nifti" / "case.nii.gz")
    args = [tmp_path / "nifti", "-m", model, "-o", tmp_path / "out_nifti", "--no-postprocess"]
    code, out = run_main(cli, args, capsys)
    assert code == 0, out
    return read_labels(tmp_path / "out_nifti" / "case_seg.nii.gz").data, json.loads(
        (tmp_path / "out_nifti" / "case.json").read_text()
    )


@pytest.mark.parametrize("variant", ["plain", "shuffled", "reversed"])
def test_seg_run_on_a_series_agrees_with_the_nifti_path(tmp_path, phantom, model, capsys, variant):
    import highdicom as hd

    ref_mask, ref = nifti_reference(tmp_path, phantom, model, capsys)
    assert ref["liver_ml"] > 10 and ref["tumor_ml"] > 0  # the comparison means something
    hu, aff = reversed_lps(phantom) if variant == "reversed" else (phantom.hu, phantom.affine)
    n = hu.shape[2]
    names = [f"x{k:03d}.dcm" for k in np.random.default_rng(5).permutation(n)] if variant == "shuffled" else None
    ids = new_ids(patient_id="PAT 7/A", study_date="20260102", series_number=4)
    write_ct_series(hu, aff, tmp_path / "study" / "series", ids=ids, names=names)
    args = [tmp_path / "study", "-m", model, "-o", tmp_path / "out", "--dicom-seg", "--no-postprocess"]
    code, out = run_main(cli, args, capsys)
    assert code == 0, out
    case = "PAT-7-A_20260102_4"
    mask = read_labels(tmp_path / "out" / f"{case}_seg.nii.gz")
    assert (mask.data == ref_mask).mean() >= 0.9999
    report = json.loads((tmp_path / "out" / f"{case}.json").read_text())
    for key in ("liver_ml", "tumor_ml"):
        assert report[key] == pytest.approx(ref[key], rel=1e-3)
    assert report["dicom"]["series_instance_uid"] == ids.series_uid
    assert report["dicom"]["study_instance_uid"] == ids.study_uid
    assert report["timings_s"]["read"] > 0 and report["input_format"] == "dicom"
    # the patient's name appears in no output name, report or log line; the SEG carries it as the standard asks
    assert "Doe" not in out and all("Doe" not in p.name for p in (tmp_path / "out").iterdir())
    assert "Doe" not in (tmp_path / "out" / f"{case}.json").read_text()
    seg = hd.seg.segread(tmp_path / "out" / f"{case}_seg.dcm")
    assert str(seg.PatientName) == PATIENT_NAME and seg.FrameOfReferenceUID == ids.frame_uid
    # SEG frames placed on the source series reproduce the NIfTI mask voxel for voxel
    # the mask's slice axis runs inferior to superior (axial series: IPP z ascending), whatever the files' order
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in (tmp_path / "study" / "series").iterdir()]
    uids = [ds.SOPInstanceUID for ds in sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))]
    assert len(uids) == n
    planes = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    import nibabel as nib

    written = np.asanyarray(nib.load(tmp_path / "out" / f"{case}_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(planes.transpose(2, 1, 0), written)
    assert np.count_nonzero(planes == 2) > 0 and np.count_nonzero(planes == 1) > 0
    codes = {s.SegmentNumber: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert codes == {1: "10200004", 2: "108369006"}
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "unet-edge" and report["model_sha256"] in str(algo.AlgorithmParameters)


def test_tilted_series_segments_to_the_same_ml(tmp_path, phantom, model, capsys):
    _, ref = nifti_reference(tmp_path, phantom, model, capsys)
    hu, aff = sheared(phantom)
    write_ct_series(hu, aff, tmp_path / "tilted")
    code, out = run_main(cli, [tmp_path / "tilted", "-m", model, "-o", tmp_path / "out", "--no-postprocess"], capsys)
    assert code == 0, out
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")]
    assert report["liver_ml"] == pytest.approx(ref["liver_ml"], rel=1e-3)
    assert report["dicom"]["gantry_tilt_sheared"] is True


def test_two_series_a_localizer_and_a_seg_in_one_folder(tmp_path, phantom, model, capsys):
    a, b = new_ids(series_number=2), new_ids(series_number=5)
    write_ct_series(phantom.hu, phantom.affine, tmp_path / "in", ids=a, names=[f"a{k}.dcm" for k in range(16)])
    write_ct_series(phantom.hu[:, :, :8], phantom.affine, tmp_path / "in" / "sub", ids=b)
    loc = pydicom.dcmread(tmp_path / "in" / "a0.dcm")
    loc.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    loc.SeriesInstanceUID, loc.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    loc.save_as(tmp_path / "in" / "scout.dcm")
    if (REAL / "liver_seg.dcm").exists():
        shutil.copy(REAL / "liver_seg.dcm", tmp_path / "in" / "seg.dcm")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM")
    code, out = run_main(cli, [tmp_path / "in", "-m", model, "-o", tmp_path / "out"], capsys)
    assert code == 0, out
    assert "scout.dcm: skipped, a localizer/scout" in out
    if (REAL / "liver_seg.dcm").exists():
        assert "seg.dcm: skipped, a segmentation (SEG)" in out
    reports = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert set(reports) == {"PHANTOM01_20260101_2.json", "PHANTOM01_20260101_5.json"}
    assert reports["PHANTOM01_20260101_5.json"]["slices"] == 8


def test_colliding_case_names_are_made_unique(tmp_path, phantom):
    for name in ("a", "b"):
        write_ct_series(phantom.hu[:, :, :4], phantom.affine, tmp_path / name, ids=new_ids())
    cases = [s.case for s in dicom.find_series(tmp_path)]
    assert len(set(cases)) == 2 and all(c.startswith("PHANTOM01_20260101_3_") for c in cases)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"])
def test_compressed_copy_reads_the_same(tmp_path, phantom, syntax):
    write_ct_series(phantom.hu[:, :, :4], phantom.affine, tmp_path / "raw", ids=new_ids())
    write_ct_series(phantom.hu[:, :, :4], phantom.affine, tmp_path / "packed", ids=new_ids(), compress=syntax)
    assert str(pydicom.dcmread(tmp_path / "packed" / "IM0000.dcm").file_meta.TransferSyntaxUID) == syntax
    raw = dicom.read_series(only_series(tmp_path / "raw"))
    packed = dicom.read_series(only_series(tmp_path / "packed"))
    np.testing.assert_array_equal(packed.data, raw.data)


def test_to_nifti_writes_the_series_in_its_own_geometry(tmp_path, phantom, capsys):
    write_ct_series(phantom.hu, phantom.affine, tmp_path / "s")
    code, out = run_main(cli, [tmp_path / "s", "--to-nifti", "-o", tmp_path / "n"], capsys)
    assert code == 0, out
    vol = read_volume(tmp_path / "n" / "PHANTOM01_20260101_3.nii.gz")
    np.testing.assert_array_equal(vol.data, canonical(phantom)[0])
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------------


def bad(tmp_path, capsys, *args):
    code, out = run_main(cli, [*args, "-o", tmp_path / "out"], capsys)
    lines = [ln for ln in out.splitlines() if ln.startswith(("error", "seg-run: error"))]
    return code, out, lines


def test_empty_folder_and_folder_without_ct(tmp_path, phantom, model, capsys):
    (tmp_path / "empty").mkdir()
    code, out, lines = bad(tmp_path, capsys, tmp_path / "empty", "-m", model)
    assert code != 0 and len(lines) == 1 and "no DICOM CT series" in lines[0] and "Traceback" not in out
    write_ct_series(phantom.hu[:, :, :3], phantom.affine, tmp_path / "scouts")
    for f in (tmp_path / "scouts").iterdir():
        ds = pydicom.dcmread(f)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(f)
    code, out, lines = bad(tmp_path, capsys, tmp_path / "scouts", "-m", model)
    assert code != 0 and "no DICOM CT series" in lines[0] and "localizer" in out


def corrupt_cases(tmp_path, phantom):
    """Folder name -> (a broken series made from the phantom, words its error line must hold)."""
    hu, aff = phantom.hu[:, :, :6], phantom.affine
    cases = {}
    d = tmp_path / "in"
    write_ct_series(hu[:, :, :1], aff, d / "one", ids=new_ids(series_number=11))
    cases[11] = "single slice"
    files = write_ct_series(hu, aff, d / "gap", ids=new_ids(series_number=12))
    files[3].unlink()
    cases[12] = "1 slice(s) missing"
    files = write_ct_series(hu, aff, d / "sizes", ids=new_ids(series_number=13))
    ds = pydicom.dcmread(files[2])
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), "<u2").tobytes()
    ds.save_as(files[2])
    cases[13] = "mixed image sizes"
    files = write_ct_series(hu, aff, d / "nopixels", ids=new_ids(series_number=14))
    ds = pydicom.dcmread(files[4])
    del ds.PixelData
    ds.save_as(files[4])
    cases[14] = "IM0004.dcm: holds no pixel data"
    files = write_ct_series(hu, aff, d / "truncated", ids=new_ids(series_number=15))
    files[2].write_bytes(files[2].read_bytes()[:-5000])
    cases[15] = "IM0002.dcm"
    aff_uneven = aff.copy()
    files = write_ct_series(hu, aff, d / "uneven", ids=new_ids(series_number=16))
    ds = pydicom.dcmread(files[5])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.4 * aff_uneven[2, 2]
    ds.save_as(files[5])
    cases[16] = "unevenly spaced"
    files = write_ct_series(hu, aff, d / "orient", ids=new_ids(series_number=17))
    ds = pydicom.dcmread(files[1])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    ds.save_as(files[1])
    cases[17] = "mixed orientations in one series"
    write_ct_series(np.full_like(hu, 40.0), aff, d / "blank", ids=new_ids(series_number=18))
    cases[18] = "not a CT"  # the same not-CT refusal as a NIfTI volume gets
    return cases


def test_bad_series_each_fail_alone_and_the_batch_goes_on(tmp_path, phantom, model, capsys):
    cases = corrupt_cases(tmp_path, phantom)
    write_ct_series(phantom.hu, phantom.affine, tmp_path / "in" / "good", ids=new_ids(series_number=1))
    code, out = run_main(cli, [tmp_path / "in", "-m", model, "-o", tmp_path / "out"], capsys)
    assert code != 0 and "Traceback" not in out
    errors = [ln for ln in out.splitlines() if ln.startswith("error")]
    assert len(errors) == len(cases), out
    for number, words in cases.items():
        (line,) = [ln for ln in errors if f"_{number}" in ln or words in ln][:1] or [""]
        assert words in line, (number, words, out)
    outputs = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".probe"))
    assert outputs == ["PHANTOM01_20260101_1.json", "PHANTOM01_20260101_1_seg.nii.gz"]
    assert "gap of" in out and "mm" in out


def test_missing_plugin_names_the_package(tmp_path, phantom):
    write_ct_series(phantom.hu[:, :, :3], phantom.affine, tmp_path / "jls", compress="1.2.840.10008.1.2.4.80")
    block = "import sys\nfor m in ('jpeg_ls', 'libjpeg', 'pylibjpeg', 'gdcm', 'PIL'):\n    sys.modules[m] = None\n"
    code = (
        block
        + "from runtime.cli import main\nsys.argv = ['seg-run', sys.argv[1], '--to-nifti', '-o', sys.argv[2]]\nmain()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "jls"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "JPEG-LS" in r.stderr and "pip install" in r.stderr and "jpegls" in r.stderr.lower()
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_without_pydicom_a_dicom_folder_names_the_extra(tmp_path, phantom):
    write_ct_series(phantom.hu[:, :, :3], phantom.affine, tmp_path / "s")
    code = "import sys\nsys.modules['pydicom'] = None\nfrom runtime.cli import main\n"
    code += "sys.argv = ['seg-run', sys.argv[1], '-o', sys.argv[2]]\nmain()\n"
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s"), str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert 'pip install "unet-edge[dicom]"' in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_series_path_is_one_clear_error(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="no DICOM series of that name"):
        dicom.read_input(tmp_path / "d" / "nobody.dcmseries")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) is not installed")
def test_dciodvfy_finds_no_errors_in_our_seg(tmp_path, phantom, model, capsys):
    write_ct_series(phantom.hu, phantom.affine, tmp_path / "s")
    code, out = run_main(cli, [tmp_path / "s", "-m", model, "-o", tmp_path / "out", "--dicom-seg"], capsys)
    assert code == 0, out
    r = subprocess.run(
        ["dciodvfy", str(tmp_path / "out" / "PHANTOM01_20260101_3_seg.dcm")], capture_output=True, text=True
    )
    text = r.stdout + r.stderr
    assert "Segmentation" in text
    errors = [ln for ln in text.splitlines() if ln.startswith("Error")]
    assert not errors, text


# ---- seg-bench --------------------------------------------------------------------------------------------


def test_seg_bench_takes_a_dicom_folder(tmp_path, phantom):
    from benchmarks.cli import _volumes
    from benchmarks.latency import real_slices
    from benchmarks.tiny_models import threshold_spec

    write_ct_series(phantom.hu, phantom.affine, tmp_path / "s")
    (path,) = _volumes(tmp_path / "s", quick=False, tmp=tmp_path)
    assert path.endswith("PHANTOM01_20260101_3.dcmseries")
    dicom._CACHE.clear()  # the latency worker is another process: the path alone must find the series again
    x = real_slices([Path(path)], threshold_spec(), n=4)
    assert x.shape[0] == 4 and np.isfinite(x).all() and x.std() > 0


def test_dicom_read_benchmark_compares_the_same_volume(tmp_path):
    from benchmarks.dicom_read import markdown, measure

    res = measure(slices=4, size=64, repeats=1)
    assert res["dicom_read_ms_per_slice"]["median"] > 0 and res["ratio_dicom_to_nifti"] > 0
    assert "DICOM / NIfTI" in markdown(res)


def test_enhanced_multiframe_ct_reads_and_gets_a_seg(tmp_path, phantom):
    import highdicom as hd

    from runtime.dicom_seg import seg_bytes
    from runtime.dicom_write import write_enhanced_ct

    order = list(np.random.default_rng(2).permutation(phantom.hu.shape[2]))  # frames stored out of order
    write_enhanced_ct(phantom.hu, phantom.affine, tmp_path / "e" / "ct.dcm", frame_order=order)
    vol = dicom.read_series(only_series(tmp_path / "e"))
    hu, _, spacing = canonical(phantom)
    np.testing.assert_array_equal(vol.data, hu)
    np.testing.assert_allclose(vol.spacing, spacing, rtol=1e-5)
    labels = (vol.data > 0).astype(np.uint8)
    (tmp_path / "seg.dcm").write_bytes(seg_bytes(vol, labels, "1" * 64))
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    uid = vol.sources[0].SOPInstanceUID
    back = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=uid, source_frame_numbers=list(range(1, len(order) + 1)), combine_segments=True
    )
    expect = np.stack([phantom.hu[:, :, k].T > 0 for k in order]).astype(np.uint8)
    np.testing.assert_array_equal(back, expect)


def test_resample_gaps_fills_a_missing_slice_by_interpolation(tmp_path, phantom, model, capsys):
    hu = phantom.hu[:, :, :8]
    files = write_ct_series(hu, phantom.affine, tmp_path / "gap")
    files[4].unlink()
    code, out = run_main(cli, [tmp_path / "gap", "--to-nifti", "-o", tmp_path / "refused"], capsys)
    assert code != 0 and "--resample-gaps" in out
    code, out = run_main(cli, [tmp_path / "gap", "--to-nifti", "--resample-gaps", "-o", tmp_path / "n"], capsys)
    assert code == 0, out
    vol = read_volume(tmp_path / "n" / "PHANTOM01_20260101_3.nii.gz")
    filled = vol.to_file_layout(vol.data)
    assert filled.shape == hu.shape
    np.testing.assert_array_equal(np.delete(filled, 4, axis=2), np.delete(hu, 4, axis=2))
    mid = np.rint((hu[:, :, 3].astype(np.float32) + hu[:, :, 5]) / 2)
    np.testing.assert_array_equal(filled[:, :, 4], mid)
    np.testing.assert_allclose(vol.affine, phantom.affine, atol=1e-4)
    code, out = run_main(
        cli, [tmp_path / "gap", "-m", model, "--resample-gaps", "--dicom-seg", "-o", tmp_path / "o"], capsys
    )
    assert code != 0 and "cannot lie on its slices" in out
    assert not [p for p in (tmp_path / "o").iterdir() if not p.name.startswith(".")]


def test_one_file_of_a_series_stands_for_its_series(tmp_path, phantom, capsys):
    write_ct_series(phantom.hu[:, :, :5], phantom.affine, tmp_path / "s")
    code, out = run_main(cli, [tmp_path / "s" / "IM0002.dcm", "--to-nifti", "-o", tmp_path / "n"], capsys)
    assert code == 0, out
    assert read_volume(tmp_path / "n" / "PHANTOM01_20260101_3.nii.gz").num_slices == 5
