"""seg-bench gpu-check: on this machine (no TensorRT, no GPU) it runs and says why the GPU steps
did not; with tests.fake_gpu standing in for tensorrt and CUDA, every GPU step runs."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.tiny_models import threshold_model, threshold_spec
from tests.fake_gpu import FakeCuda, fake_tensorrt

STATUSES = {"ran", "failed", "not applicable"}


def run_check(tmp_path, capsys):
    from benchmarks.cli import cli
    from tests.conftest import run_main

    model = threshold_model(tmp_path / "m.onnx", threshold_spec(), tumour_level=0.6)
    out = tmp_path / "report"
    code, text = run_main(cli, ["gpu-check", "--model", model, "--slices", 24, "--repeats", 1, "-o", out], capsys)
    rep = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    return code, text, rep, md


def test_without_a_gpu_it_reports_why_the_gpu_steps_did_not_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError, as here
    code, text, rep, md = run_check(tmp_path, capsys)
    assert code == 0 and "Traceback" not in text, text
    steps = {s["step"]: s for s in rep["steps"]}
    assert all(s["status"] in STATUSES for s in rep["steps"])
    assert all(s["reason"] for s in rep["steps"] if s["status"] != "ran")  # nothing skipped silently
    assert (
        steps["import tensorrt"]["status"] == "not applicable" and "not installed" in steps["import tensorrt"]["reason"]
    )
    # the CPU side ran: the three graphs and ONNX Runtime on each
    for p in ("fp32", "fp16", "int8"):
        assert steps[f"{p} graph"]["status"] == "ran"
        assert steps[f"{p} onnxruntime CPU"]["status"] == "ran" and steps[f"{p} onnxruntime CPU"]["ms_per_slice"] > 0
        assert steps[f"{p} onnxruntime CPU"]["dice_vs_fp32"]["liver"] >= 0.95
    gpu = [s for s in rep["steps"] if " TensorRT, " in s["step"] or "plan build" in s["step"]]
    assert len(gpu) == 3 * (1 + 2 * 3)  # per precision: a build, then 3 batch sizes with and without graphs
    assert all(s["status"] == "not applicable" and "no TensorRT on a usable GPU" in s["reason"] for s in gpu)
    assert rep["gpu"] is None and "tensorrt is not installed" in rep["no_gpu_reason"]
    assert "- GPU: none usable: no TensorRT on a usable GPU here (tensorrt is not installed" in md
    assert "| int8 TensorRT, batch 6 (above opt 4), CUDA graphs | not applicable |" in md
    assert md in text  # the Markdown printed is the Markdown written


def test_with_the_stand_ins_every_gpu_step_runs_and_matches_onnxruntime(tmp_path, capsys, monkeypatch):
    import runtime.backends.cuda as cuda_mod
    import runtime.backends.tensorrt as trt_backend

    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda.dev, "10.3.0"))
    monkeypatch.setattr(cuda_mod, "load_cuda", lambda: cuda)
    monkeypatch.setattr(trt_backend, "load_cuda", lambda: cuda)
    code, text, rep, md = run_check(tmp_path, capsys)
    assert code == 0, text
    steps = {s["step"]: s for s in rep["steps"]}
    assert rep["gpu"] == "Fake GPU" and steps["CUDA device"]["status"] == "ran"
    runs = [s for s in rep["steps"] if s.get("precision")]
    assert len(runs) == 3 * 2 * 3 and all(s["status"] == "ran" for s in runs), [s["reason"] for s in runs]
    for p in ("fp32", "fp16", "int8"):
        build = steps[f"{p} plan build"]
        assert build["status"] == "ran" and build["tf32"] is False and build["device_memory"]["contexts"] == 2
    for s in runs:
        assert s["dice"]["liver"] >= 0.95 and s["ms_per_slice"] > 0
        if s["cuda_graph"]:
            assert s["graph_stats"]["replays"] > 0  # the batch size asked for replays, at the opt or not
    assert {s["batch"] for s in runs} == {3, 4, 6}
    assert "| fp16 TensorRT, batch 3 (below opt 4), CUDA graphs | ran |" in md
    assert cuda.dev.idle()


@pytest.mark.parametrize(
    "args, needle", [(["--opt-batch", 8, "--max-batch", 4], "--max-batch 4 is below --opt-batch 8")]
)
def test_bad_options_are_one_line(tmp_path, capsys, args, needle):
    from benchmarks.cli import cli
    from tests.conftest import run_main

    code, text = run_main(cli, ["gpu-check", *args, "-o", tmp_path / "r"], capsys)
    assert code != 0 and needle in text and "Traceback" not in text
    assert not (tmp_path / "r").exists()
