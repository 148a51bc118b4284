import numpy as np
import pytest

from runtime.datasets import check_case, discover, images_in, load_dataset
from runtime.errors import InputError
from tests.conftest import save_nifti

AFF = np.diag([0.8, 0.8, 2.0, 1.0])


def _pair(dirpath, img_name, lab_name, lab=None, shape=(16, 16, 8), aff=AFF):
    save_nifti(dirpath / img_name, np.full(shape, -500, np.int16), aff)
    if lab_name:
        save_nifti(dirpath / lab_name, np.zeros(shape, np.uint8) if lab is None else lab, aff)


def test_lits_layout_is_found_in_natural_order(tmp_path):
    for k in (10, 2, 1):
        _pair(tmp_path, f"volume-{k}.nii.gz", f"segmentation-{k}.nii.gz")
    cases, bad = discover(tmp_path)
    assert [c.name for c in cases] == ["volume-1", "volume-2", "volume-10"] and not bad
    assert cases[0].label.name == "segmentation-1.nii.gz"


def test_decathlon_layout_is_found(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    save_nifti(tmp_path / "imagesTr" / "liver_3.nii.gz", np.zeros((8, 8, 4), np.int16), AFF)
    save_nifti(tmp_path / "labelsTr" / "liver_3.nii.gz", np.zeros((8, 8, 4), np.uint8), AFF)
    cases, bad = discover(tmp_path)
    assert [c.name for c in cases] == ["liver_3"] and not bad


def test_images_of_a_dataset_folder_leave_out_its_label_maps(tmp_path):
    for k in (10, 2):
        _pair(tmp_path, f"volume-{k}.nii.gz", f"segmentation-{k}.nii.gz")
    _pair(tmp_path, "segmentation-7.nii.gz", None)  # no volume-7: a CT that happens to be named so
    _pair(tmp_path, "patient.nii", None)
    assert [p.name for p in images_in(tmp_path)] == [
        "patient.nii",
        "segmentation-7.nii.gz",
        "volume-2.nii.gz",
        "volume-10.nii.gz",
    ]
    dec = tmp_path / "msd"
    (dec / "imagesTr").mkdir(parents=True)
    (dec / "labelsTr").mkdir()
    _pair(dec / "imagesTr", "liver_3.nii.gz", None)
    _pair(dec / "labelsTr", "liver_3.nii.gz", None)
    assert images_in(dec) == [dec / "imagesTr" / "liver_3.nii.gz"]


def test_every_bad_pair_is_reported_with_its_reason(tmp_path):
    _pair(tmp_path, "volume-0.nii.gz", "segmentation-0.nii.gz")  # fine
    _pair(tmp_path, "volume-1.nii.gz", None)  # no label
    bad_lab = np.zeros((16, 16, 8), np.uint8)
    bad_lab[0, 0, 0] = 7
    _pair(tmp_path, "volume-2.nii.gz", "segmentation-2.nii.gz", lab=bad_lab)
    save_nifti(tmp_path / "volume-3.nii.gz", np.zeros((16, 16, 8), np.int16), AFF)
    save_nifti(tmp_path / "segmentation-3.nii.gz", np.zeros((16, 16, 9), np.uint8), AFF)
    save_nifti(tmp_path / "volume-4.nii.gz", np.zeros((16, 16, 8), np.int16), AFF)
    save_nifti(tmp_path / "segmentation-4.nii.gz", np.zeros((16, 16, 8), np.uint8), np.diag([1.0, 1, 2, 1]))
    with pytest.raises(InputError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "4 bad case(s)" in msg
    for needle in (
        "volume-1: volume-1.nii.gz has no label",
        "volume-2: label values",
        "volume-3: image shape",
        "volume-4: image and label affines differ",
    ):
        assert needle in msg


def test_empty_or_mislabeled_directory(tmp_path):
    with pytest.raises(InputError, match="no labelled cases"):
        discover(tmp_path)
    save_nifti(tmp_path / "scan_a.nii.gz", np.zeros((8, 8, 4), np.int16), AFF)
    with pytest.raises(InputError, match="other NIfTI files such as"):
        discover(tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        discover(tmp_path / "missing")


def test_truncated_label_is_a_reason_not_a_crash(tmp_path):
    _pair(tmp_path, "volume-0.nii.gz", "segmentation-0.nii.gz")
    p = tmp_path / "segmentation-0.nii.gz"
    p.write_bytes(p.read_bytes()[:60])
    cases, _ = discover(tmp_path)
    assert check_case(cases[0]) is not None
