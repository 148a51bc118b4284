"""Tiny ONNX models built with onnx.helper (no torch), carrying a spec like exported models: what the
tests and the kill benchmark run, so that a run's time is seg-run's own work, not the model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.spec import METADATA_KEY, ModelSpec, Preprocess


def threshold_spec(size: int = 64, spacing: float = 6.0) -> ModelSpec:
    return ModelSpec(
        preprocess=Preprocess(size=(size, size), spacing_mm=spacing, context=0), model={"in_channels": 1, "classes": 3}
    ).validate()


def threshold_model(
    path: Path,
    spec: ModelSpec | None = None,
    level: float = 0.55,
    spec_json: str | None = None,
    out_channels: int = 3,
    in_hw: tuple[int, int] | None = None,
    tumour_level: float | None = None,
    stride: int = 1,
) -> Path:
    """A 1x1 Conv: liver logit = 20 * (x - level), background 0, tumour -10. Liver where the
    windowed intensity exceeds ``level`` (HU > -200 + level * 450 with the default window).
    With ``tumour_level`` the tumour logit is 40 * (x - tumour_level): tumour where x exceeds
    2 * tumour_level - level (bright voxels, noisy specks among them). ``stride`` > 1 makes the
    output that much smaller than the input (a model that does not fit its spec)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or threshold_spec()
    c = spec.preprocess.channels
    h, w = in_hw or spec.preprocess.size
    weight = np.zeros((out_channels, c, 1, 1), np.float32)
    bias = np.zeros(out_channels, np.float32)
    weight[1, c // 2] = 20.0
    bias[1] = -20.0 * level
    if out_channels > 2:
        bias[2] = -10.0
        if tumour_level is not None:
            weight[2, c // 2], bias[2] = 40.0, -40.0 * tumour_level
    graph = helper.make_graph(
        [helper.make_node("Conv", ["slices", "W", "B"], ["logits"], strides=[stride, stride])],
        "threshold",
        [helper.make_tensor_value_info("slices", TensorProto.FLOAT, ["batch", c, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", out_channels, h // stride, w // stride])],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if spec_json is not False:
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, spec_json if spec_json is not None else spec.to_json()
    onnx.save(model, str(path))
    return path
