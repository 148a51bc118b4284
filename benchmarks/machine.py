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
    for pkg in ("numpy", "scipy", "nibabel", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "tensorrt", "cuda-python"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(), "versions": versions()}


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best dense float32 matrix-multiply rate (GFLOP/s) numpy's BLAS reaches on these cores."""
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9
