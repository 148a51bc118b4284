"""Training options as one dataclass (torch-free, so the CLI's --help needs no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from runtime.errors import InputError
from runtime.spec import IOLayout, ModelSpec, Preprocess


@dataclass
class TrainConfig:
    """Every choice of a training run; the CLI options and --config keys are these names."""

    # model
    base_width: int = 16
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
    bn_slices: int = 256  # whole slices for re-estimating BatchNorm statistics before validation
    tumour_oversampling: float = 1 / 3
    liver_oversampling: float = 1 / 3
    # data
    val_fraction: float = 0.2
    val_cases: int = 0
    seed: int = 0
    workers: int = 2
    cache_volumes: int = 64
    device: str = "auto"
    threads: int = 0

    def spec(self, provenance: dict) -> ModelSpec:
        pre = Preprocess(window=(self.window_low, self.window_high), mode=self.mode, spacing_mm=self.spacing_mm,
                         size=(self.size, self.size), context=self.context)
        sigmoid = self.classes == 1
        return ModelSpec(
            preprocess=pre,
            classes=("background", "liver") if sigmoid else ("background", "liver", "tumor"),
            io=IOLayout(activation="sigmoid" if sigmoid else "softmax"),
            model=dict(in_channels=pre.channels, classes=self.classes, base_width=self.base_width,
                       depth=self.depth, norm=self.norm, bilinear=self.bilinear),
            provenance=provenance,
        ).validate()

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{path}: cannot read the config ({exc}); expected a JSON object of option names") from exc
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise InputError(f"{path}: unknown config keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return d
