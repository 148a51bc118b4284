"""FP16 and calibrated INT8 (Q/DQ) graphs, checked and gated on Dice before they are written.

Precision lives in the ONNX graph, so the same graph runs in ONNX Runtime here (to measure
parity) and becomes a strongly typed TensorRT engine on the GPU.

INT8 targets:
- ``tensorrt``: S8S8, symmetric (every zero point an explicit int8 0), scales as
  initializers, Q/DQ on the inputs of Conv and ConvTranspose (outputs stay float), float
  biases: what TensorRT's ONNX parser accepts and fuses. Conv weights are per-channel along
  axis 0 (output channels). ConvTranspose weights are per-tensor: their output channels are
  axis 1, which ONNX Runtime's quantizer would pick, but TensorRT's deconvolution kernels take
  per-tensor (or per-input-channel) weight scales only. Evaluated with ONNX Runtime's graph
  optimisations disabled, so Q/DQ is simulated in float as TensorRT computes it, not by the
  CPU's int8 kernels.
- ``cpu``: U8S8 with ``reduce_range`` weights (7-bit), per-channel: on x86 CPUs without
  VNNI, ONNX Runtime's int8 kernels give wrong results for S8S8 and for U8S8 with full-range
  weights. Conv, Relu, MaxPool, Concat and DepthToSpace are quantized, so that ONNX Runtime
  runs the whole network in its int8 channels-last kernels: Relu folds into the convolution
  before it (asymmetric uint8 activations start at 0), MaxPool and Concat work on uint8, and
  each 2x2 transposed convolution (no int8 kernel on the CPU) is first rewritten as its exact
  equivalent, a 1x1 convolution to four times the channels and DepthToSpace. With Conv alone
  every activation went through float between the int8 convolutions and the model ran
  1.2x faster than FP32 instead of 1.5x. Evaluated with graph optimisations on, exactly as
  it will run.

Every written graph passed ``check_qdq`` for its target and the Dice gate against the FP32
model on held-out cases; both results are stored in the spec inside it.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import InputError, SegError
from runtime.io import write_bytes_atomic
from runtime.models import file_sha256

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
        raise InputError(
            "the calibration data has no slice with liver (label >= 1); calibrate on CT with liver in view"
        )
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
    info = {
        "slices": int(len(data)),
        "cases": [c.name for c in cases],
        "sha256": hashlib.sha256(data.tobytes()).hexdigest(),
        "tumour_slices": sum(1 for ci, s in picks if (ci, s) in set(pools["tumour"])),
        "seed": seed,
    }
    return data, info


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed slices, a few at a time."""

    def __init__(self, name: str, data: np.ndarray, batch: int = 8):
        self.name, self.data, self.batch, self.i = name, data, batch, 0

    def get_next(self):
        if self.i >= len(self.data):
            return None
        b = self.data[self.i : self.i + self.batch]
        self.i += self.batch
        return {self.name: b}

    def rewind(self):
        self.i = 0


