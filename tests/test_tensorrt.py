"""seg-export build-engine, the TensorRT backend's own logic (buffer slots, shapes, CUDA
graphs, release), seg-run and seg-bench on a plan, with tests.fake_gpu standing in for
tensorrt and CUDA. The real calls run only in the ``gpu`` test of test_backends.py."""

from __future__ import annotations

import json
import sys
import warnings

import nibabel as nib
import numpy as np
import pytest

from benchmarks.tiny_models import threshold_model, threshold_spec
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
    # a slot captures the second run in a row of one shape and replays it until the shape changes:
    # slot A runs 4, 3, 4, 4 (captured), 8; slot B runs 4, 4 (captured), 2, 1, 4
    assert (cuda.dev.launches, cuda.dev.captures) == ((2, 2) if graph else (0, 0))
    assert cuda.dev.engine_runs == len(xs)  # no batch runs twice (a warm-up is a real batch)
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

    def install(fail=None, driver_version=12080, native_handles=True):
        dev = Device()
        rt = fake_cudart(dev, fail, driver_version)
        monkeypatch.setattr(cuda_mod, "_import_cudart", lambda: rt)
        getter = rt.get_cuda_native_handle if native_handles else None
        monkeypatch.setattr(cuda_mod, "_native_handle_getter", lambda: getter, raising=False)
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # int(handle) is deprecated since cuda-bindings 12.9.1
        with open_backend(plan, cuda_graph=graph) as be:
            assert be.provider == "cuda-python"  # and the GPU's name from NUL-padded bytes matched the sidecar's
            words = ", CUDA graphs for repeated batch shapes" if graph else ""
            assert be.describe() == f"tensorrt (cuda-python, batch profile 1/4/8{words}), fp32"
            for x, e in zip(xs, expected):
                np.testing.assert_allclose(be.infer(x), e, atol=1e-5)
            # 1 ms per copy and engine run; a capture adds no run (slot B captures its second batch of 4)
            assert be.device_times_ms == {"h2d": 6.0, "compute": 6.0, "d2h": 6.0}
            if graph:
                assert be.describe().endswith("CUDA graphs: 1 of 6 batches replayed, 1 captures), fp32")
    assert (dev.launches, dev.captures, dev.engine_runs) == ((1, 1, 6) if graph else (0, 0, 6))
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

    dev, rt = cudart({call: code}, driver_version=0)  # 35 with no driver at all
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
        assert be.describe() == "tensorrt (pycuda, batch profile 1/4/8, no CUDA graphs through pycuda), fp32"
        assert be.device_times_ms["h2d"] == 5.0
        assert len(drv.host) == 4  # two page-locked buffers per slot
    # buffers and streams freed, page-locked host memory freed through its .base, the context popped
    assert dev.idle() and not drv.contexts and not drv.host


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
    assert (
        f"backend after the run: tensorrt (fake-cuda, batch profile 1/4/8, CUDA graphs: {cuda.dev.launches} of 10"
        in text
    )
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
        "--batch-size 16 is above m.plan's max batch 8; use --batch-size 8 or less, or rebuild the plan with "
        "--max-batch 16" in text
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
    side = read_sidecar(plan)
    assert side["profile"] == {"min_batch": 1, "opt_batch": 4, "max_batch": 8} and side["tensorrt_version"] == version
    assert side["onnx_sha256"] == file_sha256(onnx_path) and side["builder"]["strongly_typed"]
    build = trt.builds[-1]
    # strongly typed: STRONGLY_TYPED is bit 1 on 10.x and bit 0 on 11.x (NvInfer.h)
    assert build["network"].flags == (1 << 0 if version.startswith("11.") else 1 << 1)
    # no precision flags (11.x has none; 10.x refuses FP16 on a strongly typed network), and TF32,
    # on by default, is cleared so that an FP32 plan computes in FP32
    assert build["flags"] == set() and side["builder"]["tf32"] is False
    assert build["config"].profiles[0].shapes == {"slices": ((1, 1, 64, 64), (4, 1, 64, 64), (8, 1, 64, 64))}
    assert build["config"].pools == {0: 1024 << 20}
    # the second build started from the first one's cache
    assert cache.read_bytes() == f"{version}/Fake GPU\n++".encode() and side["builder"]["timing_cache_reused"]
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


