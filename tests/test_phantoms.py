"""CT phantoms: deterministic, anatomically placed, CT-like, varied."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from runtime.io import read_labels, read_volume
from runtime.phantoms import canonical as phantom_canonical
from runtime.phantoms import make_phantom
from train.cli import cli

SMALL = dict(size=64, slices=20)


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    runner = CliRunner()
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        r = runner.invoke(
            cli,
            ["phantoms", str(tmp_path / name), "--cases", "2", "--seed", str(seed), "--size", "64", "--slices", "16"],
        )
        assert r.exit_code == 0, r.output
    for f in ("volume-0.nii.gz", "segmentation-0.nii.gz", "volume-1.nii.gz", "segmentation-1.nii.gz"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "volume-0.nii.gz").read_bytes() != (tmp_path / "c" / "volume-0.nii.gz").read_bytes()


@pytest.fixture(scope="module")
def cases():
    return [make_phantom(0, k, **SMALL) for k in range(12)]


def canonical(ph):
    hu, lab, _ = phantom_canonical(ph)
    return hu, lab


def test_labels_tumours_and_variety(cases):
    tumours = [len(np.unique(__import__("scipy").ndimage.label(ph.labels == 2)[0])) - 1 for ph in cases]
    assert sum(t == 0 for t in tumours) >= 1  # some cases without tumour
    assert sum(t >= 2 for t in tumours) >= 1
    assert sum((ph.labels == 1).any() for ph in cases) == len(cases)
    codes = {nib.aff2axcodes(ph.affine) for ph in cases}
    assert len(codes) >= 2
    spacings = {round(float(np.linalg.norm(ph.affine[:3, 0])), 3) for ph in cases}
    assert len(spacings) >= 3  # the field of view varies, so the in-plane spacing does


def test_default_cases_have_all_three_labels_mostly():
    present = [set(np.unique(make_phantom(0, k, size=96).labels)) for k in range(3)]
    assert sum(p == {0, 1, 2} for p in present) >= 2


def test_anatomy_is_where_it_belongs_and_looks_like_ct(cases):
    for ph in cases:
        hu, lab = canonical(ph)
        liver, tumour = lab >= 1, lab == 2
        # the liver is on the patient's right in world coordinates, whatever the file layout
        ijk = np.argwhere(ph.labels >= 1).mean(axis=0)
        centre = np.array(ph.labels.shape) / 2 - 0.5
        world_dx = (ph.affine[:3, :3] @ (ijk - centre))[0]
        assert world_dx > 20, "liver centroid should be > 2 cm to the patient's right of the centre"
        # body contains all labels; air outside
        assert hu[0, 0, 0] < -900 and np.median(hu[:, :3, :3]) < -900
        assert (hu[liver] > -200).mean() > 0.99
        # tumour voxels are a subset of the liver region by construction of labels
        assert not (tumour & ~liver).any()
        assert (hu > 300).sum() > 0  # bone


def test_organs_next_to_the_liver_have_liver_like_hu():
    """Spleen and kidneys sit within ~25 HU of the liver: intensity alone cannot find the liver."""
    ph = make_phantom(3, 0, size=128, slices=40)
    hu, lab = canonical(ph)
    liver_mean = float(hu[lab == 1].mean())
    non_liver_soft = (lab == 0) & (np.abs(hu - liver_mean) < 25)
    # plenty of voxels outside the liver share its intensity range
    assert non_liver_soft.sum() > 0.3 * (lab == 1).sum()


def test_written_files_read_back_as_the_canonical_arrays(tmp_path):
    from runtime.phantoms import write_phantoms

    write_phantoms(tmp_path, cases=3, seed=5, progress=False, **SMALL)
    for k in range(3):
        ph = make_phantom(5, k, **SMALL)
        hu, lab = canonical(ph)
        np.testing.assert_array_equal(read_volume(tmp_path / f"volume-{k}.nii.gz").data, hu)
        np.testing.assert_array_equal(read_labels(tmp_path / f"segmentation-{k}.nii.gz").data, lab)


def _surface_shell(lab: np.ndarray, hu: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    liver = lab >= 1
    return ndimage.binary_dilation(liver, iterations=2) & ~liver & (hu > -500)  # body only, not air


def test_perihepatic_fat_covers_part_of_the_liver_surface_and_changes_nothing_else():
    """Real livers are partly wrapped in fat (about half of a 3 mm shell around the liver in a
    real abdominal CT); without it a lesion on the liver surface looks like the bowel beside it."""
    from scipy import ndimage

    plain = make_phantom(0, 2, size=128, slices=40)
    fat = make_phantom(0, 2, size=128, slices=40, perihepatic_fat=True)
    hu0, lab0 = canonical(plain)
    hu1, lab1 = canonical(fat)
    np.testing.assert_array_equal(lab0, lab1)  # same anatomy and lesions
    shell = _surface_shell(lab0, hu0)
    assert (hu0[shell] < -30).mean() < 0.05  # bowel and organs touch the liver directly
    assert 0.2 < (hu1[shell] < -30).mean() < 0.8  # fat over part of the surface, not all of it
    far = ndimage.distance_transform_edt(lab0 == 0) > 12  # voxels; well beyond the thickest fat and its blur
    np.testing.assert_array_equal(hu0[far], hu1[far])  # the rest of the case, noise included, is unchanged
