"""seg-train pieces without a training run: split, sampling, crops, augmentation, loss, config."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.datasets import Case, load_dataset  # noqa: E402
from runtime.errors import InputError  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import (  # noqa: E402
    CaseIndex,
    SliceDataset,
    SliceSampler,
    augment,
    elastic_field,
    index_cases,
    split_cases,
)
from train.loop import boundary_band, loss_fn, lr_at  # noqa: E402


def _cases(n):
    return [Case(f"volume-{i}", None, None) for i in range(n)]  # paths unused by the split


def test_split_is_by_case_seeded_and_needs_two_cases():
    tr, va = split_cases(_cases(10), 0.2, seed=3)
    assert len(va) == 2 and not {c.name for c in tr} & {c.name for c in va}
    assert split_cases(_cases(10), 0.2, seed=3) == (tr, va)
    assert split_cases(_cases(10), 0.2, seed=4) != (tr, va)
    assert len(split_cases(_cases(10), 0.2, seed=3, val_cases=4)[1]) == 4
    with pytest.raises(InputError, match="need at least 2 cases"):
        split_cases(_cases(1), 0.2, seed=0)


def test_split_seed_keeps_the_split_when_the_seed_changes():
    def split(**kw):
        return split_cases(_cases(40), 0.2, TrainConfig(**kw).validate().split_seed_value, val_cases=6)

    assert split(seed=1) != split(seed=0)  # by default the seed also draws the split
    assert split(seed=1, split_seed=0) == split(seed=0) == split(seed=7, split_seed=0)
    with pytest.raises(InputError, match="--split-seed must be >= 0, or -1"):
        TrainConfig(split_seed=-2).validate()


def _index():
    liver = np.arange(10, 30)
    return [
        CaseIndex("a", 40, liver, np.arange(15, 18)),
        CaseIndex("b", 40, liver, np.array([], int)),
        CaseIndex("c", 40, np.array([], int), np.array([], int)),
    ]


def test_sampler_oversamples_and_gives_ranks_disjoint_shares():
    idx = _index()
    s = SliceSampler(idx, seed=0, fractions=(1 / 3, 1 / 3, 1 / 3))
    draw = s.draw(epoch=0, n=600)
    tumour = np.mean([idx[ci].tumour.size and s_ in idx[ci].tumour for ci, s_, _ in draw])
    liver = np.mean([s_ in idx[ci].liver for ci, s_, _ in draw])
    assert 0.25 < tumour < 0.45  # 1/3 by design; tumour is 3 of 120 slices
    assert liver > 0.6
    assert draw == s.draw(epoch=0, n=600) and draw != s.draw(epoch=1, n=600)
    r0, r1 = s.draw(0, 50, rank=0, world=2), s.draw(0, 50, rank=1, world=2)
    assert len(r0) == len(r1) == 50
    full = s.draw(0, 100)  # the one global draw the ranks share out
    assert r0 == full[0::2] and r1 == full[1::2]


def test_lru_cache_holds_at_most_its_bound_and_crops_find_the_tumour(tiny_data):
    cases = load_dataset(tiny_data / "train")[:3]
    cfg = TrainConfig(**TINY)
    pre = cfg.spec({}).preprocess
    index = index_cases(cases)
    ds = SliceDataset(cases, pre, SliceSampler(index, 0, (1, 0, 0)), 24, 32, seed=0, cache_volumes=2)
    for key in [(0, j) for j in range(24)]:
        x, y = ds[key]
        assert x.shape == (3, 32, 32) and y.shape == (32, 32) and x.dtype == torch.float32
        assert len(ds._cache) <= 2
    with_tumour = [ds[(0, j)][1] for j in range(24) if ds.items(0)[j][2] == 0]
    assert with_tumour and np.mean([bool((y == 2).any()) for y in with_tumour]) > 0.8


def test_augmentation_keeps_the_patients_right_on_the_right():
    """No left-right flip: a structure on one side stays there (small rotations and shifts only)."""
    x = torch.zeros(16, 3, 64, 64)
    y = torch.zeros(16, 64, 64, dtype=torch.long)
    x[:, :, 20:44, 40:60] = 0.6  # image columns 40-60: the "right" of this toy anatomy
    y[:, 20:44, 40:60] = 1
    y[:, 28:34, 48:54] = 2
    xa, ya = augment(x, y, torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert set(ya.unique().tolist()) <= {0, 1, 2}
    cols = torch.arange(64).float()
    centre = [(cols * (m >= 1).float().sum(0)).sum() / (m >= 1).sum() for m in ya]
    assert min(centre) > 40  # the original centre is 49.5; a flip would put it at 13.5
    assert not torch.equal(xa, x)


def test_elastic_field_is_smooth_and_bounded_in_pixels():
    h, w = 192, 160  # a training crop's size: 5 control points are 40-48 px apart
    f = elastic_field(16, (h, w), 5.0, torch.Generator().manual_seed(0))
    assert f.shape == (16, h, w, 2)
    px = f * torch.tensor([w / 2.0, h / 2.0])  # [-1, 1] units back to pixels (x, y)
    assert 2.0 < px.abs().max() <= 5.0 + 1e-4
    # neighbours move together (well under a pixel apart): it bends, never folds or tears
    assert (px[:, 1:] - px[:, :-1]).abs().max() < 0.4 and (px[:, :, 1:] - px[:, :, :-1]).abs().max() < 0.4


def test_elastic_augmentation_bends_outlines_and_is_off_by_default():
    x = torch.zeros(8, 1, 64, 64)
    y = torch.zeros(8, 64, 64, dtype=torch.long)
    y[:, 16:48, 16:48] = 1
    x[y[:, None] == 1] = 0.6
    still = dict(rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, intensity=0.0, noise=0.0)
    _, same = augment(x, y, torch.Generator().manual_seed(0), **still)
    assert torch.equal(same, y)
    xa, ya = augment(x, y, torch.Generator().manual_seed(0), elastic=4.0, **still)
    moved = (ya != y).float().mean(dim=(1, 2))
    assert (moved > 0).sum() >= 4 and moved.max() < 0.15  # outlines move, the square stays a square-ish blob
    assert ((xa[:, 0] > 0.3) == (ya == 1)).float().mean() > 0.98  # image and labels move together


def test_liver_shift_moves_liver_and_tumour_together_and_nothing_else():
    x = torch.full((16, 3, 64, 64), 0.3)
    y = torch.zeros(16, 64, 64, dtype=torch.long)
    y[:, 16:48, 16:48] = 1
    y[:, 28:36, 28:36] = 2
    x[:, :, 16:48, 16:48] = 0.55
    x[:, :, 28:36, 28:36] = 0.5  # a lesion 0.05 below the liver
    still = dict(rotate_deg=0.0, scale=(1.0, 1.0), shift=0.0, noise=0.0)
    plain, _ = augment(x, y, torch.Generator().manual_seed(0), **still)
    xa, ya = augment(x, y, torch.Generator().manual_seed(0), liver_shift=0.08, **still)
    assert torch.equal(ya, y)
    delta = xa - plain
    assert torch.equal(delta[:, :, :8], torch.zeros_like(delta[:, :, :8]))  # tissue away from the liver stays put
    inner = delta[:, :, 20:44, 20:44]  # liver and lesion, away from the soft edge
    per_sample = inner.mean(dim=(1, 2, 3))
    assert torch.allclose(inner, per_sample.view(-1, 1, 1, 1).expand_as(inner), atol=1e-6)  # contrast kept
    assert per_sample.abs().max() <= 0.08 * 1.1 + 1e-6 and per_sample.std() > 0.02  # bounded, varies by sample
    assert (per_sample > 0).any() and (per_sample < 0).any()


def test_loss_prefers_correct_logits_for_softmax_and_sigmoid():
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    y[:, 4:12, 4:12] = 1
    y[:, 6:8, 6:8] = 2
    good = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 10
    bad = torch.zeros_like(good)
    assert loss_fn(good, y) < 0.05 < loss_fn(bad, y)
    weighted = loss_fn(bad, y, class_weight=torch.tensor([1.0, 1.0, 5.0]))
    assert torch.isfinite(weighted)
    g1 = (y >= 1).float()[:, None] * 20 - 10
    assert loss_fn(g1, y) < 0.05 < loss_fn(torch.zeros_like(g1), y)


def test_per_image_dice_weighs_a_missed_small_lesion_as_much_as_a_found_large_one():
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 2:30, 2:30] = 1
    y[0, 4:28, 4:28] = 2  # a large lesion, found
    y[1, 10:12, 10:12] = 2  # a small lesion, missed
    pred = y.clone()
    pred[1, 10:12, 10:12] = 1
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float() * 10
    batch, image = loss_fn(logits, y, dice="batch"), loss_fn(logits, y, dice="image")
    assert batch < 0.05  # the large lesion hides the miss
    assert image > batch + 0.15  # per image, tumour Dice is about (1 + 0.2) / 2, halved over two classes
    empty = torch.zeros_like(y)  # no foreground anywhere: Dice costs nothing in either mode
    zero = torch.nn.functional.one_hot(empty, 3).permute(0, 3, 1, 2).float() * 20
    assert loss_fn(zero, empty, dice="image") < 1e-3 and loss_fn(zero, empty, dice="batch") < 1e-3


def test_lr_schedules_warm_up_and_decay():
    cos = TrainConfig(lr=1e-3, warmup_epochs=1, epochs=10, schedule="cosine")
    assert lr_at(cos, 0.0) < 1e-5 and lr_at(cos, 1.0) == pytest.approx(1e-3)
    assert lr_at(cos, 9.99) < 0.05e-3
    step = TrainConfig(lr=1e-3, warmup_epochs=0, epochs=9, schedule="step")
    assert [lr_at(step, e) for e in (0, 3, 6)] == pytest.approx([1e-3, 3e-4, 9e-5])


def test_config_file_keys_and_validation(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"base-width": 8, "epochs": 2}))
    assert TrainConfig.from_file(tmp_path / "c.json") == {"base_width": 8, "epochs": 2}
    (tmp_path / "bad.json").write_text(json.dumps({"widht": 8}))
    with pytest.raises(InputError, match="unknown config keys"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(InputError, match="sum to at most 1"):
        TrainConfig(tumour_oversampling=0.7, liver_oversampling=0.5).validate()
    with pytest.raises(InputError, match="--schedule must be one of"):
        TrainConfig(schedule="linear").validate()
    spec = TrainConfig().validate().spec({})
    assert spec.model == dict(in_channels=3, classes=3, base_width=24, depth=4, norm="batch", bilinear=False)
    assert spec.preprocess.size == (256, 256) and spec.preprocess.spacing_mm == 1.5
    assert spec.preprocess.window == (-200.0, 250.0) and spec.io.activation == "softmax"
    assert TrainConfig(classes=1).spec({}).io.activation == "sigmoid"


def test_boundary_band_covers_both_sides_of_every_label_change_and_nothing_far_away():
    y = torch.zeros(1, 40, 40, dtype=torch.long)
    y[0, 10:30, 10:30] = 1
    y[0, 18:22, 26:30] = 2  # a lesion on the organ's edge
    band = boundary_band(y, 2)[0]
    assert band[10, 20] == 1 and band[8, 20] == 1 and band[11, 20] == 1  # edge, outside, inside
    assert band[7, 20] == 0 and band[20, 13] == 0 and band[0, 0] == 0  # 3 px away on either side
    assert band[20, 24] == 1 and band[20, 31] == 1  # around the lesion, liver side and background side
    assert band.sum() < y.numel() / 2


def test_pixel_weights_of_one_change_nothing_and_boundary_weights_count_boundary_errors_more():
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, 8:24, 8:24] = 1
    y[:, 12:16, 20:24] = 2
    logits = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 4
    cw = torch.tensor([1.0, 1.0, 2.0])
    assert torch.allclose(
        loss_fn(logits, y, class_weight=cw), loss_fn(logits, y, class_weight=cw, pixel_weight=torch.ones(2, 32, 32))
    )
    edge_err, far_err = logits.clone(), logits.clone()
    edge_err[:, :, 12:16, 20:24] = logits[:, :, 12:16, 16:20]  # the lesion (all boundary) called liver
    far_err[:, :, 0:4, 0:4] = logits[:, :, 12:16, 16:20]  # the same number of background pixels far away called liver
    band = 1 + 4 * boundary_band(y, 2)
    plain = loss_fn(edge_err, y, dice_weight=0), loss_fn(far_err, y, dice_weight=0)
    weighted = (
        loss_fn(edge_err, y, dice_weight=0, pixel_weight=band),
        loss_fn(far_err, y, dice_weight=0, pixel_weight=band),
    )
    assert torch.isclose(plain[0], plain[1], rtol=0.05)
    assert weighted[0] > 2 * weighted[1]
