"""Hostile input through the four CLIs: each case is refused with one clean line and loses nothing.

Every case runs a real CLI in-process through its entry point (run_cli) with the working
directory inside the case's own folder, and asserts: a non-zero exit, exactly one line on
stderr, no traceback and no Python warning, and that nothing was created, removed or changed
anywhere in the case's folder or in the shared inputs (files already in the output folder stay
byte for byte the same; no partial or stray file appears).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tiny_models import threshold_model, threshold_spec
from runtime.io import write_nifti
from runtime.phantoms import make_phantom, phantom_images
from tests.conftest import save_nifti

SIZE, SLICES = 64, 12
AFFINE = np.diag([6.0, 6.0, 5.0, 1.0])


# ------------------------------------------------------------------ shared inputs, built once
@dataclass
class World:
    root: Path
    model: Path  # a tiny ONNX model with a spec
    ct: Path  # a tiny phantom CT that seg-run segments fine
    data: Path  # two labelled phantoms in the LiTS layout
    preds: Path  # seg-run-style masks for them


def _phantom_ct(seed: int = 5, index: int = 0):
    ph = make_phantom(seed, index, size=SIZE, slices=SLICES)
    return phantom_images(ph)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile-world")
    model = threshold_model(root / "model.onnx", threshold_spec(SIZE))
    img, _ = _phantom_ct()
    ct = write_nifti(img, root / "ct.nii.gz")
    data, preds = root / "data", root / "preds"
    data.mkdir()
    preds.mkdir()
    for k in range(2):
        img, seg = _phantom_ct(index=k)
        write_nifti(img, data / f"volume-{k}.nii.gz")
        write_nifti(seg, data / f"segmentation-{k}.nii.gz")
        write_nifti(seg, preds / f"volume-{k}_seg.nii.gz")
    return World(root, model, ct, data, preds)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind and, for regular files, a hash of the bytes (symlinks not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[str(p.relative_to(root))] = ("link", os.readlink(p))
            else:
                out[str(p.relative_to(root))] = ("dir" if stat.S_ISDIR(st.st_mode) else "other",)
    return out


def run_refused(main: Callable, prog: str, args: list, capsys) -> tuple[int, str]:
    """Run a CLI through its entry point; return (exit code, stderr) after asserting the error is clean."""
    from runtime.cliutil import run_cli

    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run_cli(main, prog, [str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    lines += [f"warning: {w.category.__name__}: {w.message}" for w in caught]
    assert code != 0, f"exit 0 for hostile input; stdout: {out.out!r} stderr: {out.err!r}"
    assert len(lines) == 1, f"expected exactly one line on stderr, got {lines}"
    assert "Traceback" not in out.err and "internal error" not in out.err, out.err
    return code, lines[0]


def cli_of(prog: str):
    if prog == "seg-run":
        from runtime.cli import cli
    elif prog == "seg-export":
        from export.cli import cli
    elif prog == "seg-train":
        from train.cli import cli
    else:
        from benchmarks.cli import cli
    return cli


# ------------------------------------------------------------------ hostile files
def nii(path: Path, data: np.ndarray, affine=AFFINE, qcode: int = 1, scode: int = 1) -> Path:
    return save_nifti(path, data, affine, qcode, scode)


def ct_array(dtype=np.int16) -> np.ndarray:
    img, _ = _phantom_ct()
    return np.asanyarray(img.dataobj).astype(dtype)


def header_only(path: Path, shape, gz: bool) -> Path:
    """A header promising ``shape`` int16 voxels, followed by a few hundred bytes."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    raw = hdr.binaryblock + b"\0" * 4 + bytes(600)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def truncated(src: Path, path: Path, keep: float = 0.5) -> Path:
    raw = src.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def corrupt_gzip(src: Path, path: Path) -> Path:
    raw = bytearray(src.read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = bytes(64)  # the stream's CRC cannot match any more, if it inflates at all
    path.write_bytes(bytes(raw))
    return path


def with_header(path: Path, edit: Callable[[nib.Nifti1Image], None], data=None, gz: bool = True) -> Path:
    img = nib.Nifti1Image(ct_array() if data is None else data, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    edit(img)
    nib.save(img, str(path))
    return path


def patched(path: Path, **fields) -> Path:
    """A phantom CT whose header fields are then overwritten as given (nibabel itself refuses to
    write such headers, or rewrites them from the affine)."""
    img = nib.Nifti1Image(ct_array(), AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header(binaryblock=bytes(raw[:348]))
    for key, value in fields.items():
        hdr[key] = value
    raw[:348] = hdr.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


def sform(affine) -> dict:
    a = np.asarray(affine, float)
    return dict(qform_code=0, sform_code=1, srow_x=a[0], srow_y=a[1], srow_z=a[2])


def big_slope(img: nib.Nifti1Image) -> None:
    img.header.set_slope_inter(1e38, 0.0)


def rgb_volume(path: Path) -> Path:
    rgb = np.zeros((SIZE, SIZE, SLICES), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return nii(path, rgb)


def stride_model(path: Path) -> Path:
    """A model whose output is half the size of its input: a 1x1 convolution with stride 2."""
    return threshold_model(path, threshold_spec(SIZE), stride=2)


def noise(n: int) -> bytes:
    """Garbage bytes, the same on every run."""
    return np.random.default_rng(n).bytes(n)


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def symlink_loop(path: Path) -> Path:
    other = path.with_name("loop-b.nii.gz")
    os.symlink(other, path)
    os.symlink(path, other)
    return path


def link(path: Path, target) -> Path:
    os.symlink(target, path)
    return path


def dataset_with(case: Path, world: World, image: Callable[[Path, Path], Path] | None = None, label=None) -> Path:
    """A copy of the world's two-case dataset in the case folder, with volume-1 or its label replaced."""
    d = case / "data"
    d.mkdir()
    for p in world.data.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    if image:
        image(world.data / "volume-1.nii.gz", d / "volume-1.nii.gz")
    if label:
        label(d / "segmentation-1.nii.gz")
    return d


# ------------------------------------------------------------------ the cases
# (id, prog, builder(case_dir, out_dir, world) -> argv, words the error line must hold)
def seg_run(inputs: Callable[[Path, World], object], *extra, words: str = ""):
    def build(case: Path, out: Path, w: World) -> list:
        src = inputs(case, w)
        return [*(src if isinstance(src, list) else [src]), "--model", w.model, "-o", out, *extra]

    return ("seg-run", build, words)


def run_with(model: Callable[[Path, World], object], *extra, words: str = ""):
    def build(case: Path, out: Path, w: World) -> list:
        return [w.ct, "--model", model(case, w), "-o", out, *extra]

    return ("seg-run", build, words)


def cmd(prog: str, argv: Callable[[Path, Path, World], list], words: str = ""):
    return (prog, argv, words)


def good(case: Path, w: World) -> Path:
    return w.ct


CASES = {
    # --- seg-run: files that are not (complete) NIfTI volumes
    "missing-file": seg_run(lambda c, w: c / "nope.nii.gz", words="no such file"),
    "empty-directory": seg_run(lambda c, w: (c / "empty").mkdir() or c / "empty", words="no .nii"),
    "glob-matches-nothing": seg_run(lambda c, w: str(c / "*.nii.gz"), words="matches no files"),
    "not-nifti-suffix": seg_run(lambda c, w: (c / "scan.txt").write_text("x") and c / "scan.txt", words="not a NIfTI"),
    "empty-nii-gz": seg_run(lambda c, w: (c / "e.nii.gz").write_bytes(b"") or c / "e.nii.gz"),
    "truncated-gzip": seg_run(lambda c, w: truncated(w.ct, c / "t.nii.gz"), words="truncated"),
    "truncated-gzip-tail": seg_run(lambda c, w: truncated(w.ct, c / "t.nii.gz", 0.97), words="truncated"),
    "corrupt-gzip": seg_run(lambda c, w: corrupt_gzip(w.ct, c / "c.nii.gz")),
    "garbage-nii": seg_run(lambda c, w: (c / "g.nii").write_bytes(noise(2000)) or c / "g.nii"),
    "truncated-nii": seg_run(
        lambda c, w: truncated(nii(c / "full.nii", ct_array()), c / "t.nii", 0.6), words="truncated"
    ),
    "header-4000-cubed-nii": seg_run(lambda c, w: header_only(c / "h.nii", (4000,) * 3, False), words="4000x4000x4000"),
    "header-4000-cubed-gz": seg_run(lambda c, w: header_only(c / "h.nii.gz", (4000,) * 3, True), words="cannot hold"),
    # --- seg-run: shapes and voxel types
    "2d-image": seg_run(lambda c, w: nii(c / "a.nii.gz", ct_array()[:, :, 0]), words="2 dimensions"),
    "4d-image": seg_run(lambda c, w: nii(c / "a.nii.gz", np.stack([ct_array()] * 2, -1)), words="4D"),
    "5d-image": seg_run(lambda c, w: nii(c / "a.nii.gz", ct_array()[..., None, None].repeat(2, 4)), words="5"),
    "zero-length-axis": seg_run(lambda c, w: nii(c / "a.nii", np.zeros((SIZE, SIZE, 0), np.int16)), words="length 0"),
    "single-slice": seg_run(lambda c, w: nii(c / "a.nii.gz", ct_array()[:, :, :1]), words="single slice"),
    "nan-voxels": seg_run(
        lambda c, w: nii(c / "a.nii.gz", np.where(ct_array(np.float32) > 0, np.nan, ct_array(np.float32))),
        words="NaN or Inf",
    ),
    "inf-voxels": seg_run(
        lambda c, w: nii(c / "a.nii.gz", np.where(ct_array() > 0, np.inf, -1000.0).astype(np.float32)),
        words="NaN or Inf",
    ),
    "complex-voxels": seg_run(lambda c, w: nii(c / "a.nii.gz", ct_array(np.complex64)), words="complex"),
    "rgb-voxels": seg_run(lambda c, w: rgb_volume(c / "a.nii.gz"), words="voxel type"),
    "scale-1e38": seg_run(lambda c, w: with_header(c / "a.nii.gz", big_slope), words="NaN or Inf"),
    # --- seg-run: geometry
    "zero-affine": seg_run(lambda c, w: patched(c / "a.nii.gz", **sform(np.zeros((4, 4)))), words="singular"),
    "nan-affine": seg_run(lambda c, w: patched(c / "a.nii.gz", **sform(np.full((4, 4), np.nan))), words="NaN"),
    "singular-affine": seg_run(
        lambda c, w: patched(c / "a.nii.gz", **sform([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])), words="singular"
    ),
    "zero-voxel-size-no-codes": seg_run(
        lambda c, w: patched(c / "a.nii", qform_code=0, sform_code=0, pixdim=[1, 0, 0, 0, 1, 1, 1, 1])
    ),
    "negative-voxel-size-no-codes": seg_run(
        lambda c, w: patched(c / "a.nii", qform_code=0, sform_code=0, pixdim=[1, -6, -6, -5, 1, 1, 1, 1])
    ),
    "50mm-pixels": seg_run(
        lambda c, w: nii(c / "a.nii.gz", ct_array(), np.diag([50.0, 50.0, 5.0, 1.0])), words="pixel size"
    ),
    "0.01mm-pixels": seg_run(
        lambda c, w: nii(c / "a.nii.gz", ct_array(), np.diag([0.01, 0.01, 5.0, 1.0])), words="pixel size"
    ),
    "100mm-slices": seg_run(
        lambda c, w: nii(c / "a.nii.gz", ct_array(), np.diag([6.0, 6.0, 100.0, 1.0])), words="slice spacing"
    ),
    # --- seg-run: voxels that are not CT
    "all-zero-volume": seg_run(lambda c, w: nii(c / "a.nii.gz", np.zeros((SIZE, SIZE, SLICES), np.int16)), words="0"),
    "constant-volume": seg_run(
        lambda c, w: nii(c / "a.nii.gz", np.full((SIZE, SIZE, SLICES), 40, np.int16)), words="every voxel"
    ),
    "air-only": seg_run(
        lambda c, w: nii(
            c / "a.nii.gz", (np.random.default_rng(0).normal(-1000, 30, (SIZE, SIZE, SLICES))).astype(np.int16)
        ),
        words="air only",
    ),
    "raw-uint16-counts": seg_run(lambda c, w: nii(c / "a.nii.gz", (ct_array(np.int32) + 1024) * 20), words="beyond"),
    "normalised-0-1": seg_run(lambda c, w: nii(c / "a.nii.gz", (ct_array(np.float32) + 1024) / 4000), words="not a CT"),
    # --- seg-run: special files
    "symlink-loop": seg_run(lambda c, w: symlink_loop(c / "loop.nii.gz"), words="loop"),
    "dangling-symlink": seg_run(lambda c, w: link(c / "d.nii.gz", c / "gone.nii.gz"), words="leads nowhere"),
    "fifo": seg_run(lambda c, w: fifo(c / "f.nii.gz"), words="not a regular file"),
    "dev-zero-link": seg_run(lambda c, w: link(c / "z.nii", "/dev/zero"), words="not a regular file"),
    "dev-zero": seg_run(lambda c, w: "/dev/zero", words="not a NIfTI"),
    # --- seg-run: models
    "model-missing": run_with(lambda c, w: c / "none.onnx", words="no such model"),
    "model-directory": run_with(lambda c, w: (c / "m.onnx").mkdir() or c / "m.onnx", words="is a directory"),
    "model-garbage": run_with(lambda c, w: (c / "m.onnx").write_bytes(noise(300)) or c / "m.onnx"),
    "model-empty": run_with(lambda c, w: (c / "m.onnx").write_bytes(b"") or c / "m.onnx"),
    "model-without-spec": run_with(lambda c, w: threshold_model(c / "m.onnx", spec_json=False), words="no spec"),
    "model-output-half-size": run_with(lambda c, w: stride_model(c / "m.onnx"), words="32x32"),
    "tensorrt-with-onnx": run_with(lambda c, w: w.model, "--backend", "tensorrt", words="not a TensorRT plan"),
    "garbage-plan": run_with(lambda c, w: (c / "m.plan").write_bytes(noise(300)) or c / "m.plan"),
    # --- seg-run: options
    "threads-100000": seg_run(good, "--threads", "100000", words="at most"),
    "streams-1000": seg_run(good, "--streams", "1000", words="at most"),
    "min-tumour-inf": seg_run(good, "--min-tumour-ml", "inf", words="finite"),
    "min-tumour-nan": seg_run(good, "--min-tumour-ml", "nan", words="finite"),
    "min-tumour-negative": seg_run(good, "--min-tumour-ml", "-1"),
    "batch-size-0": seg_run(good, "--batch-size", "0"),
    "unknown-option": seg_run(good, "--frobnicate"),
    "no-inputs": cmd("seg-run", lambda c, o, w: ["--model", w.model, "-o", o], words="give one or more"),
    "no-out": cmd("seg-run", lambda c, o, w: [w.ct, "--model", w.model], words="--out"),
    "out-empty-string": cmd("seg-run", lambda c, o, w: [w.ct, "--model", w.model, "-o", ""], words="empty"),
    "out-below-a-file": cmd("seg-run", lambda c, o, w: [w.ct, "--model", w.model, "-o", o / "keep.txt" / "sub"]),
    # --- seg-export
    "export-empty-pt": cmd("seg-export", lambda c, o, w: ["onnx", _empty(c / "e.pt"), "-o", o / "m.onnx"], "empty"),
    "export-garbage-pt": cmd(
        "seg-export", lambda c, o, w: ["onnx", _garbage(c / "g.pt"), "-o", o / "m.onnx"], "checkpoint"
    ),
    "export-pt-is-directory": cmd(
        "seg-export", lambda c, o, w: ["onnx", _dir(c / "run.pt"), "-o", o / "m.onnx"], "directory"
    ),
    "export-missing-pt": cmd("seg-export", lambda c, o, w: ["onnx", c / "none.pt", "-o", o / "m.onnx"], "no such"),
    "export-out-empty": cmd("seg-export", lambda c, o, w: ["onnx", c / "none.pt", "-o", ""], "empty"),
    "export-empty-calibration": cmd(
        "seg-export",
        lambda c, o, w: ["quantize", w.model, "--precision", "int8", "--calib", _dir(c / "cal"), "-o", o / "q.onnx"],
    ),
    "export-int8-without-calib": cmd(
        "seg-export", lambda c, o, w: ["quantize", w.model, "--precision", "int8", "-o", o / "q.onnx"], "--calib"
    ),
    "export-max-drop-nan": cmd(
        "seg-export",
        lambda c, o, w: ["quantize", w.model, "--precision", "fp16", "--max-dice-drop", "nan", "-o", o / "q.onnx"],
        "finite",
    ),
    "export-garbage-onnx": cmd(
        "seg-export",
        lambda c, o, w: [
            "quantize",
            _garbage(c / "g.onnx"),
            "--precision",
            "fp16",
            "--eval-data",
            w.data,
            "-o",
            o / "q.onnx",
        ],
    ),
    "export-batch-profile-inverted": cmd(
        "seg-export",
        lambda c, o, w: ["build-engine", w.model, "-o", o / "m.plan", "--min-batch", "4", "--max-batch", "2"],
    ),
    # --- seg-train
    "phantoms-below-a-file": cmd(
        "seg-train", lambda c, o, w: ["phantoms", o / "keep.txt" / "ph", "--cases", "1"], "file"
    ),
    "phantoms-zero-cases": cmd("seg-train", lambda c, o, w: ["phantoms", o / "ph", "--cases", "0"]),
    "fit-empty-dir": cmd("seg-train", lambda c, o, w: ["fit", _dir(c / "d"), "--out", o / "run"], "no labelled cases"),
    "fit-truncated-image": cmd(
        "seg-train",
        lambda c, o, w: ["fit", dataset_with(c, w, image=lambda s, d: truncated(s, d, 0.8)), "--out", o / "run"],
        "truncated",
    ),
    "fit-label-shape-mismatch": cmd(
        "seg-train",
        lambda c, o, w: [
            "fit",
            dataset_with(c, w, label=lambda p: nii(p, np.zeros((SIZE, SIZE, SLICES + 1), np.uint8))),
            "--out",
            o / "run",
        ],
        "shape",
    ),
    "fit-threads-100000": cmd(
        "seg-train", lambda c, o, w: ["fit", w.data, "--out", o / "run", "--threads", "100000"], "at most"
    ),
    "fit-lr-nan": cmd("seg-train", lambda c, o, w: ["fit", w.data, "--out", o / "run", "--lr", "nan"], "finite"),
    "fit-lr-inf": cmd("seg-train", lambda c, o, w: ["fit", w.data, "--out", o / "run", "--lr", "inf"], "finite"),
    "fit-config-garbage": cmd(
        "seg-train",
        lambda c, o, w: ["fit", w.data, "--out", o / "run", "--config", _text(c / "cfg.json", "{not json")],
        "config",
    ),
    "fit-out-is-a-file": cmd("seg-train", lambda c, o, w: ["fit", w.data, "--out", o / "keep.txt"], "not a directory"),
    "evaluate-min-tumour-inf": cmd(
        "seg-train", lambda c, o, w: ["evaluate", _empty(c / "e.pt"), w.data, "--min-tumour-ml", "inf"], "finite"
    ),
    "evaluate-empty-checkpoint": cmd("seg-train", lambda c, o, w: ["evaluate", _empty(c / "e.pt"), w.data], "empty"),
    "compare-garbage-metrics": cmd(
        "seg-train", lambda c, o, w: ["compare", _text(c / "a.json", "[]"), _text(c / "b.json", "{}")], "metrics file"
    ),
    # --- seg-bench
    "score-arguments-swapped": cmd("seg-bench", lambda c, o, w: ["score", w.data, w.preds, "-o", o], "PRED_DIR"),
    "score-missing-predictions": cmd(
        "seg-bench", lambda c, o, w: ["score", c / "none", w.data, "-o", o], "not a directory"
    ),
    "score-grid-mismatch": cmd(
        "seg-bench",
        lambda c, o, w: ["score", _preds(c, w), c / "labels"],
        "same grid",
    ),
    "score-out-empty": cmd("seg-bench", lambda c, o, w: ["score", w.preds, w.data, "-o", ""], "empty"),
    "latency-truncated-volume": cmd(
        "seg-bench",
        lambda c, o, w: ["latency", w.model, "--volumes", truncated(w.ct, c / "t.nii.gz"), "--quick", "-o", o / "r"],
        "truncated",
    ),
    "latency-threads-100000": cmd(
        "seg-bench", lambda c, o, w: ["latency", w.model, "--threads", "100000", "-o", o / "r"], "at most"
    ),
    "latency-bad-batches": cmd("seg-bench", lambda c, o, w: ["latency", w.model, "--batch", "1,x", "-o", o / "r"]),
    "parity-max-drop-inf": cmd(
        "seg-bench",
        lambda c, o, w: ["parity", w.model, w.model, "--data", w.data, "--max-dice-drop", "inf", "-o", o / "r"],
        "finite",
    ),
    "parity-empty-data": cmd(
        "seg-bench", lambda c, o, w: ["parity", w.model, w.model, "--data", _dir(c / "d"), "-o", o / "r"], "no labelled"
    ),
}


def _empty(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _garbage(p: Path) -> Path:
    p.write_bytes(noise(500))
    return p


def _dir(p: Path) -> Path:
    p.mkdir()
    return p


def _text(p: Path, text: str) -> Path:
    p.write_text(text)
    return p


def _preds(case: Path, w: World) -> Path:
    """A prediction on another grid than its label's (one slice short), and a folder of that one label."""
    d, labels = _dir(case / "preds"), _dir(case / "labels")
    nii(d / "volume-0_seg.nii.gz", np.zeros((SIZE, SIZE, SLICES - 1), np.uint8))
    (labels / "volume-0.nii.gz").write_bytes((w.data / "segmentation-0.nii.gz").read_bytes())
    return d


def test_there_are_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_cleanly(name, world, tmp_path, capsys, monkeypatch):
    prog, build, words = CASES[name]
    case = tmp_path / "case"
    out = case / "out"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("results of an earlier run\n")
    (out / "earlier_seg.nii.gz").write_bytes(noise(256))
    (out / "earlier.json").write_text('{"liver_ml": 1500.0}\n')
    monkeypatch.chdir(case)  # whatever is written to the working directory lands here, and is seen
    argv = build(case, out, world)
    before, shared = snapshot(case), snapshot(world.root)
    _, line = run_refused(cli_of(prog), prog, argv, capsys)
    if words:
        assert words.lower() in line.lower(), line
    assert snapshot(case) == before, "files appeared, vanished or changed"
    assert snapshot(world.root) == shared, "an input changed"


def test_a_header_that_needs_more_memory_than_is_free_is_refused_before_allocating(tmp_path, world, capsys):
    from runtime.geometry import MEMORY_FACTOR, available_memory

    free = available_memory()
    if free is None or free > 64e9:
        pytest.skip("needs a known amount of free memory below 64 GB")
    n = int(free / MEMORY_FACTOR * 1.2 / 2 / 512 / 512) + 1  # int16 slices: a little more than is free
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((512, 512, n))
    hdr.set_data_dtype(np.int16)
    hdr.set_qform(np.diag([0.8, 0.8, 1.0, 1.0]), code=1)
    src = tmp_path / "huge.nii.gz"
    with open(src, "wb") as f:  # big enough that deflate could hold the voxels: only memory stands in the way
        body = np.random.default_rng(0).bytes(2 * 512 * 512 * n // 1000)
        f.write(gzip.compress(hdr.binaryblock + b"\0" * 4 + body, compresslevel=1))
    out = tmp_path / "out"
    out.mkdir()
    _, line = run_refused(cli_of("seg-run"), "seg-run", [src, "--model", world.model, "-o", out], capsys)
    assert "of memory" in line and list(out.iterdir()) == []


def test_bad_volumes_do_not_stop_the_batch(tmp_path, world, capsys):
    """Volumes that fail in different ways are reported one line each; the good ones are segmented."""
    from runtime.cliutil import run_cli

    bad = [
        header_only(tmp_path / "a-huge.nii", (4000,) * 3, False),
        truncated(world.ct, tmp_path / "b-truncated.nii.gz"),
        nii(tmp_path / "c-flat.nii.gz", np.zeros((SIZE, SIZE, SLICES), np.int16)),
    ]
    good = tmp_path / "d-good.nii.gz"
    good.write_bytes(world.ct.read_bytes())
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(cli_of("seg-run"), "seg-run", [str(tmp_path), "--model", str(world.model), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 1
    assert err[-1] == "3 of 4 volume(s) failed" and len(err) == 4, err
    assert all(line.startswith("error: ") and name.name in line for line, name in zip(err, bad))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["d-good.json", "d-good_seg.nii.gz"]


def test_every_json_we_write_is_strict(tmp_path):
    import json

    from runtime.io import write_json_atomic
    from runtime.spec import ModelSpec

    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    path = write_json_atomic(tmp_path / "r.json", {"a": float("nan"), "b": [np.float32("inf"), 2], "c": 1.5})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [None, 2], "c": 1.5}
    from dataclasses import replace

    spec = replace(threshold_spec(SIZE), parity={"max_abs_diff": float("nan")})
    text = spec.to_json()
    assert json.loads(text, parse_constant=refuse)["parity"] == {"max_abs_diff": None}
    assert ModelSpec.from_json(text).preprocess == spec.preprocess
