"""seg-bench: statistics, FLOP counting, report writers and scoring (no timings asserted)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from benchmarks.cli import cli
from benchmarks.report import (
    latency_markdown,
    parity_markdown,
    plot_dice_bars,
    plot_latency,
    write_reports,
)
from benchmarks.stats import percentile, summarize
from tests.conftest import run_main, save_nifti


def test_percentiles_on_known_samples():
    s = summarize(range(1, 101))
    assert s["median"] == pytest.approx(50.5) and s["p90"] == pytest.approx(90.1)
    assert s["p95"] == pytest.approx(95.05) and s["p99"] == pytest.approx(99.01)
    assert s["min"] == 1 and s["max"] == 100 and s["n"] == 100
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        percentile([], 50)


@pytest.mark.parametrize(
    "cfg", [dict(base_width=4, depth=2, bilinear=False), dict(base_width=8, depth=3, bilinear=False)]
)
def test_onnx_flop_count_matches_the_model_formula(cfg, tmp_path):
    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from benchmarks.flops import conv_flops
    from train.model import UNet, count_flops

    full = dict(in_channels=3, classes=3, norm="batch", **cfg)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            UNet(**full).eval(),
            (torch.zeros(1, 3, 64, 64),),
            str(tmp_path / "m.onnx"),
            dynamo=False,
            input_names=["slices"],
            output_names=["logits"],
            dynamic_axes={"slices": {0: "b"}, "logits": {0: "b"}},
        )
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert conv_flops(m) == count_flops(full, 64, 64)
    assert conv_flops(m, batch=4) == 4 * count_flops(full, 64, 64)


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


LAT = {
    "kind": "latency",
    "command": "seg-bench latency a.onnx",
    "matmul_peak_gflops": 100.0,
    "machine": {"cpu": "Test CPU", "cores": 2, "os": "x", "versions": {}},
    "results": [
        {
            "model": "a.onnx",
            "backend": "onnxruntime",
            "precision": "fp32",
            "peak_rss_mb": 300.0,
            "gflop_per_slice": 6.0,
            "describe": "onnxruntime (cpu, 2 streams of 1 thread), fp32",
            "rows": [
                {
                    "batch": b,
                    "per_slice_ms": summarize([40.0 + b, 41.0 + b, 42.0 + b]),
                    "batch_latency_ms": summarize([80.0 * b, 84.0 * b, 86.0 * b]),
                    "throughput_slices_s": 1000 / (41 + b),
                    "gflops": 6.0 / ((41 + b) / 1000),
                }
                for b in (1, 2, 4)
            ],
            "volumes": [
                {
                    "volume": "v.nii.gz",
                    "batch": 4,
                    "slices": 100,
                    "wall_s": summarize([5.0, 5.2, 5.1]),
                    "stages_s": {"read": 0.3, "preprocess": 0.2, "infer": 4.4, "postprocess": 0.1, "write": 0.05},
                }
            ],
        },
        {"model": "bad.onnx", "error": "InputError: bad.onnx: no such model file"},
    ],
}


def test_latency_report_forms(tmp_path):
    md = latency_markdown(LAT)
    lines = md.splitlines()
    table = [ln for ln in lines if ln.startswith("| a.onnx")]
    assert len(table) == 3 + 1  # three batch rows and one volume row
    # samples 41, 42, 43 ms: median 42, p90 42.8 (linear interpolation); 6 GFLOP / 42 ms = 142.9 GFLOP/s = 143% of 100
    # batch latency: one batch alone (84 ms median at batch 1), beside the per-slice time with batches in flight
    assert (
        "| a.onnx (onnxruntime, fp32) | 1 | 42.00 | 42.80 | 42.90 | 42.98 | 41.00 | 43.00 | 84.00 | 23.8 | 142.9 | "
        "143 |" in md
    )
    assert "- a.onnx: onnxruntime (cpu, 2 streams of 1 thread), fp32" in md
    # whole volume: 5.1 s median for 100 slices = 51 ms/slice; backend alone at batch 4: 100 x 45 ms = 4.5 s -> 1.13
    assert "| v.nii.gz | 100 | 4 | 5.10 | 51.0 | 0.30 | 0.20 | 4.40 | 0.10 | 0.05 | 1.13 | 300 |" in md
    assert "failed: InputError" in md
    written = write_reports(tmp_path, "latency", LAT, md, [(lambda p: plot_latency(LAT, p), "latency.png")])
    assert json.loads((tmp_path / "latency.json").read_text())["results"][0]["rows"][0]["batch"] == 1
    w, h = _png_size(tmp_path / "latency.png")
    assert w > 300 and h > 200 and len(written) == 3


def _case(dice_l, dice_t):
    def s(d):
        return {
            "dice": d,
            "voe": None if d is None else 1 - d,
            "rvd": 0.0,
            "assd": 1.0,
            "hd95": 2.0,
            "pred_voxels": 10,
            "ref_voxels": 10,
            "intersection": 0 if d is None else int(10 * d),
            "pred_ml": 1.0,
            "ref_ml": 1.0,
            "note": None,
        }

    return {"liver": s(dice_l), "tumor": s(dice_t)}


def test_parity_report_forms(tmp_path):
    from runtime.metrics import summarize as msum

    ref = {"c1": _case(0.96, 0.80), "c2": _case(0.95, None)}
    cand = {"c1": _case(0.955, 0.79), "c2": _case(0.90, None)}
    rep = {
        "kind": "parity",
        "command": "x",
        "machine": {"cpu": "T", "cores": 2},
        "max_dice_drop": 0.01,
        "reference": {"model": "ref.onnx", "per_case": ref, "summary": msum(ref)},
        "models": {
            "q.onnx": {
                "precision": "int8",
                "error": None,
                "summary": msum(cand),
                "pass": False,
                "agreement_mean": 0.999,
                "max_abs_logit_diff": 0.5,
                "per_case": {
                    k: {
                        "metrics": v,
                        "agreement": 0.999,
                        "max_abs_logit_diff": 0.5,
                        "dice_vs_reference": {"liver": 0.99, "tumor": None},
                        "drop": {"liver": ref[k]["liver"]["dice"] - v["liver"]["dice"], "tumor": None},
                        "pass": k == "c1",
                    }
                    for k, v in cand.items()
                },
            }
        },
        "bad_cases": [],
    }
    md = parity_markdown(rep)
    assert "| q.onnx | int8 |" in md and "| FAIL |" in md
    assert "| c2 | 0.9000 | n/a | 0.0500 | n/a | 0.99900 | FAIL |" in md
    plot_dice_bars(rep, tmp_path / "bars.png")
    assert _png_size(tmp_path / "bars.png")[0] > 300


def test_score_agrees_with_hand_computed_dice_and_reports_mismatches(tmp_path, capsys):
    preds, labels = tmp_path / "preds", tmp_path / "labels"
    preds.mkdir()
    labels.mkdir()
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1  # 8 voxels
    pred = np.zeros_like(ref)
    pred[2:4, 1:3, 1:3] = 1  # 8 voxels, 4 shared: Dice 0.5
    save_nifti(labels / "segmentation-3.nii.gz", ref, aff)
    save_nifti(labels / "volume-3.nii.gz", ref.astype(np.int16), aff)
    save_nifti(preds / "volume-3_seg.nii.gz", pred, aff)
    save_nifti(preds / "volume-9_seg.nii.gz", pred, aff)  # no label
    code, out = run_main(cli, ["score", preds, labels, "-o", tmp_path / "rep"], capsys, "seg-bench")
    assert code == 1 and "volume-9_seg.nii.gz: no label with this case name" in out
    # a run that could not score every file reports under score.failed.*, never as score.json
    assert not (tmp_path / "rep" / "score.json").exists()
    rep = json.loads((tmp_path / "rep" / "score.failed.json").read_text())
    assert rep["per_case"]["volume-3"]["liver"]["dice"] == pytest.approx(0.5)
    assert rep["per_case"]["volume-3"]["tumor"]["note"] == "both empty"
    assert "1 file(s) not scored" in rep["failed"]
    assert "| volume-3 | 0.5000 |" in (tmp_path / "rep" / "score.failed.md").read_text()


def test_score_runs_on_masks_written_by_seg_run(tmp_path, capsys):
    from benchmarks.tiny_models import threshold_model
    from runtime.cli import cli as run_cli_cmd
    from runtime.phantoms import write_phantoms

    write_phantoms(tmp_path / "data", 2, seed=5, size=64, slices=16, progress=False)
    model = threshold_model(tmp_path / "m.onnx")
    code, out = run_main(
        run_cli_cmd,
        [
            tmp_path / "data" / "volume-0.nii.gz",
            tmp_path / "data" / "volume-1.nii.gz",
            "--model",
            model,
            "-o",
            tmp_path / "preds",
        ],
        capsys,
    )
    assert code == 0, out
    for extra in (tmp_path / "preds").glob("*.json"):
        extra.unlink()
    code, out = run_main(
        cli, ["score", tmp_path / "preds", tmp_path / "data", "-o", tmp_path / "rep"], capsys, "seg-bench"
    )
    assert code == 0, out
    assert "volume-0" in out and "volume-1" in out and "global (pooled)" in out
    # seg-train compare pairs a deployed model's score with another by case
    from train.cli import cli as train_cli

    score = json.loads((tmp_path / "rep" / "score.json").read_text())
    for m in score["per_case"].values():
        m["liver"]["dice"] /= 2
    (tmp_path / "worse.json").write_text(json.dumps(score))
    code, out = run_main(
        train_cli,
        ["compare", tmp_path / "rep" / "score.json", tmp_path / "worse.json", "--structure", "liver"],
        capsys,
        "seg-train",
    )
    assert code == 0, out
    assert "better on 0, worse on 2" in out and "mean of 2" in out


def test_warmup_lasts_its_calls_and_its_seconds_before_timing():
    from benchmarks.latency import _timed

    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def run():  # each call takes 0.1 s of the fake clock; the first two take 1 s (kernel selection)
        calls.append(now[0])
        now[0] += 1.0 if len(calls) <= 2 else 0.1

    times = _timed(run, warmup=3, repeats=4, warmup_s=2.35, clock=clock)
    assert len(calls) == 6 + 4  # 3 calls reach 2.1 s, three more pass 2.35 s
    assert times == pytest.approx([0.1] * 4)
    calls.clear()
    assert len(_timed(run, warmup=0, repeats=2, warmup_s=2.5, clock=clock)) == 2 and len(calls) == 2  # no warm-up asked


def test_train_step_layouts_learn_the_same_and_report_their_ratio(tmp_path, capsys):
    pytest.importorskip("torch")
    code, out = run_main(
        cli,
        [
            "train-step",
            "--width",
            "4",
            "--depth",
            "2",
            "--batch",
            "2",
            "--crop",
            "32",
            "--repeats",
            "4",
            "--warmup",
            "1",
            "-o",
            tmp_path / "ts",
        ],
        capsys,
        "seg-bench",
    )
    assert code == 0, out
    rep = json.loads((tmp_path / "ts" / "train_step.json").read_text())
    assert rep["kind"] == "train-step" and {r["layout"] for r in rep["rows"]} == {"contiguous", "channels_last"}
    a, b = (r["losses"] for r in rep["rows"])
    assert len(a) == len(b) == 5
    assert np.allclose(a, b, rtol=1e-4), (a, b)  # same weights, same batch: the layout must not change the maths
    assert a[-1] < a[0]  # five Adam steps on one batch lower its loss
    assert all(r["step_s"]["n"] == 4 and r["step_s"]["median"] > 0 for r in rep["rows"])
    assert "| 4 | channels_last |" in out and "x |" in out
    assert (tmp_path / "ts" / "train_step.png").stat().st_size > 1000


def test_train_step_rejects_a_crop_the_unet_cannot_take(tmp_path, capsys):
    pytest.importorskip("torch")
    code, out = run_main(
        cli, ["train-step", "--width", "4", "--depth", "3", "--crop", "60", "-o", tmp_path / "ts"], capsys, "seg-bench"
    )
    assert code != 0 and "use 64x64" in out and "Traceback" not in out
    assert not (tmp_path / "ts").exists()
