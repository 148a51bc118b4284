"""seg-bench gpu-check: the one command to run on a first NVIDIA GPU, with one report to paste into an issue.

It builds FP32, FP16 and INT8 TensorRT plans from a model (the embedded one by default),
segments a generated phantom with each (with and without CUDA graphs; batch sizes at, below
and above the profile's opt), checks Dice parity against ONNX Runtime on the CPU running the
very graph each plan was built from, and times both. Every step ends as ``ran``, ``failed``
(with the reason) or ``not applicable`` (with the reason): nothing is skipped silently, and on
a machine without a GPU the report says why the GPU steps did not run.
"""

from __future__ import annotations

import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np

RAN, FAILED, NOT_APPLICABLE = "ran", "failed", "not applicable"
PRECISIONS = ("fp32", "fp16", "int8")
# Dice of the plan's labels against ONNX Runtime's labels from the same graph, per precision:
# FP32 differs by summation order only; FP16 and INT8 kernels round differently from the CPU's
MIN_DICE = {"fp32": 0.99, "fp16": 0.98, "int8": 0.95}


def _step(name: str, status: str, reason: str = "", **data) -> dict:
    return {"step": name, "status": status, "reason": reason, **data}


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def probe_environment() -> tuple[list[dict], dict]:
    """Steps saying what is installed, and facts: tensorrt module (or None), GPU, and why not."""
    steps, facts = [], {"tensorrt": None, "device": None, "no_gpu_reason": None}
    import onnxruntime as ort

    steps.append(_step("onnxruntime", RAN, version=ort.__version__, providers=ort.get_available_providers()))
    try:
        import tensorrt as trt

        facts["tensorrt"] = trt
        steps.append(_step("import tensorrt", RAN, version=trt.__version__))
    except ImportError as exc:
        reason = f'tensorrt is not installed ({exc}); pip install "unet-edge[trt-cu12]" tensorrt-cu12'
        facts["no_gpu_reason"] = reason
        steps.append(_step("import tensorrt", NOT_APPLICABLE, reason))
    from runtime.backends.cuda import binding_major, binding_mismatch, load_cuda, tensorrt_cuda_major
    from runtime.errors import SegError

    try:
        cuda = load_cuda()
        try:
            dev = cuda.device_info(0)
        finally:
            cuda.close()
        facts["device"] = dev
        steps.append(
            _step(
                "CUDA device",
                RAN,
                binding=cuda.name,
                gpu=dev.name,
                compute_capability=list(dev.compute_capability),
                memory_mib=dev.total_memory >> 20,
            )
        )
    except SegError as exc:
        facts["no_gpu_reason"] = facts["no_gpu_reason"] or str(exc)
        steps.append(_step("CUDA device", NOT_APPLICABLE, str(exc)))
    name = "CUDA binding matches TensorRT's CUDA major"
    trt_major, bind_major = tensorrt_cuda_major(), binding_major()
    if trt_major is None or bind_major is None:
        what = "no cuda-python here" if bind_major is None else "no tensorrt-cu12/-cu13 wheel here (JetPack's or none)"
        steps.append(_step(name, NOT_APPLICABLE, what))
    else:
        mismatch = binding_mismatch()
        steps.append(_step(name, FAILED if mismatch else RAN, mismatch or "", cuda_major=trt_major))
    if facts["no_gpu_reason"]:
        facts["no_gpu_reason"] = f"no TensorRT on a usable GPU here ({facts['no_gpu_reason']})"
    return steps, facts


def make_phantom_case(workdir: Path, spec, slices: int) -> types.SimpleNamespace:
    """One phantom CT and its labels, in the model's in-plane size, written as NIfTI."""
    from runtime.io import write_nifti
    from runtime.phantoms import make_phantom, phantom_images

    img, seg = phantom_images(make_phantom(seed=36, index=0, size=max(spec.preprocess.size), slices=slices))
    image, label = workdir / "volume-0.nii.gz", workdir / "segmentation-0.nii.gz"
    write_nifti(img, image)
    write_nifti(seg, label)
    return types.SimpleNamespace(image=image, label=label, name="volume-0")


