"""Progress of long work: a rich bar on a terminal, a line every few seconds anywhere else.

A run started from a script, a batch system or ``| tee log`` has no terminal, and a bar would
print nothing useful there; ``LineProgress`` has the few methods of ``rich.progress.Progress``
this project calls and writes ``description: done/total (rate/s, ~N s left)`` lines instead.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

#: Seconds between two progress lines when there is no terminal.
LINE_EVERY = 10.0


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    start: float  # perf_counter at the start
    printed: float  # perf_counter at the last line printed
    start_count: float


class LineProgress:
    """``rich.progress.Progress``'s add_task / update / advance / remove_task, as log lines.

    Args:
        every: Seconds between two lines of one task (a task's last step always prints).
        stream: Where the lines go (stderr by default, like a bar).
    """

    def __init__(self, every: float = LINE_EVERY, stream: TextIO | None = None) -> None:
        self.every, self.stream = every, stream
        self.tasks: dict[int, _Task] = {}
        self._added = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tasks.clear()

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0
    ) -> TaskID:
        """Starts a task; returns its id."""
        self._added += 1
        now = time.perf_counter()
        self.tasks[self._added] = _Task(description, total, completed, now, now, completed)
        return TaskID(self._added)

    def update(
        self, task_id: TaskID, *, advance: float = 0, description: str | None = None, **_: Any
    ) -> None:
        """Advances a task (and renames it); prints when ``every`` seconds have passed."""
        task = self.tasks[task_id]
        task.completed += advance
        task.description = description or task.description
        now = time.perf_counter()
        done = task.total is not None and task.completed >= task.total
        if now - task.printed >= self.every or done:
            task.printed = now
            print(self._line(task, now), file=self.stream or sys.stderr, flush=True)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """Advances a task by ``advance`` steps."""
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: TaskID) -> None:
        """Forgets a task."""
        self.tasks.pop(task_id, None)

    @staticmethod
    def _line(task: _Task, now: float) -> str:
        rate = (task.completed - task.start_count) / max(now - task.start, 1e-9)
        total = "" if task.total is None else f"/{task.total:g}"
        left = ""
        if task.total is not None and rate > 0:
            left = f", ~{(task.total - task.completed) / rate:.0f} s left"
        return f"{task.description}: {task.completed:g}{total} ({rate:.2f}/s{left})"


Reporter = Progress | LineProgress


def make_progress(show: bool, *, transient: bool = True) -> Reporter:
    """A bar when ``show`` and stderr is a terminal, lines when ``show`` without one, else silence.

    Args:
        show: Whether this process reports at all (e.g. only rank 0).
        transient: Remove a finished bar from the terminal.
    """
    if show and not sys.stderr.isatty():
        return LineProgress()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, disable=not show, transient=transient)