# ------------------------------------------------------------------------ issue 36: the GPU path vs the real APIs
def write_plan_with(tmp_path, profile=PROFILE, **options):
    """(plan, onnx): like ``write_plan``, with fake engine options (see fake_gpu.fake_plan_bytes)."""
    plan, onnx_path = write_plan(tmp_path, profile)
    plan.write_bytes(fake_plan_bytes(onnx_path.read_bytes(), profile, **options))
    side = json.loads(sidecar_path(plan).read_text())
    side["plan_sha256"] = file_sha256(plan)
    sidecar_path(plan).write_text(json.dumps(side))
    return plan, onnx_path


def test_a_timing_cache_from_another_gpu_is_refused_and_the_build_goes_on(fake_trt, tmp_path, capsys):
    from export.cli import cli as export_cli
    from runtime.backends.plan import read_sidecar
    from tests.conftest import run_main

    fake_trt("10.3.0")
    onnx_path = threshold_model(tmp_path / "m.onnx", threshold_spec(), tumour_level=0.6)
    plan, cache = tmp_path / "m.plan", tmp_path / "timing.cache"
    cache.write_bytes(b"10.3.0/Another GPU\n+++")  # set_timing_cache returns False for it
    code, text = run_main(export_cli, build_cmd(onnx_path, plan, cache), capsys, "seg-export")
    assert code == 0 and "Traceback" not in text, text
    assert "refused this timing cache" in text and "building without it and writing a fresh one" in text
    assert plan.is_file() and cache.read_bytes() == b"10.3.0/Fake GPU\n+"  # a fresh cache for this GPU
    assert read_sidecar(plan)["builder"]["timing_cache_reused"] is False


def test_tf32_is_a_recorded_choice(fake_trt, tmp_path, capsys):
    from export.cli import cli as export_cli
    from runtime.backends.plan import read_sidecar
    from tests.conftest import run_main

    trt = fake_trt("11.4.0.106")
    onnx_path = threshold_model(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    code, text = run_main(export_cli, ["build-engine", onnx_path, "-o", plan, "--tf32"], capsys, "seg-export")
    assert code == 0, text
    assert trt.builds[-1]["flags"] == {trt.BuilderFlag.TF32} and read_sidecar(plan)["builder"]["tf32"] is True


def test_the_sidecar_reports_the_memory_seg_run_allocates_and_no_builder_outlives_the_build(fake_trt, tmp_path, capsys):
    from export.cli import cli as export_cli
    from runtime.backends.plan import read_sidecar
    from tests.conftest import run_main

    trt = fake_trt("10.3.0")
    cuda = sys.modules["runtime.backends.tensorrt"].load_cuda()
    onnx_path = threshold_model(tmp_path / "m.onnx", threshold_spec(), tumour_level=0.6)
    plan, cache = tmp_path / "m.plan", tmp_path / "timing.cache"
    code, text = run_main(export_cli, build_cmd(onnx_path, plan, cache), capsys, "seg-export")
    assert code == 0, text
    assert trt.deserialized_with_builders == [0]  # the builder was freed before the plan was read back
    mem = read_sidecar(plan)["device_memory"]
    # two buffer slots, each with a STATIC context (3 MiB of activations) and I/O buffers for batch 8:
    # 8x1x64x64 float32 in, 8x3x64x64 float32 out
    io = 8 * 64 * 64 * 4 * (1 + 3)
    assert mem == {"contexts": 2, "activation_bytes_per_context": 3 << 20, "io_bytes_per_slot": io,
                   "total_bytes": 2 * ((3 << 20) + io)}  # fmt: skip
    assert "seg-run allocates 7 MiB of device memory besides the weights (2 contexts x 3 MiB" in text
    with open_backend(plan) as be:
        allocated = sum(len(b) for b in cuda.dev.buffers.values())
        assert allocated == mem["total_bytes"] == be.device_bytes
    assert cuda.dev.idle()


def test_engines_with_more_outputs_get_every_tensor_bound(tmp_path, monkeypatch):
    plan, onnx_path, cuda = make_fake_plan(tmp_path, monkeypatch, PROFILE)
    plan, onnx_path = write_plan_with(tmp_path, extra_outputs=["aux", "deep_supervision"])
    xs = batches([4, 8, 3], seed=5)
    with open_backend(onnx_path) as ref_be, open_backend(plan) as be:
        for x in xs:
            np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)
    assert cuda.dev.idle() and not cuda.host