def model_inputs(case, spec) -> np.ndarray:
    """The phantom's preprocessed slices (n, C, H, W), as seg-run feeds them."""
    from runtime.io import read_volume
    from runtime.preprocess import make_batch, slice_grid

    vol = read_volume(case.image)
    grid = slice_grid(vol.data.shape[1:], vol.spacing[1:], spec.preprocess)
    return make_batch(np.asarray(vol.data), vol.spacing, spec.preprocess, 0, vol.data.shape[0], grid)


def make_graphs(model: Path, workdir: Path, case, x: np.ndarray) -> tuple[list[dict], dict[str, Path]]:
    """FP32 (the model), FP16 and INT8 (Q/DQ, calibrated on the phantom) ONNX graphs."""
    import onnx

    from export.onnx_export import get_spec, load_onnx, set_spec
    from export.quantize import to_fp16, to_int8

    steps, graphs = [], {}
    fp32 = load_onnx(model)
    spec = get_spec(fp32)
    if spec.precision != "fp32":
        for p in PRECISIONS:
            steps.append(
                _step(f"{p} graph", NOT_APPLICABLE, f"{model} is already {spec.precision}; give an FP32 model")
            )
        return steps, graphs
    graphs["fp32"] = Path(model)
    steps.append(_step("fp32 graph", RAN, path=str(model)))
    makers = {"fp16": lambda m: to_fp16(m), "int8": lambda m: to_int8(m, x, "tensorrt")}
    for p, make in makers.items():
        try:
            t0 = time.perf_counter()
            g = make(load_onnx(model))
            set_spec(g, spec.with_(precision=p, parity=None))
            out = workdir / f"model.{p}.onnx"
            onnx.save(g, str(out))
            graphs[p] = out
            steps.append(_step(f"{p} graph", RAN, path=str(out), seconds=round(time.perf_counter() - t0, 1)))
        except Exception as exc:
            steps.append(_step(f"{p} graph", FAILED, _why(exc)))
    return steps, graphs


def ort_labels(graph: Path, precision: str, x: np.ndarray, batch: int, repeats: int) -> tuple[np.ndarray, float]:
    """ONNX Runtime on the CPU: argmax labels on the model grid and median ms per slice. Q/DQ graphs
    run without graph optimisations, so ONNX Runtime computes them as TensorRT does (float math on
    quantized values) instead of in its own int8 kernels."""
    from export.onnx_export import ort_session

    sess = ort_session(Path(graph).read_bytes(), optimize=precision != "int8")
    name = sess.get_inputs()[0].name
    times, labels = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        times.append(time.perf_counter() - t0)
        labels = np.concatenate(out).argmax(1).astype(np.uint8)
    return labels, 1000 * float(np.median(times)) / len(x)


