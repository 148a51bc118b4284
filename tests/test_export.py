"""seg-export: verified ONNX, FP16 and INT8 graphs, the Dice gate, graph checks, bad input."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from benchmarks.tiny_models import threshold_model  # noqa: E402
from export.cli import cli  # noqa: E402
from export.onnx_export import export_onnx  # noqa: E402
from export.quantize import GateFailure, check_qdq, quantize, upsampling_as_depth_to_space  # noqa: E402
from runtime.datasets import load_dataset  # noqa: E402
from runtime.errors import InputError, SegError  # noqa: E402
from runtime.spec import METADATA_KEY, ModelSpec  # noqa: E402
from tests.conftest import run_main  # noqa: E402


@pytest.fixture(scope="module")
def fp32(tiny_run, tmp_path_factory):
    out, _ = tiny_run
    path, v = export_onnx(out / "best.pt", tmp_path_factory.mktemp("onnx") / "model.onnx")
    return path, v


def test_onnx_export_is_verified_and_carries_the_spec(fp32, tiny_run):
    from train.checkpoint import load_checkpoint

    path, v = fp32
    assert v.agreement >= 0.9999 and v.max_abs_diff <= 1e-3 * max(1.0, v.logit_scale)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = ModelSpec.from_json(sess.get_modelmeta().custom_metadata_map[METADATA_KEY])
    ck = load_checkpoint(tiny_run[0] / "best.pt")
    assert spec.model == ck.spec.model and spec.preprocess == ck.spec.preprocess and spec.precision == "fp32"
    assert len(spec.provenance["checkpoint_sha256"]) == 64 and spec.parity["argmax_agreement"] >= 0.9999
    c, (h, w) = spec.preprocess.channels, spec.preprocess.size
    for n in (1, 5):  # the batch axis is dynamic
        assert sess.run(None, {"slices": np.zeros((n, c, h, w), np.float32)})[0].shape == (n, 3, h, w)
    model = onnx.load(str(path))
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert {n.op_type for n in model.graph.node} <= {"Conv", "Relu", "MaxPool", "ConvTranspose", "Concat"}


def test_fp16_graph_keeps_float32_io_and_segments_like_fp32(fp32, tiny_data, tmp_path):
    heldout = load_dataset(tiny_data / "heldout")
    path, parity = quantize(fp32[0], tmp_path / "m16.onnx", "fp16", None, heldout, echo=lambda *a: None)
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    for row in parity.per_case.values():
        assert row["agreement"] > 0.999
        assert row["liver"]["drop"] is None or abs(row["liver"]["drop"]) <= 0.002


def test_int8_tensorrt_graph_is_symmetric_per_channel_and_passes_the_gate(fp32, tiny_data, tmp_path):
    train_cases, heldout = load_dataset(tiny_data / "train"), load_dataset(tiny_data / "heldout")
    path, parity = quantize(
        fp32[0], tmp_path / "m8.onnx", "int8", train_cases, heldout, "tensorrt", calib_slices=32, echo=lambda *a: None
    )
    m = onnx.load(str(path))
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    zps = [
        consts[n.input[2]]
        for n in m.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)
    weight_dq = [
        n
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[1]].size > 1
    ]
    assert weight_dq and all(next(a.i for a in n.attribute if a.name == "axis") == 0 for n in weight_dq)
    spec = ModelSpec.from_json(next(p.value for p in m.metadata_props if p.key == METADATA_KEY))
    assert (
        spec.precision == "int8" and spec.calibration["target"] == "tensorrt" and len(spec.calibration["sha256"]) == 64
    )
    head = next(n for n in m.graph.node if n.output[0] == m.graph.output[0].name)
    stem = next(n for n in m.graph.node if n.op_type == "Conv" and m.graph.input[0].name in n.input)
    for conv in (head, stem):  # the first and the output convolution stay float
        assert conv.input[1] in consts and consts[conv.input[1]].dtype == np.float32
    assert spec.calibration["first_and_output_conv"] == "float"
    assert spec.parity["passed"] and spec.parity["evaluated_with_graph_optimizations"] is False
    assert parity.passed


def test_int8_cpu_graph_uses_reduce_range_weights_with_zero_offsets(fp32, tiny_data, tmp_path):
    train_cases, heldout = load_dataset(tiny_data / "train"), load_dataset(tiny_data / "heldout")
    path, _ = quantize(
        fp32[0],
        tmp_path / "m8c.onnx",
        "int8",
        train_cases,
        heldout,
        "cpu",
        calib_slices=32,
        max_drop=0.05,
        echo=lambda *a: None,
    )
    m = onnx.load(str(path))
    assert check_qdq(m, "cpu")["qdq_nodes"] > 0
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    weights = [
        consts[n.input[0]]
        for n in m.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in consts and consts[n.input[0]].dtype == np.int8
    ]
    assert weights and max(int(np.abs(w).max()) for w in weights) <= 64  # 7-bit (reduce_range) weights
    # the whole body is int8: no float upsampling, and pooling, concatenation and
    # depth-to-space read quantized tensors; only the float first convolution keeps its Relu
    ops = [n.op_type for n in m.graph.node]
    ups = sum(n.op_type == "ConvTranspose" for n in onnx.load(str(fp32[0])).graph.node)
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == ups > 0 and ops.count("Relu") <= 1
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("MaxPool", "Concat", "DepthToSpace"):
            assert all(producers.get(i) == "DequantizeLinear" for i in n.input), n.name


def test_transposed_convolutions_become_an_exact_1x1_conv_and_depth_to_space(fp32, rng):
    src = onnx.load(str(fp32[0]))
    ups = sum(n.op_type == "ConvTranspose" for n in src.graph.node)
    out = upsampling_as_depth_to_space(src)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ups > 0 and "ConvTranspose" not in ops and ops.count("DepthToSpace") == ups
    assert sum(n.op_type == "ConvTranspose" for n in src.graph.node) == ups  # the input model is untouched
    name = src.graph.input[0].name
    x = rng.random((3, *[d.dim_value for d in src.graph.input[0].type.tensor_type.shape.dim[1:]]), dtype=np.float32)
    a = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    b = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))


def test_the_gate_refuses_a_badly_calibrated_model(fp32, tiny_data, tmp_path):
    """Calibrating on near-empty slices gives activation scales far too small: outputs clip,
    the segmentation collapses, and nothing is written."""
    import nibabel as nib

    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    bad = tmp_path / "bad"
    bad.mkdir()
    for k in range(2):
        ph = make_phantom(2, k, size=64, slices=20)
        img, seg = phantom_images(ph)
        write_nifti(nib.Nifti1Image(np.full(ph.hu.shape, -1000, np.int16), ph.affine), bad / f"volume-{k}.nii.gz")
        write_nifti(seg, bad / f"segmentation-{k}.nii.gz")
    with pytest.raises(GateFailure, match="not written"):
        quantize(
            fp32[0],
            tmp_path / "bad.onnx",
            "int8",
            load_dataset(bad),
            load_dataset(tiny_data / "heldout"),
            "tensorrt",
            echo=lambda *a: None,
        )
    assert not (tmp_path / "bad.onnx").exists()


def test_checker_rejects_asymmetric_and_activation_per_channel_qdq():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w")
    ws = numpy_helper.from_array(np.array([0.1, 0.1], np.float32), "ws")
    wz = numpy_helper.from_array(np.array([0, 3], np.int8), "wz")  # a non-zero zero point
    xs = numpy_helper.from_array(np.array(0.02, np.float32), "xs")
    xz = numpy_helper.from_array(np.array(128, np.uint8), "xz")  # uint8 activations: not for TensorRT
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wdq", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [w, ws, wz, xs, xz],
    )
    with pytest.raises(SegError) as e:
        check_qdq(helper.make_model(g), "tensorrt")
    msg = str(e.value)
    assert "zero point type uint8" in msg and "non-zero zero point" in msg


def test_bad_inputs_are_one_line(tmp_path, tiny_data, fp32, capsys):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    code, out = run_main(cli, ["onnx", tmp_path / "x.pt", "-o", tmp_path / "x.onnx"], capsys, "seg-export")
    assert code == 2 and ("not a readable checkpoint" in out or "only seg-train checkpoints are accepted" in out)
    assert len(out.strip().splitlines()) == 1
    nospec = threshold_model(tmp_path / "nospec.onnx", spec_json=False)
    code, out = run_main(
        cli,
        ["quantize", nospec, "--precision", "fp16", "--eval-data", tiny_data / "heldout", "-o", tmp_path / "y.onnx"],
        capsys,
        "seg-export",
    )
    assert code == 2 and "carries no spec" in out
    wrong = threshold_model(tmp_path / "wrong.onnx", in_hw=(32, 32))
    code, out = run_main(
        cli,
        ["quantize", wrong, "--precision", "fp16", "--eval-data", tiny_data / "heldout", "-o", tmp_path / "y.onnx"],
        capsys,
        "seg-export",
    )
    assert code == 2 and "input layout does not match its spec" in out
    (tmp_path / "empty").mkdir()
    code, out = run_main(
        cli,
        ["quantize", fp32[0], "--precision", "int8", "--calib", tmp_path / "empty", "-o", tmp_path / "y.onnx"],
        capsys,
        "seg-export",
    )
    assert code == 2 and "no labelled cases" in out
    code, out = run_main(
        cli,
        [
            "quantize",
            fp32[0],
            "--precision",
            "fp16",
            "--eval-data",
            tiny_data / "heldout",
            "-o",
            tmp_path / "missing" / "y.onnx",
        ],
        capsys,
        "seg-export",
    )
    assert code == 2 and "does not exist" in out
    code, out = run_main(
        cli,
        ["build-engine", fp32[0], "-o", tmp_path / "m.plan", "--min-batch", "4", "--opt-batch", "2"],
        capsys,
        "seg-export",
    )
    assert code == 2 and "1 <= min <= opt <= max" in out
    assert not any(tmp_path.glob("y.onnx")) and not any(tmp_path.glob("*.plan"))


def test_calibration_without_liver_is_refused(tmp_path, fp32):
    import nibabel as nib

    from export.quantize import calibration_slices
    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    ph = make_phantom(4, 0, size=64, slices=16)
    img, _ = phantom_images(ph)
    write_nifti(img, tmp_path / "volume-0.nii.gz")
    write_nifti(nib.Nifti1Image(np.zeros(ph.labels.shape, np.uint8), ph.affine), tmp_path / "segmentation-0.nii.gz")
    spec = ModelSpec.from_json(next(p.value for p in onnx.load(str(fp32[0])).metadata_props if p.key == METADATA_KEY))
    with pytest.raises(InputError, match="no slice with liver"):
        calibration_slices(load_dataset(tmp_path), spec)


def test_build_engine_without_tensorrt_says_what_to_install(fp32, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    code, out = run_main(cli, ["build-engine", fp32[0], "-o", tmp_path / "m.plan"], capsys, "seg-export")
    assert code == 2 and "install TensorRT 10.x or 11.x" in out and not (tmp_path / "m.plan").exists()
