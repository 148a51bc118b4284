"""seg-bench: latency and Dice-parity suites."""

from __future__ import annotations

import click

from runtime.cliutil import DEBUG_OPTION, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@DEBUG_OPTION
def cli() -> None:
    """Measure latency and Dice parity of models and backends on real volumes.

    \b
    Example:
      seg-bench latency model.onnx model.int8.onnx --volumes data/heldout
      seg-bench parity model.onnx model.fp16.onnx model.int8.onnx --data data/heldout
      seg-bench score predictions/ labels/
    """


def main() -> None:
    run_cli(cli, "seg-bench")


if __name__ == "__main__":
    main()
