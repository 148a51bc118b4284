"""seg-run: segment CT volumes with a TensorRT plan or an ONNX model."""

from __future__ import annotations

import glob
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .cliutil import DEBUG_OPTION, EXIT_FAILED, FiniteFloat, OutPath, check_parallelism, run_cli
from .errors import InputError, SegError


def expand_inputs(inputs: tuple[str, ...], echo=click.echo) -> list[Path]:
    """Files, directories (their CT images: label maps of a LiTS or Decathlon dataset are left out)
    and glob patterns, in a stable order. Masks and probability maps seg-run wrote are never
    inputs (``seg-run same -o same`` twice must not segment its own masks): they are left out,
    with one note."""
    from .datasets import images_in
    from .dicom import file_input, series_inputs
    from .outputs import is_our_output

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = images_in(p) or series_inputs(p, warn=lambda msg: click.echo(f"note: {msg}", err=True))
            if not found:
                raise InputError(f"{p}: directory holds no .nii or .nii.gz files and no DICOM CT series")
            paths += found
        elif any(ch in item for ch in "*?[") and not p.exists():
            found = sorted(Path(q) for q in glob.glob(item))
            if not found:
                raise InputError(f"{item}: the pattern matches no files")
            paths += found
        else:
            paths.append(file_input(p))  # a missing file is reported per volume, and the rest still run
    paths = list(dict.fromkeys(paths))
    ours = [p for p in paths if is_our_output(p)]
    if ours:
        if len(ours) == len(paths):
            raise InputError(
                f"{ours[0]}{' and the other inputs' if len(ours) > 1 else ''}: seg-run's own output, never an input; "
                "give the CT volumes"
            )
        echo(f"note: left out {len(ours)} mask(s) or probability map(s) seg-run wrote (e.g. {ours[0]})", err=True)
        paths = [p for p in paths if p not in set(ours)]
    return paths