# ---------------------------------------------------------------------------------- conversions
def to_fp16(model):
    """FP16 weights and math, float32 inputs and outputs (casts at the graph edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return topological_sort(convert_float_to_float16(model, keep_io_types=True))


def topological_sort(model):
    """Reorder graph nodes so every input is produced before use.

    The float16 converter appends its input casts at the end of the node list; ONNX requires
    sorted nodes, and TensorRT's parser walks them in order.
    """
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise SegError(f"graph has a cycle or an undefined input near node {rest[0].name}")
        for n in done:
            ready.update(n.output)
        ordered += done
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def int8_settings(target: str) -> dict:
    """quantize_static settings for a target (the choices are explained in the module docstring)."""
    from onnxruntime.quantization import QuantType

    if target == "tensorrt":
        return {
            "activation_type": QuantType.QInt8,
            "weight_type": QuantType.QInt8,
            "reduce_range": False,
            "op_types": ["Conv", "ConvTranspose"],
            "extra": {
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT takes float biases and fuses them; int32 bias Q/DQ only adds nodes
                "QuantizeBias": False,
                # Q/DQ on the inputs of Conv/ConvTranspose only, outputs stay float: TensorRT's
                # recommended placement, which leaves it free to fuse Conv+bias+ReLU
                "OpTypesToExcludeOutputQuantization": ["Conv", "ConvTranspose"],
            },
        }
    if target == "cpu":
        return {
            "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "reduce_range": True,
            "op_types": ["Conv", "Relu", "MaxPool", "Concat", "DepthToSpace"],
            "extra": {"ActivationSymmetric": False, "WeightSymmetric": True},
        }
    raise InputError(f"--target must be one of {TARGETS}, got {target!r}")


def upsampling_as_depth_to_space(model):
    """Rewrite each 2x2, stride-2 ConvTranspose as a 1x1 Conv to 4x the channels followed by
    DepthToSpace (CRD): the same function, since the kernel's four taps never overlap
    (output channel ``4 * co + 2 * a + b`` of the 1x1 convolution is tap ``(a, b)`` of
    output channel ``co``). ONNX Runtime has no int8 ConvTranspose kernel on the CPU; the
    rewritten form quantizes. Other ConvTransposes and the model itself are left as they are;
    returns a rewritten copy."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    for n in g.node:
        if not _is_plain_2x2_up(n, inits):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])  # (in, out, 2, 2)
        c_out = w.shape[1]
        ins = [n.input[0], n.input[1] + ".as_1x1"]
        g.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(4 * c_out, -1, 1, 1)), ins[1])
        )
        if len(n.input) > 2 and n.input[2]:
            ins.append(n.input[2] + ".as_1x1")
            g.initializer.append(
                numpy_helper.from_array(np.repeat(numpy_helper.to_array(inits[n.input[2]]), 4), ins[2])
            )
        mid = n.output[0] + ".before_depth_to_space"
        nodes.append(helper.make_node("Conv", ins, [mid], name=f"{n.name}.as_1x1", kernel_shape=[1, 1]))
        nodes.append(
            helper.make_node(
                "DepthToSpace", [mid], list(n.output), name=f"{n.name}.depth_to_space", blocksize=2, mode="CRD"
            )
        )
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return out


def _is_plain_2x2_up(n, inits: dict) -> bool:
    """A ConvTranspose with a 2x2 kernel, stride 2, no padding, groups or dilation, and
    constant weights and bias: the up-convolution of the UNet."""
    return (
        n.op_type == "ConvTranspose"
        and list(_attr(n, "kernel_shape", [])) == [2, 2]
        and list(_attr(n, "strides", [1, 1])) == [2, 2]
        and int(_attr(n, "group", 1)) == 1
        and not any(_attr(n, "pads", [0]))
        and not any(_attr(n, "output_padding", [0]))
        and set(_attr(n, "dilations", [1])) == {1}
        and _attr(n, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        and n.input[1] in inits
        and (len(n.input) < 3 or not n.input[2] or n.input[2] in inits)
    )


def edge_nodes(model) -> list[str]:
    """Names of the nodes that read the graph's input or write its outputs: the UNet's first
    3x3 convolution (on the windowed CT slices) and its 1x1 output convolution."""
    ends = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if ends & (set(n.input) | set(n.output))]


