"""seg-export triton and seg-run --backend triton against a real Triton server.

The server is the ``tritonserver`` binary bundled in nvidia-pytriton, started on 127.0.0.1 with
free ports on a repository written by ``seg-export triton --python-backend`` (the model runs
in ONNX Runtime inside Triton's Python backend), and always stopped. config.pbtxt files are
parsed with Triton's own model-config protobuf schema from tritonclient. The .plan case uses
tests.fake_gpu's TensorRT stand-in for the local GPU/TensorRT check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs the triton extra: pip install 'unet-edge[triton]'")

from benchmarks.tiny_models import threshold_model, threshold_spec  # noqa: E402
from export.triton import export_repository  # noqa: E402
from runtime.backends.plan import DeviceInfo, make_sidecar, sidecar_path  # noqa: E402
from runtime.cli import cli as seg_run  # noqa: E402
from runtime.models import file_sha256  # noqa: E402
from runtime.spec import METADATA_KEY, ModelSpec  # noqa: E402
from tests.conftest import run_main, save_nifti  # noqa: E402
from tests.fake_gpu import DEVICE, VERSION, FakeCuda, fake_plan_bytes, fake_tensorrt  # noqa: E402


def parse_config(folder: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def check_matches_spec(cfg, spec: ModelSpec) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    (i,), (o,) = cfg.input, cfg.output
    assert (i.name, o.name) == (spec.io.input_name, spec.io.output_name)
    assert list(i.dims) == [spec.preprocess.channels, *spec.preprocess.size]
    assert list(o.dims) == [spec.out_channels, *spec.preprocess.size]
    assert i.data_type == o.data_type == pb.TYPE_FP32
    assert ModelSpec.from_json(cfg.parameters[METADATA_KEY].string_value) == spec


# config.pbtxt ------------------------------------------------------------------------------
@pytest.mark.parametrize("python_backend", [False, True])
def test_onnx_repository_config_parses_and_matches_the_spec(tmp_path, python_backend):
    from tritonclient.grpc import model_config_pb2 as pb

    spec = threshold_spec()
    model = threshold_model(tmp_path / "liver.onnx", spec)
    folder, entry = export_repository(
        model, tmp_path / "repo", max_batch=16, preferred=[8, 16], instances=2, python_backend=python_backend
    )
    cfg = parse_config(folder)
    check_matches_spec(cfg, spec)
    assert cfg.name == "liver" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.instance_group[0].count == 2
    kind = pb.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)
    if python_backend:
        assert (cfg.backend, cfg.platform, kind) == ("python", "", "KIND_CPU")
        assert (folder / "1" / "model.py").is_file()
    else:
        assert (cfg.platform, kind) == ("onnxruntime_onnx", "KIND_GPU")
    assert (folder / "1" / "model.onnx").read_bytes() == model.read_bytes()
    assert ModelSpec.from_dict(json.loads((folder / "spec.json").read_text())) == spec
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["liver"]  # no temporary folder left


def test_trt_accelerator_is_in_the_onnx_config(tmp_path):
    model = threshold_model(tmp_path / "m.onnx")
    folder, _ = export_repository(model, tmp_path / "repo", trt_accelerator=True)
    acc = parse_config(folder).optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in acc] == ["tensorrt"]


def fake_plan(tmp_path, monkeypatch, profile=(1, 4, 8), version=VERSION, device=DEVICE):
    """A fake plan with its sidecar, built for ``version``/``device``; this machine has fake_gpu's."""
    import runtime.backends.cuda as cuda_mod

    spec = threshold_spec()
    onnx_path = threshold_model(tmp_path / "m.onnx", spec)
    plan = tmp_path / "liver.plan"
    plan.write_bytes(fake_plan_bytes(onnx_path.read_bytes(), profile))
    side = make_sidecar(spec, file_sha256(onnx_path), plan.read_bytes(), version, device, profile, {}, 1 << 20)
    sidecar_path(plan).write_text(json.dumps(side))
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(cuda.dev))
    monkeypatch.setattr(cuda_mod, "load_cuda", lambda: cuda)
    return plan, spec


def test_plan_repository_takes_its_batch_limits_from_the_profile(tmp_path, monkeypatch, capsys):
    from export.cli import cli as seg_export

    plan, spec = fake_plan(tmp_path, monkeypatch, profile=(1, 4, 8))
    code, text = run_main(seg_export, ["triton", plan, "-o", tmp_path / "repo"], capsys, "seg-export")
    assert code == 0, text
    folder = tmp_path / "repo" / "liver"
    cfg = parse_config(folder)
    check_matches_spec(cfg, spec)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]  # the profile's opt and max
    assert (folder / "1" / "model.plan").read_bytes() == plan.read_bytes()