def dice_per_class(a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    from runtime.metrics import dice

    return {"liver": dice(a >= 1, b >= 1), "tumour": dice(a == 2, b == 2)}


def trt_run(plan: Path, x: np.ndarray, batch: int, graph: bool, repeats: int) -> dict:
    """Segment the phantom's slices with the TensorRT backend: labels, median ms per slice, what replayed."""
    from runtime.backends.tensorrt import TensorRTBackend

    with TensorRTBackend(plan, cuda_graph=graph) as be:
        times, labels = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = [be.infer(x[i : i + batch]) for i in range(0, len(x), batch)]
            times.append(time.perf_counter() - t0)
            labels = np.concatenate(out).argmax(1).astype(np.uint8)
        return {
            "labels": labels,
            "ms_per_slice": 1000 * float(np.median(times)) / len(x),
            "describe": be.describe(),
            "graph_stats": dict(be.graph_stats),
            "device_ms": {k: round(v, 3) for k, v in be.device_times_ms.items()},
        }


def batch_sizes(opt: int, max_batch: int) -> list[int]:
    """The profile's opt, one below it and one above it (inside the profile), without repeats."""
    return list(dict.fromkeys(b for b in (opt, max(1, opt - 1), min(max_batch, opt + 2)) if 1 <= b <= max_batch))


def run_gpu_check(
    model: Path,
    workdir: Path,
    slices: int = 24,
    profile: tuple[int, int, int] = (1, 4, 8),
    repeats: int = 3,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Every step, in order; see the module docstring."""
    from export.onnx_export import get_spec, load_onnx
    from runtime.models import file_sha256

    report: dict = {"model": str(model), "profile": list(profile), "slices": slices, "repeats": repeats}
    steps, facts = probe_environment()
    spec = get_spec(load_onnx(model))
    case = make_phantom_case(workdir, spec, slices)
    x = model_inputs(case, spec)
    report["input_shape"] = list(x.shape)
    progress("graphs")
    graph_steps, graphs = make_graphs(model, workdir, case, x)
    steps += graph_steps
    opt = profile[1]
    ref: dict[str, np.ndarray] = {}
    for p in PRECISIONS:
        if p not in graphs:
            steps.append(_step(f"{p} onnxruntime CPU", NOT_APPLICABLE, f"no {p} graph (above)"))
            continue
        progress(f"{p} onnxruntime")
        try:
            ref[p], ms = ort_labels(graphs[p], p, x, opt, repeats)
            vs = dice_per_class(ref[p], ref["fp32"]) if "fp32" in ref else None
            steps.append(_step(f"{p} onnxruntime CPU", RAN, ms_per_slice=round(ms, 2), dice_vs_fp32=vs))
        except Exception as exc:
            steps.append(_step(f"{p} onnxruntime CPU", FAILED, _why(exc)))
    gpu_reason = facts["no_gpu_reason"]
    short = "no TensorRT on a usable GPU here (see the first steps)" if gpu_reason else None
    for p in PRECISIONS:
        plan = workdir / f"model.{p}.plan"
        name = f"{p} plan build"
        if gpu_reason or p not in graphs:
            steps.append(_step(name, NOT_APPLICABLE, short or f"no {p} graph (above)"))
            plan = None
        else:
            progress(f"{p} build")
            try:
                from export.engine import build_engine

                t0 = time.perf_counter()
                g = graphs[p]
                side = build_engine(g, plan, get_spec(load_onnx(g)), file_sha256(g), profile, device=facts["device"])
                steps.append(
                    _step(
                        name,
                        RAN,
                        seconds=round(time.perf_counter() - t0, 1),
                        tensorrt=side["tensorrt_version"],
                        device_memory=side.get("device_memory"),
                        tf32=side["builder"].get("tf32"),
                    )
                )
            except Exception as exc:
                steps.append(_step(name, FAILED, _why(exc), detail=traceback.format_exc(limit=3)))
                plan = None
        for graph in (False, True):
            for b in batch_sizes(opt, profile[2]):
                where = "at" if b == opt else "below" if b < opt else "above"
                name = f"{p} TensorRT, batch {b} ({where} opt {opt}), {'CUDA graphs' if graph else 'no graphs'}"
                if plan is None:
                    steps.append(_step(name, NOT_APPLICABLE, short or f"no {p} plan (above)"))
                    continue
                if p not in ref:
                    steps.append(_step(name, NOT_APPLICABLE, f"no onnxruntime {p} reference (above)"))
                    continue
                progress(name)
                try:
                    r = trt_run(plan, x, b, graph, repeats)
                except Exception as exc:
                    steps.append(_step(name, FAILED, _why(exc)))
                    continue
                d = dice_per_class(r.pop("labels"), ref[p])
                ok = d["liver"] is not None and d["liver"] >= MIN_DICE[p]
                reason = "" if ok else f"liver Dice vs onnxruntime {d['liver']} < {MIN_DICE[p]}"
                if graph and not r["graph_stats"]["replays"]:
                    ok, reason = False, (reason + "; " if reason else "") + "CUDA graphs asked for, none replayed"
                row = _step(name, RAN if ok else FAILED, reason, precision=p, batch=b, cuda_graph=graph, dice=d, **r)
                steps.append(row)
    report["steps"] = steps
    report["summary"] = {s: sum(1 for x in steps if x["status"] == s) for s in (RAN, FAILED, NOT_APPLICABLE)}
    report["gpu"] = None if gpu_reason else facts["device"].name
    report["no_gpu_reason"] = gpu_reason
    report["python"] = platform.python_version()
    return report


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def gpu_check_markdown(rep: dict) -> str:
    """The report as Markdown, meant to be pasted into an issue as it is."""
    m = rep.get("machine", {})
    s = rep["summary"]
    out = [
        "# seg-bench gpu-check",
        "",
        f"- command: `{rep.get('command', 'seg-bench gpu-check')}`",
        f"- machine: {m.get('cpu', '?')} ({m.get('cores', '?')} cores), {m.get('os', '?')}, Python {rep['python']}",
        f"- GPU: {rep['gpu'] or 'none usable: ' + str(rep['no_gpu_reason'])}",
        f"- model: {Path(rep['model']).name}; phantom of {rep['slices']} slices, model input {rep['input_shape']}; "
        f"plan profile {'/'.join(map(str, rep['profile']))}; medians of {rep['repeats']} runs",
        f"- steps: {s['ran']} ran, {s['failed']} failed, {s['not applicable']} not applicable",
        "",
        "Dice, on the model grid: a TensorRT row compares the plan's labels with ONNX Runtime's (CPU) from the "
        "same ONNX graph, and passes at liver Dice >= "
        + ", ".join(f"{v} ({k})" for k, v in MIN_DICE.items())
        + "; an onnxruntime row compares that graph with the FP32 one. ms/slice: median over the runs.",
        "",
        "| step | status | Dice liver / tumour | ms/slice | details |",
        "|---|---|---|---|---|",
    ]
    for st in rep["steps"]:
        d = st.get("dice") or st.get("dice_vs_fp32")
        dice = f"{_f(d['liver'])} / {_f(d['tumour'])}" if d else ""
        ms = _f(st.get("ms_per_slice"), 2) if "ms_per_slice" in st else ""
        bits = []
        for key in ("version", "gpu", "binding", "compute_capability", "tensorrt", "seconds", "tf32"):
            if st.get(key) is not None:
                bits.append(f"{key} {st[key]}")
        if st.get("device_memory"):
            bits.append(f"seg-run device memory {st['device_memory']['total_bytes'] / 2**20:.0f} MiB")
        if st.get("graph_stats") and st.get("cuda_graph"):
            g = st["graph_stats"]
            bits.append(f"graphs: {g['replays']} replays, {g['captures']} captures, {g['capture_failures']} failed")
        if st.get("device_ms"):
            bits.append("device ms " + ", ".join(f"{k} {v}" for k, v in st["device_ms"].items()))
        detail = "; ".join(bits + ([st["reason"]] if st["reason"] else []))
        out.append(f"| {st['step']} | {st['status']} | {dice} | {ms} | {detail.replace('|', '/')} |")
    return "\n".join(out) + "\n"


@click.command("gpu-check")
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="FP32 ONNX model with its spec (default: the embedded demo model).",
)
@click.option("--slices", default=24, show_default=True, type=click.IntRange(2, 400), help="Phantom slices.")
@click.option("--opt-batch", default=4, show_default=True, type=click.IntRange(2))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(2))
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per step.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("gpu-check"), show_default=True)
def gpu_check_command(model, slices, opt_batch, max_batch, repeats, out_dir) -> None:
    """The first-GPU check: build FP32, FP16 and INT8 TensorRT plans, segment a phantom with each
    (with and without CUDA graphs; batch sizes at, below and above the profile's opt), compare
    with ONNX Runtime on the CPU (Dice) and time both; write gpu_check.md and gpu_check.json to
    paste into an issue. Every step says ran, failed (why) or not applicable (why); the exit
    code is 1 if any step failed.

    \b
    Example:
      seg-bench gpu-check -o gpu-check
    """
    import tempfile

    from tqdm import tqdm

    from runtime.errors import InputError
    from runtime.models import demo_model_path

    from .report import envelope, write_reports

    if max_batch < opt_batch:
        raise InputError(f"--max-batch {max_batch} is below --opt-batch {opt_batch}; give max >= opt")
    model = Path(model) if model else demo_model_path()
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    bar = tqdm(desc="gpu-check", unit="step", disable=not sys.stderr.isatty())

    def progress(what: str) -> None:
        bar.set_postfix_str(what[:40])
        bar.update()

    with tempfile.TemporaryDirectory() as tmp:
        res = run_gpu_check(model, Path(tmp), slices, (1, opt_batch, max_batch), repeats, progress)
    bar.close()
    rep = envelope("gpu_check", res)
    md = gpu_check_markdown(rep)
    write_reports(out_dir, "gpu_check", rep, md, [])
    click.echo(md)
    click.echo(f"reports in {out_dir}")
    if res["summary"][FAILED]:
        sys.exit(1)
