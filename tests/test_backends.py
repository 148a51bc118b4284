"""Everything around the TensorRT and CUDA calls that can be checked without a GPU, and the
ONNX Runtime backend's lifecycle."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import pytest

from benchmarks.tiny_models import threshold_model, threshold_spec
from runtime.backends.plan import (
    DeviceInfo,
    PlanMismatch,
    check_plan,
    make_sidecar,
    parse_version,
    read_sidecar,
    sidecar_path,
    validate_profile,
)
from runtime.errors import InputError, MissingDependency, SegError
from runtime.models import choose_backend, open_backend

ORIN = DeviceInfo("Orin", (8, 7), 8 << 30)
PLAN = b"\x00plan bytes\x01" * 10


def sidecar(version="10.3.0", device=ORIN, plan=PLAN):
    return make_sidecar(
        threshold_spec(), "ab" * 32, plan, version, device, (1, 8, 16), {"optimization_level": 3}, 123456
    )


def test_versions_are_compared_as_integers():
    assert parse_version("10.3.0") == (10, 3, 0)
    assert parse_version("11.4.0.106") == (11, 4, 0, 106)
    assert parse_version("10.10.0") > parse_version("10.9.0")  # a string compare gets this wrong
    with pytest.raises(ValueError):
        parse_version("unknown")


@pytest.mark.parametrize("profile", [(0, 1, 1), (2, 1, 4), (1, 8, 4)])
def test_invalid_profiles_are_refused(profile):
    with pytest.raises(InputError, match="1 <= min <= opt <= max"):
        validate_profile(*profile)
    assert validate_profile(1, 8, 16) == (1, 8, 16)


def test_sidecar_records_what_the_runtime_checks(tmp_path):
    side = sidecar()
    assert side["plan_sha256"] == hashlib.sha256(PLAN).hexdigest()
    assert side["gpu"] == {"name": "Orin", "compute_capability": [8, 7], "total_memory": 8 << 30}
    assert side["profile"] == {"min_batch": 1, "opt_batch": 8, "max_batch": 16}
    plan = tmp_path / "m.plan"
    plan.write_bytes(PLAN)
    sidecar_path(plan).write_text(json.dumps(side))
    assert read_sidecar(plan)["tensorrt_version"] == "10.3.0"
    check_plan(read_sidecar(plan), PLAN, "10.3.0", ORIN)  # same everything: accepted


@pytest.mark.parametrize(
    "version, device, plan, needle",
    [
        ("10.3.1", ORIN, PLAN, "built with TensorRT 10.3.0, this machine has 10.3.1"),
        ("11.4.0.106", ORIN, PLAN, "built with TensorRT 10.3.0"),
        ("10.3.0", DeviceInfo("NVIDIA RTX 4090", (8, 9)), PLAN, "built for Orin (compute capability 8.7)"),
        ("10.3.0", ORIN, PLAN[:-1], "does not match its sidecar's sha256"),
    ],
)
def test_plans_for_another_version_gpu_or_altered_are_refused_with_the_rebuild_command(version, device, plan, needle):
    with pytest.raises(PlanMismatch) as e:
        check_plan(sidecar(), plan, version, device, "model.plan")
    assert needle in str(e.value) and "seg-export build-engine MODEL.onnx -o model.plan" in str(e.value)


def test_missing_or_malformed_sidecar(tmp_path):
    plan = tmp_path / "m.plan"
    plan.write_bytes(PLAN)
    with pytest.raises(InputError, match="no sidecar JSON"):
        read_sidecar(plan)
    sidecar_path(plan).write_text('{"spec": {}}')
    with pytest.raises((InputError, SegError)):
        read_sidecar(plan)


def test_tensorrt_backend_without_tensorrt_says_what_to_install(tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    plan = tmp_path / "m.plan"
    plan.write_bytes(PLAN)
    sidecar_path(plan).write_text(json.dumps(sidecar()))
    be = open_backend(plan)
    assert be.name == "tensorrt"
    with pytest.raises(MissingDependency, match="install TensorRT 10.x or 11.x"):
        be.activate()


def test_cuda_without_a_driver_is_one_clear_error():
    cuda = pytest.importorskip("runtime.backends.cuda")
    try:
        info = cuda.device_info()
    except MissingDependency as exc:
        assert "unet-edge[trt]" in str(exc)
    except SegError as exc:
        assert "cannot use the GPU" in str(exc) and ("driver" in str(exc) or "GPU" in str(exc))
    else:  # a machine with a GPU
        assert info.name and len(info.compute_capability) == 2


def test_auto_backend_choice():
    from pathlib import Path

    assert choose_backend(Path("m.plan")) == "tensorrt"
    assert choose_backend(Path("m.engine")) == "tensorrt"
    assert choose_backend(Path("m.onnx")) == "onnxruntime"
    assert choose_backend(Path("m.plan"), "onnxruntime") == "onnxruntime"


def test_onnxruntime_backend_lifecycle(tmp_path):
    model = threshold_model(tmp_path / "m.onnx")
    be = open_backend(model)
    with pytest.raises(SegError, match="before activate"):
        be.infer(np.zeros((1, 1, 64, 64), np.float32))
    with be:
        assert be.is_active and be.provider == "cpu" and be.precision == "fp32"
        x = np.zeros((2, 1, 64, 64), np.float32)
        x[:, :, :32] = 1.0
        logits = be.infer(x)
        assert logits.shape == (2, 3, 64, 64) and logits.dtype == np.float32
        assert (logits[:, 1, :32] > 0).all() and (logits[:, 1, 32:] < 0).all()
    assert not be.is_active


@pytest.mark.parametrize(
    "streams, threads, cores, planned",
    [
        (0, 0, 2, (2, 1)),  # the default on 2 cores: two batches at once, one thread each
        (0, 0, 1, (1, 0)),  # one core: one batch at a time, ONNX Runtime's own thread count
        (0, 0, 16, (2, 8)),
        (0, 6, 16, (2, 3)),  # --threads is the total, shared by the streams
        (3, 2, 2, (3, 1)),  # never fewer than one thread a stream
        (1, 4, 16, (1, 4)),
    ],
)
def test_cpu_streams_share_the_threads(streams, threads, cores, planned):
    from runtime.backends.onnxrt import plan_streams

    assert plan_streams(streams, threads, cores) == planned


def test_onnxruntime_streams_run_batches_at_once_and_collect_in_order(tmp_path):
    model = threshold_model(tmp_path / "m.onnx")
    xs = [np.full((2, 1, 64, 64), v, np.float32) for v in (0.2, 0.9, 0.4)]
    with open_backend(model, streams=2) as be:
        assert be.in_flight == 2 and "2 streams of 1 thread" in be.describe()
        assert be.default_batch == 1  # the streams keep the cores busy with single slices
        expected = [be.infer(x) for x in xs]
        # both submitted batches must be inside the model together, or the barrier breaks
        meet, real = threading.Barrier(2, timeout=10), be.infer_impl

        def meeting(batch):
            meet.wait()
            return real(batch)

        be.infer_impl = meeting
        tokens = [be.submit(x) for x in xs[:2]]
        got = [be.collect(t) for t in tokens]
        be.infer_impl = real
        got.append(be.collect(be.submit(xs[2])))
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)
    assert not [th for th in threading.enumerate() if th.name.startswith("ort-stream")]
    with open_backend(model, streams=1) as be:
        assert be.in_flight == 1 and "streams" not in be.describe() and be.default_batch == 4


@pytest.mark.gpu
def test_tiny_plan_end_to_end_matches_onnxruntime(tmp_path):
    """Builds a plan from a tiny ONNX and runs it through the TensorRT backend (needs a GPU)."""
    pytest.importorskip("tensorrt", reason="needs TensorRT and an NVIDIA GPU")
    from runtime.backends.cuda import device_info

    try:
        device_info()
    except SegError as exc:
        pytest.skip(f"no usable GPU: {exc}")
    from export.engine import build_engine
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.models import file_sha256

    onnx_path = threshold_model(tmp_path / "m.onnx")
    plan = tmp_path / "m.plan"
    build_engine(onnx_path, plan, threshold_spec(), file_sha256(onnx_path), (1, 4, 8))
    rng = np.random.default_rng(0)
    # full batches replay CUDA graphs; each slot also runs a partial batch, then full ones again
    xs = [rng.random((n, 1, 64, 64), dtype=np.float32) for n in (4, 4, 3, 4, 4, 2, 4, 1, 8, 4)]
    for graph in (False, True):
        with open_backend(onnx_path) as ort_be, TensorRTBackend(plan, cuda_graph=graph) as trt_be:
            for x in xs:
                np.testing.assert_allclose(trt_be.infer(x), ort_be.infer(x), atol=1e-4)
