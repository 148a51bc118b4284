"""Shared CLI plumbing: one-line errors, --debug, and the exit codes every command uses."""

from __future__ import annotations

import sys

import click

from .errors import SegError

EXIT_USAGE = 2
EXIT_FAILED = 1


def run_cli(group: click.Command, prog_name: str, argv: list[str] | None = None) -> None:
    """Run a click group so that SegError and bad files give one line and a non-zero exit.

    With ``--debug`` anywhere on the command line the full traceback is shown instead.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    args = [a for a in argv if a != "--debug"]
    try:
        group.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SegError as exc:
        if debug:
            raise
        click.echo(f"{prog_name}: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        click.echo(
            f"{prog_name}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    sys.exit(0)


DEBUG_OPTION = click.option("--debug", is_flag=True, expose_value=False, help="Show the full traceback on errors.")
