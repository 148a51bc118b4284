"""Shared fixtures: tiny generated volumes only, written under pytest's tmp_path."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest


def save_nifti(path, data, affine, qcode: int = 1, scode: int = 1):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def run_main(cli, args, capsys, prog: str = "seg-run") -> tuple[int, str]:
    """Run a CLI through its real entry point (one-line errors, exit codes); returns (code, stdout+stderr)."""
    from runtime.cliutil import run_cli

    capsys.readouterr()
    try:
        run_cli(cli, prog, [str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out + out.err


TINY = dict(
    base_width=8,
    amp="off",
    size=64,
    spacing_mm=6.0,
    crop=0,
    batch_size=8,
    workers=0,
    val_cases=1,
    warmup_epochs=0,
    bn_slices=32,
    cache_volumes=8,
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Four tiny phantoms (64 px, 20 slices) in the LiTS layout, and two held-out ones."""
    from runtime.phantoms import write_phantoms

    root = tmp_path_factory.mktemp("tiny")
    write_phantoms(root / "train", cases=4, seed=11, size=64, slices=20, progress=False)
    write_phantoms(root / "heldout", cases=2, seed=11, start=50, size=64, slices=20, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory):
    """A tiny UNet trained for a few dozen steps: (run dir, TrainConfig)."""
    pytest.importorskip("torch")
    from train.config import TrainConfig
    from train.loop import fit

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(**TINY, epochs=6, steps_per_epoch=20, val_every=1, patience=10, lr=3e-3)
    fit(tiny_data / "train", out, cfg, log=lambda *a: None)
    return out, cfg
