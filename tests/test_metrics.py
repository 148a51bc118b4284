"""LiTS metrics against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.metrics import (
    assd,
    case_metrics,
    dice,
    format_table,
    hd95,
    jaccard,
    markdown_table,
    paired_dice,
    rvd,
    summarize,
    surface_distances,
)


def cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_overlap_metrics_of_two_shifted_cubes():
    a = cube((6, 6, 6), (1, 1, 1), (3, 3, 3))  # 8 voxels
    b = cube((6, 6, 6), (2, 1, 1), (4, 3, 3))  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert jaccard(a, b) == pytest.approx(4 / 12)
    m = case_metrics(a.astype(np.uint8), b.astype(np.uint8), (1, 1, 1))["liver"]
    assert m["voe"] == pytest.approx(2 / 3)
    assert m["intersection"] == 4 and m["pred_voxels"] == 8 and m["ref_voxels"] == 8


def test_rvd_is_signed_relative_to_the_reference():
    ref = cube((5, 5, 5), (0, 0, 0), (2, 2, 2))  # 8
    big = cube((5, 5, 5), (0, 0, 0), (3, 2, 2))  # 12
    assert rvd(big, ref) == pytest.approx(0.5)
    assert rvd(ref, big) == pytest.approx(-1 / 3)


def test_empty_cases_are_reported_not_crashed_or_silently_one():
    empty = np.zeros((4, 4, 4), bool)
    full = cube((4, 4, 4), (1, 1, 1), (2, 2, 2))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0
    assert dice(empty, empty) is None
    m = case_metrics(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8), (1, 1, 1))
    assert m["liver"]["dice"] is None and m["liver"]["note"] == "both empty"
    m = case_metrics(np.zeros((4, 4, 4), np.uint8), full.astype(np.uint8) * 2, (1, 1, 1))
    assert m["tumor"]["dice"] == 0.0 and m["tumor"]["note"] == "prediction empty"
    assert m["tumor"]["assd"] is None and m["tumor"]["hd95"] is None
    assert assd(empty, full, (1, 1, 1)) is None and hd95(full, empty, (1, 1, 1)) is None


@pytest.mark.parametrize(
    "axis, spacing, expected", [(0, (3.0, 1.0, 1.0), 6.0), (1, (3.0, 0.5, 1.0), 1.0), (2, (1.0, 1.0, 2.5), 5.0)]
)
def test_surface_distance_in_millimetres_on_anisotropic_grids(axis, spacing, expected):
    """Two single voxels 2 voxels apart along one axis: every distance is 2 x that axis' spacing."""
    a = np.zeros((7, 7, 7), bool)
    b = np.zeros((7, 7, 7), bool)
    a[3, 3, 3] = True
    idx = [3, 3, 3]
    idx[axis] = 5
    b[tuple(idx)] = True
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert assd(a, b, spacing) == pytest.approx(expected)


def test_hd95_differs_from_the_maximum_and_assd_pools_both_directions():
    """Reference: a 1x1x40 line of voxels. Prediction: the same line with one voxel moved
    4 voxels away. Pred->ref distances: 39 zeros and one 4; ref->pred: 40 zeros (the moved
    voxel's old place is 1 from its neighbours... computed below by hand)."""
    ref = np.zeros((1, 9, 40), bool)
    ref[0, 2, :] = True
    pred = ref.copy()
    pred[0, 2, 39] = False
    pred[0, 6, 39] = True
    d_pred, d_ref = surface_distances(pred, ref, (1.0, 1.0, 1.0))
    # pred border = all its voxels (a line has no interior): 39 on the line (distance 0), one at distance 4
    assert sorted(d_pred)[-1] == pytest.approx(4.0) and np.count_nonzero(d_pred) == 1
    # ref voxel (2, 39) is missing from pred: nearest pred voxels are (2, 38) at 1 and (6, 39) at 4 -> 1
    assert np.count_nonzero(d_ref) == 1 and max(d_ref) == pytest.approx(1.0)
    # 95th percentile of 40 values with one 4.0 at the top: linear interpolation at rank 37.05 -> 0
    assert hd95(pred, ref, (1, 1, 1)) == pytest.approx(0.0)
    assert assd(pred, ref, (1, 1, 1)) == pytest.approx((4.0 + 1.0) / 80)


def test_assd_of_identical_masks_is_zero():
    a = cube((8, 8, 8), (2, 2, 2), (6, 6, 6))
    assert assd(a, a, (2.0, 1.0, 0.5)) == 0.0 and hd95(a, a, (2.0, 1.0, 0.5)) == 0.0


def test_bounding_box_shortcut_equals_the_whole_volume(rng):
    a = np.zeros((20, 30, 30), bool)
    b = np.zeros((20, 30, 30), bool)
    a[5:12, 8:20, 6:18] = rng.random((7, 12, 12)) > 0.3
    b[6:14, 10:22, 7:19] = rng.random((8, 12, 12)) > 0.3
    for crop_a, crop_b in zip(
        surface_distances(a, b, (2.0, 0.7, 0.9), crop=True), surface_distances(a, b, (2.0, 0.7, 0.9), crop=False)
    ):
        np.testing.assert_allclose(np.sort(crop_a), np.sort(crop_b))


