"""FP16 and calibrated INT8 (Q/DQ) graphs, checked and gated on Dice before they are written.

Precision lives in the ONNX graph, so the same graph runs in ONNX Runtime here (to measure
parity) and becomes a strongly typed TensorRT engine on the GPU.

INT8 targets:
- ``tensorrt``: S8S8, symmetric (every zero point 0), per-channel weights along the output
  channel axis, scales as initializers: what TensorRT's ONNX parser accepts. Evaluated with
  ONNX Runtime's graph optimisations disabled, so Q/DQ is simulated in float as TensorRT
  computes it, not by the CPU's int8 kernels.
- ``cpu``: U8S8 with ``reduce_range`` weights (7-bit): on x86 CPUs without VNNI the int8
  kernels give wrong results for S8S8 and for U8S8 without reduce_range.

Only Conv is quantized; the 2x2 transposed convolutions (a few % of the FLOPs) stay float,
because their per-channel weight axis differs between tools.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import InputError, SegError
from runtime.io import write_bytes_atomic

from .onnx_export import check_graph_layout, get_spec, load_onnx, ort_session, set_spec

MAX_DICE_DROP = 0.01  # per class, per case: the gate shared with seg-bench parity
TARGETS = ("tensorrt", "cpu")


class GateFailure(SegError):
    """A converted model segments worse than the FP32 model beyond the allowed drop."""


# ---------------------------------------------------------------------------------- calibration
def calibration_slices(cases, spec, n: int = 64, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Preprocessed slices from ``cases``, stratified: a third with tumour, a third with liver, the rest any."""
    from runtime.io import read_labels, read_volume
    from runtime.preprocess import make_batch, slice_grid

    rng = np.random.default_rng(seed)
    pools: dict[str, list] = {"tumour": [], "liver": [], "any": []}
    loaded = []
    for ci, c in enumerate(cases):
        vol, lab = read_volume(c.image), read_labels(c.label).data
        per = lab.reshape(lab.shape[0], -1)
        pools["tumour"] += [(ci, s) for s in np.nonzero((per == 2).any(1))[0]]
        pools["liver"] += [(ci, s) for s in np.nonzero((per >= 1).any(1))[0]]
        pools["any"] += [(ci, s) for s in range(lab.shape[0])]
        loaded.append(vol)
    if not pools["liver"]:
        raise InputError("the calibration data has no slice with liver (label >= 1); calibrate on CT with liver in view")
    picks = []
    for name, share in (("tumour", n // 3), ("liver", n // 3), ("any", n - 2 * (n // 3))):
        pool = pools[name] or pools["liver"]
        idx = rng.choice(len(pool), size=min(share, len(pool)), replace=False)
        picks += [pool[i] for i in sorted(idx)]
    batches = []
    for ci, s in picks:
        vol = loaded[ci]
        grid = slice_grid(vol.data.shape[1:], vol.spacing[1:], spec.preprocess)
        batches.append(make_batch(vol.data, vol.spacing, spec.preprocess, int(s), int(s) + 1, grid))
    data = np.concatenate(batches).astype(np.float32)
    info = {"slices": int(len(data)), "cases": [c.name for c in cases], "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
            "tumour_slices": sum(1 for ci, s in picks if (ci, s) in set(pools["tumour"])), "seed": seed}
    return data, info


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed slices, a few at a time."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 8):
        self.name, self.data, self.batch, self.i = name, data, batch, 0

    def get_next(self):
        if self.i >= len(self.data):
            return None
        b = self.data[self.i:self.i + self.batch]
        self.i += self.batch
        return {self.name: b}

    def rewind(self):
        self.i = 0


# ---------------------------------------------------------------------------------- conversions
def to_fp16(model):
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True)


def to_int8(model, data: np.ndarray, target: str, method: str = "minmax"):
    """Static Q/DQ quantization of Conv layers, calibrated on ``data``."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if target not in TARGETS:
        raise InputError(f"--target must be one of {TARGETS}")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise InputError(f"--method must be one of {sorted(methods)}")
    spec = get_spec(model)
    extra = {"WeightSymmetric": True, "CalibMovingAverage": False}
    if target == "tensorrt":
        extra["ActivationSymmetric"] = True
        extra["QuantizeBias"] = False  # TensorRT takes float biases and fuses them; int32 bias Q/DQ is rejected
        act, reduce_range = QuantType.QInt8, False
    else:
        act, reduce_range = QuantType.QUInt8, True
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static(str(src), str(dst), _Reader(spec.io.input_name, data), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv"], per_channel=True, reduce_range=reduce_range,
                        activation_type=act, weight_type=QuantType.QInt8, calibrate_method=methods[method], extra_options=extra)
        return onnx.load(str(dst))


# ---------------------------------------------------------------------------------- graph checks
def _constants(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def check_qdq(model, target: str) -> dict:
    """Verify the Q/DQ graph is what ``target`` accepts; returns counts. Raises SegError otherwise.

    tensorrt: every zero point int8 and 0, scales constant, per-channel only on weights, along
    axis 0 of Conv weights. cpu: weights int8 with zero points 0 (activations may be uint8;
    biases int32, as ONNX Runtime's CPU kernels use them).
    """
    consts = _constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems, q, per_channel = [], 0, 0
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        q += 1
        scale_name = n.input[1]
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if scale_name not in consts:
            problems.append(f"{n.name}: scale is not a build-time constant")
            continue
        scale = consts[scale_name]
        zp = consts.get(zp_name) if zp_name else None
        is_weight = n.op_type == "DequantizeLinear" and (n.input[0] in consts or (n.input[0] in producers and producers[n.input[0]].op_type == "QuantizeLinear" and producers[n.input[0]].input[0] in consts))
        if zp_name and zp is None:
            problems.append(f"{n.name}: zero point is not a constant")
        int32_bias = zp is not None and zp.dtype == np.int32 and target == "cpu" and n.input[0] in consts
        if zp is not None and not int32_bias:
            if target == "tensorrt" or is_weight:
                if zp.dtype != np.int8:
                    problems.append(f"{n.name}: zero point type {zp.dtype}, need int8")
                if np.any(zp != 0):
                    problems.append(f"{n.name}: non-zero zero point (asymmetric quantization)")
        if scale.ndim > 0 and scale.size > 1:
            per_channel += 1
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            users = consumers.get(n.output[0], [])
            if not is_weight:
                problems.append(f"{n.name}: per-channel scale on an activation")
            elif any(u.op_type == "Conv" for u in users) and axis != 0:
                problems.append(f"{n.name}: per-channel axis {axis} on a Conv weight, need 0 (output channels)")
        if np.any(scale <= 0):
            problems.append(f"{n.name}: non-positive scale")
    if q == 0:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: the graph is not quantized")
    if problems:
        raise SegError(f"the INT8 graph is not valid for --target {target}: " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
    return {"qdq_nodes": q, "per_channel": per_channel}


# ---------------------------------------------------------------------------------- parity
@dataclass
class Parity:
    per_case: dict
    passed: bool
    table: str

    def as_dict(self) -> dict:
        return {"per_case": self.per_case, "passed": self.passed, "max_dice_drop": self.max_drop}


def evaluate_parity(reference_bytes: bytes, candidate_bytes: bytes, cases, spec, optimize_candidate: bool = True,
                    max_drop: float = MAX_DICE_DROP, batch: int = 8) -> Parity:
    """Per-case Dice (liver, tumour) of both models vs ground truth, candidate vs reference, argmax agreement."""
    from runtime.inference import predict_labels
    from runtime.io import read_labels, read_volume
    from runtime.metrics import dice
    from runtime.postprocess import postprocess

    ref_s = ort_session(reference_bytes)
    cand_s = ort_session(candidate_bytes, optimize=optimize_candidate)
    name = spec.io.input_name
    per_case, ok = {}, True
    for c in cases:
        vol, gt = read_volume(c.image), read_labels(c.label).data
        raw_r = predict_labels(vol.data, vol.spacing, spec, lambda x: ref_s.run(None, {name: x})[0], batch)
        raw_c = predict_labels(vol.data, vol.spacing, spec, lambda x: cand_s.run(None, {name: x})[0], batch)
        pr, pc = postprocess(raw_r), postprocess(raw_c)
        row = {"agreement": float((raw_r == raw_c).mean())}
        for cls, sel in (("liver", lambda a: a >= 1), ("tumor", lambda a: a == 2)):
            d_ref, d_cand = dice(sel(pr), sel(gt)), dice(sel(pc), sel(gt))
            drop = None if d_ref is None or d_cand is None else d_ref - d_cand
            row[cls] = {"dice_fp32": d_ref, "dice": d_cand, "dice_vs_fp32": dice(sel(pc), sel(pr)), "drop": drop}
            if drop is not None and drop > max_drop:
                ok = False
        per_case[c.name] = row
    p = Parity(per_case, ok, parity_table(per_case, max_drop))
    p.max_drop = max_drop
    return p


def parity_table(per_case: dict, max_drop: float) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"{'case':<16}{'agree':>8}  {'liver fp32':>10}{'liver':>8}{'drop':>8}{'vs fp32':>9}  {'tumour fp32':>11}{'tumour':>8}{'drop':>8}{'vs fp32':>9}"]
    for name, r in per_case.items():
        L, T = r["liver"], r["tumor"]
        flag = " FAIL" if any(x["drop"] is not None and x["drop"] > max_drop for x in (L, T)) else ""
        lines.append(f"{name:<16}{r['agreement']:>8.5f}  {f(L['dice_fp32']):>10}{f(L['dice']):>8}{f(L['drop']):>8}{f(L['dice_vs_fp32']):>9}"
                     f"  {f(T['dice_fp32']):>11}{f(T['dice']):>8}{f(T['drop']):>8}{f(T['dice_vs_fp32']):>9}{flag}")
    return "\n".join(lines)


def quantize(model_path: str | Path, out: str | Path, precision: str, calib_cases=None, eval_cases=None, target: str = "tensorrt",
             method: str = "minmax", calib_slices: int = 64, max_drop: float = MAX_DICE_DROP, seed: int = 0, echo=print) -> tuple[Path, Parity]:
    """Convert, check, evaluate against the FP32 model, gate, then write atomically."""
    model = load_onnx(model_path)
    spec = get_spec(model)
    check_graph_layout(model, spec, str(model_path))
    if spec.precision != "fp32":
        raise InputError(f"{model_path}: is already {spec.precision}; quantize the FP32 model from seg-export onnx")
    fp32_bytes = model.SerializeToString()
    if precision == "fp16":
        qmodel = to_fp16(model)
        calib, checks, optimize = None, {}, True
    elif precision == "int8":
        data, calib = calibration_slices(calib_cases, spec, calib_slices, seed)
        calib.update({"method": method, "target": target})
        qmodel = to_int8(model, data, target, method)
        checks = check_qdq(qmodel, target)
        optimize = target == "cpu"
    else:
        raise InputError(f"--precision must be fp16 or int8, got {precision!r}")
    new_spec = spec.with_(precision=precision, calibration=calib)
    set_spec(qmodel, new_spec)
    parity = evaluate_parity(fp32_bytes, qmodel.SerializeToString(), eval_cases, spec, optimize_candidate=optimize, max_drop=max_drop)
    echo(parity.table)
    if not parity.passed:
        raise GateFailure(f"{precision}{'/' + target if precision == 'int8' else ''} model loses more than {max_drop} Dice on some case (table above); not written")
    set_spec(qmodel, new_spec.with_(parity={"vs": "fp32", "evaluated_with_graph_optimizations": optimize, **checks, **parity.as_dict()}))
    return write_bytes_atomic(out, qmodel.SerializeToString()), parity
