"""seg-export: ONNX export, FP16/INT8 graphs and TensorRT engines."""

from __future__ import annotations

import click

from runtime.cliutil import DEBUG_OPTION, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Export a trained checkpoint to verified ONNX, FP16/INT8 graphs and TensorRT plans.

    \b
    Example:
      seg-export onnx runs/demo/best.pt -o model.onnx
      seg-export quantize model.onnx --precision int8 --calib data/phantoms -o model.int8.onnx
      seg-export build-engine model.int8.onnx -o model.plan
    """


def main() -> None:
    run_cli(cli, "seg-export")


if __name__ == "__main__":
    main()
