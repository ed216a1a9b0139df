"""benchmarks/common.py's turn-taking runs: processes compute one at a time, alternately, and each
counts only its own time."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_in_turns  # noqa: E402


def busy_steps(steps, turns):
    """``steps`` busy 30 ms steps, offering the turn before each like a training step does."""
    intervals = []
    start_held = turns.held
    for _ in range(steps):
        turns.on_train_batch_start(None, None, None, 0)
        start = time.perf_counter()
        while time.perf_counter() < start + 0.03:
            pass
        intervals.append((start, time.perf_counter()))
    return intervals, turns.held - start_held


def test_runs_take_turns_and_count_only_their_own_time():
    results = run_in_turns(busy_steps, [(8,), (12,)], slice_s=0.07)
    (first, first_held), (second, second_held) = results
    everything = sorted([(s, e, 0) for s, e in first] + [(s, e, 1) for s, e in second])
    for (_, end, _), (start, _, _) in zip(everything, everything[1:]):
        assert end <= start  # never two computing at once
    owners = [owner for _, _, owner in everything]
    switches = sum(a != b for a, b in zip(owners, owners[1:]))
    assert switches >= 4  # alternating in slices (3 steps each), not one run after the other
    assert owners[-4:] == [1] * 4  # the longer run finishes alone
    for intervals, held in results:
        work = sum(e - s for s, e in intervals)
        assert work <= held < work + 0.1 * len(intervals)  # waits for the other are not counted


def fails_for_zero(value, turns):
    if value == 0:
        raise ValueError("this run fails")
    return value


def test_a_failing_run_is_reported_and_the_others_finish():
    with pytest.raises(RuntimeError, match=r"turn-taking runs failed: \[\(0,\)\]"):
        run_in_turns(fails_for_zero, [(0,), (1,)], slice_s=0.05)
