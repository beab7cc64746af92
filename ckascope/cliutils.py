"""Shared command-line plumbing: one-line errors, exit codes, options generated from configs.

User mistakes (click usage errors, ``InputError``) exit with code 2, runtime failures
(``CKAScopeError``, ``OSError``) with code 1, an interrupt with 130; each prints exactly one line
on stderr and no traceback. Anything else is a bug and keeps its traceback. A
``CKAScopeWarning`` is one ``note: ...`` line on stderr, without Python's file and source line;
under torchrun rank 0 alone shows it, and each rank shows its own ``LocalWarning``, naming it.
Errors alike: rank 0 shows an error of the whole job (one whose class says ``whole_job``: a
user's mistake, missing pretrained weights, a non-finite loss or weights, an interrupt), which
every rank meets, and each rank its own runtime failure, naming its rank; a rank that meets a
whole-job error rank 0 did not shows it after a wait (``fail``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from click import ParameterSource
from rich.console import Console

from ckascope.errors import CKAScopeError, CKAScopeWarning, LocalWarning

F = TypeVar("F", bound=Callable[..., Any])

#: Width of tables written to a pipe or file: wide enough not to cut a summary table.
PIPE_WIDTH = 200


def make_console(**kwargs: Any) -> Console:
    """A rich Console; on a terminal as wide as it, into a pipe ``PIPE_WIDTH`` (rich's 80 cuts)."""
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(width=width, **kwargs)


#: Exit code of an interrupt (Ctrl-C, SIGTERM), which torchrun sends to every process.
INTERRUPTED = 130

#: Seconds a process other than rank 0 waits before it shows an error every process meets
#: (``fail``): time for rank 0 to show it and exit, and for torchrun to end the others.
JOB_ERROR_WAIT = 10.0


def fail(message: str, code: int, *, whole_job: bool = False) -> NoReturn:
    """Prints ``Error: message`` as one line on stderr and exits with ``code``.

    Under torchrun (``launched_rank``), as ``note_text`` does for notes: an error every process
    meets alike (``whole_job``: a user's mistake in the arguments) is shown by rank 0; any
    other by the process that met it, naming its rank. Another rank with a whole-job error
    waits ``JOB_ERROR_WAIT`` seconds first, in which torchrun ends it once rank 0 has failed;
    still running, rank 0 did not meet it (a file missing on this node alone), so it shows the
    error itself, naming its rank: no error goes unshown. An interrupt is shown by rank 0
    alone, at once: every process was sent it.
    """
    rank, world = launched_rank()
    whole_job = whole_job or code == INTERRUPTED
    if world > 1 and rank != 0 and whole_job:
        # An interrupt does not wait as a mistake does: torchrun, itself interrupted, waits (30 s)
        # for its processes to end rather than ending them, so each would say it after the
        # wait. One process alone interrupted (kill -INT) is named in torchrun's summary (130).
        if code == INTERRUPTED:
            sys.exit(code)
        _wait_for_rank_0(code)
    where = f"rank {rank}: " if world > 1 and (rank != 0 or not whole_job) else ""
    click.echo(f"Error: {where}{' '.join(message.split())}", err=True)
    sys.exit(code)


def _wait_for_rank_0(code: int) -> None:
    """Sleeps ``JOB_ERROR_WAIT`` seconds; a Ctrl-C in them exits with ``code``, saying nothing.

    torchrun forwards a Ctrl-C to every process, and rank 0 says the job was interrupted;
    Python's default handler would end the wait with a traceback, inside the error's.
    """
    try:
        time.sleep(JOB_ERROR_WAIT)
    except KeyboardInterrupt:
        sys.exit(code)


def _usage_message(error: click.UsageError) -> str:
    where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
    return error.format_message() + where


def launched_rank() -> tuple[int, int]:
    """(rank, number of processes) as torchrun sets them; (0, 1) for a single process.

    Read from the environment: known before (and without) a process group.
    """
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def note_text(message: Warning | str, category: type[Warning]) -> str | None:
    """The ``note: ...`` line of a ckascope warning in this process; None when it is not shown.

    A ``CKAScopeWarning`` holds for the whole job, so under torchrun only rank 0 shows it; a
    ``LocalWarning`` is this process's alone and names its rank when there are several.
    """
    rank, world = launched_rank()
    local = issubclass(category, LocalWarning)
    if rank != 0 and not local:
        return None
    where = f"rank {rank}: " if local and world > 1 else ""
    return f"note: {where}{' '.join(str(message).split())}"


@contextlib.contextmanager
def warnings_as_notes() -> Iterator[None]:
    """Shows each ``CKAScopeWarning`` as one ``note: ...`` line on stderr, others as Python does.

    A command-line user needs the message, not the library's file, line number and source line
    that Python's warning display adds; under torchrun, once (``note_text``).
    """
    with warnings.catch_warnings():  # restores the display on exit
        shown = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: typing.TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, CKAScopeWarning):
                text = note_text(message, category)
                if text is not None:
                    click.echo(text, err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


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
            with warnings_as_notes():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:  # the same arguments on every process
            fail(_usage_message(e), 2, whole_job=True)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except CKAScopeError as e:
            fail(str(e), e.exit_code, whole_job=e.whole_job)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", INTERRUPTED)
        except OSError as e:
            detail = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
            fail(detail, 1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def explicit_options() -> frozenset[str]:
    """The names of the running command's parameters that the user gave, not left at default.

    Given means on the command line, in the environment or at a prompt (click's parameter
    source): a default typed out (``--ci 0.95``) is given, which the values alone cannot tell.
    """
    ctx = click.get_current_context()
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    return frozenset(name for name in ctx.params if ctx.get_parameter_source(name) in given)


#: The default of a ``config_field`` whose option must be given (a required option).
REQUIRED: Any = dataclasses.MISSING


def renamed_flags(args: list[str], renamed: Mapping[str, str]) -> list[str]:
    """``args`` with each old flag name (``--sizes``, ``--sizes=8,28``) spelled the new way.

    Old names stay accepted for one release so that scripts keep working; each use says the
    new name on stderr (a note, not an error: the command runs).
    """
    out = []
    for token in args:
        flag, eq, value = token.partition("=")
        if flag in renamed:
            note = f"{flag} is now {renamed[flag]}; the old name goes in the next release"
            text = note_text(note, CKAScopeWarning)  # the same arguments on every rank: once
            if text is not None:
                click.echo(text, err=True)
            token = renamed[flag] + eq + value
        out.append(token)
    return out


def config_field(default: Any, help: str | None, **extra: Any) -> Any:
    """A config dataclass field with what ``config_options`` makes its option from.

    Args:
        default: The default value (an immutable one: configs are plain values), or
            ``REQUIRED`` for an option that must be given.
        help: The option's help text (None: none).
        **extra: ``choices``, ``min``/``max``, ``short``, ``flag`` or ``option`` (see
            ``config_options``).
    """
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def config_options(
    config: type, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> Callable[[F], F]:
    """A decorator adding one click option per field of a config dataclass, in field order.

    A field's type hint, default and metadata (``config_field``) make its option: ``help``;
    ``choices`` or a ``Literal`` type (a ``click.Choice``); ``min``/``max`` (an
    ``IntRange``/``FloatRange``); ``short`` (e.g. ``-m``); ``flag`` (a plain on-switch instead
    of ``--x/--no-x`` for a boolean); ``option`` (a flag other than ``--field-name``; the value
    still arrives under the field's name). Paths become ``click.Path``, fixed-length tuples
    ``nargs``, a field without a default a required option. ``overrides`` gives the click
    keywords (type, callback, ...) of named fields instead (a list option, for one).

    Raises:
        TypeError: A field with a default factory, or of a type no option takes (a
            variable-length tuple, a union other than ``X | None``) and no override.
    """
    hints = typing.get_type_hints(config)
    options = [
        _field_option(f, hints[f.name], (overrides or {}).get(f.name))
        for f in dataclasses.fields(config)
    ]

    def decorate(f: F) -> F:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def _field_option(
    f: dataclasses.Field[Any], hint: Any, override: Mapping[str, Any] | None
) -> Callable[[F], F]:
    meta = f.metadata
    if f.default_factory is not dataclasses.MISSING:
        raise TypeError(f"config field {f.name!r} needs a plain default, or none (required)")
    flag = meta.get("option", "--" + f.name.replace("_", "-"))
    names = [flag, *([meta["short"]] if "short" in meta else [])]
    required = f.default is dataclasses.MISSING
    kwargs: dict[str, Any] = {"help": meta["help"]}
    kwargs.update({"required": True} if required else {"default": f.default})
    if override is not None:
        return click.option(*names, f.name, **{**kwargs, "show_default": True, **override})
    kind = _unwrap_optional(hint)
    if kind is bool:
        if not meta.get("flag"):
            names = [f"{flag}/--no-{flag[2:]}"]
            kwargs["show_default"] = True
        else:
            kwargs["is_flag"] = True
    else:
        kwargs.update(_click_type(kind, meta))
        kwargs["show_default"] = not required and f.default is not None
    return click.option(*names, f.name, **kwargs)


def _unwrap_optional(hint: Any) -> Any:
    """``X | None`` -> X; other hints as they are.

    Raises:
        TypeError: A union of several types.
    """
    if not (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) != 1:
        raise TypeError(f"no option takes {hint}: only X | None unions")
    return args[0]


def _click_type(kind: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Click's ``type`` (and ``nargs``) for a field of type ``kind``."""
    if "choices" in meta or typing.get_origin(kind) is typing.Literal:
        return {"type": click.Choice(meta.get("choices") or typing.get_args(kind))}
    if kind is Path:
        return {"type": click.Path(path_type=Path)}
    nargs = 1
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        if Ellipsis in items:
            raise TypeError(f"a {kind} option needs an override (e.g. a list callback)")
        kind, nargs = items[0], len(items)
    if "min" in meta or "max" in meta:
        ranged = click.IntRange if kind is int else click.FloatRange
        kind = ranged(meta.get("min"), meta.get("max"))
    return {"type": kind, "nargs": nargs}
