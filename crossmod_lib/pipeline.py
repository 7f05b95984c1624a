"""Executing the numbered notebooks (papermill) and building the book (Jupyter Book 1.x).

The notebooks under ``notebooks/`` are Jupytext ``py:percent`` files; each has a cell tagged
``parameters`` holding ``profile`` and ``run_dir``. :func:`run_notebooks` converts each to a
notebook in memory, injects the parameters with papermill, executes it headlessly and keeps the
executed ``.ipynb`` in ``<run>/notebooks/``. :func:`build_book` copies those into
a staging folder with ``_config.yml`` and ``book/`` and runs ``jupyter-book build`` on it; the
HTML lands in ``_build/html/``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import CrossmodError
from .runs import RunFolder, project_root

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[a-z0-9_]+\.py$")


def notebooks(root: Path | None = None) -> list[tuple[int, Path]]:
    """The numbered notebook sources, as (stage number, path), in order."""
    folder = (root or project_root()) / "notebooks"
    found = []
    for path in sorted(folder.glob("*.py")):
        match = NOTEBOOK_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def _kernel_environment() -> None:
    # The "python3" kernel spec launches `python` from PATH; put this interpreter's folder first so
    # the notebooks run in the same environment as crossmod itself (e.g. the project's .venv).
    os.environ["CROSSMOD_HEADLESS"] = "1"  # no live front end: widgets degrade to static figures
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def run_notebooks(run: RunFolder, stages: list[int] | None = None, log=print,
                  source_root: Path | None = None) -> list[Path]:
    """Execute the numbered notebooks (all, or the given stage numbers) into the run folder.

    A failing cell stops the run with a one-line error naming the notebook and the cell; the
    executed partial notebook is kept in ``<run>/notebooks/`` for inspection.
    """
    import jupytext
    import papermill
    from papermill.exceptions import PapermillExecutionError

    available = notebooks(source_root)
    if stages:
        unknown = sorted(set(stages) - {n for n, _ in available})
        if unknown:
            raise CrossmodError(
                f"no notebook for stage(s) {unknown}; available: {[n for n, _ in available]}"
            )
        available = [(n, p) for n, p in available if n in stages]
    _kernel_environment()
    out_dir = run.stage("notebooks")
    executed = []
    for number, source in available:
        target = out_dir / f"{source.stem}.ipynb"
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                           "language": "python"}
        started = time.perf_counter()
        log(f"[{number:02d}] {source.name} (profile {run.profile['name']}) ...")
        try:
            papermill.execute_notebook(
                notebook, str(target),
                parameters={"profile": run.profile["name"], "run_dir": str(run.root),
                            "profile_path": str(run.root / "profile.yaml")},
                cwd=str(run.root), kernel_name="python3", progress_bar=False,
                report_mode=False, log_output=False,
            )
        except PapermillExecutionError as exc:
            raise CrossmodError(
                f"{source.name}: cell {exc.exec_count} failed: {exc.ename}: {exc.evalue.strip()} "
                f"(executed partial notebook kept at {target})"
            ) from None
        log(f"[{number:02d}] done in {time.perf_counter() - started:.1f} s -> {target}")
        executed.append(target)
    return executed


def build_book(run: RunFolder, out_dir: str | Path | None = None, log=print) -> Path:
    """Build the HTML book from the run's executed notebooks; returns ``<out>/_build/html/index.html``.

    ``out_dir`` defaults to the repository root, so the book opens at ``_build/html/index.html``.
    The book's sources (``_config.yml``, ``book/``) and the executed notebooks are staged in
    ``<out>/_build/source/`` (its ``book/_executed/`` holds the notebooks the table of contents
    names), so a build writes nothing into the sources and builds into different folders do not
    collide.
    """
    root = project_root()
    out_dir = Path(out_dir).resolve() if out_dir else root
    missing = [src.stem for _, src in notebooks(root)
               if not (run.root / "notebooks" / f"{src.stem}.ipynb").is_file()]
    if missing:
        raise CrossmodError(
            f"{run.root / 'notebooks'}: executed notebooks missing ({', '.join(missing)}); "
            f"run them first (crossmod run --profile {run.profile['name']})"
        )
    source = out_dir / "_build" / "source"
    if source.exists():
        shutil.rmtree(source)
    shutil.copytree(root / "book", source / "book",
                    ignore=shutil.ignore_patterns("_executed", "_build"))
    shutil.copy2(root / "_config.yml", source / "_config.yml")
    executed_dir = source / "book" / "_executed"
    executed_dir.mkdir(parents=True)
    for _, notebook in notebooks(root):
        shutil.copy2(run.root / "notebooks" / f"{notebook.stem}.ipynb", executed_dir)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book) if jupyter_book.exists() else "jupyter-book", "build",
               str(source), "--config", str(source / "_config.yml"),
               "--toc", str(source / "book" / "_toc.yml"), "--path-output", str(out_dir)]
    log(f"building the book into {out_dir} ...")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=source, capture_output=True, text=True)
    log_path = out_dir / "_build" / "jupyter-book.log"
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        raise CrossmodError(f"jupyter-book build failed: {last[0]} (full log: {log_path})")
    index = out_dir / "_build" / "html" / "index.html"
    if not index.is_file():
        raise CrossmodError(f"jupyter-book build wrote no {index} (full log: {log_path})")
    log(f"book built in {time.perf_counter() - started:.1f} s -> {index}")
    return index
