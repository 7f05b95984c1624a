"""Running independent tasks over worker processes, with an optional progress bar.

Used where whole patients are generated (the phantom, the simulated MR); each task is a picklable
tuple handed to a module-level function.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def can_spawn() -> bool:
    """Whether worker processes can be spawned: they re-import the main script, which fails when
    it is not a file (code piped to ``python -``); then the tasks run in this process."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or os.path.isfile(main_file)


def run_tasks(function: Callable, tasks: list, workers: int, progress: bool = False,
              desc: str = "tasks", unit: str = "task") -> list:
    """``[function(t) for t in tasks]``, over ``workers`` processes when there is more than one
    (and they can be spawned); results in the order of ``tasks``. A failing task stops the rest
    (pending ones are cancelled) and its exception propagates."""
    bar = None
    if progress:
        try:  # tqdm comes with the project, but the phantom must not depend on it
            from tqdm.auto import tqdm

            bar = tqdm(total=len(tasks), desc=desc, unit=unit)
        except ImportError:
            bar = None
    results: list = [None] * len(tasks)
    try:
        if workers == 1 or len(tasks) <= 1 or not can_spawn():
            for i, task in enumerate(tasks):
                results[i] = function(task)
                if bar is not None:
                    bar.update(1)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn, not fork: forking a process that runs threads (a notebook kernel, torch) can
            # deadlock, and the workers need nothing but the task tuples
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context) as pool:
                futures = {pool.submit(function, task): i for i, task in enumerate(tasks)}
                try:
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        if bar is not None:
                            bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()
    return results
