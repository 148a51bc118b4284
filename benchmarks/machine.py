"""What machine and libraries a report was measured on, and its matrix-multiply peak."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata

import numpy as np


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in (
        "numpy",
        "scipy",
        "nibabel",
        "onnxruntime",
        "onnxruntime-gpu",
        "onnx",
        "torch",
        "tensorrt",
        "cuda-python",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(), "versions": versions()}


def _best_rate(run, n: int, repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def matmul_rates(n: int = 2048, repeats: int = 5, threads: int = 0) -> dict[str, float]:
    """Dense float32 matrix-multiply rates (GFLOP/s) of the GEMMs on this machine: numpy's BLAS
    and, when installed, ONNX Runtime's own (MLAS, the one its Conv kernels use; on AVX-512
    CPUs it can be well above numpy's)."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    rates = {"numpy": _best_rate(lambda: a @ b, n, repeats)}
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError:
        return rates
    spec = [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "abc"]
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rates["onnxruntime"] = _best_rate(lambda: sess.run(None, {"a": a, "b": b}), n, repeats)
    return rates


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, threads: int = 0) -> tuple[float, dict[str, float]]:
    """The machine's dense float32 matrix-multiply peak: the best rate of any GEMM at hand."""
    rates = matmul_rates(n, repeats, threads)
    return max(rates.values()), rates
