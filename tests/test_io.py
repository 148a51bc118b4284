"""Volume I/O: canonical axial slicing for any orientation, and masks that line up on write-back."""

from __future__ import annotations

import gzip
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from runtime.errors import InputError
from runtime.io import read_labels, read_volume, write_bytes_atomic, write_mask
from tests.conftest import save_nifti

RAS_AFFINE = np.array([[0.8, 0, 0, -100.0], [0, 0.7, 0, -80.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])


def reoriented(data_ras: np.ndarray, affine_ras: np.ndarray, kind: str):
    """The same world content stored in another voxel layout (data, affine)."""
    if kind == "RAS":
        return data_ras, affine_ras
    shape = np.array(data_ras.shape)
    if kind == "LPS":  # flip i and j
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
        return data_ras[::-1, ::-1, :].copy(), affine_ras @ flip
    if kind == "flipped-z":
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = shape[2] - 1
        return data_ras[:, :, ::-1].copy(), affine_ras @ flip
    if kind == "permuted":  # file axes (k, i, j): a sagittal-major layout
        perm = np.zeros((4, 4))
        perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1
        return data_ras.transpose(2, 0, 1).copy(), affine_ras @ perm
    if kind == "oblique":  # 8 degrees about z: closest canonical is still RAS
        a = np.deg2rad(8)
        rot = np.eye(4)
        rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        return data_ras, rot @ affine_ras
    raise ValueError(kind)


KINDS = ["RAS", "LPS", "flipped-z", "permuted", "oblique"]


@pytest.fixture
def ras_volume(rng):
    return rng.integers(-1000, 1500, size=(24, 20, 12)).astype(np.int16)


@pytest.mark.parametrize("kind", KINDS)
def test_canonical_slices_are_the_same_whatever_the_layout(tmp_path, ras_volume, kind):
    data, affine = reoriented(ras_volume, RAS_AFFINE, kind)
    vol = read_volume(save_nifti(tmp_path / "v.nii.gz", data, affine))
    assert vol.data.shape == (12, 20, 24)  # (slices, rows, cols) = (z, y, x)
    np.testing.assert_array_equal(vol.data, ras_volume.transpose(2, 1, 0))
    np.testing.assert_allclose(vol.spacing, (2.5, 0.7, 0.8), rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_mask_written_back_lines_up_with_input_in_world_space(tmp_path, ras_volume, kind):
    """A mask that depends on position (patient's right half, upper slices) must land on the
    same world positions in the written file as in the input, voxel for voxel."""
    data, affine = reoriented(ras_volume, RAS_AFFINE, kind)
    src = save_nifti(tmp_path / "v.nii.gz", data, affine, qcode=1, scode=2)
    vol = read_volume(src)
    z, y, x = np.meshgrid(*[np.arange(s) for s in vol.data.shape], indexing="ij")
    mask = ((x >= vol.data.shape[2] // 2).astype(np.uint8) + (z >= 8)).astype(np.uint8)  # 0,1,2
    out = write_mask(mask, vol, tmp_path / "m.nii.gz")

    img = nib.load(str(out))
    assert img.shape == data.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 2
    written = np.asanyarray(img.dataobj)
    # expected from world coordinates of every voxel of the input file
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
    ras_vox = nib.affines.apply_affine(np.linalg.inv(RAS_AFFINE) @ affine, ijk).round().astype(int)
    if kind == "oblique":  # oblique: voxel indices line up with the RAS layout, world rotates
        ras_vox = ijk
    expected = (ras_vox[:, 0] >= 12).astype(np.uint8) + (ras_vox[:, 2] >= 8)
    np.testing.assert_array_equal(written.reshape(-1), expected)
    # and the written mask carries the same values where the input intensities say so
    np.testing.assert_array_equal(read_volume(out).data, mask)


def test_same_mask_same_bytes(tmp_path, ras_volume):
    vol = read_volume(save_nifti(tmp_path / "v.nii.gz", ras_volume, RAS_AFFINE))
    mask = (vol.data > 0).astype(np.uint8)
    a = write_mask(mask, vol, tmp_path / "a.nii.gz").read_bytes()
    b = write_mask(mask, vol, tmp_path / "b.nii.gz").read_bytes()
    assert a == b and gzip.decompress(a)[:4] == (348).to_bytes(4, "little")


def test_masks_written_without_isal_hold_the_same_image(tmp_path, ras_volume, monkeypatch):
    """zlib (where isal has no wheel) and ISA-L streams differ, but inflate to the same file."""
    pytest.importorskip("isal")
    vol = read_volume(save_nifti(tmp_path / "v.nii.gz", ras_volume, RAS_AFFINE))
    mask = (vol.data > 0).astype(np.uint8)
    fast = write_mask(mask, vol, tmp_path / "fast.nii.gz").read_bytes()
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal now fails
    slow = write_mask(mask, vol, tmp_path / "slow.nii.gz").read_bytes()
    assert fast != slow and gzip.decompress(fast) == gzip.decompress(slow)


def test_float_volume_with_nan_is_refused(tmp_path, ras_volume):
    data = ras_volume.astype(np.float32)
    data[3, 4, 5] = np.nan
    data[1, 1, 1] = np.inf
    with pytest.raises(InputError, match="2 voxels are NaN or Inf"):
        read_volume(save_nifti(tmp_path / "v.nii.gz", data, RAS_AFFINE))


@pytest.mark.parametrize(
    "shape, match", [((20, 30), "2 dimensions"), ((8, 8, 8, 3), "4 dimensions.*split"), ((8, 8, 1), "single slice")]
)
def test_wrong_dimensionality_is_refused(tmp_path, shape, match):
    with pytest.raises(InputError, match=match):
        read_volume(save_nifti(tmp_path / "v.nii.gz", np.zeros(shape, np.int16), np.eye(4)))


def test_4d_with_one_volume_is_accepted(tmp_path, ras_volume):
    vol = read_volume(save_nifti(tmp_path / "v.nii.gz", ras_volume[..., None], RAS_AFFINE))
    assert vol.data.shape == (12, 20, 24)


def test_missing_non_nifti_and_truncated_files(tmp_path, ras_volume):
    with pytest.raises(InputError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not a NIfTI"):
        read_volume(tmp_path / "x.txt")
    (tmp_path / "garbage.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(InputError, match="cannot be read as NIfTI"):
        read_volume(tmp_path / "garbage.nii.gz")
    full = save_nifti(tmp_path / "full.nii.gz", ras_volume, RAS_AFFINE).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="corrupt or truncated|cannot be read"):
        read_volume(tmp_path / "cut.nii.gz")


def test_labels_outside_classes_are_refused(tmp_path):
    lab = np.zeros((8, 8, 8), np.uint8)
    lab[2, 2, 2] = 3
    with pytest.raises(InputError, match="outside 0..2"):
        read_labels(save_nifti(tmp_path / "s.nii.gz", lab, np.eye(4)))


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_bytes_atomic(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_unwritable_or_missing_output_directory(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="does not exist"):
        write_bytes_atomic(tmp_path / "missing" / "a.bin", b"x")

    def denied(*args, **kwargs):  # what mkstemp raises in a read-only directory (root ignores mode bits)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("runtime.outputs.tempfile.mkstemp", denied)  # where the temp file is made
    with pytest.raises(InputError, match="cannot write there.*writable output directory"):
        write_bytes_atomic(tmp_path / "a.bin", b"x")
    assert not (tmp_path / "a.bin").exists()


@pytest.mark.parametrize("dtype", ["<i2", ">i2", "<f4", "u1"])
def test_isal_fast_read_gives_what_nibabel_gives(tmp_path, ras_volume, dtype, monkeypatch):
    pytest.importorskip("isal")
    from runtime import io as rio

    hdr = nib.Nifti1Header(endianness=dtype[0] if dtype[0] in "<>" else "<")
    values = ras_volume if dtype != "u1" else (ras_volume % 3).astype(np.uint8)
    img = nib.Nifti1Image(values.astype(dtype), RAS_AFFINE, hdr)
    img.header.set_slope_inter(1.0, 0.0)
    path = tmp_path / "v.nii.gz"
    nib.save(img, str(path))
    assert rio._read_gz_isal(nib.load(str(path)), path) is not None  # the fast path is the one taken
    fast = read_volume(path).data
    monkeypatch.setattr(rio, "_read_gz_isal", lambda img, path: None)
    slow = read_volume(path).data
    assert fast.dtype == slow.dtype and np.array_equal(fast, slow)


def test_scaled_files_are_left_to_nibabel(tmp_path, ras_volume):
    pytest.importorskip("isal")
    from runtime import io as rio

    img = nib.Nifti1Image(ras_volume, RAS_AFFINE)
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(img, str(path))
    assert rio._read_gz_isal(nib.load(str(path)), path) is None
    assert np.array_equal(
        read_volume(path).data, np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32).transpose(2, 1, 0)
    )


def test_corrupt_compressed_voxels_give_one_line(tmp_path, ras_volume):
    full = bytearray(save_nifti(tmp_path / "full.nii.gz", ras_volume, RAS_AFFINE).read_bytes())
    mid = len(full) // 2
    full[mid : mid + 64] = bytes(64)  # zeroed bytes inside the deflate stream
    (tmp_path / "bad.nii.gz").write_bytes(bytes(full))
    with pytest.raises(InputError, match="corrupt or truncated|cannot be read"):
        read_volume(tmp_path / "bad.nii.gz")


@pytest.mark.parametrize(
    "kind, streams, from_end",
    [("RAS", True, False), ("LPS", True, False), ("flipped-z", True, True), ("permuted", False, None)],
)
def test_streamed_read_hands_over_the_volume_before_its_voxels(tmp_path, ras_volume, kind, streams, from_end):
    """Files whose stored slices are axial are handed over at once and fill in slice by slice,
    from the end of the canonical stack the file starts with; the result is the plain read."""
    pytest.importorskip("isal")
    data, affine = reoriented(ras_volume, RAS_AFFINE, kind)
    path = save_nifti(tmp_path / "v.nii.gz", data, affine)
    seen = []
    vol = read_volume(path, on_open=lambda v: seen.append((v, v.arrival and v.arrival._have)))
    assert seen[0][0] is vol
    np.testing.assert_array_equal(vol.data, read_volume(path).data)
    if not streams:
        assert vol.arrival is None
        return
    assert seen[0][1] == 0 and vol.arrival.from_end == from_end  # nothing was in when it was handed over
    vol.arrival.wait(0, vol.num_slices)  # all in now: returns at once


def test_a_stream_that_breaks_fails_its_waiters_with_one_line(tmp_path, ras_volume):
    import threading

    pytest.importorskip("isal")
    full = bytearray(save_nifti(tmp_path / "full.nii.gz", ras_volume, RAS_AFFINE).read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(bytes(full[: len(full) // 2]))  # truncated mid-stream
    opened, errors = [], []

    def waiter(vol):
        def run():
            try:
                vol.arrival.wait(0, vol.num_slices)
            except InputError as exc:
                errors.append(str(exc))

        th = threading.Thread(target=run)
        th.start()
        opened.append(th)

    with pytest.raises(InputError, match="corrupt or truncated") as exc:
        read_volume(tmp_path / "cut.nii.gz", on_open=waiter)
    opened[0].join(5)
    assert errors == [str(exc.value)] and "\n" not in errors[0]