@pytest.mark.parametrize("how", ["invalidate", "graph"])
def test_a_capture_that_fails_part_way_is_ended_as_trtexec_does(cudart, tmp_path, how):
    dev, rt = cudart()
    plan, onnx_path = write_plan_with(tmp_path, capturable=False, capture_failure=how if how == "invalidate" else None)
    xs = batches([4, 4, 4, 4, 4], seed=6)
    with open_backend(onnx_path) as ref_be, open_backend(plan, cuda_graph=True) as be:
        for x in xs:
            np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)
        words = be.describe()
    assert dev.idle() and not rt.host  # no graph left behind: not instantiated, destroyed
    assert dev.last_error == 0  # cleared with cudaGetLastError after the failed capture
    assert dev.launches == 0 and dev.engine_runs == len(xs)
    assert not be.use_graph and "no CUDA graphs: capture failed" in words
    assert be.graph_stats["capture_failures"] == 1 and be.graph_stats["replays"] == 0


def test_cuda_graphs_capture_the_batch_size_actually_used(tmp_path, monkeypatch):
    plan, onnx_path, cuda = make_fake_plan(tmp_path, monkeypatch, PROFILE)
    xs = batches([6] * 7 + [2], seed=7)  # --batch-size 6 on a 1/4/8 profile, then a partial batch
    with open_backend(onnx_path) as ref_be, open_backend(plan, cuda_graph=True) as be:
        for x in xs:
            np.testing.assert_allclose(be.infer(x), ref_be.infer(x), atol=1e-5)
        # each slot runs its first 6 plainly, captures its second and replays the rest
        assert cuda.dev.launches == 5 and cuda.dev.engine_runs == len(xs)
        assert be.graph_stats == {"captures": 2, "replays": 5, "plain": 3, "capture_failures": 0}
        assert "CUDA graphs: 5 of 8 batches replayed, 2 captures" in be.describe()
    assert cuda.dev.idle()


def test_float16_engine_io_runs_through_nptype(tmp_path, monkeypatch):
    plan, onnx_path, cuda = make_fake_plan(tmp_path, monkeypatch, PROFILE)
    plan, onnx_path = write_plan_with(tmp_path, io_dtype="float16")
    x = batches([4], seed=8)[0]
    with open_backend(onnx_path) as ref_be, open_backend(plan) as be:
        assert be.input_dtype == np.float16
        got = be.infer(x)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref_be.infer(x), rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"io_dtype": "bfloat16"}, "engine tensor 'slices' is BF16, which numpy cannot hold"),
        ({"profile_error": True}, "TensorRT could not select the plan's optimisation profile"),
    ],
)
def test_engines_the_backend_cannot_feed_are_one_clear_error(tmp_path, monkeypatch, capsys, options, needle):
    from runtime.cli import cli
    from tests.conftest import run_main

    _, _, cuda = make_fake_plan(tmp_path, monkeypatch, PROFILE)
    plan, _ = write_plan_with(tmp_path, **options)
    vol = save_volume(tmp_path)
    code, text = run_main(cli, [vol, "--model", plan, "-o", tmp_path / "out"], capsys)
    assert code != 0 and "Traceback" not in text and needle in text, text
    assert not list(tmp_path.glob("out/*")) and cuda.dev.idle() and not cuda.host


def save_volume(tmp_path):
    from runtime.phantoms import canonical, make_phantom
    from tests.conftest import save_nifti

    hu, _, (sz, sy, sx) = canonical(make_phantom(5, 0, size=64, slices=10))
    return save_nifti(tmp_path / "v.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([sx, sy, sz, 1.0]))


def test_error_35_from_a_driver_older_than_cuda_bindings_13_says_so(cudart, tmp_path, monkeypatch):
    import runtime.backends.cuda as cuda_mod
    from runtime.backends.cuda import CudaError

    dev, rt = cudart({"cudaGetDeviceCount": 35}, driver_version=12040)  # an r550 driver: CUDA 12.4
    monkeypatch.setattr(cuda_mod, "binding_major", lambda: 13, raising=False)
    plan, _ = write_plan(tmp_path, PROFILE)
    with pytest.raises(CudaError) as e:
        open_backend(plan).activate()
    assert "the NVIDIA driver (CUDA 12.4) is too old for cuda-bindings 13" in str(e.value)
    assert 'pip install "unet-edge[trt-cu12]"' in str(e.value)


def test_a_binding_for_another_cuda_major_than_tensorrts_wheel_is_named(monkeypatch):
    import runtime.backends.cuda as cuda_mod

    monkeypatch.setattr(cuda_mod, "tensorrt_cuda_major", lambda: 12)
    monkeypatch.setattr(cuda_mod, "binding_major", lambda: 13)
    assert "tensorrt-cu12" in cuda_mod.binding_mismatch() and "unet-edge[trt-cu12]" in cuda_mod.binding_mismatch()
    monkeypatch.setattr(cuda_mod, "binding_major", lambda: 12)
    assert cuda_mod.binding_mismatch() is None
