"""seg-run: segment CT volumes with a TensorRT plan or an ONNX model."""

from __future__ import annotations

import click

from .cliutil import DEBUG_OPTION, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Segment liver and liver tumours in CT volumes.

    \b
    Example:
      seg-run segment scans/*.nii.gz --model model.onnx -o out/
    """


def main() -> None:
    run_cli(cli, "seg-run")


if __name__ == "__main__":
    main()
