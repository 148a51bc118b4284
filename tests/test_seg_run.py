"""seg-run end to end on tiny phantoms with a tiny threshold model (no torch)."""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.tiny_models import threshold_model
from runtime.cli import cli
from runtime.errors import SpecError
from runtime.io import write_nifti
from runtime.phantoms import make_phantom, phantom_images
from tests.conftest import run_main, save_nifti


@pytest.fixture
def model(tmp_path):
    return threshold_model(tmp_path / "m.onnx")


def write_case(path, index=0, layout_flip=False, seed=3):
    ph = make_phantom(seed, index, size=64, slices=16)
    img, _ = phantom_images(ph)
    if layout_flip:  # the same world content stored flipped in i and j (RAS <-> LPS)
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [ph.hu.shape[0] - 1, ph.hu.shape[1] - 1]
        img = nib.Nifti1Image(ph.hu[::-1, ::-1].copy(), ph.affine @ flip)
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    write_nifti(img, path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_masks_line_up_with_inputs_in_any_orientation(tmp_path, model):
    a = write_case(tmp_path / "in" / "a.nii.gz") if (tmp_path / "in").mkdir() is None else None
    b = write_case(tmp_path / "in" / "b.nii.gz", layout_flip=True)
    r = run(tmp_path / "in", "--model", model, "-o", tmp_path / "out", "--no-postprocess")
    assert r.exit_code == 0, r.output
    ma = nib.load(str(tmp_path / "out" / "a_seg.nii.gz"))
    mb = nib.load(str(tmp_path / "out" / "b_seg.nii.gz"))
    va, vb = nib.load(str(a)), nib.load(str(b))
    assert ma.shape == va.shape and np.allclose(ma.affine, va.affine) and np.allclose(mb.affine, vb.affine)
    da, db = np.asanyarray(ma.dataobj), np.asanyarray(mb.dataobj)
    np.testing.assert_array_equal(da, db[::-1, ::-1])  # same world content -> same world mask
    # the mask follows the intensities of its own file voxel for voxel (a flipped mask would not)
    hu = np.asanyarray(va.dataobj)
    body = hu > -500
    agree = ((da == 1) == (hu > -200 + 0.55 * 450))[body].mean()
    assert agree > 0.9
    report = json.loads((tmp_path / "out" / "a.json").read_text())
    assert report["backend"] == "onnxruntime" and report["precision"] == "fp32" and len(report["model_sha256"]) == 64
    assert set(report["timings_s"]) >= {"read", "preprocess", "infer", "postprocess", "write", "wall"}
    assert report["liver_ml"] > 0


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_streaming_pipeline_equals_simple_batches(tmp_path, model, streams):
    """With any number of batches in flight, every batch lands on its own slices."""
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.io import read_volume
    from runtime.pipeline import SegmentOptions, segment_canonical
    from runtime.preprocess import logits_to_labels, make_batch, slice_grid

    vol = read_volume(write_case(tmp_path / "v.nii.gz"))
    with OnnxRuntimeBackend(model, streams=streams) as be:
        assert be.in_flight == streams
        streamed = segment_canonical(vol.data, vol.spacing, be.spec, be, SegmentOptions(batch_size=3))
        grid = slice_grid(vol.data.shape[1:], vol.spacing[1:], be.spec.preprocess)
        simple = logits_to_labels(
            be.infer(make_batch(vol.data, vol.spacing, be.spec.preprocess, 0, vol.num_slices, grid)), grid
        )
    np.testing.assert_array_equal(streamed, simple)


def test_pipeline_keeps_batches_queued_behind_the_cpu_streams(tmp_path, model):
    """A stream that finishes must find the next batch waiting, not idle until the oldest is collected."""
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.io import read_volume
    from runtime.pipeline import SegmentOptions, segment_canonical

    vol = read_volume(write_case(tmp_path / "v.nii.gz"))
    with OnnxRuntimeBackend(model, streams=2) as be:
        assert be.queued == 2
        outstanding, most = [0], [0]
        submit, collect = be.submit, be.collect

        def counting_submit(batch):
            outstanding[0] += 1
            most[0] = max(most[0], outstanding[0])
            return submit(batch)

        def counting_collect(token):
            outstanding[0] -= 1
            return collect(token)

        be.submit, be.collect = counting_submit, counting_collect
        segment_canonical(vol.data, vol.spacing, be.spec, be, SegmentOptions(batch_size=1))
    assert most[0] == be.in_flight + be.queued == 4 and outstanding[0] == 0


def test_components_labelled_during_inference_give_the_usual_postprocessing(tmp_path, model):
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.cli import segment_files
    from runtime.io import read_volume
    from runtime.pipeline import SegmentOptions, segment_canonical
    from runtime.postprocess import postprocess

    src = write_case(tmp_path / "v.nii.gz", seed=5)
    vol = read_volume(src)
    with OnnxRuntimeBackend(model, streams=2) as be:
        raw = segment_canonical(vol.data, vol.spacing, be.spec, be, SegmentOptions(batch_size=1))
        (tmp_path / "out").mkdir()
        report = segment_files([src], be, tmp_path / "out", 1, echo=lambda *a, **k: None)[src]
    mask = np.asarray(nib.load(report["mask"]).dataobj)
    reference = postprocess(raw)
    assert (raw >= 1).sum() > (reference >= 1).sum() > 0  # the threshold model finds more than the liver
    np.testing.assert_array_equal(vol.to_file_layout(reference), mask)


def test_min_tumour_ml_drops_lesions_below_it_and_is_reported(tmp_path):
    model = threshold_model(tmp_path / "m.onnx", tumour_level=0.62)  # bright voxels are tumour: lesions of 1-500 mL
    src = write_case(tmp_path / "v.nii.gz", seed=5)
    masks, reports = {}, {}
    for ml in (0, 30, 10_000):
        assert run(src, "--model", model, "-o", tmp_path / f"o{ml}", "--min-tumour-ml", ml).exit_code == 0
        masks[ml] = np.asarray(nib.load(tmp_path / f"o{ml}" / "v_seg.nii.gz").dataobj)
        reports[ml] = json.loads((tmp_path / f"o{ml}" / "v.json").read_text())
    assert reports[0]["tumor_count"] > reports[30]["tumor_count"] > 0
    assert reports[30]["tumor_ml"] >= 30 * reports[30]["tumor_count"]
    assert reports[10_000]["tumor_count"] == 0 and reports[10_000]["min_tumour_ml"] == 10_000
    for ml in (30, 10_000):
        np.testing.assert_array_equal(masks[ml] >= 1, masks[0] >= 1)  # dropped lesions stay liver


def test_wall_time_counts_the_read_once(tmp_path, model, monkeypatch):
    """A volume's wall time spans its read and everything after it, and nothing twice."""
    import time

    import runtime.pipeline as rp  # seg-run reads through runtime.pipeline.read_any
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.cli import segment_files

    def slow_read(path, on_open=None, **options):
        time.sleep(0.4)
        return real(path, on_open=on_open, **options)

    real = rp.read_volume
    monkeypatch.setattr(rp, "read_volume", slow_read)
    src = write_case(tmp_path / "v.nii.gz")
    (tmp_path / "out").mkdir()
    with OnnxRuntimeBackend(model) as be:
        began = time.perf_counter()
        report = segment_files([src], be, tmp_path / "out", 2, echo=lambda *a, **k: None)[src]
        elapsed = time.perf_counter() - began
    timings = report["timings_s"]
    assert timings["read"] >= 0.4 and timings["read"] < timings["wall"] <= elapsed


def test_a_failing_batch_stops_the_pipeline_with_its_error(tmp_path, model, monkeypatch):
    """An error while a batch is brought back to the scan's grid (in its own thread) reaches
    the caller, and no pipeline thread outlives the call."""
    import threading

    import runtime.pipeline as rp
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.io import read_volume

    calls = []

    def flaky(logits, grid, activation):
        calls.append(len(logits))
        if len(calls) == 2:
            raise MemoryError("no room for batch 2")
        return real(logits, grid, activation)

    real = rp.logits_to_labels
    monkeypatch.setattr(rp, "logits_to_labels", flaky)
    vol = read_volume(write_case(tmp_path / "v.nii.gz"))
    with OnnxRuntimeBackend(model) as be, pytest.raises(MemoryError, match="batch 2"):
        rp.segment_canonical(vol.data, vol.spacing, be.spec, be, rp.SegmentOptions(batch_size=2))
    assert not [th for th in threading.enumerate() if th.name.startswith(("postprocess", "preprocess", "ort-stream"))]


def test_probability_maps_have_the_input_geometry_and_agree_with_the_mask(tmp_path, model):
    b = write_case(tmp_path / "b.nii.gz", layout_flip=True)
    r = run(b, "--model", model, "-o", tmp_path / "out", "--no-postprocess", "--probabilities")
    assert r.exit_code == 0, r.output
    prob_img, mask_img, src = (
        nib.load(str(p)) for p in (tmp_path / "out" / "b_prob.nii.gz", tmp_path / "out" / "b_seg.nii.gz", b)
    )
    assert prob_img.shape == (*src.shape, 3) and np.allclose(prob_img.affine, src.affine)
    prob, mask = prob_img.get_fdata(), np.asanyarray(mask_img.dataobj)
    assert prob.min() >= 0 and prob.max() <= 1.0 + 1e-6
    assert np.abs(prob.sum(axis=-1) - 1).max() <= 3 / 255 + 1e-6  # rounding of three uint8 channels
    assert np.mean(prob.argmax(axis=-1) == mask) > 0.99  # the same logits, only rounding and ties differ
    assert json.loads((tmp_path / "out" / "b.json").read_text())["probabilities"].endswith("b_prob.nii.gz")


def test_batch_with_bad_files_reports_each_and_writes_the_good_ones(tmp_path, model, capsys):
    d = tmp_path / "in"
    d.mkdir()
    write_case(d / "good.nii.gz")
    good = (d / "good.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    (d / "garbage.nii.gz").write_bytes(b"not a nifti at all")
    save_nifti(d / "flat.nii.gz", np.zeros((32, 32), np.int16), np.eye(4))
    nan = np.zeros((16, 16, 8), np.float32)
    nan[1, 1, 1] = np.nan
    save_nifti(d / "nan.nii.gz", nan, np.eye(4))
    code, err = run_main(cli, [d, tmp_path / "missing.nii.gz", "--model", model, "-o", tmp_path / "out"], capsys)
    assert code == 1
    for needle in (
        "truncated.nii.gz: voxel data is corrupt or truncated",
        "garbage.nii.gz: cannot be read as NIfTI",
        "flat.nii.gz: image has 2 dimensions",
        "nan.nii.gz: 1 voxels are NaN",
        "missing.nii.gz: no such file",
        "5 of 6 volume(s) failed",
    ):
        assert needle in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.json", "good_seg.nii.gz"]


def test_a_lits_dataset_folder_segments_its_volumes_not_its_label_maps(tmp_path, model):
    d = tmp_path / "lits"
    d.mkdir()
    write_case(d / "volume-0.nii.gz")
    write_nifti(phantom_images(make_phantom(3, 0, size=64, slices=16))[1], d / "segmentation-0.nii.gz")
    r = run(d, "--model", model, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["volume-0.json", "volume-0_seg.nii.gz"]


def test_skip_existing_continues_an_interrupted_batch(tmp_path, model):
    d = tmp_path / "in"
    d.mkdir()
    for k in range(2):
        write_case(d / f"c{k}.nii.gz", index=k)
    out = tmp_path / "out"
    assert run(d / "c0.nii.gz", "--model", model, "-o", out).exit_code == 0
    before = (out / "c0_seg.nii.gz").stat().st_mtime_ns
    r = run(d, "--model", model, "-o", out, "--skip-existing")
    assert r.exit_code == 0 and "c0.nii.gz: done already, skipped" in r.output
    assert (out / "c0_seg.nii.gz").stat().st_mtime_ns == before and (out / "c1_seg.nii.gz").exists()


def test_non_ct_intensities_are_refused_unless_forced(tmp_path, model):
    ph = make_phantom(3, 0, size=64, slices=16)
    save_nifti(tmp_path / "mr.nii.gz", ((ph.hu.astype(np.float32) + 1024) / 4000).astype(np.float32), ph.affine)
    r = run(tmp_path / "mr.nii.gz", "--model", model, "-o", tmp_path / "out")
    assert r.exit_code == 1 and "not a CT in HU" in r.output and "--force" in r.output
    assert not (tmp_path / "out" / "mr_seg.nii.gz").exists()
    r = run(tmp_path / "mr.nii.gz", "--model", model, "-o", tmp_path / "out", "--force")
    assert r.exit_code == 0 and "not the -1000..+1000 HU of CT" in r.output
    report = json.loads((tmp_path / "out" / "mr.json").read_text())
    assert len(report["forced"]) == 1 and "not a CT in HU" in report["forced"][0]


def test_model_problems_are_one_line(tmp_path, capsys):
    case = write_case(tmp_path / "c.nii.gz")
    nospec = threshold_model(tmp_path / "nospec.onnx", spec_json=False)
    wrong = threshold_model(tmp_path / "wrong.onnx", in_hw=(32, 32))
    for model, needle in (
        (nospec, "carries no spec"),
        (wrong, "input layout does not match its spec: input C,H,W = 1,32,32 (spec: 1,64,64)"),
        (tmp_path / "none.onnx", "no such model file"),
    ):
        code, out = run_main(cli, [case, "--model", model, "-o", tmp_path / "o"], capsys)
        assert code == 2 and needle in out and len(out.strip().splitlines()) == 1, out
    with pytest.raises(SpecError):  # --debug shows the real exception and its traceback
        run_main(cli, [case, "--model", nospec, "-o", tmp_path / "o", "--debug"], capsys)


def test_refuses_to_overwrite_its_input(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    src = write_case(out / "x_seg.nii.gz")  # its mask would be x_seg_seg; its JSON x_seg.json: fine
    r = run(src, "--model", model, "-o", out)
    assert r.exit_code == 0
    # an input named like another input's mask in the same directory is caught
    write_case(out / "y.nii.gz")
    (out / "y_seg.nii.gz").write_bytes(src.read_bytes())
    r = CliRunner().invoke(
        cli, [str(out / "y_seg.nii.gz"), str(out / "y.nii.gz"), "--model", str(model), "-o", str(out)]
    )
    assert r.exit_code == 0  # y_seg is a distinct input; y's mask replaces the copy atomically


def test_unwritable_output_directory(tmp_path, model, monkeypatch, capsys):
    case = write_case(tmp_path / "c.nii.gz")

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("runtime.cli.tempfile.NamedTemporaryFile", denied)
    code, out = run_main(cli, [case, "--model", model, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "cannot write the output directory" in out


def test_a_failing_write_leaves_no_mask_and_no_temporary_file(tmp_path, model, monkeypatch):
    case = write_case(tmp_path / "c.nii.gz")
    out = tmp_path / "out"

    def crash(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("runtime.io.os.fsync", crash)
    r = CliRunner().invoke(cli, [str(case), "--model", str(model), "-o", str(out)])
    assert r.exit_code != 0
    assert list(out.iterdir()) == []


def test_demo_uses_the_embedded_or_configured_model(tmp_path, model, monkeypatch):
    monkeypatch.setenv("UNET_EDGE_DEMO_MODEL", str(model))
    monkeypatch.setattr(
        "runtime.phantoms.make_phantom",
        lambda seed, index, size=None, slices=None: make_phantom(seed, index, size=64, slices=16),
    )
    r = CliRunner().invoke(cli, ["--demo", "-o", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "Dice vs ground truth: liver" in r.output and "synthetic CT phantoms only" in r.output
    assert (tmp_path / "demo" / "phantom_seg.nii.gz").exists() and (tmp_path / "demo" / "phantom_overlay.png").exists()
    assert os.path.getsize(tmp_path / "demo" / "phantom_overlay.png") > 1000


@pytest.mark.parametrize("head_first", [False, True])
def test_a_streamed_volume_gets_the_mask_of_a_fully_read_one(tmp_path, model, head_first):
    """seg-run starts on the first slices while the rest are inflated, in file order (down the
    volume for a head-first file): the mask is the one a fully read volume gets."""
    from runtime.backends.onnxrt import OnnxRuntimeBackend
    from runtime.io import read_labels, read_volume
    from runtime.pipeline import SegmentOptions, segment_canonical

    ph = make_phantom(3, 0, size=64, slices=16)
    img, _ = phantom_images(ph)
    if head_first:
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = ph.hu.shape[2] - 1
        img = nib.Nifti1Image(ph.hu[:, :, ::-1].copy(), ph.affine @ flip)
    src = write_nifti(img, tmp_path / "v.nii.gz")
    streamed = []
    read_volume(src, on_open=lambda v: streamed.append(v.arrival))
    assert streamed[0] is not None and streamed[0].from_end == head_first
    r = run(src, "--model", model, "-o", tmp_path / "out", "--no-postprocess", "--batch-size", "3")
    assert r.exit_code == 0, r.output
    vol = read_volume(src)
    with OnnxRuntimeBackend(model) as be:
        expected = segment_canonical(vol.data, vol.spacing, be.spec, be, SegmentOptions(batch_size=3))
    np.testing.assert_array_equal(read_labels(tmp_path / "out" / "v_seg.nii.gz").data, expected)


def test_cuda_graph_with_an_onnx_model_says_it_is_ignored(tmp_path, model, capsys):
    write_case(tmp_path / "a.nii.gz")
    code, text = run_main(
        cli, [tmp_path / "a.nii.gz", "--model", model, "-o", tmp_path / "out", "--cuda-graph"], capsys
    )
    assert code == 0 and "--cuda-graph applies to TensorRT plans only; ignored" in text
    assert (tmp_path / "out" / "a_seg.nii.gz").is_file()
