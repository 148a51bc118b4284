"""Training data: cases split by case, preprocessed once by the runtime's code, sampled by slice.

Slices are drawn with oversampling of slices that contain liver and tumour (by default a
third each of tumour slices, liver slices and any slice). Each sample is the model input
(2k+1 context channels on the model grid, exactly what the runtime feeds the network: the
volume goes through runtime.preprocess.to_model_grid and labels_to_model_grid once, and the
context channels are gathered with context_indices) and its labels on the same grid,
optionally cropped around the structure it was drawn for. Augmentation happens on whole
batches in ``augment``; there is deliberately no left-right flip.

Memory: preprocessed volumes are cached per DataLoader worker in an LRU of ``cache_volumes``
entries. At 256x256 one slice is 0.25 MB of float32 image plus 0.06 MB of uint8 labels, so a
cached volume takes 0.31 MB per slice (e.g. 25 MB for 80 slices, 37 MB for 120), and the
bound is workers x cache_volumes x that (64 volumes of 80 slices: 1.6 GB per worker).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from runtime.datasets import Case
from runtime.errors import InputError
from runtime.io import read_labels, read_volume
from runtime.preprocess import context_indices, labels_to_model_grid, slice_grid, to_model_grid
from runtime.spec import Preprocess


def split_cases(
    cases: list[Case], val_fraction: float, seed: int, val_cases: int | None = None
) -> tuple[list[Case], list[Case]]:
    """Split by case (never by slice), reproducibly."""
    if len(cases) < 2:
        raise InputError(f"need at least 2 cases for a train/validation split, found {len(cases)}")
    n_val = val_cases if val_cases else max(1, round(len(cases) * val_fraction))
    n_val = min(n_val, len(cases) - 1)
    order = np.random.default_rng(seed).permutation(len(cases))
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c.name)
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


@dataclass
class CaseIndex:
    """Which slices of a case hold liver / tumour (for oversampling), from its labels."""

    name: str
    slices: int
    liver: np.ndarray
    tumour: np.ndarray


def index_cases(cases: list[Case]) -> list[CaseIndex]:
    out = []
    for c in cases:
        lab = read_labels(c.label).data
        per_slice = lab.reshape(lab.shape[0], -1)
        out.append(
            CaseIndex(
                c.name, lab.shape[0], np.nonzero((per_slice >= 1).any(1))[0], np.nonzero((per_slice == 2).any(1))[0]
            )
        )
    return out


def load_case(case: Case, pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """A case on the model grid: (slices, rows, cols) float32 in [0, 1] and uint8 labels."""
    vol = read_volume(case.image)
    lab = read_labels(case.label)
    grid = slice_grid(vol.data.shape[1:], vol.spacing[1:], pre)
    return to_model_grid(vol.data, grid, pre), labels_to_model_grid(lab.data, grid, 3)


class SliceSampler:
    """Per-epoch, per-rank lists of (case, slice, purpose) drawn with oversampling.

    Deterministic in (seed, epoch), so a resumed run draws the same slices; each rank of a
    distributed run takes a disjoint share of the same global draw.
    """

    PURPOSES = ("tumour", "liver", "any")

    def __init__(self, index: list[CaseIndex], seed: int, fractions=(1 / 3, 1 / 3, 1 / 3)):
        self.index, self.seed = index, seed
        self.fractions = np.asarray(fractions, float) / np.sum(fractions)
        self.with_tumour = [i for i, c in enumerate(index) if len(c.tumour)]
        self.with_liver = [i for i, c in enumerate(index) if len(c.liver)]
        if not self.with_liver:
            raise InputError("no training case contains liver (label >= 1); check the labels")

    def draw(self, epoch: int, n: int, rank: int = 0, world: int = 1) -> list[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, epoch, 0x5A])
        out = []
        for _ in range(n * world):
            p = int(rng.choice(3, p=self.fractions))
            if p == 0 and self.with_tumour:
                ci = self.with_tumour[rng.integers(len(self.with_tumour))]
                s = int(rng.choice(self.index[ci].tumour))
            elif p <= 1:
                ci = self.with_liver[rng.integers(len(self.with_liver))]
                s, p = int(rng.choice(self.index[ci].liver)), 1
            else:
                ci = int(rng.integers(len(self.index)))
                s = int(rng.integers(self.index[ci].slices))
            out.append((ci, s, p))
        return out[rank::world]


class EpochSampler(torch.utils.data.Sampler):
    """Yields (epoch, j) keys, so persistent workers know which epoch's draw an index belongs to."""

    def __init__(self, per_epoch: int):
        self.per_epoch, self.epoch = per_epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        return iter([(self.epoch, j) for j in range(self.per_epoch)])


