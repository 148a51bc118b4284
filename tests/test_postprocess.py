import numpy as np
import pytest
from scipy import ndimage

from runtime.postprocess import (
    StreamingComponents,
    drop_small_tumours,
    fill_holes,
    largest_component,
    postprocess,
    volume_stats,
    voxels_for_ml,
)


def test_only_the_largest_liver_component_survives_and_tumour_stays_inside_it():
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[1:8, 2:12, 2:12] = 1  # big liver
    lab[3:5, 4:6, 4:6] = 2  # tumour inside
    lab[1:3, 15:18, 15:18] = 1  # a small false-positive liver blob
    lab[8:10, 15:17, 0:2] = 2  # a tumour outside any liver
    out = postprocess(lab)
    assert out.dtype == np.uint8
    assert (out[1:3, 15:18, 15:18] == 0).all() and (out[8:10, 15:17, 0:2] == 0).all()
    assert (out[3:5, 4:6, 4:6] == 2).all()
    assert np.count_nonzero(out >= 1) == 7 * 10 * 10


def test_tumour_touching_the_liver_counts_as_liver_region():
    lab = np.zeros((4, 10, 10), np.uint8)
    lab[:, 2:6, 2:6] = 1
    lab[:, 6:8, 2:6] = 2  # tumour at the edge of the liver, part of the same region
    out = postprocess(lab)
    assert (out == lab).all()


def test_holes_are_filled_with_liver_only_when_asked():
    lab = np.zeros((3, 9, 9), np.uint8)
    lab[:, 1:8, 1:8] = 1
    lab[:, 4, 4] = 0
    assert postprocess(lab)[1, 4, 4] == 0
    assert postprocess(lab, holes=True)[1, 4, 4] == 1
    assert fill_holes(np.zeros((2, 3, 3), bool)).sum() == 0


def test_empty_stays_empty():
    assert not largest_component(np.zeros((3, 3, 3), bool)).any()
    assert not postprocess(np.zeros((3, 3, 3), np.uint8)).any()


@pytest.mark.parametrize("spacing, ml", [((1.0, 1.0, 1.0), 1.0), ((2.0, 0.5, 0.5), 0.5)])
def test_volume_statistics_in_millilitres(spacing, ml):
    lab = np.zeros((10, 10, 20), np.uint8)
    lab[:, :, :10] = 1  # 1000 voxels of liver
    lab[0, 0, 0] = lab[5, 5, 5] = lab[9, 9, 9] = 2  # three separate one-voxel tumours (inside the liver region)
    s = volume_stats(lab, spacing)
    assert s["liver_ml"] == pytest.approx(ml)
    assert s["tumor_count"] == 3
    assert s["tumor_ml"] == pytest.approx(3 * ml / 1000)
    assert s["tumor_burden"] == pytest.approx(3 / 1000)


@pytest.mark.parametrize("holes", [False, True])
def test_in_place_postprocessing_matches_a_full_volume_reference(holes):
    """Random blobs anywhere in the volume: the bounding-box, in-place path gives what labelling
    the whole volume gives, and writes it into the caller's array."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    lab = (ndimage.uniform_filter(rng.random((12, 40, 40)), 5) > 0.55).astype(np.uint8)
    lab[(lab == 1) & (rng.random(lab.shape) < 0.2)] = 2
    comp, n = ndimage.label(lab >= 1)
    assert n >= 3  # several liver candidates, so the choice matters
    biggest = comp == np.bincount(comp.ravel())[1:].argmax() + 1
    if holes:
        biggest = np.stack([ndimage.binary_fill_holes(s) for s in biggest])
    expected = biggest.astype(np.uint8) + (biggest & (lab == 2))
    copy = lab.copy()
    assert (postprocess(lab, holes=holes) == expected).all() and (lab == copy).all()
    out = postprocess(lab, holes=holes, inplace=True)
    assert out is lab and (lab == expected).all()


def _blobs(rng: np.random.Generator, shape=(37, 40, 44)) -> np.ndarray:
    """Labels 0/1/2 with many components of all sizes, some touching across slices."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    labels = (noise > 0.12).astype(np.uint8)
    labels[noise > 0.3] = 2
    return labels


@pytest.mark.parametrize("seed", range(6))
def test_streamed_components_equal_the_whole_volume_labelling(seed):
    """Fed in any order and any batch size, the run-by-run labelling keeps the same component."""
    rng = np.random.default_rng(seed)
    labels = _blobs(rng)
    n = labels.shape[0]
    batch, chunk = int(rng.integers(1, 6)), int(rng.integers(1, 9))
    starts = list(range(0, n, batch))
    if seed % 2:
        starts.reverse()  # a volume whose slices arrive from the end
    sc = StreamingComponents(labels, chunk=chunk)
    for s in starts:
        sc.add(s, min(n, s + batch))
    streamed = postprocess(labels, components=sc)
    whole = postprocess(labels)
    assert (labels >= 1).sum() > (whole >= 1).sum() > 0  # something was dropped: the test has teeth
    np.testing.assert_array_equal(streamed, whole)


def test_streamed_components_break_ties_like_ndimage():
    labels = np.zeros((20, 12, 12), np.uint8)
    labels[2:6, 2:5, 2:5] = 1  # 36 voxels, first in raster order
    labels[12:16, 6:9, 6:9] = 1  # 36 voxels too
    sc = StreamingComponents(labels, chunk=3)
    for s in range(18, -1, -2):
        sc.add(s, s + 2)
    np.testing.assert_array_equal(postprocess(labels, components=sc), postprocess(labels))
    assert postprocess(labels, components=sc)[2:6].sum() == 36 and postprocess(labels, components=sc)[12:16].sum() == 0


def test_small_tumour_components_become_liver_and_larger_ones_stay():
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[1:9, 2:18, 2:18] = 1
    lab[2:5, 3:6, 3:6] = 2  # 27 voxels
    lab[7, 10, 10:12] = 2  # 2 voxels
    lab[5, 15, 15] = 2  # 1 voxel; touches the big lesion nowhere
    out = drop_small_tumours(postprocess(lab), 27)
    assert (out == 2).sum() == 27 and (out[2:5, 3:6, 3:6] == 2).all()
    assert out[7, 10, 10] == 1 and out[5, 15, 15] == 1  # relabelled as liver, not background
    assert ((out >= 1) == (lab >= 1)).all()
    assert (drop_small_tumours(postprocess(lab), 28) == 2).sum() == 0
    np.testing.assert_array_equal(drop_small_tumours(postprocess(lab), 0), lab)  # 0 keeps every lesion
    only = lab.copy()
    assert drop_small_tumours(only, 3) is only and (only == 2).sum() == 27


def test_millilitres_become_voxels_at_the_scan_spacing():
    assert voxels_for_ml(0.1, (1.0, 1.0, 1.0)) == 100
    assert voxels_for_ml(0.1, (2.5, 0.8, 0.8)) == 63  # 62.5 rounded up
    assert voxels_for_ml(0.0, (1.0, 1.0, 1.0)) == 0
