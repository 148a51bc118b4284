"""Training options as one dataclass (torch-free, so the CLI's --help needs no torch).

The defaults are the demo edge model: base width 24, depth 4, batch norm, 256x256 input at
1.5 mm, one context slice on each side (3 input channels), window (-200, 250) HU.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from runtime.errors import InputError
from runtime.spec import IOLayout, ModelSpec, Preprocess

DEFAULT_WORKERS = min(2, os.cpu_count() or 1)

# Options with a fixed set of values (the CLI turns these into click.Choice).
CHOICES = {
    "norm": ("batch", "instance", "group", "none"),
    "mode": ("spacing", "resize"),
    "schedule": ("cosine", "step"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "amp": ("auto", "off", "bf16", "fp16"),
    "dice": ("batch", "image"),
}

HELP = {
    "base_width": "Channels of the first UNet level (doubles per level).",
    "depth": "Number of down-sampling steps; the input size must be divisible by 2**depth.",
    "norm": "Normalisation layer.",
    "bilinear": "Bilinear up-sampling instead of transposed convolutions.",
    "classes": "3: softmax over background/liver/tumour; 1: sigmoid liver-only model.",
    "size": "Model input rows = cols (whole slices at inference).",
    "spacing_mm": "In-plane spacing of the model grid (mode 'spacing').",
    "mode": "'spacing': fixed mm/pixel, centre crop/pad; 'resize': stretch the slice.",
    "context": "Neighbouring slices on each side: 2k+1 input channels.",
    "window_low": "HU window lower bound.",
    "window_high": "HU window upper bound.",
    "batch_size": "Slices per step (per process under torchrun).",
    "crop": "Train on random square crops of this size (0: whole slices); must be divisible by 2**depth.",
    "lr": "Adam learning rate.",
    "weight_decay": "Adam weight decay.",
    "schedule": "Learning-rate decay after warm-up.",
    "warmup_epochs": "Linear warm-up epochs.",
    "epochs": "Epochs to train (an epoch is --steps-per-epoch steps).",
    "steps_per_epoch": "Optimizer steps per epoch.",
    "val_every": "Validate every N epochs (and after the last).",
    "patience": "Early stopping: validations without improvement before stopping.",
    "dice_weight": "Weight of the soft Dice term (cross-entropy has weight 1).",
    "dice": (
        "Soft Dice over the whole batch, or per image and averaged over the images that contain the class "
        "(weighs a small lesion as much as a large one; cross-entropy alone then polices the empty slices)."
    ),
    "tumour_weight": "Cross-entropy class weight of tumour (background and liver: 1).",
    "boundary_weight": (
        "Extra cross-entropy weight of pixels near a class boundary (weight 1 + this), as the 2015 "
        "UNet weighted cell borders: lesions on the liver surface are where the model errs (0: off)."
    ),
    "boundary_width": "Half-width in pixels of the boundary band that --boundary-weight weighs.",
    "ema": "Decay of an exponential moving average of the weights, validated and saved as best (0: off).",
    "bn_slices": "Whole slices used to re-estimate BatchNorm statistics before each validation (0: off).",
    "tumour_oversampling": "Fraction of sampled slices drawn from slices with tumour.",
    "liver_oversampling": "Fraction of sampled slices drawn from slices with liver.",
    "rotate_deg": "Augmentation: maximum rotation (degrees).",
    "scale_range": "Augmentation: scaling in [1 - s, 1 + s].",
    "shift": "Augmentation: maximum translation (fraction of the crop).",
    "intensity": "Augmentation: gain jitter (+-) of the [0, 1] input; offset jitter is half of it.",
    "noise": "Augmentation: maximum Gaussian noise std on the [0, 1] input.",
    "elastic": "Augmentation: maximum elastic displacement in pixels of the model grid (0: off).",
    "liver_shift": (
        "Augmentation: maximum HU offset added to liver and tumour together (contrast kept), "
        "for livers that enhance more or less than the training cases (0: off)."
    ),
    "val_fraction": "Fraction of cases held out for validation (split by case).",
    "val_cases": "Number of validation cases (overrides --val-fraction when > 0).",
    "seed": "Seed of the split, the slice draws, crops, augmentation and initial weights.",
    "split_seed": (
        "Seed of the train/validation split alone (-1: --seed), so that runs with different --seed "
        "values are validated on the same cases."
    ),
    "workers": "DataLoader worker processes (0: load in the main process).",
    "cache_volumes": "Preprocessed volumes kept per worker (LRU); ~0.31 MB per slice at 256x256.",
    "device": "auto picks cuda, then mps, then cpu.",
    "amp": (
        "Mixed-precision training steps (validation and saved weights stay float32). auto: fp16 with "
        "loss scaling on CUDA, float32 elsewhere. bf16 is 2.2x faster on a CPU with AVX512-BF16 or AMX "
        "but trailed float32 in tumour Dice there."
    ),
    "threads": "torch CPU threads (0: cores / processes on this node).",
}


@dataclass
class TrainConfig:
    """Every choice of a training run; the CLI options and --config keys are these names."""

    # model
    base_width: int = 24
    depth: int = 4
    norm: str = "batch"
    bilinear: bool = False
    classes: int = 3
    # preprocessing (recorded in the spec)
    size: int = 256
    spacing_mm: float = 1.5
    mode: str = "spacing"
    context: int = 1
    window_low: float = -200.0
    window_high: float = 250.0
    # optimisation
    batch_size: int = 8
    crop: int = 160
    lr: float = 1e-3
    weight_decay: float = 1e-5
    schedule: str = "cosine"
    warmup_epochs: int = 1
    epochs: int = 30
    steps_per_epoch: int = 100
    val_every: int = 1
    patience: int = 8
    dice_weight: float = 1.0
    dice: str = "batch"
    tumour_weight: float = 1.0
    boundary_weight: float = 0.0
    boundary_width: int = 5
    ema: float = 0.998  # per step; with a warm-up, so short runs average over their own steps
    bn_slices: int = 256  # whole slices for re-estimating BatchNorm statistics before validation
    tumour_oversampling: float = 1 / 3
    liver_oversampling: float = 1 / 3
    # augmentation (no flips: the liver is on the patient's right)
    rotate_deg: float = 12.0
    scale_range: float = 0.15
    shift: float = 0.05
    intensity: float = 0.1
    noise: float = 0.015
    elastic: float = 0.0
    liver_shift: float = 0.0
    # data
    val_fraction: float = 0.2
    val_cases: int = 0
    seed: int = 0
    split_seed: int = -1
    workers: int = DEFAULT_WORKERS
    cache_volumes: int = 64
    device: str = "auto"
    amp: str = "auto"
    threads: int = 0

    def validate(self) -> TrainConfig:
        """Reject impossible combinations with one line that names the option."""
        for f in fields(self):  # inf and nan pass every comparison below unnoticed
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"--{f.name.replace('_', '-')} must be a finite number; got {v}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}"
                )
        if self.classes not in (1, 3):
            raise InputError(f"--classes must be 3 (background/liver/tumour) or 1 (liver only); got {self.classes}")
        positive = ("base_width", "depth", "size", "batch_size", "epochs", "steps_per_epoch", "val_every", "patience")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        for name in (
            "crop",
            "warmup_epochs",
            "val_cases",
            "workers",
            "threads",
            "bn_slices",
            "context",
            "rotate_deg",
            "scale_range",
            "shift",
            "intensity",
            "noise",
            "elastic",
            "liver_shift",
            "boundary_weight",
            "boundary_width",
        ):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")
        cores = os.cpu_count() or 1
        for name, limit in (("threads", 4 * cores), ("workers", 4 * cores)):  # more only cost memory
            if getattr(self, name) > limit:
                raise InputError(f"--{name} {getattr(self, name)} on {cores} core(s); at most {limit} (4 per core)")
        if self.split_seed < -1:
            raise InputError(f"--split-seed must be >= 0, or -1 to use --seed; got {self.split_seed}")
        if self.cache_volumes < 1:
            raise InputError(f"--cache-volumes must be >= 1; got {self.cache_volumes}")
        if not (
            0 <= self.tumour_oversampling
            and 0 <= self.liver_oversampling
            and self.tumour_oversampling + self.liver_oversampling <= 1
        ):
            raise InputError("--tumour-oversampling and --liver-oversampling must be >= 0 and sum to at most 1")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        if not self.window_low < self.window_high:
            raise InputError(f"--window-low must be below --window-high; got {self.window_low}, {self.window_high}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InputError("--lr must be > 0 and --weight-decay >= 0")
        if not 0 <= self.ema < 1:
            raise InputError(f"--ema must be in [0, 1) (0: off); got {self.ema}")
        if self.crop > self.size:
            raise InputError(f"--crop {self.crop} is larger than the model input --size {self.size}")
        return self

    @property
    def split_seed_value(self) -> int:
        """The seed that splits the cases: --split-seed, or --seed when it is -1."""
        return self.seed if self.split_seed < 0 else self.split_seed

    def spec(self, provenance: dict) -> ModelSpec:
        pre = Preprocess(
            window=(self.window_low, self.window_high),
            mode=self.mode,
            spacing_mm=self.spacing_mm,
            size=(self.size, self.size),
            context=self.context,
        )
        sigmoid = self.classes == 1
        return ModelSpec(
            preprocess=pre,
            classes=("background", "liver") if sigmoid else ("background", "liver", "tumor"),
            io=IOLayout(activation="sigmoid" if sigmoid else "softmax"),
            model=dict(
                in_channels=pre.channels,
                classes=self.classes,
                base_width=self.base_width,
                depth=self.depth,
                norm=self.norm,
                bilinear=self.bilinear,
            ),
            provenance=provenance,
        ).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """Option values from a JSON object whose keys are option names (dashes or underscores)."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read the config ({exc}); expected a JSON object of option names") from exc
        if not isinstance(d, dict):
            raise InputError(f"{path}: the config must be a JSON object of option names, got {type(d).__name__}")
        d = {str(k).lstrip("-").replace("-", "_"): v for k, v in d.items()}
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"{path}: unknown config keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return d
