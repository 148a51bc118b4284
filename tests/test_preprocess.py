"""The one preprocessing: windowing, fixed-spacing resampling, context slices and the inverse."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.preprocess import (
    SliceBatcher,
    argmax_with_background,
    context_indices,
    interp_matrix,
    labels_to_model_grid,
    logits_to_labels,
    make_batch,
    preprocess_volume,
    slice_grid,
    to_model_grid,
    window,
)
from runtime.spec import Preprocess


def disk(shape, spacing, radius_mm, centre_mm=(0.0, 0.0)):
    """A disk of physical radius on a grid centred like the preprocessing's grids."""
    r = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0] - centre_mm[0]
    c = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1] - centre_mm[1]
    return (r[:, None] ** 2 + c[None, :] ** 2) <= radius_mm**2


def test_window_clips_and_scales_to_unit_range():
    x = window(np.array([-1000, -200, 25, 250, 3000], dtype=np.int16), -200, 250)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [0, 0, 0.5, 1, 1], atol=1e-6)


@pytest.mark.parametrize(
    "shape, spacing, window_hu",
    [((3, 300, 500), (0.7, 0.9), (-200.0, 250.0)), ((2, 90, 70), (1.0, 1.2), (-150.5, 200.25))],
)
def test_model_grid_input_is_the_resampled_window(shape, spacing, window_hu):
    """Shift and scale are applied after resampling, weighted by coverage: the result is still
    the window resampled, padding included (both scans are narrower than the 384 mm model grid)."""
    pre = Preprocess(window=window_hu, size=(256, 256))
    hu = np.random.default_rng(1).integers(-1100, 1500, shape).astype(np.int16)
    grid = slice_grid(shape[1:], spacing, pre)
    x = to_model_grid(hu, grid, pre)
    np.testing.assert_allclose(x, grid.forward(window(hu, *window_hu)), atol=1e-6)
    padding = grid.coverage == 0
    assert x.dtype == np.float32 and padding.any() and (x[:, padding] == 0).all()


def test_interp_matrix_identity_and_partition_of_unity():
    np.testing.assert_allclose(interp_matrix(9, 1.5, 9, 1.5), np.eye(9), atol=1e-7)
    m = interp_matrix(100, 0.7, 64, 1.5)  # FOV 70 mm -> 96 mm: padded at both ends
    inside = m.sum(axis=1) > 0
    np.testing.assert_allclose(m.sum(axis=1)[inside], 1.0, atol=1e-5)
    assert not inside[0] and not inside[-1]  # padding rows are all zero
    # padding is symmetric: the model grid is centred on the input's centre
    assert inside.sum() in (46, 47) and inside[:32].sum() == inside[32:].sum()


def test_upsampling_reproduces_linear_functions_exactly():
    n_in, s_in, n_out, s_out = 40, 2.0, 70, 1.0
    pos_in = (np.arange(n_in) - (n_in - 1) / 2) * s_in
    pos_out = (np.arange(n_out) - (n_out - 1) / 2) * s_out
    got = interp_matrix(n_in, s_in, n_out, s_out) @ (3.0 * pos_in + 7.0)
    interior = np.abs(pos_out) <= pos_in.max()
    np.testing.assert_allclose(got[interior], 3.0 * pos_out[interior] + 7.0, atol=1e-3)


@pytest.mark.parametrize("in_spacing, in_size", [(0.6, 512), (0.9, 384), (0.75, 256)])
def test_fixed_spacing_keeps_physical_size(in_spacing, in_size):
    """A 60 mm disk covers the same number of model pixels whatever the scanner's grid."""
    pre = Preprocess(spacing_mm=1.5, size=(128, 128), context=0)
    hu = np.where(disk((in_size, in_size), (in_spacing, in_spacing), 60.0), 100, -1000).astype(np.int16)
    grid = slice_grid(hu.shape, (in_spacing, in_spacing), pre)
    x = make_batch(hu[None], (1.0, in_spacing, in_spacing), pre, 0, 1, grid)[0, 0]
    area_px = (x > 0.5).sum()
    expected = np.pi * (60.0 / 1.5) ** 2
    assert abs(area_px - expected) / expected < 0.02


