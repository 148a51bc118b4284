"""Build TensorRT plans from ONNX graphs. Every TensorRT builder call of the project is here.

The network is strongly typed (precision comes from the ONNX graph: FP32, FP16 casts, INT8
Q/DQ), which works the same on TensorRT 10.x and 11.x; 11.x removed the FP16/INT8 builder
flags and calibrators, and 10.x rejects the FP16 flag on a strongly typed network. Version
branches compare parsed integers, never strings.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.backends.plan import (
    DeviceInfo,
    make_sidecar,
    parse_version,
    sidecar_path,
    validate_profile,
)
from runtime.errors import TRT_HINT, SegError, require
from runtime.io import write_bytes_atomic, write_json_atomic
from runtime.spec import ModelSpec


class EngineBuildError(SegError):
    pass


def parser_errors(parser) -> list[str]:
    """Every ONNX parser error as 'node N (name, Op): description'."""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        out.append(f"node {e.node()} ({e.node_name() or '?'}, {e.node_operator() or '?'}): {e.desc()}")
    return out


def device_memory_bytes(engine, version: tuple[int, ...]) -> int | None:
    """Activation memory one STATIC context allocates (V2 API from 10.1 on; 11.x has only V2)."""
    if version >= (10, 1) and hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(getattr(engine, "device_memory_size", 0)) or None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _set_timing_cache(config, cache_path: Path | None, warn: Callable[[str], None]) -> bool:
    """Give the builder the cache at ``cache_path`` if TensorRT accepts it, else a fresh one.

    A cache from another GPU or TensorRT version is refused (``set_timing_cache`` returns False,
    NvInfer.h IBuilderConfig::setTimingCache); the build then starts from an empty cache and the
    file is replaced by the fresh one afterwards. Returns whether the file's cache was used.
    """
    data = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    try:
        cache = config.create_timing_cache(data) if data else None
    except (RuntimeError, TypeError, ValueError):  # a damaged file may be refused here already
        cache = None
    if cache is not None and config.set_timing_cache(cache, False):
        return True
    if data:
        warn(
            f"{cache_path}: TensorRT refused this timing cache (made by another GPU or TensorRT version, or "
            "damaged); building without it and writing a fresh one"
        )
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    spec: ModelSpec,
    onnx_sha256: str,
    profile: tuple[int, int, int],
    workspace_mb: int = 1024,
    opt_level: int = 3,
    timing_cache: str | Path | None = None,
    verbose: bool = False,
    device: DeviceInfo | None = None,
    tf32: bool = False,
    warn: Callable[[str], None] = _warn,
) -> dict:
    """Parse, build and write ``plan_path`` plus its sidecar; returns the sidecar.

    TF32 is off unless ``tf32``: TensorRT enables it by default (NvInfer.h BuilderFlag::kTF32),
    and on Ampere and later it rounds FP32 matrix inputs to a 10-bit mantissa (about 1e-3
    relative error), so an "fp32" plan would not match ONNX Runtime's FP32 to 1e-4.
    """
    min_b, opt_b, max_b = validate_profile(*profile)
    if not 0 <= opt_level <= 5:
        raise EngineBuildError(f"builder optimisation level must be 0-5, got {opt_level}")
    trt = require("tensorrt", "trt", "building TensorRT engines", TRT_HINT)
    if device is None:
        from runtime.backends.cuda import device_info

        device = device_info(0)
    version = parse_version(trt.__version__)
    if version < (10, 0):
        raise EngineBuildError(f"TensorRT {trt.__version__} is too old; install TensorRT 10.x or 11.x")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    cache_path = Path(timing_cache) if timing_cache else None
    plan, cache_used, cache_bytes = _build(
        trt, logger, onnx_path, spec, (min_b, opt_b, max_b), workspace_mb, opt_level, cache_path, tf32, warn
    )
    # the builder, network and parser are freed by now: reading the memory figure holds only the plan and its engine
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    per_context = device_memory_bytes(engine, version) if engine is not None else None
    io_bytes = io_buffer_bytes(engine, trt, spec, max_b) if engine is not None else None
    del engine
    side = make_sidecar(
        spec,
        onnx_sha256,
        plan,
        trt.__version__,
        device,
        (min_b, opt_b, max_b),
        {
            "workspace_mb": workspace_mb,
            "optimization_level": opt_level,
            "strongly_typed": True,
            "tf32": bool(tf32),
            "timing_cache": str(cache_path) if cache_path else None,
            "timing_cache_reused": cache_used,
        },
        per_context,
        io_bytes,
    )
    write_bytes_atomic(plan_path, plan)
    if cache_path and cache_bytes is not None:
        write_bytes_atomic(cache_path, cache_bytes)
    write_json_atomic(sidecar_path(plan_path), side)
    return side


def _build(trt, logger, onnx_path, spec, profile, workspace_mb, opt_level, cache_path, tf32, warn):
    """(plan bytes, whether the cache file was used, the timing cache to save or None). Everything
    the builder holds is released when this returns."""
    min_b, opt_b, max_b = profile
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data, str(onnx_path)):
        errs = parser_errors(parser)
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errs or ["no details"]))
    del data
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.builder_optimization_level = int(opt_level)
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    c, h, w = spec.preprocess.channels, *spec.preprocess.size
    prof = builder.create_optimization_profile()
    prof.set_shape(spec.io.input_name, (min_b, c, h, w), (opt_b, c, h, w), (max_b, c, h, w))
    if config.add_optimization_profile(prof) < 0:
        raise EngineBuildError(f"TensorRT refused the batch profile {min_b}/{opt_b}/{max_b}")
    cache_used = _set_timing_cache(config, cache_path, warn) if cache_path else False
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            "TensorRT could not build the engine (see its log above; try --verbose or a larger --workspace-mb)"
        )
    plan = bytes(serialized)
    del serialized
    cache_bytes = None
    if cache_path:
        cache = config.get_timing_cache()  # None when no cache is attached (pyCoreDoc.h get_timing_cache)
        if cache is None:
            warn(f"{cache_path}: TensorRT returned no timing cache after the build; the file is left as it was")
        else:
            cache_bytes = bytes(cache.serialize())
    return plan, cache_used, cache_bytes


def io_buffer_bytes(engine, trt, spec: ModelSpec, max_batch: int) -> int:
    """Bytes of device I/O buffers the TensorRT backend allocates per buffer slot: every I/O
    tensor at the profile's max batch, at the engine's dtype."""
    total = 0
    c, h, w = spec.preprocess.channels, *spec.preprocess.size
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = list(engine.get_tensor_shape(name))
        if name == spec.io.input_name:
            shape = [max_batch, c, h, w]
        shape = [max_batch if d < 0 and k == 0 else max(int(d), 1) for k, d in enumerate(shape)]
        total += int(np.prod(shape)) * dtype_size(trt, engine.get_tensor_dtype(name))
    return total


def dtype_size(trt, dtype) -> int:
    itemsize = getattr(dtype, "itemsize", None)
    if itemsize is not None:
        return max(1, int(np.ceil(float(itemsize))))
    return int(np.dtype(trt.nptype(dtype)).itemsize)
