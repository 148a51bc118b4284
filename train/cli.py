"""seg-train: generate phantoms, train the UNet, evaluate checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runtime.cliutil import DEBUG_OPTION, FiniteFloat, run_cli
from runtime.errors import InputError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Train the liver/tumour UNet on LiTS- or Decathlon-layout NIfTI data.

    \b
    Example:
      seg-train phantoms data/phantoms --cases 40 --seed 0
      seg-train fit data/phantoms --out runs/demo
    """


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=10, show_default=True, type=click.IntRange(1), help="Number of volumes.")
@click.option("--seed", default=0, show_default=True, type=int, help="Same seed, same bytes.")
@click.option("--start", default=0, show_default=True, type=click.IntRange(0), help="Index of the first case.")
@click.option("--size", type=click.IntRange(32, 1024), default=None, help="In-plane size (default: varied, 256-512).")
@click.option("--slices", type=click.IntRange(8, 1024), default=None, help="Slice count (default: varied).")
@click.option("--preview/--no-preview", default=False, help="Also write a PNG of a mid-liver slice per case.")
@click.option(
    "--perihepatic-fat/--no-perihepatic-fat",
    default=False,
    show_default=True,
    help="Put fat over part of the liver surface, as in real scans; otherwise the same cases.",
)
def phantoms(
    out_dir: Path,
    cases: int,
    seed: int,
    start: int,
    size: int | None,
    slices: int | None,
    preview: bool,
    perihepatic_fat: bool,
) -> None:
    """Write synthetic abdominal CT phantoms (HU + labels) in the LiTS layout.

    \b
    Example:
      seg-train phantoms data/phantoms --cases 3 --seed 0
    writes data/phantoms/volume-0.nii.gz, segmentation-0.nii.gz, ...
    """
    from runtime.phantoms import write_phantoms

    paths = write_phantoms(
        out_dir,
        cases=cases,
        seed=seed,
        start=start,
        size=size,
        slices=slices,
        preview=preview,
        perihepatic_fat=perihepatic_fat,
    )
    click.echo(f"wrote {len(paths)} cases to {out_dir}")


def _config_options(f):
    """One click option per TrainConfig field (--base-width, --bilinear/--no-bilinear, ...).

    Every default is None, so that only flags given on the command line override --config.
    """
    from dataclasses import MISSING

    from .config import CHOICES, HELP, TrainConfig

    for fld in reversed(fields_of(TrainConfig)):
        name = "--" + fld.name.replace("_", "-")
        default = fld.default if fld.default is not MISSING else None
        shown = f"{default:.4g}" if isinstance(default, float) else default
        text = f"{HELP.get(fld.name, '')} [default: {shown}]".strip()
        if fld.type in ("bool", bool):
            f = click.option(f"{name}/--no-{name[2:]}", fld.name, default=None, help=text)(f)
        elif fld.name in CHOICES:
            f = click.option(name, fld.name, type=click.Choice(CHOICES[fld.name]), default=None, help=text)(f)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(fld.type), str)
            f = click.option(name, fld.name, type=kind, default=None, help=text)(f)
    return f


def fields_of(cls):
    from dataclasses import fields

    return fields(cls)


def _make_fit():
    @cli.command()
    @click.argument("data_dir", type=click.Path(path_type=Path))
    @click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(path_type=Path),
        help="Run directory (checkpoints, logs, curves).",
    )
    @click.option(
        "--config", "config_file", type=click.Path(path_type=Path), help="JSON file of option names; flags override it."
    )
    @click.option(
        "--resume", is_flag=True, help="Continue from RUN_DIR/last.pt with its optimizer, epoch and RNG state."
    )
    @_config_options
    def fit(data_dir: Path, out_dir: Path, config_file: Path | None, resume: bool, **options) -> None:
        """Train the UNet on a LiTS- or Decathlon-layout directory.

        Cases are split into training and validation by case (seeded; recorded in
        RUN_DIR/split.json and in the checkpoints' spec). RUN_DIR gets last.pt (resumable),
        best.pt (best eval-mode validation score: mean of liver and tumour per-case Dice),
        metrics.jsonl, curves.png, split.json and config.json. The defaults are the demo
        edge model: width 24, depth 4, batch norm, 256x256 at 1.5 mm, 3 slices, window
        (-200, 250).

        \b
        Example (a short run on 40 phantoms on a CPU; the README has the demo model's recipe):
          seg-train phantoms data/ph40 --cases 40 --seed 0
          seg-train fit data/ph40 --out runs/demo --crop 128 --epochs 30 \\
              --steps-per-epoch 200 --val-every 3 --val-cases 6
          seg-train fit data/ph40 --out runs/demo --epochs 40 --resume   # continue
        Options may also come from a JSON file; flags given here override it:
          seg-train fit data/ph40 --out runs/demo --config demo.json
        Under torchrun the same command trains with DistributedDataParallel:
          torchrun --nproc_per_node 2 -m train.cli fit data/ph40 --out runs/ddp
        """
        from .config import TrainConfig
        from .loop import fit as run_fit

        values = TrainConfig.from_file(config_file) if config_file else {}
        values.update({k: v for k, v in options.items() if v is not None})
        try:
            cfg = TrainConfig(**values).validate()
        except TypeError as exc:
            raise InputError(f"{config_file}: bad option value ({exc})") from None
        result = run_fit(data_dir, out_dir, cfg, resume=resume, log=click.echo)
        click.echo(f"best validation score {result['best_score']:.4f}; checkpoints in {out_dir}")

    return fit


fit = _make_fit()