@pytest.mark.parametrize(
    "version, device, needle",
    [
        ("10.4.0", DEVICE, "built with TensorRT 10.4.0, this machine has 10.3.0"),
        (VERSION, DeviceInfo("Other GPU", (7, 2)), "built for Other GPU"),
    ],
)
def test_a_plan_for_another_tensorrt_or_gpu_is_refused_and_nothing_written(
    tmp_path, monkeypatch, capsys, version, device, needle
):
    from export.cli import cli as seg_export

    plan, _ = fake_plan(tmp_path, monkeypatch, version=version, device=device)
    code, text = run_main(seg_export, ["triton", plan, "-o", tmp_path / "repo"], capsys, "seg-export")
    assert code != 0 and needle in text and "seg-export build-engine" in text and "Traceback" not in text
    assert not (tmp_path / "repo").exists() or not list((tmp_path / "repo").iterdir())


def test_a_max_batch_other_than_the_plans_is_refused(tmp_path, monkeypatch, capsys):
    from export.cli import cli as seg_export

    plan, _ = fake_plan(tmp_path, monkeypatch, profile=(1, 4, 8))
    code, text = run_main(
        seg_export, ["triton", plan, "-o", tmp_path / "repo", "--max-batch", 16], capsys, "seg-export"
    )
    assert code != 0 and "--max-batch 16 differs from the plan's profile max 8" in text


