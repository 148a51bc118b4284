"""Checkpoint -> one self-contained, verified ONNX file with the spec in its metadata."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import InputError, SegError
from runtime.io import write_bytes_atomic
from runtime.models import file_sha256
from runtime.spec import METADATA_KEY, ModelSpec

OPSET = 18
# FP32 export must be numerically the same network: every voxel's argmax agrees (allowing a
# handful of exact ties out of ~10^5-10^6 pixels), logits within 1e-3 of the logit scale.
TOLERANCES = {"fp32": {"agreement": 0.9999, "max_abs_rel": 1e-3}}


class VerificationError(SegError):
    """The exported graph does not compute what the source model computes."""


@dataclass
class Verification:
    max_abs_diff: float
    logit_scale: float
    agreement: float
    slices: int

    def as_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "logit_scale": self.logit_scale,
            "argmax_agreement": self.agreement,
            "slices": self.slices,
        }


def set_spec(model, spec: ModelSpec) -> None:
    """Store the spec JSON in the ModelProto's metadata_props (replacing an older one)."""
    props = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, spec.to_json(indent=None)


def get_spec(model) -> ModelSpec:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return ModelSpec.from_json(p.value)
    raise InputError(
        "the ONNX model carries no spec (metadata_props has no model spec); export it with seg-export onnx"
    )


def check_graph_layout(model, spec: ModelSpec, where: str = "the model") -> None:
    """The graph's input/output names and C, H, W must be what its spec says."""

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    ins, outs = list(model.graph.input), list(model.graph.output)
    init = {t.name for t in model.graph.initializer}
    ins = [i for i in ins if i.name not in init]
    want = [spec.preprocess.channels, *spec.preprocess.size]
    problems = []
    if len(ins) != 1 or ins[0].name != spec.io.input_name:
        problems.append(f"inputs {[i.name for i in ins]} (spec: ['{spec.io.input_name}'])")
    elif dims(ins[0])[1:] != want:
        problems.append(f"input C,H,W = {dims(ins[0])[1:]} (spec: {want})")
    if not outs or outs[0].name != spec.io.output_name:
        problems.append(f"outputs {[o.name for o in outs]} (spec: ['{spec.io.output_name}'])")
    if problems:
        raise InputError(
            f"{where}: input layout does not match its spec: "
            + "; ".join(problems)
            + "; re-export it with seg-export onnx"
        )


def load_onnx(path: str | Path):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such ONNX file")
    try:
        return onnx.load(str(p))
    except Exception as exc:
        raise InputError(f"{p}: not a readable ONNX model ({str(exc).splitlines()[0][:120]})") from exc


def verification_slices(spec: ModelSpec, data_dir: str | Path | None = None, n: int = 8) -> np.ndarray:
    """Real preprocessed slices (liver-bearing ones first) from DATA or from a generated phantom."""
    from runtime.preprocess import make_batch

    if data_dir:
        from runtime.datasets import load_dataset
        from runtime.io import read_labels, read_volume

        case = load_dataset(data_dir, check=False)[0]
        vol, lab = read_volume(case.image), read_labels(case.label).data
        spacing = vol.spacing
        data = vol.data
    else:
        from runtime.phantoms import canonical, make_phantom

        data, lab, spacing = canonical(make_phantom(seed=7919, index=0, size=256, slices=48))
    liver_slices = np.nonzero((lab >= 1).reshape(lab.shape[0], -1).any(1))[0]
    picks = (
        list(liver_slices[np.linspace(0, len(liver_slices) - 1, min(n, len(liver_slices))).astype(int)])
        if len(liver_slices)
        else []
    )
    picks = sorted(set(picks) | {0, lab.shape[0] - 1})[: max(n, 2)]
    return np.concatenate([make_batch(data, spacing, spec.preprocess, int(s), int(s) + 1) for s in picks])


def compare(ref: np.ndarray, got: np.ndarray) -> Verification:
    ref, got = ref.astype(np.float32), got.astype(np.float32)
    agree = (
        float((ref.argmax(1) == got.argmax(1)).mean()) if ref.shape[1] > 1 else float(((ref > 0) == (got > 0)).mean())
    )
    return Verification(float(np.abs(ref - got).max()), float(np.abs(ref).max()), agree, int(ref.shape[0]))


def ort_session(model_bytes: bytes, optimize: bool = True, threads: int = 0):
    from runtime.errors import require

    ort = require("onnxruntime", "cpu", "running ONNX models")
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def export_onnx(
    checkpoint: str | Path, out: str | Path, verify_data: str | Path | None = None, opset: int = OPSET
) -> tuple[Path, Verification]:
    """Export, check, verify against PyTorch, then write atomically (nothing written on failure)."""
    import onnx
    import torch

    from train.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint)
    model = ck.model().float()
    spec = ck.spec
    h, w = spec.preprocess.size
    model.check_input_size(h, w)
    x = torch.zeros(2, spec.preprocess.channels, h, w)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            (x,),
            input_names=[spec.io.input_name],
            output_names=[spec.io.output_name],
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            opset_version=opset,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    spec = spec.with_(
        precision="fp32",
        provenance={
            **spec.provenance,
            "checkpoint_sha256": file_sha256(checkpoint),
            "exporter": f"torch {torch.__version__} dynamo, opset {opset}",
        },
    )
    set_spec(proto, spec)
    proto.producer_name = "unet-edge"
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    batch = verification_slices(spec, verify_data)
    with torch.inference_mode():
        ref = model(torch.from_numpy(batch)).numpy()
    got = ort_session(data).run(None, {spec.io.input_name: batch})[0]
    v = compare(ref, got)
    tol = TOLERANCES["fp32"]
    if v.agreement < tol["agreement"] or v.max_abs_diff > tol["max_abs_rel"] * max(1.0, v.logit_scale):
        raise VerificationError(
            f"ONNX output differs from PyTorch: argmax agreement {v.agreement:.6f} (need >= {tol['agreement']}), "
            f"max |logit diff| {v.max_abs_diff:.3g} (allowed {tol['max_abs_rel'] * max(1.0, v.logit_scale):.3g}); "
            "nothing written"
        )
    spec = spec.with_(parity={"vs": "pytorch", **v.as_dict()})
    set_spec(proto, spec)
    return write_bytes_atomic(out, proto.SerializeToString()), v
