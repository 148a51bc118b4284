"""seg-run: segment CT volumes with a TensorRT plan or an ONNX model."""

from __future__ import annotations

import glob
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .cliutil import DEBUG_OPTION, EXIT_FAILED, run_cli
from .errors import InputError, SegError


def expand_inputs(inputs: tuple[str, ...]) -> list[Path]:
    """Files, directories (their CT images: label maps of a LiTS or Decathlon dataset are left out)
    and glob patterns, in a stable order."""
    from .datasets import images_in

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = images_in(p)
            if not found:
                raise InputError(f"{p}: directory holds no .nii or .nii.gz files")
            paths += found
        elif any(ch in item for ch in "*?[") and not p.exists():
            found = sorted(Path(q) for q in glob.glob(item))
            if not found:
                raise InputError(f"{item}: the pattern matches no files")
            paths += found
        else:
            paths.append(p)  # a missing file is reported per volume, and the rest still run
    return list(dict.fromkeys(paths))


def check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-"):
            pass
    except OSError as exc:
        raise InputError(f"{out}: cannot write the output directory ({exc.strerror}); choose a writable -o") from exc


def _bar(total: int, desc: str, unit: str, leave: bool = True):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, disable=not sys.stderr.isatty())


def segment_files(
    paths: list[Path],
    backend,
    out_dir: Path,
    batch_size: int,
    skip_existing: bool = False,
    postprocess: bool = True,
    holes: bool = False,
    overlay: bool = False,
    echo=click.echo,
    probabilities: bool = False,
    min_tumour_ml: float = 0.0,
    names: dict[Path, str] | None = None,
) -> dict[Path, dict | str]:
    """Segment each file; returns {path: report dict, or the error line}. One bad volume never stops the rest.
    ``names`` gives an output base name per input (default: the input's file name)."""
    from .io import (
        case_name,
        intensity_warning,
        probability_image,
        write_json_atomic,
        write_mask,
        write_nifti,
    )
    from .models import file_sha256
    from .pipeline import Timings, read_ahead, segment_canonical
    from .postprocess import StreamingComponents, drop_small_tumours, volume_stats, voxels_for_ml
    from .postprocess import postprocess as post

    results: dict[Path, dict | str] = {}
    model_hash = file_sha256(backend.path) if getattr(backend, "path", None) else None
    todo = []
    for p in paths:
        name = (names or {}).get(p) or case_name(p)
        mask_path, json_path = out_dir / f"{name}_seg.nii.gz", out_dir / f"{name}.json"
        if p.exists() and p.resolve() in (mask_path.resolve(), json_path.resolve()):
            results[p] = f"{p}: the output would overwrite the input; choose another -o"
            echo(f"error: {results[p]}", err=True)
            continue
        if skip_existing and mask_path.exists() and json_path.exists():
            results[p] = {"skipped": True, "mask": str(mask_path)}
            echo(f"{p}: done already, skipped")
            continue
        todo.append(p)
    overall = _bar(len(todo), "volumes", "vol")
    done_at = time.perf_counter()  # when the previous volume was finished
    for p, opened, done in read_ahead(todo):
        name = (names or {}).get(p) or case_name(p)
        mask_path, json_path = out_dir / f"{name}_seg.nii.gz", out_dir / f"{name}.json"
        t = Timings()
        try:
            vol = opened.result()  # its slices may still be arriving: segmentation follows them
            bar = _bar(vol.num_slices, name, "slice", leave=False)
            prob = np.empty((backend.spec.out_channels, *vol.data.shape), np.uint8) if probabilities else None
            labels = np.empty(vol.data.shape, np.uint8)
            components = StreamingComponents(labels) if postprocess else None  # labelled while inference goes on
            segment_canonical(
                vol.data,
                vol.spacing,
                backend.spec,
                None,
                batch_size,
                t,
                progress=bar.update,
                backend=backend,
                probabilities=prob,
                arrival=vol.arrival,
                out=labels,
                on_final=components.add if components else None,
            )
            bar.close()
            read_s, read_began = done.result()  # a stream that fails its final checksum stops here, before any output
            t.add("read", read_s)
            warning = intensity_warning(vol.data)
            if warning:
                echo(f"warning: {p}: {warning}", err=True)
            s = time.perf_counter()
            if postprocess:
                labels = post(labels, holes=holes, inplace=True, components=components)
            drop_small_tumours(labels, voxels_for_ml(min_tumour_ml, vol.spacing))
            stats = volume_stats(labels, vol.spacing)
            t.add("postprocess", time.perf_counter() - s)
            s = time.perf_counter()
            write_mask(labels, vol, mask_path)
            prob_path = out_dir / f"{name}_prob.nii.gz" if prob is not None else None
            if prob_path is not None:
                write_nifti(probability_image(prob, vol), prob_path)
            t.add("write", time.perf_counter() - s)
            if overlay:
                from .overlay import overlay_panel

                overlay_panel(vol.data, labels, out_dir / f"{name}_overlay.png")
            # this volume's own time: from its read, or from the end of the previous volume
            # if it was read ahead meanwhile
            t.wall = time.perf_counter() - max(read_began, done_at)
            report = {
                "input": str(p),
                "mask": str(mask_path),
                **({"probabilities": str(prob_path)} if prob_path else {}),
                **stats,
                "slices": vol.num_slices,
                "shape": list(vol.shape),
                "spacing_mm": list(vol.spacing),
                "timings_s": t.as_dict(),
                "backend": backend.name,
                "provider": backend.provider,
                "precision": backend.precision,
                "batch_size": batch_size,
                "model": str(getattr(backend, "path", "")),
                "model_sha256": model_hash,
                "postprocess": postprocess,
                "min_tumour_ml": min_tumour_ml,
                "warnings": [warning] if warning else [],
            }
            write_json_atomic(json_path, report)
            results[p] = report
            echo(
                f"{p}: liver {stats['liver_ml']:.0f} mL, tumour {stats['tumor_ml']:.1f} mL in {stats['tumor_count']} lesion(s); "
                f"{vol.num_slices} slices in {t.wall:.1f}s -> {mask_path}"
            )
        except SegError as exc:
            results[p] = str(exc)
            echo(f"error: {exc}", err=True)
        finally:
            overall.update(1)
            done_at = time.perf_counter()
    overall.close()
    return results


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1)
@click.option(
    "-m",
    "--model",
    type=click.Path(path_type=Path),
    help="model.onnx or model.plan (default: the embedded demo model).",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Output directory (created if missing).",
)
@click.option("--demo", is_flag=True, help="Generate a CT phantom, segment it and print Dice against its ground truth.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True)
@click.option(
    "--provider",
    type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime execution provider.",
)
@click.option(
    "--threads",
    type=click.IntRange(0),
    default=0,
    help="ONNX Runtime threads in all (0: all cores), shared by its streams.",
)
@click.option(
    "--streams",
    type=click.IntRange(0),
    default=0,
    help="ONNX Runtime on the CPU: batches run at once, each on its own "
    "threads (0: 2 where there are 2 cores or more; 1: one batch at a time on all threads).",
)
@click.option(
    "--batch-size", type=click.IntRange(1), default=None, help="Slices per batch (default: chosen per backend)."
)
@click.option("--skip-existing", is_flag=True, help="Skip volumes whose mask and JSON already exist (resume a batch).")
@click.option("--overlay", is_flag=True, help="Also write <name>_overlay.png with outlines on representative slices.")
@click.option("--cuda-graph", is_flag=True, help="TensorRT: replay the steady-state batch as a CUDA graph.")
@click.option("--no-postprocess", is_flag=True, help="Keep every predicted component (no largest-liver filter).")
@click.option("--fill-holes", is_flag=True, help="Fill holes in the liver slice by slice.")
@click.option(
    "--min-tumour-ml",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Relabel tumour components smaller than this (mL) as liver: specks in a tumour-free liver (0: keep all).",
)
@click.option(
    "--probabilities",
    is_flag=True,
    help="Also write <name>_prob.nii.gz: per-class probabilities (4D, input geometry, "
    "uint8 with scale 1/255; before postprocessing).",
)
@click.option(
    "--manifest",
    type=click.Path(path_type=Path),
    help="CSV or Parquet with a 'path' column (one volume per row) and an optional 'case_id' column "
    "(the output base name); taken with any INPUTS.",
)
@click.option(
    "--ray",
    "ray_address",
    metavar="auto|local|ADDRESS",
    help="Run on a Ray cluster: 'auto' (the running one), 'local' (a new one on this machine) or HOST:PORT. "
    "Outputs go to -o, which every node must reach; one result row per volume (needs unet-edge[ray]).",
)
@click.option("--actors", type=click.IntRange(1), help="--ray: actors at most (default: as many as the cluster fits).")
@click.option(
    "--cpus-per-actor",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="--ray: CPUs each actor reserves; ONNX Runtime runs that many threads.",
)
@click.option(
    "--results",
    type=click.Path(path_type=Path),
    help="--ray: the result rows, .parquet or .jsonl (default: OUT/seg-run-results.jsonl).",
)
@DEBUG_OPTION
def cli(
    inputs,
    model,
    out_dir,
    demo,
    backend,
    provider,
    threads,
    streams,
    batch_size,
    skip_existing,
    overlay,
    cuda_graph,
    no_postprocess,
    fill_holes,
    probabilities,
    min_tumour_ml,
    manifest,
    ray_address,
    actors,
    cpus_per_actor,
    results,
) -> None:
    """Segment liver and liver tumours in CT volumes (NIfTI), writing <name>_seg.nii.gz
    (uint8: 0 background, 1 liver, 2 tumour; the input's geometry) and <name>.json
    (volumes in mL, tumour count and burden, per-stage timings, backend, model hash).

    \b
    Examples:
      seg-run --demo
      seg-run scans/ --model model.onnx -o out/
      seg-run 'scans/*.nii.gz' --model model.plan -o out/ --skip-existing
      seg-run --manifest cohort.csv --model model.onnx -o /shared/out --ray auto --skip-existing
    """
    from .models import DEMO_NOTE, demo_model_path, open_backend

    if demo:
        sys.exit(run_demo(model, out_dir, backend, provider, threads, batch_size, streams))
    if not inputs and manifest is None:
        raise click.UsageError("give one or more NIfTI files, directories or globs, or --manifest (or --demo)")
    if out_dir is None:
        raise click.UsageError("missing -o/--out OUT_DIR")
    names = None
    paths = expand_inputs(inputs) if inputs else []
    if manifest is not None:
        from .cluster import output_names, read_manifest

        names = output_names([(p, None) for p in paths] + read_manifest(manifest))
        paths = list(names)
    if ray_address:
        from .cluster import import_ray, run_cluster_cli

        import_ray()  # without the extra, say what to install before creating anything
        check_output_dir(out_dir)
        if model is None:
            model = demo_model_path()
            click.echo(f"note: no --model given; using the embedded demo model: {DEMO_NOTE}", err=True)
        sys.exit(
            run_cluster_cli(
                paths,
                names,
                model,
                out_dir,
                ray_address,
                results,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                backend=backend,
                provider=provider,
                batch_size=batch_size,
                skip_existing=skip_existing,
                postprocess=not no_postprocess,
                holes=fill_holes,
                overlay=overlay,
                probabilities=probabilities,
                min_tumour_ml=min_tumour_ml,
            )
        )
    if model is None:
        model = demo_model_path()
        click.echo(f"note: no --model given; using the embedded demo model: {DEMO_NOTE}", err=True)
    check_output_dir(out_dir)
    with open_backend(model, backend, provider, threads, cuda_graph=cuda_graph, streams=streams) as be:
        bs = batch_size or be.default_batch
        if be.max_batch and bs > be.max_batch:
            raise InputError(
                f"--batch-size {bs} is above {Path(model).name}'s max batch {be.max_batch}; use --batch-size "
                f"{be.max_batch} or less, or rebuild the plan with --max-batch {bs}"
            )
        click.echo(f"backend: {be.describe()}, batch {bs} (--backend {backend} chose {be.name})", err=True)
        if cuda_graph and be.name != "tensorrt":
            click.echo("note: --cuda-graph applies to TensorRT plans only; ignored", err=True)
        results = segment_files(
            paths,
            be,
            out_dir,
            bs,
            skip_existing,
            not no_postprocess,
            fill_holes,
            overlay,
            probabilities=probabilities,
            min_tumour_ml=min_tumour_ml,
            names=names,
        )
    failed = [p for p, r in results.items() if isinstance(r, str)]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} volume(s) failed", err=True)
        sys.exit(EXIT_FAILED)