def to_int8(model, data: np.ndarray, target: str, method: str = "minmax", quantize_edges: bool = False):
    """Static Q/DQ quantization calibrated on ``data`` (preprocessed slices) for ``target``.

    The first and the output convolution stay float unless ``quantize_edges``: together
    about 1% of the FLOPs, and the most sensitive layers. Rounding the CT input to 8 bits
    and the logits' inputs flipped faint tumour voxels: on the demo model's held-out slices
    the CPU target's tumour Dice against FP32 went from 0.887 to 0.987 with both kept float.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in methods:
        raise InputError(f"--method must be one of {sorted(methods)}, got {method!r}")
    cfg = int8_settings(target)
    spec = get_spec(model)
    extra = {**cfg["extra"], "CalibMovingAverage": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    if target == "tensorrt":
        # TensorRT's deconvolution kernels take per-tensor (or per-input-channel) weight scales,
        # not per-output-channel ones (axis 1 of a ConvTranspose weight, which is what ONNX
        # Runtime's quantizer would choose): give ConvTranspose weights one scale each.
        extra["TensorQuantOverrides"] = {
            n.input[1]: [{"quant_type": cfg["weight_type"], "symmetric": True}]
            for n in model.graph.node
            if n.op_type == "ConvTranspose"
        }
    if target == "cpu":
        model = upsampling_as_depth_to_space(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(src))
        quantize_static(
            str(src),
            str(dst),
            _Reader(spec.io.input_name, data),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=cfg["op_types"],
            per_channel=True,
            reduce_range=cfg["reduce_range"],
            activation_type=cfg["activation_type"],
            weight_type=cfg["weight_type"],
            calibrate_method=methods[method],
            extra_options=extra,
            nodes_to_exclude=[] if quantize_edges else edge_nodes(model),
        )
        return onnx.load(str(dst))


# ---------------------------------------------------------------------------------- graph checks
class QDQError(SegError):
    """A Q/DQ graph that the target would reject or compute wrongly."""


def _constants(model) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs: the build-time constants of the graph."""
    from onnx import numpy_helper

    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(a.t)
    return out


