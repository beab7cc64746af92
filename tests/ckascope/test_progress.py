from __future__ import annotations

import io

import pytest

from ckascope import progress
from ckascope.progress import LineProgress


def test_lines_every_few_seconds_and_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(float(t) for t in range(0, 1000, 3))  # each call: 3 s later
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    with LineProgress(every=10, stream=out) as bar:
        task = bar.add_task("CKA", total=10)
        for _ in range(10):
            bar.advance(task)
    lines = out.getvalue().splitlines()
    assert 2 <= len(lines) < 10  # not every step
    assert lines[-1].startswith("CKA: 10/10 (")
    assert "s left" in lines[0]


def test_renamed_tasks_and_unknown_totals() -> None:
    out = io.StringIO()
    bar = LineProgress(every=0, stream=out)
    task = bar.add_task("epoch 1/2", total=None)
    bar.update(task, advance=1, description="epoch 1/2 loss 0.5")
    assert out.getvalue().startswith("epoch 1/2 loss 0.5: 1 (")
    bar.remove_task(task)
    assert not bar.tasks
