"""The process-pool helpers of crossmod_lib.parallel."""

import os
import time

from crossmod_lib import parallel


def _square(task):
    return task * task


def _risky(task):
    if task == 2:
        raise ValueError("bad task")
    if task == 3:
        os._exit(5)
    if task == 4:
        time.sleep(30)
    return task, task * 10


def test_run_tasks_keeps_the_order_with_and_without_workers():
    assert parallel.run_tasks(_square, [3, 1, 2], workers=1) == [9, 1, 4]
    assert parallel.run_tasks(_square, [3, 1, 2], workers=2) == [9, 1, 4]


def test_run_isolated_survives_errors_crashes_and_hangs():
    results = parallel.run_isolated(
        _risky, [0, 1, 2, 3, 4, 5], workers=2, timeout_s=2.0, key=lambda t: t,
        on_error=lambda task, exc: (task, f"error: {exc}"), on_lost=lambda task, why: why)
    assert results[0] == 0 and results[1] == 10 and results[5] == 50
    assert results[2] == "error: bad task"
    assert results[3] == "worker process crashed (exit code 5)"
    assert results[4] == "timed out after 2 s"
    assert parallel.run_isolated(_risky, [], 2, 1.0, key=lambda t: t, on_error=None, on_lost=None) == {}
