"""seg-bench: latency and Dice-parity suites."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cliutil import DEBUG_OPTION, FiniteFloat, OutPath, check_parallelism, run_cli
from runtime.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Measure latency and Dice parity of models and backends on real volumes.

    \b
    Example:
      seg-bench latency model.onnx model.int8.onnx --volumes data/heldout
      seg-bench parity model.onnx model.fp16.onnx model.int8.onnx --data data/heldout
      seg-bench score predictions/ labels/
      seg-bench train-step --width 16,24,32
      seg-bench gpu-check -o gpu-check
      seg-bench dicom-read
    """


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter("give comma-separated integers, e.g. 1,2,4,8") from None
    if not vals or min(vals) < 1:
        raise click.BadParameter("every value must be >= 1")
    return vals


def _volumes(volumes: Path | None, quick: bool, tmp: Path) -> list[str]:
    if volumes is None:
        from runtime.io import write_nifti
        from runtime.phantoms import make_phantom, phantom_images

        img, _ = phantom_images(make_phantom(seed=4321, index=0, size=512, slices=40 if quick else 200))
        write_nifti(img, tmp / "phantom.nii.gz")
        return [str(tmp / "phantom.nii.gz")]
    from runtime.datasets import images_in
    from runtime.dicom import is_series_path, series_inputs
    from runtime.io import read_volume

    if volumes.is_dir():
        paths = [str(p) for p in images_in(volumes) or series_inputs(volumes)]  # NIfTI files, else DICOM series
        if not paths:
            raise InputError(f"{volumes}: no NIfTI volumes or DICOM CT series found")
    else:
        paths = [str(volumes)]
    paths = paths[:1] if quick else paths
    for p in paths:  # a volume that cannot be read is refused before any timing, not reported as a result
        if not is_series_path(p):
            read_volume(p)
    return paths


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--volumes",
    type=click.Path(path_type=Path),
    help="A volume or directory of volumes or DICOM series (default: a generated 200-slice 512x512 phantom).",
)
@click.option(
    "--batch", "batches", default="1,2,4,8,16", show_default=True, help="Batch sizes for the per-slice suite."
)
@click.option(
    "--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "triton"]), default="auto", show_default=True
)
@click.option("--url", default=None, help="Triton: the server's HOST:PORT; MODELS are then model names on it.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True, help="Triton.")
@click.option("--threads", default=0, type=click.IntRange(0), help="Inference threads (0: all cores).")
@click.option(
    "--streams",
    default=0,
    type=click.IntRange(0),
    help="ONNX Runtime CPU streams, as seg-run --streams (0: the backend's default).",
)
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1))
@click.option(
    "--warmup",
    default=3,
    show_default=True,
    type=click.IntRange(0),
    help="Untimed calls per batch size before timing; with --warmup > 0 they also last at least 1 s.",
)
@click.option(
    "--volume-repeats",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Whole-volume runs per model, the PyTorch baseline included (median reported).",
)
@click.option(
    "--volume-batch",
    type=click.IntRange(1),
    default=None,
    help="Batch size for whole volumes (default: the backend's).",
)
@click.option(
    "--torch-checkpoint",
    type=click.Path(path_type=Path),
    help="Also time the seed-style PyTorch eager baseline on these weights.",
)
@click.option("--quick", is_flag=True, help="A one-minute smoke run: one batch size, few repeats, a small volume.")
@click.option("-o", "--out", "out_dir", type=OutPath(path_type=Path), default=Path("bench-latency"), show_default=True)
def latency(
    models,
    volumes,
    batches,
    backend,
    url,
    protocol,
    threads,
    streams,
    repeats,
    warmup,
    volume_repeats,
    volume_batch,
    torch_checkpoint,
    quick,
    out_dir,
) -> None:
    """Per-slice latency (median, p90, p95, p99, min, max), throughput and GFLOP/s per batch
    size, and whole-volume time with its stage split, for each model; JSON, Markdown, plot.

    \b
    Example:
      seg-bench latency model.onnx model.fp16.onnx model.int8.cpu.onnx --volumes data/heldout \\
          --torch-checkpoint runs/demo/best.pt -o reports/latency
      seg-bench latency liver --backend triton --url 127.0.0.1:8001 --volumes data/heldout -o reports/triton
    """
    import tempfile

    from tqdm import tqdm

    from runtime.io import check_creatable_dir

    from .latency import run_worker
    from .machine import matmul_peak_gflops
    from .report import envelope, latency_markdown, latency_ratios, plot_latency

    if (backend == "triton") != bool(url):
        raise click.UsageError("--backend triton and --url HOST:PORT go together")
    bl = _ints(batches)
    check_parallelism(threads, streams)
    check_creatable_dir(out_dir)
    if quick:
        bl, repeats, warmup, volume_repeats = bl[:1] if len(bl) == 1 else [4], 5, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        vols = _volumes(volumes, quick, Path(tmp))
        jobs = [
            {
                "model": str(m),
                "volumes": vols,
                "batches": bl,
                "backend": backend,
                "url": url,
                "protocol": protocol,
                "threads": threads,
                "streams": streams,
                "warmup": warmup,
                "repeats": repeats,
                "volume_repeats": volume_repeats,
                "vol_batch": volume_batch,
            }
            for m in models
        ]
        if torch_checkpoint:
            jobs.append(
                {
                    "kind": "torch",
                    "checkpoint": str(torch_checkpoint),
                    "volumes": vols,
                    "warmup": warmup,
                    "repeats": repeats,
                    "threads": threads,
                    "volume_repeats": volume_repeats,
                }
            )
        results = []
        for job in tqdm(jobs, desc="models", unit="model", disable=not sys.stderr.isatty()):
            results.append(run_worker(job))
            r = results[-1]
            click.echo(
                f"{Path(str(r['model'])).name}: " + (f"failed: {r['error']}" if "error" in r else "done"), err=True
            )
    peak, rates = matmul_peak_gflops(threads=threads)
    rep = envelope(
        "latency",
        {
            "matmul_peak_gflops": peak,
            "matmul_gflops": rates,
            "results": results,
            "volumes": [Path(v).name for v in vols],
        },
    )
    rep["ratios"] = latency_ratios(results)
    md = latency_markdown(rep)
    failed = sum("error" in r for r in results)
    plots = [(lambda p: plot_latency(rep, p), "latency_vs_batch.png")]
    click.echo(md)
    _report(out_dir, "latency", rep, md, plots, f"{failed} of {len(results)} model(s) failed" if failed else None)
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("reference", type=click.Path(path_type=Path))
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Labelled volumes (LiTS or Decathlon layout).",
)
@click.option("--max-dice-drop", default=0.01, show_default=True, type=FiniteFloat(0))
@click.option(
    "--latency-report",
    type=click.Path(path_type=Path),
    help="latency.json from seg-bench latency, for the Dice-vs-latency chart.",
)
@click.option("--quick", is_flag=True, help="Only the first case.")
@click.option("-o", "--out", "out_dir", type=OutPath(path_type=Path), default=Path("bench-parity"), show_default=True)
def parity(reference, models, data_dir, max_dice_drop, latency_report, quick, out_dir) -> None:
    """Every model against the reference (an FP32 checkpoint or ONNX) on labelled volumes:
    LiTS metrics vs ground truth, Dice vs the reference, argmax agreement, max logit
    difference, pass/fail against the export gate; JSON, Markdown and plots.

    \b
    Example:
      seg-bench parity model.onnx model.fp16.onnx model.int8.onnx --data data/heldout -o reports/parity
    """
    from tqdm import tqdm

    from runtime.io import check_creatable_dir

    from .parity import parity as run
    from .report import (
        envelope,
        load_json,
        parity_markdown,
        plot_dice_bars,
        plot_dice_vs_latency,
    )

    check_creatable_dir(out_dir)
    if quick:
        import tempfile

        from runtime.datasets import discover

        cases, _ = discover(data_dir)
        tmpdir = Path(tempfile.mkdtemp())
        for p in (cases[0].image, cases[0].label):
            (tmpdir / p.name).symlink_to(p.resolve())
        data_dir = tmpdir
    bar = tqdm(desc="parity", unit="slice", disable=not sys.stderr.isatty())
    res = run(str(reference), [str(m) for m in models], str(data_dir), max_dice_drop, progress=bar.update)
    bar.close()
    for m, r in res["models"].items():
        if not r.get("error"):
            r["precision"] = _precision(m)
    rep = envelope("parity", res)
    plots = [(lambda p: plot_dice_bars(rep, p), "dice_per_case.png")]
    if latency_report:
        lat = load_json(latency_report)
        plots.append((lambda p: plot_dice_vs_latency(rep, lat, p), "dice_vs_latency.png"))
    md = parity_markdown(rep)
    errors = sum(bool(r.get("error")) for r in res["models"].values())
    click.echo(md)
    # a model failing the Dice gate is a measurement; one that could not be run is a failed run
    _report(out_dir, "parity", rep, md, plots, f"{errors} model(s) could not be measured" if errors else None)
    if not all(r.get("pass") for r in res["models"].values()):
        sys.exit(1)