def test_an_existing_model_or_a_fixed_batch_axis_is_refused_without_touching_the_repository(tmp_path, capsys):
    import onnx

    from export.cli import cli as seg_export

    model = threshold_model(tmp_path / "liver.onnx")
    assert run_main(seg_export, ["triton", model, "-o", tmp_path / "repo"], capsys, "seg-export")[0] == 0
    before = (tmp_path / "repo" / "liver" / "config.pbtxt").read_text()
    code, text = run_main(seg_export, ["triton", model, "-o", tmp_path / "repo"], capsys, "seg-export")
    assert code != 0 and "already holds this model" in text
    assert (tmp_path / "repo" / "liver" / "config.pbtxt").read_text() == before
    fixed = onnx.load(str(model))
    for vi in (*fixed.graph.input, *fixed.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(fixed, str(tmp_path / "fixed.onnx"))
    code, text = run_main(
        seg_export, ["triton", tmp_path / "fixed.onnx", "-o", tmp_path / "repo"], capsys, "seg-export"
    )
    assert code != 0 and "batch axis is fixed at 1" in text
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["liver"]


# a real server ----------------------------------------------------------------------------
def start_server(repo: Path):
    pytest.importorskip("pytriton", reason="the test server is nvidia-pytriton's tritonserver")
    from export.triton_server import LocalTritonServer

    return LocalTritonServer(repo, startup_timeout=60).start()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, ONNX model, input folder): 'liver' (the model) and 'skewed' (config dims that
    contradict its spec) in one repository, and two small phantoms."""
    from runtime.phantoms import canonical, make_phantom

    root = tmp_path_factory.mktemp("triton")
    model = threshold_model(root / "liver.onnx", threshold_spec(), tumour_level=0.6)
    export_repository(model, root / "repo", max_batch=8, python_backend=True)
    skewed, _ = export_repository(model, root / "repo", name="skewed", python_backend=True)
    text = (skewed / "config.pbtxt").read_text()
    (skewed / "config.pbtxt").write_text(text.replace("dims: [ 1, 64, 64 ]", "dims: [ 3, 64, 64 ]", 1))
    (root / "in").mkdir()
    for k in range(2):
        hu, _, (sz, sy, sx) = canonical(make_phantom(7, k, size=64, slices=21))
        save_nifti(
            root / "in" / f"case{k}.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([sx, sy, sz, 1])
        )
    server = start_server(root / "repo")
    try:
        yield server, model, root / "in"
    finally:
        server.stop()


def masks(folder: Path) -> list[np.ndarray]:
    return [np.asanyarray(nib.load(str(folder / f"case{k}_seg.nii.gz")).dataobj) for k in range(2)]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_phantoms_through_the_server_agree_with_local_onnxruntime(served, tmp_path, capsys, protocol):
    server, model, inputs = served
    url = server.grpc_url if protocol == "grpc" else server.http_url
    code, text = run_main(seg_run, [inputs, "--model", model, "-o", tmp_path / "local"], capsys)
    assert code == 0, text
    args = [inputs, "--backend", "triton", "--url", url, "--model-name", "liver", "--protocol", protocol]
    code, text = run_main(seg_run, [*args, "-o", tmp_path / "triton", "--batch-size", 3], capsys)
    assert code == 0, text
    assert f"triton ({protocol}://{url}/liver" in text
    for a, b in zip(masks(tmp_path / "local"), masks(tmp_path / "triton")):
        assert (a == 1).any() and (a == 2).any()
        assert (a == b).mean() >= 0.9999
    report = json.loads((tmp_path / "triton" / "case0.json").read_text())
    assert report["backend"] == "triton" and report["provider"] == f"{protocol}://{url}/liver"


def test_the_backend_reads_the_spec_and_batch_limits_from_the_server(served):
    from runtime.backends.triton import TritonBackend

    server, model, _ = served
    with TritonBackend(server.grpc_url, "liver", in_flight=3) as be:
        assert be.spec == threshold_spec() and be.max_batch == 8 and be.default_batch == 4
        x = np.random.default_rng(0).random((8, 8, 1, 64, 64), dtype=np.float32)
        tokens = [be.submit(b) for b in x]  # eight requests, three at a time
        got = [be.collect(t) for t in tokens]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for b, g in zip(x, got):
        np.testing.assert_allclose(g, sess.run(None, {"slices": b})[0], atol=1e-5)


def test_a_wrong_model_name_is_one_line_naming_the_ready_models(served, tmp_path, capsys):
    server, _, inputs = served
    args = [inputs, "--backend", "triton", "--url", server.grpc_url, "--model-name", "lung", "-o", tmp_path / "o"]
    code, text = run_main(seg_run, args, capsys)
    assert code == 2 and "Traceback" not in text
    assert "has no ready model 'lung' (ready: liver, skewed); check --model-name" in text
    assert not list((tmp_path / "o").glob("*"))


def test_a_model_whose_tensors_contradict_its_spec_is_refused(served, tmp_path, capsys):
    server, _, inputs = served
    args = [inputs, "--backend", "triton", "--url", server.http_url, "--protocol", "http", "--model-name", "skewed"]
    code, text = run_main(seg_run, [*args, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "'skewed'" in text and "input slices dims [3, 64, 64] (spec: [1, 64, 64])" in text
    assert not list((tmp_path / "o").glob("*"))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_unreachable_server_is_one_line(tmp_path, capsys, protocol):
    from export.triton_server import free_port

    inputs = save_nifti(tmp_path / "v.nii.gz", np.zeros((64, 64, 8), np.int16), np.diag([6.0, 6.0, 5.0, 1.0]))
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    args = [inputs, "--backend", "triton", "--url", url, "--model-name", "liver", "--protocol", protocol]
    code, text = run_main(seg_run, [*args, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert f"cannot reach the Triton server at {url} over {protocol}" in text
    assert not list((tmp_path / "o").glob("*"))


def test_a_server_killed_mid_volume_fails_each_volume_and_writes_nothing(tmp_path):
    """The server is SIGKILLed once the first batch of the first volume is back; that volume
    and the next fail with one line each, and no mask, JSON or temporary file is written."""
    from runtime.backends.triton import TritonBackend
    from runtime.cli import segment_files
    from runtime.phantoms import canonical, make_phantom

    model = threshold_model(tmp_path / "liver.onnx", threshold_spec())
    export_repository(model, tmp_path / "repo", python_backend=True)
    shm = set(Path("/dev/shm").glob("triton_python_backend_shm_region_*"))
    paths = []
    for k in range(2):
        hu, _, (sz, sy, sx) = canonical(make_phantom(3, k, size=64, slices=24))
        paths.append(
            save_nifti(
                tmp_path / f"case{k}.nii.gz", np.ascontiguousarray(hu.transpose(2, 1, 0)), np.diag([sx, sy, sz, 1])
            )
        )
    server = start_server(tmp_path / "repo")
    try:

        class KilledAfterFirstBatch(TritonBackend):
            def collect(self, token):
                logits = super().collect(token)
                server.kill()
                return logits

        lines = []
        out = tmp_path / "out"
        out.mkdir()
        with KilledAfterFirstBatch(server.grpc_url, "liver", timeout=5, infer_timeout=20) as be:
            results = segment_files(paths, be, out, 2, echo=lambda msg, **k: lines.append(msg))
    finally:
        server.stop()
    assert all(isinstance(r, str) for r in results.values()), results
    assert "failed a request mid-volume" in results[paths[0]] and "nothing was written" in results[paths[0]]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 2
    assert not list(out.iterdir())
    assert set(Path("/dev/shm").glob("triton_python_backend_shm_region_*")) == shm


def test_latency_suite_measures_a_triton_model_by_name(served):
    from benchmarks.latency import measure_model

    server, _, inputs = served
    vol = str(inputs / "case0.nii.gz")
    out = measure_model("liver", [vol], [1, 4, 16], "triton", 0, 1, 2, 1, 4, url=server.grpc_url, protocol="grpc")
    assert out["backend"] == "triton" and out["in_flight"] == 4
    assert [r["batch"] for r in out["rows"]] == [1, 4]  # 16 is above the server's max batch of 8
    assert out["volumes"][0]["slices"] == 21 and out["volumes"][0]["batch"] == 4