def _attr(node, name: str, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# where the output channels of a weight are, per consuming op: Conv (K, C, kh, kw),
# ConvTranspose (C, K/groups, kh, kw)
OUT_CHANNEL_AXIS = {"Conv": 0, "ConvTranspose": 1}
REDUCED_RANGE = 64  # |int8 weight| bound with reduce_range (7 bits)


def check_qdq(model, target: str) -> dict:
    """Walk every QuantizeLinear/DequantizeLinear node and verify what ``target`` needs.

    Both targets: scales are build-time constants (initializers or Constant nodes) and
    positive; weights are int8 with zero points 0; per-channel scales only on weights, along
    the output-channel axis of the op that uses the weight, one scale per channel.
    tensorrt: additionally every zero point is present, int8 and 0 (symmetric; an omitted zero
    point means uint8 in ONNX), no int32 bias Q/DQ, and ConvTranspose weights per-tensor.
    cpu: activations uint8 (U8S8), weights within the 7-bit reduce_range.
    Returns counts; raises QDQError listing the problems otherwise.
    """
    if target not in TARGETS:
        raise InputError(f"--target must be one of {TARGETS}, got {target!r}")
    consts = _constants(model)
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def weight_of(node) -> np.ndarray | None:
        """The constant a Q/DQ node (de)quantizes: its own input, or the input of the Q before a DQ."""
        src = node.input[0]
        if src in consts:
            return consts[src]
        p = producers.get(src)
        if (
            node.op_type == "DequantizeLinear"
            and p is not None
            and p.op_type == "QuantizeLinear"
            and p.input[0] in consts
        ):
            return consts[p.input[0]]
        return None

    def weight_users(node) -> list[tuple[object, str]]:
        """(op, input name) pairs where the dequantized weight is used."""
        dqs = (
            [node]
            if node.op_type == "DequantizeLinear"
            else [d for d in consumers.get(node.output[0], []) if d.op_type == "DequantizeLinear"]
        )
        return [(u, d.output[0]) for d in dqs for u in consumers.get(d.output[0], [])]

    problems: list[str] = []
    counts = {"qdq_nodes": 0, "activation_qdq": 0, "weights_per_channel": 0, "weights_per_tensor": 0, "bias_qdq": 0}
    for n in nodes:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts["qdq_nodes"] += 1
        name = n.name or n.output[0]
        if n.input[1] not in consts:
            problems.append(f"{name}: scale is not a build-time constant")
            continue
        scale = consts[n.input[1]]
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        zp = consts.get(zp_name) if zp_name else None
        if zp_name and zp is None:
            problems.append(f"{name}: zero point is not a build-time constant")
        if not np.all(scale > 0):
            problems.append(f"{name}: scale has non-positive values")
        w = weight_of(n)
        stored = consts.get(n.input[0])
        if n.op_type == "DequantizeLinear" and stored is not None and stored.dtype == np.int32:
            kind = "bias"
        elif w is not None:
            kind = "weight"
        else:
            kind = "activation"
        if kind == "activation":
            counts["activation_qdq"] += 1
        elif n.op_type == "DequantizeLinear":
            counts[
                "bias_qdq" if kind == "bias" else "weights_per_channel" if scale.size > 1 else "weights_per_tensor"
            ] += 1

        # zero points
        if kind == "bias":
            if target == "tensorrt":
                problems.append(
                    f"{name}: int32 bias Q/DQ; TensorRT takes float biases (quantize with QuantizeBias off)"
                )
            elif zp is not None and np.any(zp != 0):
                problems.append(f"{name}: bias zero point is not 0")
        elif target == "tensorrt" or kind == "weight":
            if zp is None:
                if zp_name is None:
                    problems.append(
                        f"{name}: no zero point (ONNX then means uint8); "
                        f"{'TensorRT' if target == 'tensorrt' else 'weights'} need an explicit int8 zero point of 0"
                    )
            else:
                if zp.dtype != np.int8:
                    problems.append(f"{name}: zero point type {zp.dtype}, need int8")
                if np.any(zp != 0):
                    problems.append(f"{name}: non-zero zero point (asymmetric quantization)")
        elif target == "cpu" and zp is not None and zp.dtype != np.uint8:
            problems.append(f"{name}: activation zero point type {zp.dtype}, need uint8 for the U8S8 CPU kernels")

        # per-channel scales
        if scale.size > 1:
            if zp is not None and zp.size != scale.size:
                problems.append(f"{name}: {zp.size} zero points for {scale.size} scales")
            if kind == "activation":
                problems.append(f"{name}: per-channel scale on an activation (only weights may be per-channel)")
            elif kind == "weight":
                axis = int(_attr(n, "axis", 1))
                axis = axis + w.ndim if axis < 0 else axis
                for u, used_as in weight_users(n):
                    if u.op_type not in OUT_CHANNEL_AXIS or len(u.input) < 2 or u.input[1] != used_as:
                        continue
                    if target == "tensorrt" and u.op_type == "ConvTranspose":
                        problems.append(
                            f"{name}: per-channel weight scales on ConvTranspose {u.name or u.output[0]}; "
                            "TensorRT's deconvolution supports per-tensor weight scales here"
                        )
                        continue
                    want = OUT_CHANNEL_AXIS[u.op_type]
                    if axis != want:
                        problems.append(
                            f"{name}: per-channel axis {axis} on a {u.op_type} weight, need {want} (output channels)"
                        )
                if not 0 <= axis < w.ndim or w.shape[axis] != scale.size:
                    problems.append(f"{name}: {scale.size} scales for axis {axis} of a weight shaped {list(w.shape)}")
        if (
            target == "cpu"
            and kind == "weight"
            and w is not None
            and w.dtype == np.int8
            and int(np.abs(w.astype(np.int16)).max(initial=0)) > REDUCED_RANGE
        ):
            problems.append(
                f"{name}: int8 weights use the full range; the x86 CPU int8 kernels need 7-bit (reduce_range) weights"
            )
    convs = [n for n in nodes if n.op_type in OUT_CHANNEL_AXIS]
    quantized = [
        n
        for n in convs
        if len(n.input) > 1 and n.input[1] in producers and producers[n.input[1]].op_type == "DequantizeLinear"
    ]
    counts.update({"convs": len(convs), "quantized_convs": len(quantized)})
    if counts["qdq_nodes"] == 0 or not quantized:
        problems.append("no QuantizeLinear/DequantizeLinear on any convolution weight: the graph is not quantized")
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise QDQError(f"the INT8 graph is not valid for --target {target}: " + "; ".join(problems[:6]) + more)
    return counts


# ---------------------------------------------------------------------------------- parity
CLASSES = (("liver", lambda a: a >= 1), ("tumor", lambda a: a == 2))


@dataclass
class Parity:
    """Per-case agreement and Dice of a converted model against the FP32 model and the ground truth."""

    per_case: dict
    passed: bool
    max_drop: float
    notes: list = field(default_factory=list)

    @property
    def table(self) -> str:
        return parity_table(self.per_case, self.max_drop, self.notes)

    def summary(self) -> dict:
        rows = list(self.per_case.values())
        out = {"cases": len(rows), "min_agreement": min((r["agreement"] for r in rows), default=None)}
        for cls, _ in CLASSES:
            drops = [r[cls]["drop"] for r in rows if r[cls]["drop"] is not None]
            vs = [r[cls]["dice_vs_fp32"] for r in rows if r[cls]["dice_vs_fp32"] is not None]
            out[f"{cls}_max_drop"] = max(drops, default=None)
            out[f"{cls}_min_dice_vs_fp32"] = min(vs, default=None)
        return out

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "max_dice_drop": self.max_drop,
            "summary": self.summary(),
            "per_case": self.per_case,
            "notes": self.notes,
        }


