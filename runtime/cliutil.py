"""Shared CLI plumbing: one-line errors, --debug, and the exit codes every command uses."""

from __future__ import annotations

import math
import os
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
    except click.UsageError as exc:  # one line, as every other error: the usage is one --help away
        cmd = exc.ctx.command_path if exc.ctx is not None else prog_name
        click.echo(f"{cmd}: error: {' '.join(exc.format_message().split())} (see {cmd} --help)", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except SegError as exc:
        if debug:
            raise
        click.echo(f"{prog_name}: error: {' '.join(str(exc).split())}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if debug:
            raise
        click.echo(
            f"{prog_name}: internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(EXIT_FAILED)
    sys.exit(0)


DEBUG_OPTION = click.option("--debug", is_flag=True, expose_value=False, help="Show the full traceback on errors.")


class FiniteFloat(click.FloatRange):
    """A float option that refuses inf and nan (which pass ``FloatRange``'s comparisons) up front."""

    name = "finite float"

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class OutPath(click.Path):
    """An output path that refuses the empty string (which would mean the current folder, unasked)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; name an output path", param, ctx)
        return super().convert(value, param, ctx)


# more threads than this per core only add memory and switching, never speed
MAX_THREADS_PER_CORE = 4
MAX_STREAMS = 16


def check_parallelism(threads: int, streams: int = 0) -> None:
    """Refuse thread and stream counts no machine here can use, naming the limit, before anything starts."""
    cores = os.cpu_count() or 1
    limit = MAX_THREADS_PER_CORE * cores
    if threads > limit:
        raise click.BadParameter(
            f"{threads} threads on {cores} core(s); at most {limit} ({MAX_THREADS_PER_CORE} per core), 0 for all cores",
            param_hint="'--threads'",
        )
    most = min(MAX_STREAMS, threads) if threads else MAX_STREAMS
    if streams > most:
        raise click.BadParameter(
            f"{streams} streams; at most {most} ({'no more than --threads, and ' if threads else ''}"
            f"{MAX_STREAMS} in all)",
            param_hint="'--streams'",
        )
