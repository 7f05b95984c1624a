"""Papermill execution of notebooks: parameters reach the notebook, failures are one line."""

import json
import shutil

import numpy as np
import pytest

from crossmod_lib import pipeline
from crossmod_lib.errors import CrossmodError
from crossmod_lib.pipeline import notebooks, run_notebooks
from crossmod_lib.runs import RunFolder

HEADER = """# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% tags=["parameters"]
profile = "unset"
run_dir = ""
profile_path = ""

"""


@pytest.fixture
def sources(tmp_path):
    folder = tmp_path / "project" / "notebooks"
    folder.mkdir(parents=True)
    (folder / "01_ok.py").write_text(HEADER + """# %%
import json, pathlib
pathlib.Path(run_dir, "seen.json").write_text(json.dumps({"profile": profile, "run_dir": run_dir}))
""")
    (folder / "02_fails.py").write_text(HEADER + """# %%
x = 1

# %%
raise ValueError("boom in the second cell")
""")
    (folder / "README.py").write_text("# not a numbered notebook\n")
    return folder.parent


def test_notebooks_are_found_in_order(sources):
    assert [(n, p.name) for n, p in notebooks(sources)] == [(1, "01_ok.py"), (2, "02_fails.py")]


def test_parameters_reach_the_notebook(sources, tmp_path):
    run = RunFolder.open("smoke", tmp_path / "run")
    executed = run_notebooks(run, [1], log=lambda *_: None, source_root=sources)
    assert executed == [run.root / "notebooks" / "01_ok.ipynb"]
    seen = json.loads((run.root / "seen.json").read_text())
    assert seen == {"profile": "smoke", "run_dir": str(run.root)}
    assert (run.root / "profile.yaml").is_file()


def test_failure_names_notebook_and_cell_and_keeps_partial(sources, tmp_path):
    run = RunFolder.open("smoke", tmp_path / "run")
    with pytest.raises(CrossmodError) as info:
        run_notebooks(run, [2], log=lambda *_: None, source_root=sources)
    message = str(info.value)
    assert "02_fails.py: cell" in message and "ValueError: boom in the second cell" in message
    assert "\n" not in message
    assert (run.root / "notebooks" / "02_fails.ipynb").is_file()


def test_run_records_each_notebooks_time(sources, tmp_path):
    run = RunFolder.open("smoke", tmp_path / "run")
    run_notebooks(run, [1], log=lambda *_: None, source_root=sources)
    with pytest.raises(CrossmodError) as info:
        run_notebooks(run, [2], log=lambda *_: None, source_root=sources)
    cell = str(info.value).split(": cell ", 1)[1].split(" failed", 1)[0]
    record = json.loads((run.root / "notebooks" / "timings.json").read_text())["notebooks"]
    assert set(record) == {"01_ok", "02_fails"}  # the second call kept the first one's entry
    ok, failed = record["01_ok"], record["02_fails"]
    assert ok["status"] == "ok" and ok["stage"] == 1 and ok["profile"] == "smoke"
    assert 0 < ok["seconds"] < 600 and ok["started"] <= ok["ended"]
    assert ok["device"]["cpu_cores"] >= 1 and "gpu" in ok["device"]
    assert failed["status"] == "failed" and failed["error"] == f"cell {cell}: ValueError"


def _tiny_page(folder):
    """A page with a heading, a table and a red block, and an index.html forwarding to it."""
    (folder / "book").mkdir(parents=True)
    (folder / "book" / "page.html").write_text(
        "<html><body style='background:#ffffff;margin:20px'><h1>Table II</h1>"
        "<table border='1'><tr><th>method</th><th>DSC</th></tr><tr><td>cross-modality</td>"
        "<td>0.77</td></tr></table><div style='width:500px;height:400px;background:#d62728'>"
        "</div></body></html>")
    (folder / "index.html").write_text(
        '<!DOCTYPE html><html><head><meta http-equiv="Refresh" content="0; url=book/page.html" />'
        "</head></html>")


@pytest.mark.skipif(pipeline.chromium_binary() is None, reason="no Chromium on PATH")
def test_screenshots_of_book_pages(tmp_path):
    from PIL import Image

    html = tmp_path / "html"
    _tiny_page(html)
    notes = []
    results = pipeline.screenshot_pages(html, ["index.html", "book/missing.html"], tmp_path / "shots",
                                        width=900, height=3000, log=notes.append)
    assert results[1]["png"] is None and "does not exist" in results[1]["note"]
    png = results[0]["png"]
    assert png == tmp_path / "shots" / "index.png" and results[0]["note"] == "shows book/page.html"
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=int)
    assert pixels.shape[1] == 900
    assert 400 < pixels.shape[0] < 3000  # the blank part of the 3000 px window was cropped
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    dark = pixels.sum(axis=2) < 200  # the text of the heading and the table
    assert red.sum() > 0.8 * 500 * 400, "the forwarded page was rendered (red block)"
    assert dark.sum() > 100, "text rendered"
    assert len(notes) == 2 and not list((tmp_path / "shots").glob(".*"))


def test_screenshot_of_a_missing_page_is_one_line(tmp_path):
    with pytest.raises(CrossmodError) as info:
        pipeline.screenshot_page(tmp_path / "absent.html", tmp_path / "x.png", binary="chromium")
    assert "absent.html" in str(info.value) and "\n" not in str(info.value)


def test_pdf_is_skipped_cleanly_without_latex(tmp_path, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(pipeline.shutil, "which", lambda name, *a, **k: None
                        if name in ("latexmk", "xelatex", "pdflatex") else real_which(name, *a, **k))
    assert pipeline.latex_engine() is None
    lines = []
    assert pipeline.build_pdf(tmp_path / "source", tmp_path, log=lines.append) is None
    assert len(lines) == 1 and lines[0].startswith("PDF skipped: no LaTeX")
    assert not (tmp_path / "_build").exists()


@pytest.mark.skipif(pipeline.latex_engine() is None, reason="no LaTeX (latexmk, make, xelatex/pdflatex)")
def test_pdf_of_a_tiny_book(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "_config.yml").write_text(
        "title: A tiny book\nauthor: crossmod tests\nlatex:\n  latex_documents:\n"
        "    targetname: tiny.tex\n")
    (source / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (source / "intro.md").write_text("# Tiny book\n\nDSC 0.77 ± 0.07.\n\n| method | DSC |\n"
                                     "|---|---|\n| cross-modality | 0.77 |\n")
    # build_pdf expects the staged layout of build_book: book/_toc.yml beside _config.yml
    (source / "book").mkdir()
    (source / "book" / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    lines = []
    pdf = pipeline.build_pdf(source, tmp_path / "out", log=lines.append)
    assert pdf == tmp_path / "out" / "_build" / "latex" / "tiny.pdf", lines
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    assert lines[-1].startswith("PDF built in")
