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
