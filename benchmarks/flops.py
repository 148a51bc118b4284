"""FLOPs of an ONNX graph's convolutions, counted from the graph itself (no torch)."""

from __future__ import annotations

import numpy as np


def conv_flops(model, batch: int = 1) -> int:
    """2 x multiply-accumulates of every Conv and ConvTranspose for one input of ``batch`` slices.

    Shapes come from ONNX shape inference with the batch axis fixed; Q/DQ and FP16 graphs count
    the same as their FP32 source (their weights are found through DequantizeLinear/Cast).
    """
    import onnx
    from onnx import numpy_helper, shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(model)
    dim = m.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = batch
    m = shape_inference.infer_shapes(m)
    shapes = {}
    for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    inits = {t.name: tuple(numpy_helper.to_array(t).shape) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def weight_shape(name: str):
        seen = 0
        while name not in inits and name in producer and seen < 4:  # through DequantizeLinear / Cast
            name = producer[name].input[0]
            seen += 1
        return inits.get(name)

    total = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "ConvTranspose"):
            continue
        w = weight_shape(n.input[1])
        if w is None:
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        if n.op_type == "Conv":
            out = shapes.get(n.output[0])
            total += 2 * int(np.prod(out)) * (w[1] * int(np.prod(w[2:])))
        else:  # each input pixel scatters into a kernel-sized patch of every output channel
            inp = shapes.get(n.input[0])
            total += 2 * int(np.prod(inp)) * (w[1] * group) * int(np.prod(w[2:]))
    return total
