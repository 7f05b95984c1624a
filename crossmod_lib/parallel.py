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


def _isolated_worker(conn, function: Callable, on_error: Callable, initializer: Callable | None) -> None:
    if initializer is not None:
        initializer()
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        try:
            result = function(task)
        except Exception as exc:  # noqa: BLE001 - reported for this task, never fatal
            result = on_error(task, exc)
        conn.send(result)


def run_isolated(function: Callable, tasks: list, workers: int, timeout_s: float, *,
                 key: Callable, on_error: Callable, on_lost: Callable, initializer: Callable | None = None,
                 progress: bool = False, desc: str = "tasks") -> dict:
    """``{key(t): function(t)}`` over ``workers`` processes, each task isolated from the others.

    Unlike :func:`run_tasks`, a task may crash its process or hang: each worker is fed one task at
    a time, so when a worker dies or exceeds ``timeout_s`` on a task, that task's result is
    ``on_lost(task, why)`` (why: "worker process crashed (exit code N)" or "timed out after T s")
    and a fresh worker takes the rest. An exception inside ``function`` gives ``on_error(task, exc)``.
    ``function`` returns ``(key, result)``; results do not depend on ``workers``. Workers are forked
    where the platform can (they inherit loaded libraries: itk takes seconds to load), after
    ``initializer`` runs in each.
    """
    import multiprocessing as mp
    import time
    from multiprocessing.connection import wait

    from tqdm.auto import tqdm

    results: dict = {}
    if not tasks:
        return results
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    pending = list(reversed(tasks))
    workers = max(1, min(int(workers), len(tasks)))
    slots: list[dict] = []

    def start_worker():
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_isolated_worker, args=(child, function, on_error, initializer), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "task": None, "since": 0.0}

    def feed(slot):
        if pending:
            task = pending.pop()
            slot["task"], slot["since"] = task, time.monotonic()
            slot["conn"].send(task)
        else:
            slot["task"] = None

    def stop(slot, kill=False):
        try:
            if kill:
                slot["proc"].kill()
            else:
                slot["conn"].send(None)
        except (OSError, BrokenPipeError):
            pass
        slot["proc"].join(timeout=5)
        if slot["proc"].is_alive():
            slot["proc"].kill()
            slot["proc"].join()
        slot["conn"].close()

    bar = tqdm(total=len(tasks), desc=desc, disable=not progress)
    try:
        for _ in range(workers):
            slot = start_worker()
            slots.append(slot)
            feed(slot)
        while any(slot["task"] is not None for slot in slots):
            busy = [slot for slot in slots if slot["task"] is not None]
            ready = wait([x["conn"] for x in busy] + [x["proc"].sentinel for x in busy], timeout=1.0)
            now = time.monotonic()
            for k, slot in enumerate(slots):
                if slot["task"] is None:
                    continue
                task = slot["task"]
                if slot["conn"] in ready or slot["conn"].poll():
                    try:
                        got_key, result = slot["conn"].recv()
                    except (EOFError, OSError):
                        got_key = None
                    if got_key == key(task):
                        results[got_key] = result
                        bar.update(1)
                        feed(slot)
                        continue
                if not slot["proc"].is_alive():
                    results[key(task)] = on_lost(task, f"worker process crashed (exit code {slot['proc'].exitcode})")
                elif now - slot["since"] > timeout_s:
                    results[key(task)] = on_lost(task, f"timed out after {timeout_s:g} s")
                else:
                    continue
                bar.update(1)
                stop(slot, kill=True)
                slots[k] = start_worker()
                feed(slots[k])
    finally:
        bar.close()
        for slot in slots:
            stop(slot)
    return results
