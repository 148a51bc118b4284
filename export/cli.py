"""seg-export: ONNX export, FP16/INT8 graphs and TensorRT engines."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.cliutil import DEBUG_OPTION, FiniteFloat, OutPath, run_cli
from runtime.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Export a trained checkpoint to verified ONNX, FP16/INT8 graphs and TensorRT plans.

    \b
    Example:
      seg-export onnx runs/demo/best.pt -o model.onnx
      seg-export quantize model.onnx --precision int8 --calib data/phantoms -o model.int8.onnx
      seg-export build-engine model.int8.onnx -o model.plan
      seg-export triton model.plan -o triton-repo --name liver
    """


def _cases(data_dir: Path, what: str):
    from runtime.datasets import load_dataset

    return load_dataset(data_dir)


@cli.command("onnx")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=OutPath(path_type=Path), help="Output .onnx file.")
@click.option(
    "--verify-data",
    type=click.Path(path_type=Path),
    default=None,
    help="Labelled cases to verify on (default: a generated phantom).",
)
@click.option("--opset", default=18, show_default=True, type=click.IntRange(17, 23))
def onnx_cmd(checkpoint: Path, out: Path, verify_data: Path | None, opset: int) -> None:
    """Export a checkpoint to one self-contained ONNX file with a dynamic batch axis and the
    spec in its metadata, verified against PyTorch on real preprocessed slices.

    \b
    Example:
      seg-export onnx runs/demo/best.pt -o model.onnx
    """
    from .onnx_export import export_onnx

    path, v = export_onnx(checkpoint, out, verify_data, opset)
    click.echo(
        f"wrote {path}: verified on {v.slices} slices, argmax agreement {v.agreement:.6f}, max |logit diff| "
        f"{v.max_abs_diff:.2e}"
    )


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--precision", type=click.Choice(["fp16", "int8"]), required=True)
@click.option(
    "--calib",
    "calib_dir",
    type=click.Path(path_type=Path),
    help="Labelled cases for INT8 calibration (and, unless --eval-data, evaluation).",
)
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out labelled cases for the Dice evaluation.")
@click.option("--target", type=click.Choice(["tensorrt", "cpu"]), default="tensorrt", show_default=True)
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax", show_default=True)
@click.option("--calib-slices", default=64, show_default=True, type=click.IntRange(4))
@click.option(
    "--max-dice-drop",
    default=0.01,
    show_default=True,
    type=FiniteFloat(0),
    help="Refuse the model if any case loses more Dice (per class).",
)
@click.option(
    "--quantize-edges",
    is_flag=True,
    help="INT8: also quantize the first and the output convolution (by default "
    "they stay float: about 1% of the FLOPs, and the most sensitive layers).",
)
@click.option("-o", "--out", required=True, type=OutPath(path_type=Path))
def quantize(
    model: Path,
    precision: str,
    calib_dir: Path | None,
    eval_data: Path | None,
    target: str,
    method: str,
    calib_slices: int,
    max_dice_drop: float,
    quantize_edges: bool,
    out: Path,
) -> None:
    """Write an FP16 or calibrated INT8 (Q/DQ) graph, evaluated against the FP32 model on
    held-out volumes and refused if it loses more than --max-dice-drop Dice on any case.

    \b
    Examples:
      seg-export quantize model.onnx --precision fp16 --eval-data data/heldout -o model.fp16.onnx
      seg-export quantize model.onnx --precision int8 --calib data/ph40 --eval-data data/heldout \\
          --target tensorrt -o model.int8.onnx
    """
    from .quantize import quantize as run

    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output directory does not exist; create it first")
    calib = _cases(calib_dir, "calibration") if calib_dir else None
    if precision == "int8" and not calib:
        raise InputError("--precision int8 needs --calib DIR with labelled CT cases")
    evals = _cases(eval_data, "evaluation") if eval_data else None
    if evals is None:
        if not calib or len(calib) < 2:
            raise InputError(
                "give --eval-data DIR (held-out labelled cases), or --calib with at least 2 cases to split"
            )
        k = max(1, len(calib) // 4)
        calib, evals = calib[:-k], calib[-k:]
    path, parity = run(
        model,
        out,
        precision,
        calib,
        evals,
        target,
        method,
        calib_slices,
        max_dice_drop,
        echo=click.echo,
        quantize_edges=quantize_edges,
    )
    click.echo(
        f"wrote {path} ({precision}{'/' + target if precision == 'int8' else ''}); every case within {max_dice_drop} "
        "Dice of FP32"
    )


@cli.command("build-engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", required=True, type=OutPath(path_type=Path), help="Output plan; its sidecar goes to OUT.json."
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "fp16", "int8"]),
    default=None,
    help="Convert first (MODEL must then be a checkpoint or FP32 ONNX).",
)
@click.option(
    "--calib",
    "calib_dir",
    type=click.Path(path_type=Path),
    help="Calibration/evaluation cases for --precision int8/fp16.",
)
@click.option("--min-batch", default=1, show_default=True, type=int)
@click.option("--opt-batch", default=8, show_default=True, type=int)
@click.option("--max-batch", default=16, show_default=True, type=int)
@click.option("--workspace-mb", default=1024, show_default=True, type=click.IntRange(16))
@click.option(
    "--opt-level", default=3, show_default=True, type=click.IntRange(0, 5), help="Builder optimisation level."
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    help="Reusable timing cache file (read if present, then updated).",
)
@click.option(
    "--tf32",
    is_flag=True,
    help="Let FP32 layers compute in TF32 (faster on Ampere and later, about 1e-3 relative error; off by default).",
)
@click.option("--verbose", is_flag=True)
def build_engine(
    model: Path,
    out: Path,
    precision: str | None,
    calib_dir: Path | None,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_mb: int,
    opt_level: int,
    timing_cache: Path | None,
    tf32: bool,
    verbose: bool,
) -> None:
    """Build a strongly typed TensorRT plan (TensorRT 10.x or 11.x) from an ONNX graph, with a
    batch optimisation profile, and write model.plan plus model.plan.json (spec, hashes,
    TensorRT version, GPU, profile, device memory, parity). Run it on the target device.

    \b
    Examples:
      seg-export build-engine model.int8.onnx -o model.plan --opt-batch 8 --max-batch 16
      seg-export build-engine runs/demo/best.pt --precision int8 --calib data/ph40 -o model.plan
    """
    import tempfile

    from runtime.backends.plan import validate_profile
    from runtime.models import file_sha256

    from .engine import build_engine as build
    from .onnx_export import check_graph_layout, get_spec, load_onnx

    validate_profile(min_batch, opt_batch, max_batch)
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: output directory does not exist; create it first")
    with tempfile.TemporaryDirectory() as tmp:
        src = model
        if model.suffix in (".pt", ".pth"):
            from .onnx_export import export_onnx

            src, _ = export_onnx(model, Path(tmp) / "fp32.onnx")
        if precision in ("fp16", "int8"):
            if not calib_dir:
                raise InputError(
                    f"--precision {precision} needs --calib DIR (labelled cases to calibrate and evaluate on)"
                )
            from .quantize import quantize as run

            cases = _cases(calib_dir, "calibration")
            k = max(1, len(cases) // 4)
            src, _ = run(
                src, Path(tmp) / f"{precision}.onnx", precision, cases[:-k], cases[-k:], "tensorrt", echo=click.echo
            )
        graph = load_onnx(src)
        spec = get_spec(graph)
        check_graph_layout(graph, spec, str(src))
        side = build(
            src,
            out,
            spec,
            file_sha256(src),
            (min_batch, opt_batch, max_batch),
            workspace_mb,
            opt_level,
            timing_cache,
            verbose,
            tf32=tf32,
            warn=lambda m: click.echo(f"warning: {m}", err=True),
        )
    mem = side.get("device_memory")
    click.echo(
        f"wrote {out} and {out}.json: TensorRT {side['tensorrt_version']} on {side['gpu']['name']}, "
        f"batch {min_batch}/{opt_batch}/{max_batch}"
        + (
            f", seg-run allocates {mem['total_bytes'] / 2**20:.0f} MiB of device memory besides the weights "
            f"({mem['contexts']} contexts x {mem['activation_bytes_per_context'] / 2**20:.0f} MiB activations "
            f"+ {mem['io_bytes_per_slot'] / 2**20:.1f} MiB I/O buffers each)"
            if mem
            else ""
        )
    )


@cli.command("triton")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "repo", required=True, type=click.Path(path_type=Path), help="Model repository (created if missing)."
)
@click.option("--name", default=None, help="Model name in the repository (default: MODEL's file name before the dot).")
@click.option(
    "--max-batch",
    type=click.IntRange(1),
    default=None,
    help="ONNX: Triton's max_batch_size (default 8). Plans take their profile's max.",
)
@click.option(
    "--preferred",
    default=None,
    help="Preferred batch sizes of the dynamic batcher, e.g. 4,8 (default: the plan's opt batch, or half "
    "the max, and the max).",
)
@click.option(
    "--queue-delay-us",
    type=click.IntRange(0),
    default=500,
    show_default=True,
    help="How long the batcher waits for more requests.",
)
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True, help="Model instances.")
@click.option("--version", "version", type=click.IntRange(1), default=1, show_default=True, help="Version folder.")
@click.option("--cpu", is_flag=True, help="ONNX: run the instances on the CPU (KIND_CPU) rather than the GPU.")
@click.option("--trt-accelerator", is_flag=True, help="ONNX: let ONNX Runtime hand the graph to TensorRT on the GPU.")
@click.option(
    "--python-backend",
    is_flag=True,
    help="ONNX: serve through Triton's Python backend running ONNX Runtime on the CPU (for servers without "
    "an ONNX Runtime backend, like nvidia-pytriton's tritonserver).",
)
@click.option(
    "--threads",
    type=click.IntRange(0),
    default=0,
    help="--python-backend: ONNX Runtime threads per instance (0: all cores).",
)
def triton_cmd(
    model: Path,
    repo: Path,
    name: str | None,
    max_batch: int | None,
    preferred: str | None,
    queue_delay_us: int,
    instances: int,
    version: int,
    cpu: bool,
    trt_accelerator: bool,
    python_backend: bool,
    threads: int,
) -> None:
    """Write a Triton Inference Server model repository entry REPO/NAME for an ONNX model
    (onnxruntime_onnx) or a TensorRT plan (tensorrt_plan): config.pbtxt with dynamic batching,
    the model in a version folder, and the spec (also in the config, where seg-run reads it).
    A plan is checked against this machine's GPU and TensorRT, as seg-run checks it.

    \b
    Examples:
      seg-export triton model.plan -o triton-repo --name liver
      seg-export triton model.onnx -o triton-repo --name liver --max-batch 16 --preferred 8,16
      seg-export triton model.onnx -o triton-repo --name liver-cpu --python-backend
    """
    from .triton import export_repository

    sizes = None
    if preferred:
        try:
            sizes = [int(b) for b in preferred.split(",") if b.strip()]
        except ValueError:
            raise InputError(f"--preferred {preferred!r}: give batch sizes separated by commas, e.g. 4,8") from None
    folder, entry = export_repository(
        model,
        repo,
        name,
        max_batch,
        sizes,
        instances,
        version,
        cpu,
        trt_accelerator,
        python_backend,
        queue_delay_us,
        threads,
    )
    click.echo(
        f"wrote {folder}: {entry.platform}, max batch {entry.max_batch}, preferred {entry.preferred}, "
        f"{entry.instances} x {entry.kind}; serve {repo} with tritonserver --model-repository"
    )


def main() -> None:
    run_cli(cli, "seg-export")


if __name__ == "__main__":
    main()
