"""Volumes from |det| of the affine on tilted and sheared grids, and the geometry/CT plausibility checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import InputError
from runtime.geometry import geometry_problems, not_ct_reason, voxel_volume_ml
from runtime.metrics import case_metrics
from runtime.postprocess import volume_stats, voxels_for_ml

RADII = np.array([40.0, 30.0, 25.0])  # mm; an ellipsoid of 4/3 pi abc = 125.66 mL
ANALYTIC_ML = 4.0 / 3.0 * np.pi * RADII.prod() / 1000.0


def tilted(deg: float, spacing=(1.5, 1.5, 2.5)) -> np.ndarray:
    """A gantry tilt: the slice axis leans by ``deg`` in the y-z plane, so slices are sheared."""
    t = np.radians(deg)
    a = np.eye(4)
    a[:3, 0] = [spacing[0], 0, 0]
    a[:3, 1] = [0, spacing[1], 0]
    a[:3, 2] = [0, spacing[2] * np.sin(t), spacing[2] * np.cos(t)]
    return a


def sheared(k: float, spacing=(1.5, 1.5, 2.5)) -> np.ndarray:
    a = np.diag([*spacing, 1.0])
    a[0, 1] = k * spacing[1]  # x moves with the row index: a parallelogram grid
    return a


def ellipsoid_on(affine: np.ndarray, shape=(96, 96, 64)) -> np.ndarray:
    """Voxels whose centre (in mm, through the affine) lies inside the ellipsoid centred in the grid."""
    idx = np.indices(shape).reshape(3, -1).astype(float)
    world = affine[:3, :3] @ idx
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    inside = ((((world - centre[:, None]) / RADII[:, None]) ** 2).sum(axis=0)) <= 1.0
    return inside.reshape(shape).astype(np.uint8)


@pytest.mark.parametrize("affine", [tilted(25.0), sheared(0.7)], ids=["tilt-25deg", "shear-0.7"])
def test_volume_in_ml_is_right_on_tilted_and_sheared_grids(affine):
    labels = ellipsoid_on(affine)
    stats = volume_stats(labels, affine)
    assert stats["liver_ml"] == pytest.approx(ANALYTIC_ML, rel=0.01)
    lengths = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    assert float(np.prod(lengths)) / 1000.0 > 1.09 * stats["voxel_ml"]  # what the column lengths would have claimed
    m = case_metrics(labels, labels, tuple(lengths[::-1]), surface=False, affine=affine)
    assert m["liver"]["ref_ml"] == pytest.approx(ANALYTIC_ML, rel=0.01)
    assert voxels_for_ml(ANALYTIC_ML, affine) == pytest.approx(int(labels.sum()), rel=0.01)


def test_voxel_volume_agrees_for_spacing_and_affine():
    assert voxel_volume_ml((2.5, 0.8, 0.8)) == pytest.approx(1.6e-3)
    assert voxel_volume_ml(np.diag([0.8, -0.8, 2.5, 1.0])) == pytest.approx(1.6e-3)  # a flip is no smaller


def test_seg_run_reports_the_determinant_volume_of_a_tilted_scan(tmp_path, capsys):
    from benchmarks.tiny_models import threshold_model, threshold_spec
    from runtime.cli import cli
    from tests.conftest import run_main, save_nifti

    affine = tilted(25.0, (2.0, 2.0, 2.5))
    inside = ellipsoid_on(affine, (96, 96, 64)).astype(bool)
    hu = np.where(inside, 200, -1000).astype(np.int16)
    hu += np.random.default_rng(0).integers(-5, 6, hu.shape, dtype=np.int16)
    save_nifti(tmp_path / "tilt.nii.gz", hu, affine)
    model = threshold_model(tmp_path / "m.onnx", threshold_spec(96, 2.0))

    code, out = run_main(cli, [tmp_path / "tilt.nii.gz", "--model", model, "-o", tmp_path / "out"], capsys)
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "tilt.json").read_text())
    assert report["liver_ml"] == pytest.approx(ANALYTIC_ML, rel=0.03)
    assert report["voxel_ml"] == pytest.approx(voxel_volume_ml(affine))


class _Header(dict):
    def __init__(self, pixdim=(1, 1, 1, 1), codes=(1, 1)):
        super().__init__(pixdim=np.array([1.0, *pixdim[:3], 1, 1, 1, 1]), qform_code=codes[0], sform_code=codes[1])


@pytest.mark.parametrize(
    "spacing, words",
    [
        ((2.5, 0.7, 0.7), None),
        ((0.6, 0.5, 0.5), None),
        ((5.0, 50.0, 50.0), "pixel size"),
        ((5.0, 0.01, 0.01), "pixel size"),
        ((80.0, 0.8, 0.8), "slice spacing"),
        ((0.0, 0.8, 0.8), "slice spacing"),
    ],
)
def test_implausible_geometry_is_named(spacing, words):
    problems = geometry_problems(_Header(), np.eye(4), spacing)
    assert (problems == []) if words is None else (len(problems) == 1 and words in problems[0])


def test_zero_voxel_size_without_orientation_codes_is_named():
    problems = geometry_problems(_Header(pixdim=(0, 0, 0), codes=(0, 0)), np.eye(4), (1.0, 1.0, 1.0))
    assert len(problems) == 1 and "pixdim" in problems[0]
    assert geometry_problems(_Header(pixdim=(0, 0, 0), codes=(1, 0)), np.eye(4), (1.0, 1.0, 1.0)) == []


def test_not_ct_reasons():
    from runtime.phantoms import canonical, make_phantom

    hu, _, _ = canonical(make_phantom(3, 0, size=64, slices=16))
    assert not_ct_reason(hu) is None
    assert "every voxel" in not_ct_reason(np.zeros((8, 16, 16), np.int16))
    assert "not a CT" in not_ct_reason(((hu + 1024) / 4000).astype(np.float32))
    assert "beyond" in not_ct_reason((hu.astype(np.int32) + 1024) * 20)
    assert "air only" in not_ct_reason(np.random.default_rng(0).normal(-1000, 30, (8, 64, 64)))


def test_forced_volume_records_why(tmp_path):
    from runtime.io import read_volume
    from tests.conftest import save_nifti

    data = np.random.default_rng(0).integers(-1000, 1000, (32, 32, 8)).astype(np.int16)
    save_nifti(tmp_path / "wide.nii.gz", data, np.diag([50.0, 50.0, 5.0, 1.0]))
    with pytest.raises(InputError, match="pixel size 50 x 50 mm"):
        read_volume(tmp_path / "wide.nii.gz", ct=True)
    vol = read_volume(tmp_path / "wide.nii.gz", force=True, ct=True)
    assert len(vol.forced) == 1 and "pixel size" in vol.forced[0]
    assert vol.voxel_volume_ml() == pytest.approx(12.5)