def _precision(model: str) -> str:
    try:
        import onnxruntime as ort

        from runtime.spec import METADATA_KEY, ModelSpec

        meta = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        spec = ModelSpec.from_json(meta[METADATA_KEY])
        tgt = (spec.calibration or {}).get("target")
        return spec.precision + (f" ({tgt})" if tgt else "")
    except Exception:
        return "?"


@cli.command("train-step")
@click.option(
    "--width", "widths", default="24,32", show_default=True, help="UNet base widths to time, comma-separated."
)
@click.option("--depth", default=4, show_default=True, type=click.IntRange(1))
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Crops per step.")
@click.option("--crop", default=192, show_default=True, type=click.IntRange(8), help="Crop size in pixels.")
@click.option(
    "--context",
    default=1,
    show_default=True,
    type=click.IntRange(0),
    help="Neighbouring slices each side (2k+1 channels).",
)
@click.option(
    "--repeats", default=10, show_default=True, type=click.IntRange(1), help="Timed steps per width and layout."
)
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(0))
@click.option("--threads", default=0, type=click.IntRange(0), help="Torch threads (0: torch's default).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, mps or auto.")
@click.option(
    "-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-train-step"), show_default=True
)
def train_step(widths, depth, batch, crop, context, repeats, warmup, threads, device, out_dir) -> None:
    """Time seg-train's training step (forward, loss, backward, Adam) per UNet width, with the
    weights in the default and in the channels-last layout (what seg-train uses on CPU and
    CUDA), to see what a width costs to train here; JSON, Markdown, plot. Needs the train extra.

    \b
    Example:
      seg-bench train-step --width 16,24,32 --batch 8 --crop 192 -o reports/train-step
    """
    from .report import envelope, write_reports
    from .train_step import measure_train_steps, plot_train_steps, train_step_markdown

    res = measure_train_steps(
        _ints(widths),
        depth=depth,
        batch=batch,
        crop=crop,
        channels=2 * context + 1,
        warmup=warmup,
        repeats=repeats,
        threads=threads,
        device=device,
    )
    rep = envelope("train-step", res)
    md = train_step_markdown(rep)
    write_reports(out_dir, "train_step", rep, md, [(lambda p: plot_train_steps(rep, p), "train_step.png")])
    click.echo(md)
    click.echo(f"reports in {out_dir}")