def evaluate_parity(
    reference_bytes: bytes,
    candidate_bytes: bytes,
    cases,
    spec,
    optimize_candidate: bool = True,
    max_drop: float = MAX_DICE_DROP,
    batch: int = 8,
) -> Parity:
    """Segment each case with both models through the one slice pipeline (runtime.inference)
    and postprocessing; per case: argmax agreement (before postprocessing), and for liver and
    tumour the Dice of each model vs the ground truth, the drop, and Dice vs the FP32 prediction.

    The gate: no case may lose more than ``max_drop`` Dice (per class) against the FP32
    model's own Dice vs the ground truth. A class with no voxels in the ground truth and the
    FP32 prediction has no Dice (None) and is skipped, with a note.
    """
    from runtime.inference import predict_labels
    from runtime.io import read_labels, read_volume
    from runtime.metrics import dice
    from runtime.postprocess import postprocess

    if not cases:
        raise InputError("no evaluation cases: give --eval-data DIR with held-out labelled cases")
    ref_s = ort_session(reference_bytes)
    cand_s = ort_session(candidate_bytes, optimize=optimize_candidate)
    name = spec.io.input_name
    per_case, notes, ok = {}, [], True
    for c in cases:
        vol, gt = read_volume(c.image), read_labels(c.label).data
        raw_r = predict_labels(vol.data, vol.spacing, spec, lambda x: ref_s.run(None, {name: x})[0], batch)
        raw_c = predict_labels(vol.data, vol.spacing, spec, lambda x: cand_s.run(None, {name: x})[0], batch)
        pr, pc = postprocess(raw_r), postprocess(raw_c)
        row: dict = {"agreement": float(np.mean(raw_r == raw_c))}
        for cls, sel in CLASSES:
            d_ref, d_cand = dice(sel(pr), sel(gt)), dice(sel(pc), sel(gt))
            drop = None if d_ref is None or d_cand is None else d_ref - d_cand
            row[cls] = {"dice_fp32": d_ref, "dice": d_cand, "drop": drop, "dice_vs_fp32": dice(sel(pc), sel(pr))}
            if drop is None:
                extra = int(np.count_nonzero(sel(pc)))
                notes.append(
                    f"{c.name}: {cls} skipped in the gate (no {cls} in the ground truth and none predicted by FP32"
                    + (f"; the converted model predicts {extra} {cls} voxels)" if extra else " or the converted model)")
                )
            elif drop > max_drop:
                ok = False
        per_case[c.name] = row
    return Parity(per_case, ok, max_drop, notes)


def parity_table(per_case: dict, max_drop: float, notes: list | None = None) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"{'case':<16}{'agree':>8}  {'liver fp32':>10}{'liver':>8}{'drop':>8}{'vs fp32':>9}  "
        f"{'tumour fp32':>11}{'tumour':>8}{'drop':>8}{'vs fp32':>9}"
    ]
    for name, r in per_case.items():
        L, T = r["liver"], r["tumor"]
        flag = "  FAIL" if any(x["drop"] is not None and x["drop"] > max_drop for x in (L, T)) else ""
        lines.append(
            f"{name:<16}{r['agreement']:>8.5f}  "
            f"{f(L['dice_fp32']):>10}{f(L['dice']):>8}{f(L['drop']):>8}{f(L['dice_vs_fp32']):>9}"
            f"  {f(T['dice_fp32']):>11}{f(T['dice']):>8}{f(T['drop']):>8}{f(T['dice_vs_fp32']):>9}{flag}"
        )
    lines.append(
        f"(dice vs ground truth; drop = fp32 - converted, allowed <= {max_drop} per class and case; "
        "vs fp32 = Dice against the FP32 prediction; agree = voxel argmax agreement)"
    )
    lines += [f"note: {n}" for n in notes or []]
    return "\n".join(lines)


