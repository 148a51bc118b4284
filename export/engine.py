"""Build TensorRT plans from ONNX graphs. Every TensorRT builder call of the project is here.

The network is strongly typed (precision comes from the ONNX graph: FP32, FP16 casts, INT8
Q/DQ), which works the same on TensorRT 10.x and 11.x; 11.x removed the FP16/INT8 builder
flags and calibrators, and 10.x rejects the FP16 flag on a strongly typed network. Version
branches compare parsed integers, never strings.
"""

from __future__ import annotations

from pathlib import Path

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
    """What the engine reports it needs for activations (V2 API from 10.1 on; 11.x has only V2)."""
    if version >= (10, 1) and hasattr(engine, "device_memory_size_v2"):
        return int(engine.device_memory_size_v2)
    return int(getattr(engine, "device_memory_size", 0)) or None


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
) -> dict:
    """Parse, build and write ``plan_path`` plus its sidecar; returns the sidecar."""
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
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    data = Path(onnx_path).read_bytes()
    if not parser.parse(data, str(onnx_path)):
        errs = parser_errors(parser)
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path}: " + "; ".join(errs or ["no details"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    config.builder_optimization_level = int(opt_level)
    c, h, w = spec.preprocess.channels, *spec.preprocess.size
    prof = builder.create_optimization_profile()
    prof.set_shape(spec.io.input_name, (min_b, c, h, w), (opt_b, c, h, w), (max_b, c, h, w))
    if config.add_optimization_profile(prof) < 0:
        raise EngineBuildError(f"TensorRT refused the batch profile {min_b}/{opt_b}/{max_b}")
    cache_path = Path(timing_cache) if timing_cache else None
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path and cache_path.is_file() else b"")
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            "TensorRT could not build the engine (see its log above; try --verbose or a larger --workspace-mb)"
        )
    plan_bytes = bytes(plan)
    if cache_path:
        write_bytes_atomic(cache_path, bytes(config.get_timing_cache().serialize()))
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan_bytes)
    mem = device_memory_bytes(engine, version) if engine is not None else None
    side = make_sidecar(
        spec,
        onnx_sha256,
        plan_bytes,
        trt.__version__,
        device,
        (min_b, opt_b, max_b),
        {
            "workspace_mb": workspace_mb,
            "optimization_level": opt_level,
            "strongly_typed": True,
            "timing_cache": str(cache_path) if cache_path else None,
        },
        mem,
    )
    write_bytes_atomic(plan_path, plan_bytes)
    write_json_atomic(sidecar_path(plan_path), side)
    return side
