"""TensorRT plan sidecars (``model.plan.json``): what they hold and when a plan may run here.

Pure logic, no tensorrt import: shared by the engine builder (export) and the TensorRT
backend, and tested without a GPU.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, SegError
from ..spec import ModelSpec

SIDECAR_VERSION = 1
BUFFER_SLOTS = 2  # the TensorRT backend's buffer slots: one execution context, stream and I/O buffers each


class PlanMismatch(SegError):
    """A plan that cannot run on this TensorRT version or GPU."""


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory: int = 0


def parse_version(text: str) -> tuple[int, ...]:
    """'10.3.0' -> (10, 3, 0); '11.4.0.106' -> (11, 4, 0, 106). Never compare version strings."""
    parts = re.findall(r"\d+", str(text))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in parts)


def validate_profile(min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(
            f"batch profile must satisfy 1 <= min <= opt <= max, got min={min_batch} opt={opt_batch} max={max_batch}"
        )
    return min_batch, opt_batch, max_batch


def sidecar_path(plan: str | Path) -> Path:
    return Path(str(plan) + ".json")


def make_sidecar(
    spec: ModelSpec,
    onnx_sha256: str,
    plan_bytes: bytes,
    tensorrt_version: str,
    device: DeviceInfo,
    profile: tuple[int, int, int],
    builder: dict[str, Any],
    device_memory_bytes: int | None,
    io_bytes_per_slot: int | None = None,
) -> dict:
    """The sidecar. ``device_memory_bytes`` is one execution context's activation memory; the
    ``device_memory`` entry says what seg-run allocates: every buffer slot holds its own STATIC
    context (each with that much activation memory) and its own I/O buffers."""
    return {
        "sidecar_version": SIDECAR_VERSION,
        "spec": spec.to_dict(),
        "onnx_sha256": onnx_sha256,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "tensorrt_version": tensorrt_version,
        "gpu": {
            "name": device.name,
            "compute_capability": list(device.compute_capability),
            "total_memory": device.total_memory,
        },
        "profile": {"min_batch": profile[0], "opt_batch": profile[1], "max_batch": profile[2]},
        "builder": builder,
        "device_memory_bytes": device_memory_bytes,
        "device_memory": runtime_device_memory(device_memory_bytes, io_bytes_per_slot),
        "parity": spec.parity,
    }


def runtime_device_memory(per_context: int | None, io_bytes_per_slot: int | None) -> dict | None:
    """Device memory the TensorRT backend allocates for a plan (without the engine's weights)."""
    if per_context is None:
        return None
    io = int(io_bytes_per_slot or 0)
    return {
        "contexts": BUFFER_SLOTS,
        "activation_bytes_per_context": int(per_context),
        "io_bytes_per_slot": io,
        "total_bytes": BUFFER_SLOTS * (int(per_context) + io),
    }


def read_sidecar(plan: str | Path) -> dict:
    p = sidecar_path(plan)
    if not p.is_file():
        raise InputError(
            f"{p}: the plan has no sidecar JSON; build plans with 'seg-export build-engine', which writes both"
        )
    try:
        side = json.loads(p.read_text())
        ModelSpec.from_dict(side["spec"])
        for key in ("tensorrt_version", "gpu", "profile", "plan_sha256"):
            side[key]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{p}: malformed plan sidecar ({exc}); rebuild with 'seg-export build-engine'") from exc
    return side


def check_plan(
    side: dict, plan_bytes: bytes, tensorrt_version: str, device: DeviceInfo, plan_name: str = "model.plan"
) -> None:
    """Refuse a plan built for another TensorRT version or GPU, or altered since it was built."""
    rebuild = f"rebuild it on this machine: seg-export build-engine MODEL.onnx -o {plan_name}"
    if hashlib.sha256(plan_bytes).hexdigest() != side["plan_sha256"]:
        raise PlanMismatch(
            f"{plan_name}: the plan file does not match its sidecar's sha256 (changed or truncated); {rebuild}"
        )
    built, here = parse_version(side["tensorrt_version"]), parse_version(tensorrt_version)
    if built[:3] != here[:3] or (len(built) > 3 and len(here) > 3 and built[3] != here[3]):
        raise PlanMismatch(
            f"{plan_name}: built with TensorRT {side['tensorrt_version']}, this machine has {tensorrt_version}; "
            f"plans only run on the TensorRT version that built them; {rebuild}"
        )
    cc = tuple(side["gpu"]["compute_capability"])
    if cc != tuple(device.compute_capability) or side["gpu"]["name"] != device.name:
        raise PlanMismatch(
            f"{plan_name}: built for {side['gpu']['name']} (compute capability {cc[0]}.{cc[1]}), this GPU is "
            f"{device.name} ({device.compute_capability[0]}.{device.compute_capability[1]}); {rebuild}"
        )
