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
