"""seg-train: generate phantoms, train the UNet, evaluate checkpoints."""

from __future__ import annotations

from pathlib import Path

import click

from runtime.cliutil import DEBUG_OPTION, run_cli


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
def phantoms(out_dir: Path, cases: int, seed: int, start: int, size: int | None, slices: int | None, preview: bool) -> None:
    """Write synthetic abdominal CT phantoms (HU + labels) in the LiTS layout.

    \b
    Example:
      seg-train phantoms data/phantoms --cases 3 --seed 0
    writes data/phantoms/volume-0.nii.gz, segmentation-0.nii.gz, ...
    """
    from runtime.phantoms import write_phantoms

    paths = write_phantoms(out_dir, cases=cases, seed=seed, start=start, size=size, slices=slices, preview=preview)
    click.echo(f"wrote {len(paths)} cases to {out_dir}")


def main() -> None:
    run_cli(cli, "seg-train")


if __name__ == "__main__":
    main()
