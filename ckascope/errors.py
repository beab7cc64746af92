"""Typed errors shared by ckascope and the packages built on it.

Every error a user can cause carries a message that says what was wrong and what to do instead.
The command-line tools print ``str(error)`` as one line and exit with ``error.exit_code``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CKAScopeError(Exception):
    """Base class of every error the tools raise on purpose (exit code 1)."""

    exit_code = 1


class InputError(CKAScopeError, ValueError):
    """A bad argument, name, option or file given by the user (exit code 2)."""

    exit_code = 2


class NumericalError(CKAScopeError, ArithmeticError):
    """Non-finite values where finite ones are required, e.g. NaN activations."""


class WeightsUnavailableError(CKAScopeError):
    """Pretrained weights are not cached and cannot be downloaded."""


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