@cli.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--out", "out_json", type=click.Path(path_type=Path), default=None, help="Write the metrics as JSON here."
)
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--min-tumour-ml",
    type=FiniteFloat(0),
    default=0.0,
    show_default=True,
    help="Relabel predicted tumour components smaller than this (mL) as liver, as seg-run --min-tumour-ml does.",
)
def evaluate(
    checkpoint: Path, data_dir: Path, out_json: Path | None, batch_size: int, device: str, min_tumour_ml: float
) -> None:
    """Print the LiTS metric table of a checkpoint on every labelled case of DATA_DIR.

    \b
    Example:
      seg-train evaluate runs/demo/best.pt data/heldout --out metrics.json
    """
    from runtime.datasets import load_dataset
    from runtime.io import write_json_atomic
    from runtime.metrics import format_table, summarize

    from .checkpoint import load_checkpoint
    from .loop import evaluate_cases, place, select_device

    ck = load_checkpoint(checkpoint)
    cases = load_dataset(data_dir)
    dev = select_device(device)
    per_case = evaluate_cases(
        place(ck.model(), dev),
        ck.spec,
        cases,
        dev,
        batch_size,
        progress=sys.stderr.isatty(),
        surface=True,
        min_tumour_ml=min_tumour_ml,
    )
    summary = summarize(per_case)
    click.echo(format_table(per_case, summary))
    if out_json:
        write_json_atomic(
            out_json,
            {"checkpoint": str(checkpoint), "min_tumour_ml": min_tumour_ml, "per_case": per_case, "summary": summary},
        )
        click.echo(f"wrote {out_json}")


def _read_metrics(path: Path) -> dict[str, dict]:
    """The per-case metrics of a ``seg-train evaluate --out`` file or a ``seg-bench score`` score.json."""
    import json

    from runtime.metrics import STRUCTURES

    try:
        per_case = json.loads(path.read_text())["per_case"]
        if not per_case or not all(
            (m[s]["dice"] is None or isinstance(m[s]["dice"], (int, float)))
            and isinstance(m[s]["ref_voxels"], int)
            and isinstance(m[s]["pred_voxels"], int)
            for m in per_case.values()
            for s in STRUCTURES
        ):
            raise ValueError
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(
            f"{path}: not a metrics file of seg-train evaluate or seg-bench score; "
            f"write one with: seg-train evaluate CHECKPOINT DATA_DIR --out {path}"
        ) from None
    return per_case


@cli.command()
@click.argument("base", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("others", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--structure", type=click.Choice(["tumor", "liver"]), default="tumor", show_default=True)
@click.option(
    "--out", "out_json", type=click.Path(path_type=Path), default=None, help="Write the comparison as JSON here."
)
def compare(base: Path, others: tuple[Path, ...], structure: str, out_json: Path | None) -> None:
    """Compare per-case Dice of checkpoints or deployed models, each against BASE, paired by case.

    Reads the files `seg-train evaluate --out` writes (the same cases for all), or the
    score.json of `seg-bench score`, which scores a deployed model's masks, and prints
    each case's Dice, then per file the mean difference from BASE, its 95 % bootstrap
    interval over the cases, and on how many cases it is better and worse. An interval that
    spans 0 means the cases do not tell the two apart: with a handful of validation cases,
    two seeds of one recipe often differ by more than a change of recipe does.

    \b
    Example:
      seg-train evaluate runs/a/best.pt data/test --out a.json
      seg-train evaluate runs/b/best.pt data/test --out b.json
      seg-train compare a.json b.json
      seg-run data/test -o preds/ --model model.int8.onnx && seg-bench score preds/ data/test -o int8/
      seg-train compare a.json int8/score.json
    """
    from runtime.io import write_json_atomic
    from runtime.metrics import paired_dice, text_table

    ref = _read_metrics(base)
    runs = {str(p): _read_metrics(p) for p in others}
    try:
        results = {name: paired_dice(ref, per_case, structure) for name, per_case in runs.items()}
    except ValueError as exc:
        raise InputError(f"nothing to compare: {exc} (were they evaluated on the same data?)") from None
    cases = [c for c in ref if all(c in r["cases"] for r in results.values())]
    files = [ref, *runs.values()]
    rows = [[c, *(f"{m[c][structure]['dice']:.4f}" for m in files)] for c in cases]
    if cases:
        rows.append(
            [
                f"mean of {len(cases)}",
                *(f"{sum(m[c][structure]['dice'] for c in cases) / len(cases):.4f}" for m in files),
            ]
        )
    click.echo(text_table([f"{structure} Dice", str(base), *results], rows))
    for name, r in results.items():
        lo, hi = r["ci95"]
        click.echo(
            f"{name} - {base}: {r['mean_diff']:+.4f} mean per-case {structure} Dice over {len(r['cases'])} cases "
            f"(95% bootstrap interval {lo:+.4f} to {hi:+.4f}); better on {r['better']}, worse on {r['worse']}, "
            f"same on {r['same']}"
        )
        if r["cases_without"]:
            fb, fo = r["false_positive_cases"]
            click.echo(
                f"  {r['cases_without']} case(s) without a {structure}: false positives on {fb} for {base}, on {fo} "
                f"for {name}"
            )
        if r["only_base"] or r["only_other"]:
            click.echo(
                f"  note: {len(r['only_base'])} case(s) only in {base}, {len(r['only_other'])} only in {name}: left out"
            )
    if out_json:
        write_json_atomic(out_json, {"base": str(base), "comparisons": results})
        click.echo(f"wrote {out_json}")


def main() -> None:
    run_cli(cli, "seg-train")


if __name__ == "__main__":
    main()
