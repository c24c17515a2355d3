"""What every command shares: one-line errors instead of tracebacks, exit codes, the --debug switch."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from evim3.runtime.errors import Evim3Error

F = TypeVar("F", bound=Callable)

EXIT_FAILED = 1  # the job ran and something failed (a source, a parity check, a bad file)
EXIT_USAGE = 2  # the command line itself was wrong (Typer uses 2 too)
EXIT_INCONCLUSIVE = 3  # the job ran but proves nothing (parity of a model that answers the same for every input)


def debug_enabled() -> bool:
    return os.environ.get("EVIM3_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print one line to stderr and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def cli_errors(fn: F) -> F:
    """Turn expected errors into one line and a non-zero exit; EVIM3_DEBUG=1 (or --debug) shows tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (Evim3Error, FileNotFoundError, PermissionError, IsADirectoryError, ValueError) as e:
            if debug_enabled():
                raise
            fail(str(e) if not isinstance(e, OSError) or not e.filename else f"{e.filename}: {e.strerror}")
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130)
        except ModuleNotFoundError as e:
            if debug_enabled():
                raise
            fail(f"missing dependency '{e.name}': install it (see README, Install)")

    return wrapper  # type: ignore[return-value]


def echo_err(msg: str) -> None:
    print(msg, file=sys.stderr)
