"""seg-export build-engine, the TensorRT backend's own logic (buffer slots, shapes, CUDA
graphs, release), seg-run and seg-bench on a plan, with tests.fake_gpu standing in for
tensorrt and CUDA. The real calls run only in the ``gpu`` test of test_backends.py."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest

from runtime.backends.plan import make_sidecar, sidecar_path
from runtime.models import file_sha256, open_backend
from tests.fake_gpu import (
    DEVICE,
    VERSION,
    Device,
    FakeCuda,
    fake_cudart,
    fake_plan_bytes,
    fake_pycuda_driver,
    fake_tensorrt,
)
from tests.models import threshold_model, threshold_spec

PROFILE = (1, 4, 8)


@pytest.fixture
def fake_plan(tmp_path, monkeypatch):
    return make_fake_plan(tmp_path, monkeypatch, PROFILE)


def write_plan(tmp_path, profile):
    """(plan, onnx): a fake plan of a tiny ONNX model, with a matching sidecar."""
    spec = threshold_spec()
    onnx_path = threshold_model(tmp_path / "m.onnx", spec, tumour_level=0.6)
    plan = tmp_path / "m.plan"
    plan.write_bytes(fake_plan_bytes(onnx_path.read_bytes(), profile))
    side = make_sidecar(
        spec, file_sha256(onnx_path), plan.read_bytes(), VERSION, DEVICE, profile, {"optimization_level": 3}, 1 << 20
    )
    sidecar_path(plan).write_text(json.dumps(side))
    return plan, onnx_path


def make_fake_plan(tmp_path, monkeypatch, profile):
    """(plan, onnx, cuda), with fake tensorrt and CUDA in place of the real ones."""
    import runtime.backends.tensorrt as trt_backend

    plan, onnx_path = write_plan(tmp_path, profile)
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda.dev))
    monkeypatch.setattr(trt_backend, "load_cuda", lambda: cuda)
    return plan, onnx_path, cuda


def batches(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((n, 1, 64, 64), dtype=np.float32) for n in sizes]


@pytest.mark.parametrize("graph", [False, True])
def test_every_batch_size_in_any_order_gives_the_models_logits(fake_plan, graph):
    plan, onnx_path, cuda = fake_plan
    # each slot sees a full batch, then a partial one, then a full one again
    xs = batches([4, 4, 3, 4, 4, 2, 4, 1, 8, 4])
    with open_backend(onnx_path) as ref_be:
        expected = [ref_be.infer(x) for x in xs]
    with open_backend(plan, cuda_graph=graph) as be:
        assert (be.min_batch, be.default_batch, be.max_batch) == PROFILE and be.in_flight == 2
        for x, e in zip(xs, expected):
            got = be.infer(x)
            assert got.shape == e.shape
            np.testing.assert_allclose(got, e, atol=1e-5)
    # every batch of 4 (the profile's opt) replays a graph; a slot captures again only after
    # its context ran another shape: slot A at batches 0 and 4, slot B at batches 1 and 9
    assert (cuda.dev.launches, cuda.dev.captures) == ((6, 4) if graph else (0, 0))
    assert cuda.dev.idle() and not cuda.host and cuda.closed


def test_two_batches_in_flight_come_back_in_order(fake_plan):
    plan, onnx_path, _ = fake_plan
    xs = batches([4, 4, 4, 2], seed=1)
    with open_backend(onnx_path) as ref_be:
        expected = [ref_be.infer(x) for x in xs]
    with open_backend(plan, cuda_graph=True) as be:
        got = []
        tokens = [be.submit(xs[0]), be.submit(xs[1])]  # both slots busy; nothing has run yet
        got.append(be.collect(tokens.pop(0)))
        tokens.append(be.submit(xs[2]))
        got.append(be.collect(tokens.pop(0)))
        tokens.append(be.submit(xs[3]))
        got += [be.collect(t) for t in tokens]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.fixture
def cudart(monkeypatch):
    """A factory: the project's real cuda-python interface (CudaPython) over a fake
    ``cuda.bindings.runtime``, with fake tensorrt on the same fake device."""
    import runtime.backends.cuda as cuda_mod

    def install(fail=None):
        dev = Device()
        rt = fake_cudart(dev, fail)
        monkeypatch.setattr(cuda_mod, "_import_cudart", lambda: rt)
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(dev))
        return dev, rt

    return install


@pytest.mark.parametrize("graph", [False, True])
def test_the_cuda_python_interface_moves_the_right_bytes(cudart, tmp_path, graph):
    dev, rt = cudart()
    plan, onnx_path = write_plan(tmp_path, PROFILE)
    xs = batches([4, 4, 3, 4, 4, 8], seed=2)
    with open_backend(onnx_path) as ref_be:
        expected = [ref_be.infer(x) for x in xs]
    with open_backend(plan, cuda_graph=graph) as be:
        assert be.provider == "cuda-python"  # and the GPU's name read back from NUL-padded bytes matched the sidecar's
        assert be.describe() == f"tensorrt (cuda-python, batch profile 1/4/8{', CUDA graphs' if graph else ''}), fp32"
        for x, e in zip(xs, expected):
            np.testing.assert_allclose(be.infer(x), e, atol=1e-5)
        # 1 ms per copy and engine run; each capture (slot A twice, B once) adds a warm-up run
        assert be.device_times_ms == {"h2d": 6.0, "compute": 6.0 + 3 * graph, "d2h": 6.0}
    assert (dev.launches, dev.captures) == ((4, 3) if graph else (0, 0))
    assert dev.idle() and not rt.host  # device, pinned host memory, streams and graphs all released


@pytest.mark.parametrize(
    "call, code, message",
    [
        (
            "cudaGetDeviceCount",
            35,
            "cannot use the GPU: no NVIDIA driver could be loaded (cudaGetDeviceCount returned 35)",
        ),
        ("cudaMalloc", 2, "cudaMalloc failed: out of memory (2)"),
    ],
)
def test_a_failing_cuda_call_is_one_error_naming_it(cudart, tmp_path, call, code, message):
    from runtime.backends.cuda import CudaError

    dev, rt = cudart({call: code})
    plan, _ = write_plan(tmp_path, PROFILE)
    with pytest.raises(CudaError) as e:
        open_backend(plan).activate()
    assert str(e.value) == message
    assert dev.idle() and not rt.host  # what was allocated before the failure is released


def test_the_pycuda_interface_runs_the_backend_without_graphs(tmp_path, monkeypatch):
    import types

    import runtime.backends.cuda as cuda_mod

    def no_cuda_python():
        raise ImportError("no cuda-python")

    dev = Device()
    drv = fake_pycuda_driver(dev)
    package = types.ModuleType("pycuda")
    package.driver = drv
    monkeypatch.setattr(cuda_mod, "_import_cudart", no_cuda_python)
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", drv)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(dev))
    plan, onnx_path = write_plan(tmp_path, PROFILE)
    xs = batches([4, 4, 3, 4, 8], seed=4)
    with open_backend(onnx_path) as ref_be, open_backend(plan, cuda_graph=True) as be:
        assert be.provider == "pycuda" and len(drv.contexts) == 1
        for x in xs:
            np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)
        assert not be.use_graph  # capture is not available through pycuda: plain enqueues instead
        assert be.describe() == "tensorrt (pycuda, batch profile 1/4/8), fp32"
        assert be.device_times_ms["h2d"] == 5.0
    assert dev.idle() and not drv.contexts  # buffers and streams freed, the context popped


def test_batches_below_the_profiles_minimum_are_padded(tmp_path, monkeypatch):
    plan, onnx_path, _ = make_fake_plan(tmp_path, monkeypatch, (4, 4, 8))
    xs = batches([1, 3, 4, 8, 2], seed=3)
    with open_backend(onnx_path) as ref_be, open_backend(plan) as be:
        assert be.min_batch == 1
        for x in xs:
            np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)


def test_a_batch_outside_the_profile_is_refused(fake_plan):
    from runtime.errors import SegError

    plan, _, _ = fake_plan
    with open_backend(plan) as be, pytest.raises(SegError, match="outside"):
        be.infer(np.zeros((9, 1, 64, 64), np.float32))


def test_seg_run_on_a_plan_writes_the_masks_onnxruntime_writes(fake_plan, tmp_path, capsys):
    from runtime.cli import cli
    from runtime.phantoms import canonical, make_phantom
    from tests.conftest import run_main, save_nifti

    plan, onnx_path, cuda = fake_plan
    (tmp_path / "in").mkdir()
    for k in range(2):
        # stored RAS, so slices are read bottom up: batches of 4, 4, 4, 4, 2 on slots A, B, A, B, A;
        # the next volume's second batch of 4 is the first on slot A after its partial batch
        hu, _, (sz, sy, sx) = canonical(make_phantom(5, k, size=64, slices=18))
        save_nifti(
            tmp_path / "in" / f"case{k}.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([sx, sy, sz, 1.0])
        )
    for model, out in ((onnx_path, "ort"), (plan, "trt")):
        code, text = run_main(
            cli, [tmp_path / "in", "--model", model, "-o", tmp_path / out, "--batch-size", 4, "--cuda-graph"], capsys
        )
        assert code == 0, text
    assert cuda.dev.launches > 0
    for k in range(2):
        a = np.asanyarray(nib.load(str(tmp_path / "ort" / f"case{k}_seg.nii.gz")).dataobj)
        b = np.asanyarray(nib.load(str(tmp_path / "trt" / f"case{k}_seg.nii.gz")).dataobj)
        assert (a == 2).any() and (a == 1).any()
        np.testing.assert_array_equal(b, a)
        report = json.loads((tmp_path / "trt" / f"case{k}.json").read_text())
        assert report["backend"] == "tensorrt"


def test_seg_run_refuses_a_batch_above_the_plans_profile_before_any_volume(fake_plan, tmp_path, capsys):
    from runtime.cli import cli
    from tests.conftest import run_main, save_nifti

    plan, _, _ = fake_plan
    vol = save_nifti(tmp_path / "v.nii.gz", np.zeros((64, 64, 18), np.int16), np.diag([6.0, 6.0, 5.0, 1.0]))
    code, text = run_main(cli, [vol, "--model", plan, "-o", tmp_path / "out", "--batch-size", 16], capsys)
    assert code != 0 and "Traceback" not in text
    assert (
        "--batch-size 16 is above m.plan's max batch 8; use --batch-size 8 or less, or rebuild the plan with --max-batch 16"
        in text
    )
    assert not list(tmp_path.glob("out/*"))


def test_latency_suite_on_a_plan_reports_each_volume_runs_own_device_time(fake_plan, tmp_path):
    from benchmarks.latency import measure_model
    from runtime.phantoms import canonical, make_phantom
    from tests.conftest import save_nifti

    plan, _, _ = fake_plan
    hu, _, (sz, sy, sx) = canonical(make_phantom(5, 0, size=64, slices=18))
    vol = save_nifti(tmp_path / "v.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([sx, sy, sz, 1.0]))
    out = measure_model(
        str(plan), [str(vol)], [1, 4, 16], "auto", 0, warmup=1, repeats=3, volume_repeats=2, vol_batch=4
    )
    assert out["backend"] == "tensorrt" and [r["batch"] for r in out["rows"]] == [1, 4]  # 16 is outside the profile
    # one run of 18 slices is 5 batches; every copy and engine run takes 1 ms of fake device time
    assert out["volumes"][0]["device_ms"] == {"h2d": 5.0, "compute": 5.0, "d2h": 5.0}


def test_parity_suite_runs_a_plan_whose_profile_is_below_its_batch(tmp_path, monkeypatch):
    from benchmarks.parity import parity
    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    plan, onnx_path, _ = make_fake_plan(tmp_path, monkeypatch, (1, 2, 4))
    data = tmp_path / "data"
    data.mkdir()
    img, seg = phantom_images(make_phantom(5, 0, size=64, slices=18))
    write_nifti(img, data / "volume-0.nii.gz")
    write_nifti(seg, data / "segmentation-0.nii.gz")
    res = parity(str(onnx_path), [str(plan)], str(data), batch=8)["models"][str(plan)]
    assert res["error"] is None and res["pass"] and res["agreement_mean"] == 1.0
    assert res["max_abs_logit_diff"] < 1e-4


@pytest.fixture
def fake_trt(tmp_path, monkeypatch):
    """A factory: fake tensorrt of a version, and a fake GPU, in place of the real ones."""
    import runtime.backends.cuda as cuda_mod
    import runtime.backends.tensorrt as trt_backend

    def install(version: str):
        cuda = FakeCuda()
        trt = fake_tensorrt(cuda.dev, version)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(cuda_mod, "load_cuda", lambda: cuda)
        monkeypatch.setattr(trt_backend, "load_cuda", lambda: cuda)
        return trt

    return install


def build_cmd(onnx_path, plan, cache):
    return ["build-engine", onnx_path, "-o", plan, "--opt-batch", 4, "--max-batch", 8, "--timing-cache", cache]


@pytest.mark.parametrize("version", ["10.3.0", "11.4.0.106"])
def test_build_engine_writes_a_plan_the_backend_runs(fake_trt, tmp_path, capsys, version):
    from export.cli import cli as export_cli
    from runtime.backends.plan import read_sidecar
    from tests.conftest import run_main

    trt = fake_trt(version)
    onnx_path = threshold_model(tmp_path / "m.onnx", threshold_spec(), tumour_level=0.6)
    plan, cache = tmp_path / "m.plan", tmp_path / "timing.cache"
    for _ in range(2):
        code, text = run_main(export_cli, build_cmd(onnx_path, plan, cache), capsys, "seg-export")
        assert code == 0, text
    assert f"TensorRT {version} on Fake GPU, batch 1/4/8, 3 MiB device memory" in text
    side = read_sidecar(plan)
    assert side["profile"] == {"min_batch": 1, "opt_batch": 4, "max_batch": 8} and side["tensorrt_version"] == version
    assert side["onnx_sha256"] == file_sha256(onnx_path) and side["builder"]["strongly_typed"]
    build = trt.builds[-1]
    # strongly typed, no precision flags (11.x has none; 10.x refuses FP16 on a strongly typed network)
    assert build["network"].flags == 1 << 1 and build["config"].flags == []
    assert build["config"].profiles[0].shapes == {"slices": ((1, 1, 64, 64), (4, 1, 64, 64), (8, 1, 64, 64))}
    assert build["config"].pools == {0: 1024 << 20}
    assert cache.read_bytes() == b"++"  # the second build started from the first one's cache
    x = batches([4])[0]
    with open_backend(onnx_path) as ref_be, open_backend(plan) as be:
        np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)


@pytest.mark.parametrize("failure", ["parser", "builder"])
def test_a_failed_build_says_why_and_writes_nothing(fake_trt, tmp_path, capsys, monkeypatch, failure):
    import tests.fake_gpu as fake_gpu
    from export.cli import cli as export_cli
    from tests.conftest import run_main

    trt = fake_trt("11.4.0.106")
    if failure == "parser":
        monkeypatch.setattr(fake_gpu._Parser, "reject", "No importer registered for op: Foo")
    else:
        monkeypatch.setattr(trt.Builder, "build_serialized_network", lambda self, network, config: None)
    onnx_path = threshold_model(tmp_path / "m.onnx")
    plan, cache = tmp_path / "m.plan", tmp_path / "timing.cache"
    code, text = run_main(export_cli, build_cmd(onnx_path, plan, cache), capsys, "seg-export")
    assert code != 0 and len(text.strip().splitlines()) == 1 and "Traceback" not in text
    if failure == "parser":
        assert "ONNX parser rejected" in text and "node 0 (conv0, Conv): No importer registered for op: Foo" in text
    else:
        assert "could not build the engine" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