@cli.command()
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.argument("label_dir", type=click.Path(path_type=Path))
@click.option(
    "-o", "--out", "out_dir", type=OutPath(path_type=Path), default=None, help="Write score.json and score.md here."
)
def score(pred_dir, label_dir, out_dir) -> None:
    """The LiTS metric table (per case and global) for any predictions against labels,
    matched by case name: '<name>_seg.nii.gz' and '<name>.nii.gz' match '<name>';
    LiTS 'volume-K' / 'segmentation-K' match each other.

    \b
    Example:
      seg-run data/heldout -o preds/ --model model.onnx && seg-bench score preds/ data/heldout
    """
    from runtime.io import check_creatable_dir
    from runtime.metrics import format_table, markdown_table

    from .parity import score as run
    from .report import envelope

    if out_dir is not None:
        check_creatable_dir(out_dir)
    res = run(pred_dir, label_dir)
    if res["per_case"]:
        click.echo(format_table(res["per_case"], res["summary"]))
    for p in res["problems"]:
        click.echo(f"skipped: {p}", err=True)
    if out_dir and res["per_case"]:
        md = markdown_table(res["per_case"], res["summary"]) + "\n"
        why = f"{len(res['problems'])} file(s) not scored" if res["problems"] else None
        _report(out_dir, "score", envelope("score", res), md, [], why)
    elif out_dir:
        click.echo(f"no case scored: no report written; {out_dir} is left as it was", err=True)
    if res["problems"] or not res["per_case"]:
        sys.exit(1)


