"""A Triton Inference Server model repository for an exported model (``seg-export triton``).

One model folder ``REPO/NAME`` holds ``config.pbtxt`` (tensor names, dtypes and dims from the
spec, ``max_batch_size``, dynamic batching with preferred sizes, an instance group), a version
folder with the model file, and ``spec.json``. The spec also rides in the config as the
parameter ``unet_edge.spec``, so a client reads it from the server (``seg-run --backend triton``)
and preprocesses exactly as the model was trained.

Three kinds of model folder:
- ``tensorrt_plan``: a plan built by ``seg-export build-engine``; refused, as seg-run refuses it,
  when it was built for another GPU or TensorRT version (the plan runs on this machine's GPU);
- ``onnxruntime_onnx``: an ONNX graph for Triton's ONNX Runtime backend, optionally with the
  TensorRT execution accelerator;
- ``python``: the ONNX graph run by ONNX Runtime inside Triton's Python backend, for servers
  without an ONNX Runtime backend (the CPU-only ``tritonserver`` that nvidia-pytriton ships).

The folder is built under a temporary name inside REPO and renamed into place, so a failed
export leaves no half-written model for a running server (which polls REPO) to load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import InputError
from runtime.spec import METADATA_KEY, ModelSpec

PLAN_SUFFIXES = (".plan", ".engine", ".trt")
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}


@dataclass
class RepoModel:
    """What a model folder's config.pbtxt says."""

    name: str
    platform: str  # tensorrt_plan | onnxruntime_onnx | python
    spec: ModelSpec
    max_batch: int
    preferred: list[int]
    instances: int = 1
    kind: str = "KIND_GPU"  # KIND_GPU | KIND_CPU
    queue_delay_us: int = 500
    trt_accelerator: bool = False
    parameters: dict[str, str] = field(default_factory=dict)


def _quote(text: str) -> str:
    """A protobuf text-format string literal (the text is ASCII: the spec JSON escapes the rest)."""
    if not text.isascii():
        raise InputError("the model spec holds non-ASCII text that cannot go into config.pbtxt")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def config_text(m: RepoModel) -> str:
    """The config.pbtxt of one model folder."""
    io, pre = m.spec.io, m.spec.preprocess
    c, (h, w), k = pre.channels, pre.size, m.spec.out_channels
    lines = [f"name: {_quote(m.name)}"]
    lines.append('backend: "python"' if m.platform == "python" else f"platform: {_quote(m.platform)}")
    lines += [
        f"max_batch_size: {m.max_batch}",
        "input [",
        f"  {{ name: {_quote(io.input_name)} data_type: {TRITON_DTYPES[io.input_dtype]} dims: [ {c}, {h}, {w} ] }}",
        "]",
        "output [",
        f"  {{ name: {_quote(io.output_name)} data_type: {TRITON_DTYPES[io.output_dtype]} dims: [ {k}, {h}, {w} ] }}",
        "]",
        "dynamic_batching {",
        f"  preferred_batch_size: [ {', '.join(str(b) for b in m.preferred)} ]",
        f"  max_queue_delay_microseconds: {m.queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {m.instances} kind: {m.kind} }} ]",
    ]
    if m.trt_accelerator:
        lines += [
            "optimization { execution_accelerators {",
            '  gpu_execution_accelerator: [ { name: "tensorrt" } ]',
            "} }",
        ]
    params = {METADATA_KEY: m.spec.to_json(indent=None), **m.parameters}
    for key, value in params.items():
        lines.append(f"parameters {{ key: {_quote(key)} value: {{ string_value: {_quote(value)} }} }}")
    return "\n".join(lines) + "\n"