def test_resize_mode_stretches_the_whole_field_of_view():
    pre = Preprocess(mode="resize", size=(64, 64), context=0)
    hu = np.full((1, 300, 200), 250, np.int16)  # non-square FOV fills the whole model grid
    x = make_batch(hu, (1.0, 0.8, 1.2), pre, 0, 1)[0, 0]
    assert x.shape == (64, 64) and np.allclose(x, 1.0, atol=1e-5)
    fixed = make_batch(hu, (1.0, 0.8, 1.2), Preprocess(size=(256, 256), context=0), 0, 1)[0, 0]
    assert (fixed == 0).any()  # fixed spacing pads a 240 mm FOV to 384 mm


def test_context_channels_are_neighbours_with_edges_replicated():
    np.testing.assert_array_equal(context_indices(np.array([0, 1, 4]), 5, 1), [[0, 0, 1], [0, 1, 2], [3, 4, 4]])
    vol = np.stack([np.full((32, 32), v, np.int16) for v in (-200, -110, -20, 70, 160)])  # 0, .2, .4, .6, .8
    pre = Preprocess(size=(32, 32), spacing_mm=1.0, context=2)
    b = make_batch(vol, (2.0, 1.0, 1.0), pre, 0, 5)
    assert b.shape == (5, 5, 32, 32) and b.dtype == np.float32
    np.testing.assert_allclose(b[0, :, 16, 16], [0, 0, 0, 0.2, 0.4], atol=1e-6)
    np.testing.assert_allclose(b[4, :, 16, 16], [0.4, 0.6, 0.8, 0.8, 0.8], atol=1e-6)


def test_batches_equal_the_whole_volume_and_are_deterministic(rng):
    vol = rng.integers(-1000, 1000, (11, 50, 70)).astype(np.int16)
    pre = Preprocess(size=(32, 48), spacing_mm=2.0, context=1)
    whole = preprocess_volume(vol, (3.0, 1.1, 1.3), pre)
    parts = np.concatenate([make_batch(vol, (3.0, 1.1, 1.3), pre, s, min(s + 4, 11)) for s in range(0, 11, 4)])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(whole, preprocess_volume(vol.copy(), (3.0, 1.1, 1.3), pre))
    for size in (1, 2, 4):  # the batcher carries neighbours over between batches: same batches
        batcher = SliceBatcher(vol, (3.0, 1.1, 1.3), pre)
        np.testing.assert_array_equal(
            whole, np.concatenate([batcher(s, min(s + size, 11)) for s in range(0, 11, size)])
        )
        down = SliceBatcher(vol, (3.0, 1.1, 1.3), pre)  # walking down the volume, as a head-first file streams in
        np.testing.assert_array_equal(
            whole, np.concatenate([down(s, min(s + size, 11)) for s in reversed(range(0, 11, size))][::-1])
        )
    batcher = SliceBatcher(vol, (3.0, 1.1, 1.3), Preprocess(size=(32, 48), spacing_mm=2.0, context=2))
    for s in (5, 6, 0, 9, 10, 3):  # out of order, too
        got = batcher(s, s + 1)
        np.testing.assert_array_equal(got, make_batch(vol, (3.0, 1.1, 1.3), batcher.pre, s, s + 1))
        ctx = context_indices(np.array([s]), 11, 2)[0]  # each slice's context, preprocessed on its own
        np.testing.assert_array_equal(got[0], to_model_grid(vol[ctx], batcher.grid, batcher.pre))
        if 2 <= s <= 8:  # off the edges, a single slice's context is a view of the preprocessed run: no copy
            assert got.flags.c_contiguous and np.shares_memory(got, batcher._prepped)


@pytest.mark.parametrize("in_spacing", [0.7, 2.5])
def test_labels_survive_the_round_trip_to_the_model_grid_and_back(in_spacing):
    """Labels taken to the model grid and brought back as logits (resample, then argmax)
    overlap the originals almost perfectly, whether the model grid is finer or coarser."""
    shape = (int(300 / in_spacing),) * 2
    lab = disk(shape, (in_spacing,) * 2, 80.0, (10.0, -20.0)).astype(np.uint8)
    lab[disk(shape, (in_spacing,) * 2, 25.0, (20.0, -10.0))] = 2
    pre = Preprocess(size=(256, 256), spacing_mm=1.5, context=0)
    grid = slice_grid(shape, (in_spacing, in_spacing), pre)
    model_lab = labels_to_model_grid(lab[None], grid, 3)
    logits = np.stack([(model_lab == c) for c in range(3)], axis=1).astype(np.float32) * 10.0
    back = logits_to_labels(logits, grid)[0]
    for c in (1, 2):
        a, b = back == c, lab == c
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.97