def run_demo(model, out_dir, backend, provider, threads, batch_size, streams: int = 0) -> int:
    """Segment a generated phantom (not one the demo model was trained on) and score it."""
    import numpy as np

    from .io import read_labels, write_nifti
    from .metrics import dice
    from .models import DEMO_NOTE, demo_model_path, open_backend
    from .phantoms import make_phantom, phantom_images

    model = model or demo_model_path()
    out = out_dir or Path("seg-run-demo")
    check_output_dir(out)
    click.echo(f"generating a CT phantom (512x512, 120 slices) in {out} ...")
    ph = make_phantom(seed=1234, index=0, size=512, slices=120)
    img, seg = phantom_images(ph)
    write_nifti(img, out / "phantom.nii.gz")
    write_nifti(seg, out / "phantom_truth.nii.gz")
    click.echo(f"note: {DEMO_NOTE}")
    with open_backend(model, backend, provider, threads, streams=streams) as be:
        bs = batch_size or be.default_batch
        click.echo(f"backend: {be.describe()}, batch {bs}")
        res = segment_files([out / "phantom.nii.gz"], be, out, bs, overlay=True)
    r = res[out / "phantom.nii.gz"]
    if isinstance(r, str):
        return EXIT_FAILED
    pred = read_labels(out / "phantom_seg.nii.gz").data
    truth = read_labels(out / "phantom_truth.nii.gz").data
    d_liver, d_tumour = dice(pred >= 1, truth >= 1), dice(pred == 2, truth == 2)
    f = lambda v: "n/a (no tumour)" if v is None else f"{v:.4f}"  # noqa: E731
    t = r["timings_s"]
    click.echo(f"Dice vs ground truth: liver {f(d_liver)}, tumour {f(d_tumour)}")
    click.echo(
        "timings (s): "
        + ", ".join(f"{k} {t[k]:.2f}" for k in ("read", "preprocess", "infer", "postprocess", "write", "wall"))
        + f"; {t['slices'] / max(t['infer'], 1e-9):.1f} slices/s in the model"
    )
    click.echo(f"mask: {r['mask']}  overlay: {out / 'phantom_overlay.png'}")
    return 0 if d_liver is not None and np.isfinite(d_liver) else EXIT_FAILED


def main() -> None:
    run_cli(cli, "seg-run")


if __name__ == "__main__":
    main()