def preferred_sizes(max_batch: int, opt: int | None, given: list[int] | None) -> list[int]:
    """The batcher's preferred sizes: given ones, else the plan's opt batch (or half the max) and the max."""
    sizes = sorted(set(given)) if given else sorted({max(1, opt or max_batch // 2), max_batch})
    bad = [b for b in sizes if not 1 <= b <= max_batch]
    if bad:
        raise InputError(f"preferred batch sizes {bad} are outside 1..{max_batch} (the model's max batch)")
    return sizes


def checked_plan(plan: Path) -> tuple[ModelSpec, dict]:
    """The plan's spec and sidecar, after the checks seg-run makes before running a plan here."""
    from runtime.backends import cuda as cuda_mod
    from runtime.backends.plan import check_plan, read_sidecar
    from runtime.errors import TRT_HINT, require

    side = read_sidecar(plan)
    trt = require("tensorrt", "trt", "exporting a TensorRT plan to Triton (it checks the plan fits this GPU)", TRT_HINT)
    cuda = cuda_mod.load_cuda()
    try:
        device = cuda.device_info(0)
    finally:
        cuda.close()
    check_plan(side, plan.read_bytes(), trt.__version__, device, plan.name)
    return ModelSpec.from_dict(side["spec"]), side


def onnx_spec(path: Path) -> ModelSpec:
    """The spec inside an ONNX model, after checking its tensors match it and its batch axis is free."""
    from .onnx_export import check_graph_layout, get_spec, load_onnx

    graph = load_onnx(path)
    spec = get_spec(graph)
    check_graph_layout(graph, spec, str(path))
    init = {t.name for t in graph.graph.initializer}
    first = [i for i in graph.graph.input if i.name not in init][0].type.tensor_type.shape.dim[0]
    if first.dim_value and not first.dim_param:
        raise InputError(
            f"{path}: the input's batch axis is fixed at {first.dim_value}; Triton batches requests, so "
            "re-export it with a dynamic batch axis (seg-export onnx does)"
        )
    return spec


def export_repository(
    model: Path,
    repo: Path,
    name: str | None = None,
    max_batch: int | None = None,
    preferred: list[int] | None = None,
    instances: int = 1,
    version: int = 1,
    cpu: bool = False,
    trt_accelerator: bool = False,
    python_backend: bool = False,
    queue_delay_us: int = 500,
    threads: int = 0,
) -> tuple[Path, RepoModel]:
    """Write REPO/NAME (config.pbtxt, VERSION/model.*, spec.json); returns (model folder, what it holds)."""
    model = Path(model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    name = name or model.name.split(".")[0]
    if not name or "/" in name or name.startswith("."):
        raise InputError(f"{name!r} is not a usable Triton model name; pass --name NAME")
    if model.suffix in PLAN_SUFFIXES:
        if python_backend or trt_accelerator or cpu:
            raise InputError("--python-backend, --trt-accelerator and --cpu apply to ONNX models, not to plans")
        spec, side = checked_plan(model)
        lo, opt, hi = (side["profile"][k] for k in ("min_batch", "opt_batch", "max_batch"))
        if max_batch is not None and max_batch != hi:
            raise InputError(
                f"--max-batch {max_batch} differs from the plan's profile max {hi}; Triton's max_batch_size must be "
                f"the plan's: rebuild it with seg-export build-engine --max-batch {max_batch}"
            )
        platform, files, kind, max_batch = "tensorrt_plan", {"model.plan": model}, "KIND_GPU", hi
        sizes = preferred_sizes(hi, opt, preferred)
    elif model.suffix == ".onnx":
        if python_backend and trt_accelerator:
            raise InputError("--trt-accelerator needs Triton's ONNX Runtime backend; drop --python-backend")
        spec = onnx_spec(model)
        max_batch = max_batch or 8
        sizes = preferred_sizes(max_batch, None, preferred)
        if python_backend:
            platform, files, kind = "python", {"model.onnx": model, "model.py": PYTHON_MODEL}, "KIND_CPU"
        else:
            platform, files, kind = "onnxruntime_onnx", {"model.onnx": model}, "KIND_CPU" if cpu else "KIND_GPU"
    else:
        raise InputError(f"{model}: give an .onnx model or a TensorRT plan (.plan)")
    if spec.io.input_dtype not in TRITON_DTYPES or spec.io.output_dtype not in TRITON_DTYPES:
        raise InputError(
            f"{model}: tensor dtypes {spec.io.input_dtype}/{spec.io.output_dtype} have no Triton type here"
        )
    if threads and platform != "python":
        raise InputError("--threads sets ONNX Runtime's threads in the Python backend; add --python-backend")
    params = {"intra_op_threads": str(threads)} if threads else {}
    entry = RepoModel(name, platform, spec, max_batch, sizes, instances, kind, queue_delay_us, trt_accelerator, params)
    return _write_folder(repo, entry, files, version), entry


def _write_folder(repo: Path, entry: RepoModel, files: dict[str, Path], version: int) -> Path:
    """Build the model folder under a temporary name in REPO, then rename it into place."""
    dest = repo / entry.name
    if dest.exists():
        raise InputError(f"{dest}: the repository already holds this model; remove it or pass --name NAME")
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{repo}: cannot create the repository ({exc.strerror}); choose a writable -o") from exc
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=repo))
    try:
        (tmp / str(version)).mkdir()
        for target, src in files.items():
            shutil.copyfile(src, tmp / str(version) / target)
        (tmp / "config.pbtxt").write_text(config_text(entry))
        (tmp / "spec.json").write_text(json.dumps(entry.spec.to_dict(), indent=2) + "\n")
        tmp.chmod(0o755)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
