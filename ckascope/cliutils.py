"""Shared command-line plumbing: one-line errors, exit codes, version and progress helpers.

User mistakes (click usage errors, ``InputError``) exit with code 2, runtime failures
(``CKAScopeError``, ``OSError``) with code 1, an interrupt with 130; each prints exactly one line
on stderr and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
from rich.console import Console

from ckascope.errors import CKAScopeError

#: Width of tables written to a pipe or file: wide enough not to cut a summary table.
PIPE_WIDTH = 200


def make_console(**kwargs: Any) -> Console:
    """A rich Console; on a terminal as wide as it, into a pipe ``PIPE_WIDTH`` (rich's 80 cuts)."""
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(width=width, **kwargs)


def fail(message: str, code: int) -> NoReturn:
    """Prints ``Error: message`` as one line on stderr and exits with ``code``."""
    click.echo(f"Error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _usage_message(error: click.UsageError) -> str:
    where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
    return error.format_message() + where


class FriendlyGroup(click.Group):
    """A click group whose errors are one line on stderr with a meaningful exit code."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Runs the command line; see the module docstring for the exit codes."""
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            fail(_usage_message(e), 2)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except CKAScopeError as e:
            fail(str(e), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", 130)
        except OSError as e:
            detail = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
            fail(detail, 1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv
