"""Opening a model file as a backend, and the embedded demo model."""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

from .backends.base import Backend
from .errors import InputError

DEMO_ENV = "UNET_EDGE_DEMO_MODEL"  # points the demo at another model file (tests, experiments)
DEMO_NOTE = "the demo model was trained on synthetic CT phantoms only; do not use it on patient data"


def demo_model_path() -> Path:
    """The embedded demo model (runtime/assets/demo.onnx), or $UNET_EDGE_DEMO_MODEL."""
    if os.environ.get(DEMO_ENV):
        return Path(os.environ[DEMO_ENV])
    p = Path(str(resources.files("runtime.assets").joinpath("demo.onnx")))
    if not p.is_file():
        raise InputError("the demo model is not installed (runtime/assets/demo.onnx is missing); pass --model MODEL")
    return p


def choose_backend(path: Path, backend: str = "auto") -> str:
    if backend != "auto":
        return backend
    return "tensorrt" if path.suffix in (".plan", ".engine", ".trt") else "onnxruntime"


def open_backend(
    path: str | Path,
    backend: str = "auto",
    provider: str = "auto",
    threads: int = 0,
    optimize: bool | None = None,
    cuda_graph: bool = False,
    streams: int = 0,
    url: str | None = None,
    protocol: str = "grpc",
) -> Backend:
    """A backend (not yet activated) for a model file; TensorRT for plans, else ONNX Runtime.
    With backend "triton", ``path`` is the model's name on the Triton server at ``url``."""
    if backend == "triton":
        from .backends.triton import TritonBackend

        if not url:
            raise InputError("--backend triton needs --url HOST:PORT (the Triton server) and --model-name NAME")
        return TritonBackend(url, str(path), protocol)
    p = Path(path)
    if not p.exists():
        if os.path.lexists(p):
            raise InputError(f"{p}: is a symbolic link that leads nowhere (dangling or a loop); fix the link")
        raise InputError(f"{p}: no such model file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory; give the model file itself (model.onnx or model.plan)")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file; give a model.onnx or model.plan")
    kind = choose_backend(p, backend)
    if kind == "tensorrt" and p.suffix == ".onnx":
        raise InputError(
            f"{p}: an ONNX model, not a TensorRT plan; run it with --backend onnxruntime, "
            f"or build a plan first: seg-export build-engine {p} -o {p.with_suffix('.plan')}"
        )
    if kind == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend(p, cuda_graph=cuda_graph)
    if kind == "onnxruntime":
        from .backends.onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(
            p, provider=provider, threads=threads, optimize=True if optimize is None else optimize, streams=streams
        )
    raise InputError(f"unknown backend {backend!r}; choose auto, onnxruntime, tensorrt or triton")


def file_sha256(path: str | Path) -> str:
    """sha256 of a regular file (a FIFO or a device such as /dev/zero would be read forever)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not a regular file; give a file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
