"""Executing the numbered notebooks (papermill) and building the book (Jupyter Book 1.x).

The notebooks under ``notebooks/`` are Jupytext ``py:percent`` files; each has a cell tagged
``parameters`` holding ``profile`` and ``run_dir``. :func:`run_notebooks` converts each to a
notebook in memory, injects the parameters with papermill, executes it headlessly and keeps the
executed ``.ipynb`` in ``<run>/notebooks/``. :func:`build_book` copies those into
a staging folder with ``_config.yml`` and ``book/`` and runs ``jupyter-book build`` on it; the
HTML lands in ``_build/html/``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import timing
from .errors import CrossmodError
from .runs import RunFolder, git_commit, project_root

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


# The pipeline's stages in order: name -> (module whose run(run) does it, its notebook's number).
# Each reads only earlier stages' artefacts (crossmod_lib.runs.RunFolder names them all).
STAGES = {
    "preparation": ("preparation", 1),
    "cyclegan": ("cyclegan", 2),
    "cleaning": ("cleaning", 3),
    "segmentation": ("segmentation", 4),
    "evaluation": ("evaluation", 5),
    "contour_quality": ("contour_quality", 6),
    "timing": ("timing", 7),
}


def stage_order(names=None) -> list[str]:
    """The named stages (default: all) in pipeline order; an unknown name is a one-line error."""
    names = list(STAGES) if not names else list(names)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise CrossmodError(f"unknown stage {', '.join(map(repr, unknown))}; one of {', '.join(STAGES)}")
    return [n for n in STAGES if n in names]


def run_stages(run: RunFolder, names=None, log=print) -> dict[str, float]:
    """Run pipeline stages through the library alone, without the notebooks (all, or ``names``,
    always in pipeline order). Returns the wall seconds of each. The book is still built by
    executing the notebooks (:func:`run_notebooks`), which call the same functions."""
    import importlib

    seconds = {}
    for name in stage_order(names):
        module = importlib.import_module(f"crossmod_lib.{STAGES[name][0]}")
        log(f"[{name}] (profile {run.profile['name']}) ...")
        started = time.perf_counter()
        module.run(run)
        seconds[name] = time.perf_counter() - started
        log(f"[{name}] done in {seconds[name]:.1f} s")
    return seconds


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
    run.stage("notebooks")  # the executed notebooks and timings.json go here
    timing.read_timings(run)  # a damaged timings.json stops the run before any work, not after
    device = timing.device_info()
    commit = git_commit()  # the code these notebooks run (the kernel imports the same checkout)
    executed = []
    for number, source in available:
        target = run.executed_notebook(source.stem)
        notebook = jupytext.read(source)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                           "language": "python"}
        started_at = _dt.datetime.now(_dt.timezone.utc)
        started = time.perf_counter()
        log(f"[{number:02d}] {source.name} (profile {run.profile['name']}) ...")

        def record(status: str, error: str | None = None, stem=source.stem, number=number,
                   started_at=started_at, started=started) -> None:
            # notebooks/timings.json: wall time, start/end and device of each notebook (chapter 7)
            timing.record_notebook(run, stem, timing.notebook_entry(
                number, started_at, time.perf_counter() - started, status, device,
                run.profile["name"], error, commit))

        try:
            papermill.execute_notebook(
                notebook, str(target),
                parameters={"profile": run.profile["name"], "run_dir": str(run.root),
                            "profile_path": str(run.settings_file)},
                cwd=str(run.root), kernel_name="python3", progress_bar=False,
                report_mode=False, log_output=False,
            )
        except PapermillExecutionError as exc:
            message = (f"{source.name}: cell {exc.exec_count} failed: {exc.ename}: "
                       f"{exc.evalue.strip()} (executed partial notebook kept at {target})")
            record("failed", f"cell {exc.exec_count}: {exc.ename}")
            raise CrossmodError(message) from None
        except BaseException:
            record("interrupted")
            raise
        record("ok")
        log(f"[{number:02d}] done in {time.perf_counter() - started:.1f} s -> {target}")
        executed.append(target)
    return executed


def build_book(run: RunFolder, out_dir: str | Path | None = None, log=print,
               pdf: bool = True) -> Path:
    """Build the HTML book from the run's executed notebooks; returns ``<out>/_build/html/index.html``.

    ``out_dir`` defaults to the repository root, so the book opens at ``_build/html/index.html``.
    The book's sources (``_config.yml``, ``book/``) and the executed notebooks are staged in
    ``<out>/_build/source/`` (its ``book/_executed/`` holds the notebooks the table of contents
    names), so a build writes nothing into the sources and builds into different folders do not
    collide. With ``pdf`` (default), :func:`build_pdf` then makes ``<out>/_build/latex/crossmod.pdf``
    when LaTeX is installed, and says in one line that it skipped the PDF when it is not.
    """
    root = project_root()
    out_dir = Path(out_dir).resolve() if out_dir else root
    missing = [src.stem for _, src in notebooks(root)
               if not run.executed_notebook(src.stem).is_file()]
    if missing:
        raise CrossmodError(
            f"{run.executed_notebooks}: executed notebooks missing ({', '.join(missing)}); "
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
        shutil.copy2(run.executed_notebook(notebook.stem), executed_dir)
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book) if jupyter_book.exists() else "jupyter-book", "build",
               str(source), "--config", str(source / "_config.yml"),
               "--toc", str(source / "book" / "_toc.yml"), "--path-output", str(out_dir)]
    log(f"building the book into {out_dir} ...")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=source, capture_output=True, text=True, check=False)
    log_path = out_dir / "_build" / "jupyter-book.log"
    log_path.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        last = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["no output"]
        raise CrossmodError(f"jupyter-book build failed: {last[0]} (full log: {log_path})")
    index = out_dir / "_build" / "html" / "index.html"
    if not index.is_file():
        raise CrossmodError(f"jupyter-book build wrote no {index} (full log: {log_path})")
    log(f"book built in {time.perf_counter() - started:.1f} s -> {index}")
    if pdf:
        build_pdf(source, out_dir, log)
    return index


# ----------------------------------------------------------------------------------------------
# PDF (Jupyter Book's pdflatex builder) and screenshots (headless Chromium)


def latex_engine() -> str | None:
    """The LaTeX engine the PDF build would use: ``xelatex`` (handles the book's Unicode) or
    ``pdflatex``, when it, ``latexmk`` and ``make`` (Sphinx's LaTeX Makefile) are on PATH; else None."""
    if not (shutil.which("latexmk") and shutil.which("make")):
        return None
    for engine in ("xelatex", "pdflatex"):
        if shutil.which(engine):
            return engine
    return None


def _latex_package(name: str) -> bool:
    """Whether TeX finds ``name`` (``kpsewhich``); True when that cannot be asked."""
    if shutil.which("kpsewhich") is None:
        return True
    try:
        found = subprocess.run(["kpsewhich", name], capture_output=True, text=True, timeout=60,
                               check=False)
    except (OSError, subprocess.SubprocessError):
        return True
    return found.returncode == 0 and bool(found.stdout.strip())


def build_pdf(source: Path, out_dir: Path, log=print) -> Path | None:
    """The book as one PDF (``jupyter-book build --builder pdflatex``) from a staged source folder
    (see :func:`build_book`) into ``<out_dir>/_build/latex/``; returns the PDF's path.

    Optional: without LaTeX it logs one line and returns None; a failing LaTeX run is logged with
    the path of its log and returns None too (the HTML book is the product, the PDF a bonus).
    """
    import yaml

    engine = latex_engine()
    if engine is None:
        log("PDF skipped: no LaTeX on PATH (needs latexmk, make and xelatex or pdflatex)")
        return None
    config_path = Path(source) / "_config.yml"
    config = yaml.safe_load(config_path.read_text()) or {}
    config.setdefault("latex", {})["latex_engine"] = engine
    if not _latex_package("bbm.sty"):
        # Jupyter Book's LaTeX class needs bbm (TeX Live's fonts-extra); without it, Sphinx's own
        # class makes the same document with plainer styling
        config["latex"]["use_jupyterbook_latex"] = False
        log("PDF: no bbm.sty (texlive-fonts-extra), using Sphinx's LaTeX class")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    target = (config["latex"].get("latex_documents") or {}).get("targetname", "book.tex")
    jupyter_book = Path(sys.executable).parent / "jupyter-book"
    command = [str(jupyter_book) if jupyter_book.exists() else "jupyter-book", "build",
               str(source), "--builder", "pdflatex", "--config", str(config_path),
               "--toc", str(Path(source) / "book" / "_toc.yml"), "--path-output", str(out_dir)]
    log(f"building the PDF with {engine} ...")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=source, capture_output=True, text=True, check=False)
    log_path = Path(out_dir) / "_build" / "jupyter-book-pdf.log"
    log_path.write_text(result.stdout + result.stderr)
    pdf = Path(out_dir) / "_build" / "latex" / Path(target).with_suffix(".pdf").name
    if result.returncode != 0 or not pdf.is_file():
        log(f"PDF build failed (the HTML book is fine); full log: {log_path}")
        return None
    log(f"PDF built in {time.perf_counter() - started:.1f} s -> {pdf}")
    return pdf


#: Pages :func:`screenshot_pages` takes by default (relative to ``_build/html``).
SCREENSHOT_PAGES = ("index.html", "book/_executed/05_evaluation.html")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_REFRESH = re.compile(r"""<meta[^>]+http-equiv=["']?refresh["']?[^>]+content=["'][^"']*url=([^"'>]+)""",
                      re.IGNORECASE)


def chromium_binary() -> str | None:
    """The first headless-capable Chromium/Chrome on PATH, or None."""
    return next((found for found in map(shutil.which, CHROMIUM_NAMES) if found), None)


def _follow_redirect(page: Path) -> Path:
    """The page a meta-refresh page (Jupyter Book's ``index.html``) forwards to, if it exists."""
    match = _REFRESH.search(page.read_text(errors="replace")[:4000])
    if match:
        target = (page.parent / match.group(1).split("#")[0].strip()).resolve()
        if target.is_file():
            return target
    return page


def _trim_blank(png: Path, margin: int = 32, footer: int = 400) -> bool:
    """Collapse the blank stretch a tall window leaves below a page's content (a run of identical
    rows that ends at the bottom or just above a footer of at most ``footer`` px) to ``margin``
    rows. Returns False when there is none: the page may continue below the window."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    same = np.all(pixels[1:] == pixels[:-1], axis=(1, 2))  # row k+1 repeats row k
    # runs of repeated rows: [start, stop) in row indices
    edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
    starts, stops = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0] + 1
    tail = [(a, b) for a, b in zip(starts, stops) if b >= len(pixels) - footer and b - a > margin]
    if not tail:
        return False
    a, b = max(tail, key=lambda run: run[1] - run[0])
    kept = np.concatenate([pixels[: a + margin], pixels[b:]])
    tmp = png.with_name(f".{png.stem}.trim.png")
    Image.fromarray(kept).save(tmp)
    os.replace(tmp, png)
    return True


def screenshot_page(html: Path, png: Path, width: int = 1300, height: int = 24000,
                    timeout: int = 60, binary: str | None = None) -> dict:
    """A PNG of one HTML page by headless Chromium, ``width`` wide and as tall as its content:
    the window is ``height`` tall and the blank stretch below the content is cut out
    (:func:`_trim_blank`). Returns ``{"png", "complete"}``; ``complete`` is False when no blank
    stretch was found, i.e. the page may be longer than the window. One-line CrossmodError if
    Chromium is missing or fails."""
    import tempfile

    binary = binary or chromium_binary()
    if binary is None:
        raise CrossmodError(f"no Chromium on PATH ({', '.join(CHROMIUM_NAMES)}); install one "
                            "(e.g. apt-get install chromium) to take screenshots")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise CrossmodError(f"{html}: no such page to screenshot")
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = png.with_name(f".{png.stem}.tmp.png")
    with tempfile.TemporaryDirectory(prefix="crossmod-chromium-") as profile_dir:
        command = ["timeout", str(int(timeout)), binary, "--headless", "--no-sandbox",
                   "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update",
                   "--disable-sync", f"--user-data-dir={profile_dir}", "--hide-scrollbars",
                   f"--window-size={int(width)},{int(height)}", f"--screenshot={tmp_png}",
                   html.as_uri()]
        if shutil.which("timeout") is None:
            command = command[2:]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 15,
                                    check=False)
        except subprocess.TimeoutExpired:
            result = None
    if result is None or result.returncode != 0 or not tmp_png.is_file():
        tmp_png.unlink(missing_ok=True)
        why = "timed out" if result is None or result.returncode == 124 else \
            ((result.stderr or result.stdout).strip().splitlines() or [f"exit {result.returncode}"])[-1]
        raise CrossmodError(f"{html}: Chromium screenshot failed ({why[:160]})")
    os.replace(tmp_png, png)
    return {"png": png, "complete": _trim_blank(png)}


def screenshot_pages(html_dir: str | Path, pages=SCREENSHOT_PAGES, out_dir: str | Path | None = None,
                     width: int = 1300, height: int = 24000, log=print) -> list[dict]:
    """Screenshots of book pages (paths relative to ``html_dir``) into ``out_dir`` (default
    ``<html_dir>/../screenshots``), one PNG per page named after it (:func:`screenshot_page`).
    A page that forwards (the book's ``index.html``) is followed to its target. A missing page is
    skipped with a note. Returns one dict per page: page, png (None if skipped) and note."""
    html_dir = Path(html_dir)
    out_dir = Path(out_dir) if out_dir else html_dir.parent / "screenshots"
    binary = chromium_binary()
    if binary is None:
        raise CrossmodError(f"no Chromium on PATH ({', '.join(CHROMIUM_NAMES)}); install one "
                            "(e.g. apt-get install chromium) to take screenshots")
    results = []
    for page in pages:
        path = html_dir / page
        if not path.is_file():
            note = f"skipped: {path} does not exist (not built yet?)"
            log(f"screenshot {page}: {note}")
            results.append({"page": page, "png": None, "note": note})
            continue
        shown = _follow_redirect(path.resolve())
        png = out_dir / (re.sub(r"[^A-Za-z0-9]+", "_", str(Path(page).with_suffix(""))).strip("_") + ".png")
        shot = screenshot_page(shown, png, width=width, height=height, binary=binary)
        note = f"shows {os.path.relpath(shown, html_dir.resolve())}"
        if not shot["complete"]:
            note += f"; cut at {height} px (the page may be longer: raise the height)"
        log(f"screenshot {page} -> {png} ({note})")
        results.append({"page": page, "png": png, "note": note})
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m crossmod_lib.pipeline screenshots [--html DIR] [--out DIR] [PAGE ...]``
    (``make screenshots``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crossmod_lib.pipeline")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("screenshots", help="PNGs of built book pages with headless Chromium")
    p.add_argument("pages", nargs="*", default=list(SCREENSHOT_PAGES),
                   help=f"pages relative to --html (default: {' '.join(SCREENSHOT_PAGES)})")
    p.add_argument("--html", type=Path, default=Path("_build/html"), help="the built HTML book")
    p.add_argument("--out", type=Path, default=Path("_build/screenshots"), help="PNG folder")
    p.add_argument("--width", type=int, default=1300)
    args = parser.parse_args(argv)
    try:
        if not (args.html / "index.html").is_file():
            raise CrossmodError(f"{args.html}: no built book here (index.html missing); "
                                "run make book first")
        screenshot_pages(args.html, args.pages, args.out, width=args.width)
    except CrossmodError as exc:
        print(f"crossmod: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