class SliceDataset(torch.utils.data.Dataset):
    """Samples keyed by (epoch, j): the j-th draw of this rank in that epoch; volumes cached (LRU)."""

    def __init__(
        self,
        cases: list[Case],
        pre: Preprocess,
        sampler: SliceSampler,
        per_epoch: int,
        crop: int | None,
        seed: int,
        rank: int = 0,
        world: int = 1,
        cache_volumes: int = 64,
    ):
        self.cases, self.pre, self.sampler, self.per_epoch, self.crop = cases, pre, sampler, per_epoch, crop
        self.seed, self.rank, self.world, self.cache_volumes = seed, rank, world, cache_volumes
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._draw: tuple[int, list] = (-1, [])

    def __len__(self) -> int:
        return self.per_epoch

    def items(self, epoch: int) -> list[tuple[int, int, int]]:
        if self._draw[0] != epoch:
            self._draw = (epoch, self.sampler.draw(epoch, self.per_epoch, self.rank, self.world))
        return self._draw[1]

    def volume(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        if ci in self._cache:
            self._cache.move_to_end(ci)
        else:
            self._cache[ci] = load_case(self.cases[ci], self.pre)
            while len(self._cache) > self.cache_volumes:
                self._cache.popitem(last=False)
        return self._cache[ci]

    def sample(self, ci: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented model input (2k+1, rows, cols) and labels of slice s of case ci."""
        img, lab = self.volume(ci)
        idx = context_indices(np.array([s]), img.shape[0], self.pre.context)[0]
        return img[idx], lab[s]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = key
        ci, s, purpose = self.items(epoch)[j]
        x, y = self.sample(ci, s)
        if self.crop and self.crop < min(y.shape):
            rng = np.random.default_rng([self.seed, epoch, self.rank, j, 0xC0])
            x, y = _crop(x, y, self.crop, purpose, rng)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y).astype(np.int64))


def _crop(x: np.ndarray, y: np.ndarray, size: int, purpose: int, rng: np.random.Generator):
    """A square crop, centred near a voxel of the structure the slice was drawn for."""
    h, w = y.shape
    target = (y == 2) if purpose == 0 else (y >= 1) if purpose == 1 else None
    if target is not None and target.any():
        ys, xs = np.nonzero(target)
        j = rng.integers(len(ys))
        cy, cx = ys[j] + rng.integers(-size // 4, size // 4 + 1), xs[j] + rng.integers(-size // 4, size // 4 + 1)
    else:
        cy, cx = rng.integers(size // 2, h - size // 2 + 1), rng.integers(size // 2, w - size // 2 + 1)
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    return x[:, y0 : y0 + size, x0 : x0 + size], y[y0 : y0 + size, x0 : x0 + size]


def augment(
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    rotate_deg: float = 12.0,
    scale=(0.85, 1.15),
    shift: float = 0.05,
    intensity: float = 0.1,
    noise: float = 0.015,
    elastic: float = 0.0,
    liver_shift: float = 0.0,
):
    """Batch augmentation: rotation, scaling, translation, elastic deformation, intensity jitter and noise.

    No left-right (or front-back) flips: the liver lies on the patient's right (and
    anterior), so a flipped slice is anatomy that does not occur, and the side is
    information the model should use to tell liver from spleen. Noise is drawn per sample
    with a std up to ``noise`` (on the [0, 1] windowed scale: 0.015 is ~7 HU at the default
    window), kept small because CT noise already hides low-contrast tumours. Labels are resampled with nearest
    neighbour, images bilinearly; padding is 0 (air after windowing) and background.
    ``elastic`` > 0 adds a smooth displacement field, up to that many pixels per sample,
    interpolated from a 5x5 grid of random offsets: it bends organ and lesion outlines, which
    the affine part cannot (0 draws no random numbers, so earlier seeds replay unchanged).
    ``liver_shift`` > 0 moves liver and tumour together by one offset per sample within
    +-``liver_shift`` (on the [0, 1] scale), the other tissues staying put: livers enhance
    differently from scan to scan, and a lesion is told by its contrast to the liver around
    it, not by its own HU. The organ mask is the centre slice's labels with a soft 2-pixel
    edge, used for every context channel (neighbouring slices' outlines differ by little).
    It is drawn last, and 0 draws nothing, so the other augmentations replay unchanged.
    """
    n = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    ang = (u(n) * 2 - 1) * np.deg2rad(rotate_deg)
    sc = scale[0] + u(n) * (scale[1] - scale[0])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(ang) / sc
    theta[:, 0, 1] = -torch.sin(ang) / sc
    theta[:, 1, 0] = torch.sin(ang) / sc
    theta[:, 1, 1] = torch.cos(ang) / sc
    theta[:, :, 2] = (u(n, 2) * 2 - 1) * shift * 2
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    if elastic > 0:
        grid = grid + elastic_field(n, x.shape[-2:], elastic, gen)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = torch.nn.functional.grid_sample(
        y[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].long()
    gain = 1 + (u(n, 1, 1, 1) * 2 - 1) * intensity
    bias = (u(n, 1, 1, 1) * 2 - 1) * intensity * 0.5
    x = x * gain + bias + torch.randn(x.shape, generator=gen) * (u(n, 1, 1, 1) * noise)
    if liver_shift > 0:
        organ = torch.nn.functional.avg_pool2d(
            (y >= 1).float()[:, None], 5, stride=1, padding=2, count_include_pad=False
        )
        x = x + organ * ((u(n, 1, 1, 1) * 2 - 1) * liver_shift * gain)
    return x, y


def elastic_field(n: int, shape, max_px: float, gen: torch.Generator, points: int = 5) -> torch.Tensor:
    """(n, H, W, 2) smooth displacements in grid_sample's [-1, 1] units, at most ``max_px`` pixels."""
    h, w = int(shape[0]), int(shape[1])
    coarse = torch.rand(n, 2, points, points, generator=gen) * 2 - 1
    amp = torch.rand(n, 1, 1, 1, generator=gen) * max_px
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True).clamp_(-1, 1) * amp
    field = field * torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1, 1)  # pixels -> [-1, 1] units (x, y)
    return field.permute(0, 2, 3, 1)


def write_split(path, train: list[Case], val: list[Case], seed: int) -> None:
    from runtime.io import json_text, write_bytes_atomic

    write_bytes_atomic(
        path,
        json_text(
            {"seed": seed, "train": [c.name for c in train], "validation": [c.name for c in val]}, indent=2
        ).encode(),
    )
