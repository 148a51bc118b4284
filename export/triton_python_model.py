"""Triton Python-backend model that runs the ONNX graph beside it with ONNX Runtime on the CPU.

``seg-export triton MODEL.onnx --python-backend`` copies this file to ``NAME/VERSION/model.py``
next to ``model.onnx``. It serves the model on Triton builds without an ONNX Runtime backend,
such as the CPU-only ``tritonserver`` shipped in the nvidia-pytriton wheel. It imports nothing
from this project: the server's Python environment needs only numpy and onnxruntime.

The requests of one dynamic batch are concatenated and run as one ONNX Runtime call.
"""

from __future__ import annotations

import json
import os

import numpy as np


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        so = ort.SessionOptions()
        threads = int(params.get("intra_op_threads") or 0)
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        inputs = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        batch = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        logits = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch)})[0]
        responses, start = [], 0
        for x in inputs:
            part = logits[start : start + len(x)]
            start += len(x)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, part)]))
        return responses

    def finalize(self) -> None:
        self.session = None