def _report(out_dir: Path, stem: str, rep: dict, md: str, plots: list, failure: str | None) -> None:
    """Write a run's reports; a run that failed writes <stem>.failed.json/.md (no plots) instead,
    so a good <stem>.json from an earlier run is never replaced by a failed run's."""
    from .report import write_reports

    if not failure:
        write_reports(out_dir, stem, rep, md, plots)
        click.echo(f"reports in {out_dir}")
        return
    write_reports(out_dir, f"{stem}.failed", {**rep, "failed": failure}, md, [])
    click.echo(f"{failure}: report in {out_dir / (stem + '.failed.json')}; {stem}.json left as it was", err=True)


def _add_gpu_check() -> None:
    from .gpu_check import gpu_check_command

    cli.add_command(gpu_check_command)


_add_gpu_check()


@cli.command("dicom-read")
@click.option("--slices", default=60, show_default=True, type=click.IntRange(2), help="Slices of the 512x512 phantom.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Reads of each format (median).")
@click.option(
    "--compress",
    type=click.Choice(["none", "rle", "jpeg-ls", "jpeg2000"]),
    default="none",
    show_default=True,
    help="Transfer syntax of the series.",
)
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-dicom"), show_default=True)
def dicom_read(slices, repeats, compress, out_dir) -> None:
    """DICOM series read time per slice against the .nii.gz read of the same 512x512 phantom
    (needs unet-edge[dicom]); dicom_read.json and dicom_read.md.

    \b
    Example:
      seg-bench dicom-read --slices 60 --repeats 5 -o reports/dicom
    """
    from .dicom_read import markdown, measure
    from .report import envelope, write_reports

    syntax = {"none": None, "rle": "1.2.840.10008.1.2.5", "jpeg-ls": "1.2.840.10008.1.2.4.80"}
    syntax["jpeg2000"] = "1.2.840.10008.1.2.4.90"
    res = measure(slices=slices, repeats=repeats, compress=syntax[compress])
    md = markdown(res)
    write_reports(out_dir, "dicom_read", envelope("dicom-read", res), md, [])


@cli.command("triton")
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--volumes",
    type=click.Path(path_type=Path),
    help="A volume or directory (default: generated phantoms, see --size/--slices/--cases).",
)
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="seg-run runs per backend.")
@click.option("--clients", default=4, show_default=True, type=click.IntRange(2), help="Concurrent seg-run clients.")
@click.option("--instances", default=2, show_default=True, type=click.IntRange(1), help="Server model instances.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(0), help="ONNX Runtime threads each.")
@click.option("--size", default=128, show_default=True, type=click.IntRange(32), help="Phantom in-plane size.")
@click.option("--slices", default=32, show_default=True, type=click.IntRange(4), help="Phantom slices.")
@click.option("--cases", default=2, show_default=True, type=click.IntRange(1), help="Phantoms.")
@click.option("--batch-size", type=click.IntRange(1), default=None, help="seg-run --batch-size (default: each's own).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option(
    "-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-triton"), show_default=True
)
def triton(model, volumes, repeats, clients, instances, threads, size, slices, cases, batch_size, protocol, out_dir):
    """Triton serving against local ONNX Runtime on this machine: per-volume wall ratio of
    seg-run --backend triton to seg-run on the model, and the throughput of several concurrent
    clients against one with the server's batch sizes. Needs nvidia-pytriton (its CPU-only
    tritonserver serves the model through the Python backend) and the triton extra.

    \b
    Example:
      seg-bench triton model.onnx --repeats 3 --clients 4 -o reports/triton
    """
    from runtime.io import write_bytes_atomic, write_json_atomic

    from .report import envelope
    from .triton_bench import run_triton_bench, triton_markdown

    payload = run_triton_bench(
        model,
        volumes,
        repeats,
        clients,
        instances,
        threads,
        size,
        slices,
        cases,
        batch_size,
        protocol,
        echo=lambda m: click.echo(m, err=True),
    )
    rep = envelope("triton", payload)
    md = triton_markdown(rep)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "triton.json", rep)
    write_bytes_atomic(out_dir / "triton.md", md.encode())
    click.echo(md)
    click.echo(f"reports in {out_dir}")


def main() -> None:
    run_cli(cli, "seg-bench")


if __name__ == "__main__":
    main()
