"""Typed errors and warnings shared by ckascope and the packages built on it.

Every error a user can cause carries a message that says what was wrong and what to do instead.
The command-line tools print ``str(error)`` as one line and exit with ``error.exit_code``, and
a ``CKAScopeWarning`` as one ``note: ...`` line on stderr.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable
from types import FrameType


class CKAScopeError(Exception):
    """Base class of every error the tools raise on purpose (exit code 1).

    A runtime failure is the process's own: under torchrun the command lines show it from the
    process that met it, naming its rank (``cliutils.fail``).
    """

    exit_code = 1
    #: Whether every process of a torchrun job meets it alike, so that rank 0 alone shows it.
    whole_job = False


class InputError(CKAScopeError, ValueError):
    """A bad argument, name, option or file given by the user (exit code 2).

    Raised from the same arguments on every process of a torchrun job: rank 0 shows it (a
    process that met it alone still does, naming its rank: ``cliutils.fail``).
    """

    exit_code = 2
    whole_job = True


class LocalInputError(InputError):
    """A mistake only some processes of a torchrun job meet (a LOCAL_RANK without its GPU).

    Shown by the process that met it, naming its rank, at once: rank 0 may not meet it.
    """

    whole_job = False


class NumericalError(CKAScopeError, ArithmeticError):
    """Non-finite values where finite ones are required, e.g. NaN activations."""


class WeightsUnavailableError(CKAScopeError):
    """Pretrained weights are not cached and cannot be downloaded.

    Under torchrun every process of a node looks for the same file, offline alike: rank 0
    shows it (a process that met it alone still does, naming its rank: ``cliutils.fail``), as
    a missing file given by the user.

    Attributes:
        problem: The message without its hint, so that a caller whose options are not
            ckascope's (a trainer) can give its own hint.
    """

    whole_job = True

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(f"{problem} Hint: {hint}" if hint else problem)
        self.problem = problem


class CKAScopeWarning(RuntimeWarning):
    """Something to know about a result that still ran (no interval, too few permutations, ...).

    It holds for the whole job: under torchrun every process would say the same, so the
    command lines show it once, from rank 0.
    """


class LocalWarning(CKAScopeWarning):
    """Something one process alone met in its share of the work (an unreadable image).

    Under torchrun each process shows its own, naming its rank: rank 0 cannot know of it.
    """


#: ckascope's own folder: its frames are not where a warning is shown (``warn``).
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, *, local: bool = False) -> None:
    """Warns, shown at the first caller outside ckascope.

    ``local``: a ``LocalWarning`` (what this process alone met), else a ``CKAScopeWarning``.
    The line to show is the caller's (their ``compare_scales(...)``), not a line inside
    ckascope, whose depth depends on the entry point; the command lines print the message
    alone, as a note (``cliutils.warnings_as_notes``).
    """
    category = LocalWarning if local else CKAScopeWarning
    warnings.warn(message, category, stacklevel=_outside_level())


def _outside_level() -> int:
    """The ``stacklevel`` at which ``warn``'s warning names the first frame outside ckascope."""
    level = 2
    frame: FrameType | None = sys._getframe(level)  # 0: here, 1: warn, 2: warn's caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        level, frame = level + 1, frame.f_back
    return level


def hint_close(name: str, choices: Iterable[str], *, what: str = "name", limit: int = 5) -> str:
    """Builds "Unknown <what> 'x'. Hint: did you mean ...?" with the closest legal values.

    Args:
        name: The value the user gave.
        choices: The legal values.
        what: What kind of value it is, for the message.
        limit: How many suggestions to show at most.

    Returns:
        A one-line message naming the closest choices, or a sample of the legal ones.
    """
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=limit, cutoff=0.5)
    if close:
        return f"unknown {what} {name!r}. Hint: did you mean {', '.join(map(repr, close))}?"
    sample = ", ".join(options[:limit]) + (", ..." if len(options) > limit else "")
    return f"unknown {what} {name!r}. Hint: choose one of {sample}"