def quantize(
    model_path: str | Path,
    out: str | Path,
    precision: str,
    calib_cases=None,
    eval_cases=None,
    target: str = "tensorrt",
    method: str = "minmax",
    calib_slices: int = 64,
    max_drop: float = MAX_DICE_DROP,
    seed: int = 0,
    echo=print,
    quantize_edges: bool = False,
) -> tuple[Path, Parity]:
    """Convert, check the graph, evaluate against the FP32 model on held-out cases, gate, then
    write atomically. Nothing is written when any step fails."""
    import onnx

    out = Path(out)
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise InputError(f"{out.parent}: output directory does not exist; create it first")
    if precision not in ("fp16", "int8"):
        raise InputError(f"--precision must be fp16 or int8, got {precision!r}")
    if target not in TARGETS:
        raise InputError(f"--target must be one of {TARGETS}, got {target!r}")
    if not (0 <= max_drop < 1):
        raise InputError(f"--max-dice-drop must be in [0, 1), got {max_drop}")
    model = load_onnx(model_path)
    spec = get_spec(model)
    check_graph_layout(model, spec, str(model_path))
    if spec.precision != "fp32":
        raise InputError(
            f"{model_path}: is already {spec.precision}; convert the FP32 model written by seg-export onnx"
        )
    if not eval_cases:
        raise InputError("no evaluation cases: give --eval-data DIR with held-out labelled cases")
    if calib_cases and eval_cases:
        shared = {Path(c.image).resolve() for c in calib_cases} & {Path(c.image).resolve() for c in eval_cases}
        if shared:
            raise InputError(
                f"evaluation cases are also calibration cases ({len(shared)} shared, e.g. {sorted(shared)[0].name}); "
                "evaluate on held-out cases"
            )
    fp32_bytes = model.SerializeToString()
    if precision == "fp16":
        qmodel = to_fp16(model)
        calib, checks, optimize = None, {}, True
    else:
        if not calib_cases:
            raise InputError("--precision int8 needs --calib DIR with labelled CT cases")
        data, calib = calibration_slices(calib_cases, spec, calib_slices, seed)
        calib.update(
            {"method": method, "target": target, "first_and_output_conv": "int8" if quantize_edges else "float"}
        )
        qmodel = to_int8(model, data, target, method, quantize_edges)
        checks = check_qdq(qmodel, target)
        # TensorRT computes Q/DQ graphs as float math on quantized values: disable ONNX
        # Runtime's optimisations so it simulates exactly that instead of fusing the graph
        # into its own int8 CPU kernels; the cpu target is measured as it will run
        optimize = target == "cpu"
    new_spec = spec.with_(precision=precision, calibration=calib, parity=None)
    set_spec(qmodel, new_spec)
    onnx.checker.check_model(qmodel, full_check=True)
    parity = evaluate_parity(
        fp32_bytes, qmodel.SerializeToString(), eval_cases, spec, optimize_candidate=optimize, max_drop=max_drop
    )
    echo(parity.table)
    what = f"{precision}{'/' + target if precision == 'int8' else ''}"
    if not parity.passed:
        raise GateFailure(
            f"the {what} model loses more than {max_drop} Dice against FP32 on some case (table above); not written"
        )
    record = {
        "vs": "fp32",
        "evaluated_with": "onnxruntime CPU, graph optimisations "
        + ("on" if optimize else "off (Q/DQ simulated in float)"),
        "evaluated_with_graph_optimizations": optimize,
        "eval_cases": [c.name for c in eval_cases],
        "fp32_sha256": file_sha256(model_path),
        **({"graph": checks} if checks else {}),
        **parity.as_dict(),
    }
    set_spec(qmodel, new_spec.with_(parity=record))
    return write_bytes_atomic(out, qmodel.SerializeToString()), parity