def check_output_dir(out: Path) -> None:
    from .outputs import temp_prefix

    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=temp_prefix(), suffix=".part"):
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
    force: bool = False,
    dicom_seg: bool = False,
) -> dict[Path, dict | str]:
    """Segment each file; returns {path: report dict, or the error line}. One bad volume never stops the rest.

    Outputs are <name>_seg.nii.gz and <name>.json (and <name>_prob.nii.gz, <name>_overlay.png),
    where ``names`` gives an input's base name (default: runtime.outputs.output_names, unique
    per input); two inputs given one name are refused before anything runs. A volume's files are
    written all or nothing, the JSON last, recording the sha256 of input, model and mask, so
    ``skip_existing`` skips only a mask verified to be this input's with this model.
    """
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from . import dicom_seg as dseg
    from .dicom import is_series_path, report_fields, series_sha256
    from .io import intensity_warning, json_bytes, mask_image, nifti_bytes, probability_image
    from .models import file_sha256
    from .outputs import (
        DiskFullError,
        check_names,
        output_names,
        remove_stale_temps,
        sha256_bytes,
        why_not_done,
        write_group_atomic,
    )
    from .pipeline import SegmentOptions, Timings, read_ahead, read_any, segment_canonical
    from .postprocess import StreamingComponents, drop_small_tumours, volume_stats, voxels_for_ml
    from .postprocess import postprocess as post

    chosen = {**output_names(paths), **{Path(k): v for k, v in (names or {}).items()}}
    check_names({p: chosen[p] for p in paths})
    removed = remove_stale_temps(out_dir)
    if removed:
        echo(f"note: removed {len(removed)} temporary file(s) an interrupted run left in {out_dir}", err=True)

    results: dict[Path, dict | str] = {}
    model_hash = backend.model_sha256
    settings = {"postprocess": postprocess, "fill_holes": holes, "min_tumour_ml": min_tumour_ml}
    hashes: dict[Path, str] = {}

    def input_sha(p: Path) -> str:
        if p not in hashes:
            hashes[p] = series_sha256(p) if is_series_path(p) else file_sha256(p)
        return hashes[p]

    def outputs(p: Path) -> tuple[str, Path, Path]:
        name = chosen[p]
        return name, out_dir / f"{name}_seg.nii.gz", out_dir / f"{name}.json"

    todo = []
    for p in paths:
        name, mask_path, json_path = outputs(p)
        if p.exists() and p.resolve() in (mask_path.resolve(), json_path.resolve()):
            results[p] = f"{p}: the output would overwrite the input; choose another -o"
            echo(f"error: {results[p]}", err=True)
            continue
        if skip_existing:
            prob_path = out_dir / f"{name}_prob.nii.gz" if probabilities else None
            try:
                why = why_not_done(json_path, mask_path, lambda p=p: input_sha(p), model_hash, settings, prob_path)
            except (OSError, InputError) as exc:  # the input itself is unreadable: its own run reports it
                why = f"cannot check it ({getattr(exc, 'strerror', None) or exc})"
            if why is None:
                results[p] = {"skipped": True, "mask": str(mask_path)}
                echo(f"{p}: done already, skipped (mask verified against its JSON)")
                continue
            if json_path.exists() or mask_path.exists():
                echo(f"{p}: not skipped: {why}; segmenting it again", err=True)
        todo.append(p)
    overall = _bar(len(todo), "volumes", "vol")
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    done_at = time.perf_counter()  # when the previous volume was finished
    for p, opened, done in read_ahead(todo, partial(read_any, force=force, ct=True)):
        name, mask_path, json_path = outputs(p)
        t = Timings()
        try:
            hashed = hasher.submit(input_sha, p)  # beside the read; hashlib lets the GIL go
            vol = opened.result()  # its slices may still be arriving: segmentation follows them
            bar = _bar(vol.num_slices, name, "slice", leave=False)
            prob = np.empty((backend.spec.out_channels, *vol.data.shape), np.uint8) if probabilities else None
            labels = np.empty(vol.data.shape, np.uint8)
            components = StreamingComponents(labels) if postprocess else None  # labelled while inference goes on
            options = SegmentOptions(
                batch_size=batch_size,
                timings=t,
                progress=bar.update,
                probabilities=prob,
                arrival=vol.arrival,
                out=labels,
                on_final=components.add if components else None,
            )
            segment_canonical(vol.data, vol.spacing, backend.spec, backend, options)
            bar.close()
            read_s, read_began = done.result()  # a stream that fails its final checksum stops here, before any output
            t.add("read", read_s)
            warning = intensity_warning(vol.data)
            if warning:
                echo(f"warning: {p}: {warning}", err=True)
            s = time.perf_counter()
            if postprocess:
                labels = post(labels, holes=holes, inplace=True, components=components)
            drop_small_tumours(labels, voxels_for_ml(min_tumour_ml, vol.affine))
            stats = volume_stats(labels, vol.affine)
            t.add("postprocess", time.perf_counter() - s)
            s = time.perf_counter()
            seg_out = dseg.prepare(dicom_seg, vol, labels, model_hash, out_dir / f"{name}_seg.dcm")
            files = [(mask_path, nifti_bytes(mask_image(labels, vol), mask_path))]
            prob_path = out_dir / f"{name}_prob.nii.gz" if prob is not None else None
            if prob_path is not None:
                files.append((prob_path, nifti_bytes(probability_image(prob, vol), prob_path)))
            if seg_out is not None:
                files.append(seg_out)
            if overlay:
                from .overlay import panel_png

                files.append((out_dir / f"{name}_overlay.png", panel_png(vol.data, labels)))
            t.add("write", time.perf_counter() - s)  # serialising; the files themselves are written below
            # this volume's own time: from its read, or from the end of the previous volume
            # if it was read ahead meanwhile
            t.wall = time.perf_counter() - max(read_began, done_at)
            report = {
                "input": str(p),
                "input_sha256": hashed.result(),
                "mask": str(mask_path),
                "mask_sha256": sha256_bytes(files[0][1]),
                **(
                    {"probabilities": str(prob_path), "probabilities_sha256": sha256_bytes(files[1][1])}
                    if prob_path
                    else {}
                ),
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
                **settings,
                "warnings": [warning] if warning else [],
                "forced": list(vol.forced),  # checks that refused this volume, let through by --force
                **report_fields(vol),
                **({"dicom_seg": str(seg_out[0])} if seg_out is not None else {}),
            }
            files.append((json_path, json_bytes(report)))
            try:
                write_group_atomic(files)  # all or nothing, the JSON last
            except DiskFullError as exc:
                raise DiskFullError(f"{p}: {exc}") from exc
            results[p] = report
            echo(
                f"{p}: liver {stats['liver_ml']:.0f} mL, tumour {stats['tumor_ml']:.1f} mL in {stats['tumor_count']} "
                f"lesion(s); {vol.num_slices} slices in {t.wall:.1f}s -> {mask_path}"
            )
        except SegError as exc:
            results[p] = str(exc)
            echo(f"error: {exc}", err=True)
        except Exception as exc:  # anything else wrong with one volume: say it in one line and go on
            results[p] = f"{p}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            echo(f"error: {results[p]}", err=True)
        finally:
            overall.update(1)
            done_at = time.perf_counter()
    overall.close()
    hasher.shutdown(wait=True)
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
    type=OutPath(path_type=Path),
    default=None,
    help="Output directory (created if missing).",
)
@click.option("--demo", is_flag=True, help="Generate a CT phantom, segment it and print Dice against its ground truth.")
@click.option(
    "--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "triton"]), default="auto", show_default=True
)
@click.option("--url", default=None, help="Triton: the server's HOST:PORT (gRPC 8001, HTTP 8000 by default).")
@click.option("--model-name", default=None, help="Triton: the model's name in the server's repository.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True, help="Triton.")
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
@click.option(
    "--skip-existing",
    is_flag=True,
    help="Skip volumes already done: a mask whose JSON records its sha256, this input's and this model's "
    "(resume a batch).",
)
@click.option("--overlay", is_flag=True, help="Also write <name>_overlay.png with outlines on representative slices.")
@click.option("--cuda-graph", is_flag=True, help="TensorRT: replay the steady-state batch as a CUDA graph.")
@click.option("--no-postprocess", is_flag=True, help="Keep every predicted component (no largest-liver filter).")
@click.option("--fill-holes", is_flag=True, help="Fill holes in the liver slice by slice.")
@click.option(
    "--min-tumour-ml",
    type=FiniteFloat(0),
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
    "--force",
    is_flag=True,
    help="Segment volumes refused as implausible for a CT (voxel size, intensities); the JSON records why.",
)
@click.option(
    "--dicom-seg",
    is_flag=True,
    help="DICOM inputs: also write <case>_seg.dcm, a DICOM Segmentation on the source series (needs unet-edge[dicom]).",
)
@click.option(
    "--to-nifti",
    is_flag=True,
    help="Only convert each DICOM series to <case>.nii.gz in -o (the series' geometry, HU); no model is run.",
)
@click.option(
    "--resample-gaps",
    is_flag=True,
    help="DICOM inputs: interpolate a series with a missing slice or uneven spacing onto a uniform grid "
    "instead of refusing it.",
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
    url,
    model_name,
    protocol,
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
    force,
    dicom_seg,
    to_nifti,
    resample_gaps,
    manifest,
    ray_address,
    actors,
    cpus_per_actor,
    results,
) -> None:
    """Segment liver and liver tumours in CT volumes (NIfTI files or DICOM series folders), writing <name>_seg.nii.gz
    (uint8: 0 background, 1 liver, 2 tumour; the input's geometry) and <name>.json
    (volumes in mL, tumour count and burden, per-stage timings, backend, sha256 of input, model
    and mask). Inputs sharing a file name are named by their folders (pats/a/ct.nii.gz: a_ct);
    seg-run's own masks are never inputs; a volume's files appear together or not at all.

    \b
    Examples:
      seg-run --demo
      seg-run scans/ --model model.onnx -o out/
      seg-run 'scans/*.nii.gz' --model model.plan -o out/ --skip-existing
      seg-run dicom_study/ --dicom-seg -o out/
      seg-run dicom_study/ --to-nifti -o nifti/
      seg-run scans/ --backend triton --url 127.0.0.1:8001 --model-name liver -o out/
      seg-run --manifest cohort.csv --model model.onnx -o /shared/out --ray auto --skip-existing
    """
    from .dicom import is_series_path, set_resample_gaps
    from .models import DEMO_NOTE, demo_model_path, open_backend

    check_parallelism(threads, streams)
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
    set_resample_gaps(resample_gaps)
    if (dicom_seg or to_nifti) and not any(is_series_path(p) for p in paths):
        click.echo("note: --dicom-seg and --to-nifti apply to DICOM series; no input is one", err=True)
    if to_nifti:
        from .dicom import convert_to_nifti

        check_output_dir(out_dir)
        sys.exit(EXIT_FAILED if convert_to_nifti(paths, out_dir, click.echo) else 0)
    if backend == "triton":
        if not (url and model_name):
            raise click.UsageError("--backend triton needs --url HOST:PORT and --model-name NAME")
        model = model_name
    elif url or model_name:
        raise click.UsageError("--url and --model-name go with --backend triton")
    if ray_address:
        from .cluster import import_ray

        import_ray()  # without the extra, say what to install before creating anything
    if model is None:
        model = demo_model_path()
        click.echo(f"note: no --model given; using the embedded demo model: {DEMO_NOTE}", err=True)
    check_output_dir(out_dir)
    if ray_address:
        from .cluster import run_cluster_cli

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
                force=force,
                dicom_seg=dicom_seg,
                resample_gaps=resample_gaps,
            )
        )
    with open_backend(
        model, backend, provider, threads, cuda_graph=cuda_graph, streams=streams, url=url, protocol=protocol
    ) as be:
        bs = batch_size or be.default_batch
        if be.max_batch and bs > be.max_batch:
            raise InputError(
                f"--batch-size {bs} is above {Path(model).name}'s max batch {be.max_batch}; use --batch-size "
                f"{be.max_batch} or less, or rebuild the plan with --max-batch {bs}"
            )
        click.echo(f"backend: {be.describe()}, batch {bs} (--backend {backend} chose {be.name})")
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
            force=force,
            dicom_seg=dicom_seg,
            names=names,
        )
        if cuda_graph and be.name == "tensorrt":  # what replayed is known only now
            click.echo(f"backend after the run: {be.describe()}", err=True)
    failed = [p for p, r in results.items() if isinstance(r, str)]
    if failed:
        if len(results) > 1:  # for a single volume its error line says it all
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