def test_liver_counts_tumour_voxels_and_global_dice_pools_cases():
    ref = np.zeros((1, 1, 10), np.uint8)
    ref[0, 0, :4] = 1
    ref[0, 0, 4:6] = 2  # liver region = 6 voxels, tumour = 2
    pred = np.zeros_like(ref)
    pred[0, 0, :6] = 1  # all liver, no tumour
    m = case_metrics(pred, ref, (1, 1, 1))
    assert m["liver"]["dice"] == 1.0 and m["tumor"]["dice"] == 0.0

    # case A: pred 2, ref 2, overlap 2 (Dice 1); case B: pred 10, ref 90, overlap 10 (Dice 0.2)
    def case(p, r, o):
        pr = np.zeros((1, 1, 200), np.uint8)
        rf = np.zeros((1, 1, 200), np.uint8)
        pr[0, 0, :p] = 1
        rf[0, 0, p - o : p - o + r] = 1
        return case_metrics(pr, rf, (1, 1, 1), surface=False)

    per_case = {"a": case(2, 2, 2), "b": case(10, 90, 10)}
    s = summarize(per_case)["liver"]
    assert s["dice_per_case_mean"] == pytest.approx((1.0 + 0.2) / 2)
    assert s["dice_global"] == pytest.approx(2 * 12 / (12 + 92))


def test_tables_show_every_case_and_the_summary_rows():
    a = cube((6, 6, 6), (1, 1, 1), (3, 3, 3)).astype(np.uint8)
    per_case = {"case-1": case_metrics(a, a, (1, 1, 1)), "case-2": case_metrics(np.zeros_like(a), a, (1, 1, 1))}
    s = summarize(per_case)
    txt = format_table(per_case, s)
    assert "case-1" in txt and "case-2" in txt and "global (pooled)" in txt and "both empty" in txt
    md = markdown_table(per_case, s)
    lines = md.splitlines()
    assert lines[0].startswith("| case |") and len(lines) == 2 + 2 + 2
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def _cases(tumour_dice: dict[str, float | None], fp: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per-case metrics as case_metrics gives them, for the fields paired_dice reads;
    None = no tumour in the reference."""

    def one(d, name):
        ref = 0 if d is None else 100
        pred = 7 if name in fp else (0 if d is None else 90)
        return {
            "liver": {"dice": 0.95, "ref_voxels": 1000, "pred_voxels": 990},
            "tumor": {"dice": (0.0 if pred else None) if d is None else d, "ref_voxels": ref, "pred_voxels": pred},
        }

    return {n: one(d, n) for n, d in tumour_dice.items()}


def test_paired_dice_tells_a_consistent_gain_from_case_noise():
    base = _cases({"a": 0.5, "b": 0.6, "c": 0.7, "d": 0.8, "e": 0.4, "f": 0.65})
    gain = _cases({"a": 0.6, "b": 0.7, "c": 0.78, "d": 0.78, "e": 0.52, "f": 0.75})
    r = paired_dice(base, gain)
    assert r["mean_diff"] == pytest.approx((0.1 + 0.1 + 0.08 - 0.02 + 0.12 + 0.1) / 6)
    assert (r["better"], r["worse"], r["same"]) == (5, 1, 0)
    assert 0 < r["ci95"][0] < r["mean_diff"] < r["ci95"][1]
    noise = _cases(
        {"a": 0.8, "b": 0.3, "c": 0.95, "d": 0.55, "e": 0.7, "f": 0.4}
    )  # a similar mean, case by case at random
    lo, hi = paired_dice(base, noise)["ci95"]
    assert lo < 0 < hi
    assert paired_dice(base, base)["same"] == 6 and paired_dice(base, base)["ci95"] == [0.0, 0.0]


def test_paired_dice_counts_tumour_free_cases_as_false_positives_and_checks_the_labels():
    base = _cases({"a": 0.5, "b": 0.6, "clean": None, "x": 0.7})
    other = _cases({"a": 0.6, "b": 0.6, "clean": None, "y": 0.1}, fp=("clean",))
    r = paired_dice(base, other)
    assert r["cases"] == ["a", "b"] and r["mean_other"] == pytest.approx(
        0.6
    )  # the false positive's Dice 0 is not paired
    assert r["cases_without"] == 1 and r["false_positive_cases"] == [0, 1]
    assert r["only_base"] == ["x"] and r["only_other"] == ["y"]
    relabelled = _cases({"a": 0.6, "b": 0.6})
    relabelled["a"]["tumor"]["ref_voxels"] = 55
    with pytest.raises(ValueError, match="a has different reference labels"):
        paired_dice(base, relabelled)
    with pytest.raises(ValueError, match="no case holds a tumor"):
        paired_dice(_cases({"clean": None}), _cases({"clean": None}))