def test_inverse_gives_background_outside_the_model_field_of_view():
    pre = Preprocess(size=(64, 64), spacing_mm=1.5, context=0)  # 96 mm FOV
    grid = slice_grid((200, 200), (1.0, 1.0), pre)  # 200 mm input FOV
    logits = np.zeros((1, 3, 64, 64), np.float32)
    logits[:, 1] = 5.0  # liver everywhere the model sees
    back = logits_to_labels(logits, grid)[0]
    assert back[100, 100] == 1 and back[0, 0] == 0 and back[100, 5] == 0
    seen = (back == 1).sum()
    assert abs(seen - 96 * 96) / (96 * 96) < 0.05


def test_sigmoid_outputs_threshold_at_zero_logit():
    pre = Preprocess(size=(16, 16), spacing_mm=1.0, context=0)
    grid = slice_grid((16, 16), (1.0, 1.0), pre)
    logit = np.full((1, 1, 16, 16), -3.0, np.float32)
    logit[0, 0, :8] = 3.0
    back = logits_to_labels(logit, grid, activation="sigmoid")[0]
    assert back[:7].all() and not back[9:].any()


@pytest.mark.parametrize(
    "grid",
    [(512, 0.7, 256, 1.5), (256, 1.5, 512, 0.7), (100, 3.0, 256, 1.5), (256, 1.5, 100, 3.0), (300, 0.8, 64, 6.0)],
)
def test_banded_application_equals_the_matrix_product(grid, rng):
    """The matrices are the definition; the fast banded gathers must compute exactly them."""
    from runtime.preprocess import Band, resample

    m = interp_matrix(*grid)
    x = rng.standard_normal((2, grid[0], grid[0])).astype(np.float32)
    band = Band.of(m)
    np.testing.assert_allclose(band.rows(x), m @ x, atol=1e-5)
    np.testing.assert_allclose(band.cols(x), x @ m.T, atol=1e-5)
    g = slice_grid((grid[0], grid[0]), (grid[1], grid[1]), Preprocess(size=(grid[2], grid[2]), spacing_mm=grid[3]))
    np.testing.assert_allclose(g.forward(x), resample(x, g.rows_fwd, g.cols_fwd), atol=1e-5)


@pytest.mark.parametrize(
    "shape,spacing,mode",
    [
        ((512, 448), 0.8, "spacing"),
        ((128, 140), 3.0, "spacing"),
        ((300, 300), 1.0, "resize"),
        ((64, 64), 10.0, "spacing"),
    ],
)
@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_windowed_inverse_gives_the_same_labels_as_resampling_everything(shape, spacing, mode, activation):
    """logits_to_labels resamples only around foreground; it must equal the full computation."""
    pre = Preprocess(size=(64, 64), spacing_mm=2.0, context=0, mode=mode)
    grid = slice_grid(shape, (spacing, spacing), pre)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 1, (5, 3, 64, 64)).astype(np.float32)
    logits[:, 0] += 2.5  # background wins mostly ...
    logits[1, 1, 20:40, 25:50] = 9.0  # ... but not in a few blobs
    logits[1, 2, 28:34, 30:36] = 12.0
    logits[3, 2, 56:, :8] = 9.0  # foreground touching the corner
    logits[4, 0] = 10.0  # a slice with nothing
    if activation == "sigmoid":
        logits = logits[:, 1:2] - logits[:, :1]
    scores = logits[:, :1] if activation == "sigmoid" else logits[:, 1:] - logits[:, :1]
    expected = argmax_with_background(grid.inverse(scores))
    got = logits_to_labels(logits, grid, activation)
    assert got.any() and not got[4].any()
    np.testing.assert_array_equal(got, expected)


def test_the_batcher_preprocesses_each_slice_once(rng, monkeypatch):
    import runtime.preprocess as rp

    vol = rng.integers(-1000, 1000, (9, 40, 40)).astype(np.int16)
    seen = []
    real = rp.to_model_grid
    monkeypatch.setattr(rp, "to_model_grid", lambda x, grid, pre: seen.append(len(x)) or real(x, grid, pre))
    batcher = SliceBatcher(vol, (2.0, 1.0, 1.0), Preprocess(size=(32, 32), spacing_mm=1.5, context=1))
    for s in range(9):
        batcher(s, s + 1)
    assert sum(seen) == 9  # make_batch per slice would have done 3 x 9 - 2
    seen.clear()
    down = SliceBatcher(vol, (2.0, 1.0, 1.0), batcher.pre)
    for s in range(8, -1, -1):
        down(s, s + 1)
    assert sum(seen) == 9
