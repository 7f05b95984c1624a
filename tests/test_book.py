"""End to end: the smoke profile's notebooks run with papermill and the HTML book builds."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmod_lib.preparation import load_slices

pytestmark = pytest.mark.book


@pytest.fixture(scope="module")
def smoke_book(tmp_path_factory):
    crossmod = Path(sys.executable).parent / "crossmod"
    if not crossmod.exists():
        pytest.skip(f"crossmod script not installed beside {sys.executable} (pip install -e .)")
    base = tmp_path_factory.mktemp("smoke")
    run_dir, out = base / "run", base / "book"
    result = subprocess.run(
        [str(crossmod), "book", "--profile", "smoke", "--run-dir", str(run_dir), "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir, out / "_build" / "html", crossmod


def test_book_opens_at_index_with_intro(smoke_book):
    _, html, _ = smoke_book
    index = (html / "index.html").read_text()
    assert 'url=book/intro.html' in index  # Jupyter Book's start page forwards to the root file
    intro = (html / "book" / "intro.html").read_text()
    assert "Contouring MR from annotated CT only" in intro
    assert "What the phantom is not" in intro
    assert "_executed/01_data_preparation.html" in intro  # chapter 1 linked from the start page


def test_chapter_1_holds_table_i_and_figures(smoke_book):
    _, html, _ = smoke_book
    chapter = (html / "book" / "_executed" / "01_data_preparation.html").read_text()
    assert "<table" in chapter
    for row in ("FOV [#pixels]", "Voxel size", "TE [ms]", "TR [ms]", "Field strength"):
        assert row in chapter, row
    assert "0.98×0.98×2.5" in chapter and "0.5×0.5×4" in chapter  # computed from the headers
    assert "Interobserver" in chapter and "paper (real MR)" in chapter
    images = [line for line in chapter.split("<img")[1:] if ".png" in line.split(">")[0]]
    assert len(images) >= 4, "Fig. 1, two slice galleries and the histograms"
    for tag in images:
        src = tag.split('src="', 1)[1].split('"', 1)[0]
        assert (html / "book" / "_executed" / src).resolve().is_file(), src
    assert "Provenance" in chapter and "commit" in chapter


def test_run_folder_holds_the_prepared_slices(smoke_book):
    run_dir, _, _ = smoke_book
    for path in ("profile.yaml", "raw/phantom/phantom.json", "prepared/ct_slices.npz",
                 "prepared/mr_slices.npz", "prepared/ct_cases.csv", "metrics/table_1.csv",
                 "metrics/interobserver_mr.csv", "figures/fig1_views.png",
                 "notebooks/01_data_preparation.ipynb"):
        assert (run_dir / path).is_file(), path
    ct = load_slices(run_dir / "prepared" / "ct_slices.npz")
    assert ct["image"].shape[1:] == (64, 64) and ct["image"].dtype == np.uint8
    assert set(np.unique(ct["labels"])) <= {0, 1, 2} and (ct["labels"] > 0).any()


def test_a_notebook_reruns_alone(smoke_book):
    run_dir, _, crossmod = smoke_book
    before = (run_dir / "raw" / "phantom" / "phantom.json").stat().st_mtime
    result = subprocess.run([str(crossmod), "run", "--profile", "smoke", "--run-dir", str(run_dir),
                             "--stage", "1"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    # the raw phantom is reused, not regenerated
    assert (run_dir / "raw" / "phantom" / "phantom.json").stat().st_mtime == before


def test_real_data_section(smoke_book):
    from crossmod_lib.datasets import data_root
    from crossmod_lib.errors import CrossmodError

    run_dir, html, _ = smoke_book
    chapter = (html / "book" / "_executed" / "01_data_preparation.html").read_text()
    try:
        root = data_root()
    except CrossmodError:
        root = None
    if root is None or not (root / "deepmind-tcia-hn").is_dir():
        assert "section skipped" in chapter
        pytest.skip("no DeepMind data under the data root: the section is skipped, as checked")
    assert "oncologist vs radiographer" in chapter
    assert "not the paper’s MR observers" in chapter or "not the paper's MR observers" in chapter
    table = (run_dir / "metrics" / "interobserver_deepmind.csv").read_text().splitlines()
    assert len(table) == 1 + 2 * 31  # header + 31 scans x 2 glands
    if (root / "openkbp").is_dir():
        assert (run_dir / "figures" / "fig1_openkbp.png").is_file()
        assert "OpenKBP CT (first" in chapter


@pytest.mark.parametrize("chapter, needles", [
    ("02_cyclegan", ("geometric", "synthetic MR", "without geometric loss")),
    ("03_cleaning", ("Fig. 6", "decisions", "kept")),
    ("04_segmentation", ("Fig. 5", "Cross-modality", "MR oracle", "s per patient", "manual contour in blue")),
    ("05_evaluation", ("Table II", "Fig. 8", "Fig. 7", "Wilcoxon", "paper")),
    ("06_contour_quality", ("Fig. 9", "training slices")),
    ("07_computation_time", ("V100", "72 h")),
    ("08_review", ("review",)),
    ("09_recorded_runs", ("Recorded runs", "sha256", "not by the run that built this book")),
])
def test_later_chapters_render_with_figures(smoke_book, chapter, needles):
    _, html, _ = smoke_book
    page = (html / "book" / "_executed" / f"{chapter}.html").read_text()
    for needle in needles:
        assert needle in page, needle
    assert "<img" in page and "Traceback" not in page


def test_run_folder_holds_later_stages(smoke_book):
    run_dir, _, _ = smoke_book
    for path in ("synthetic/synthetic_mr.npz", "synthetic/cyclegan/checkpoint.pt",
                 "synthetic/cyclegan/losses.csv", "metrics/cyclegan_ablation.csv",
                 "cleaned/decisions.csv", "cleaned/training_slices.npz", "cleaned/elastix/bspline.txt",
                 "model/cross_modality/best.pt", "model/naive/best.pt", "predictions/index.csv",
                 "figures/fig_unet_examples.png", "figures/fig7_contours.png",
                 "figures/fig8_boxplots.png", "figures/fig9_contour_defects.png",
                 "metrics/segmentation.csv", "metrics/table_2_lcc.csv",
                 "metrics/segmentation_tests.csv", "metrics/contour_quality_glands.csv",
                 "notebooks/timings.json"):
        assert (run_dir / path).is_file(), path
    synthetic = np.load(run_dir / "synthetic" / "synthetic_mr.npz")
    ct = load_slices(run_dir / "prepared" / "ct_slices.npz")
    assert synthetic["image"].shape == ct["image"].shape


def test_library_pipeline_matches_the_notebooks(smoke_book, tmp_path):
    # The notebooks only call the stages' run(); run through the library alone, without papermill,
    # the same profile and seed give the same Table II.
    run_dir, _, crossmod = smoke_book
    result = subprocess.run(
        [str(crossmod), "pipeline", "--profile", "smoke", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for table in ("metrics/table_2_lcc.csv", "metrics/table_2_raw.csv", "metrics/cyclegan_ablation.csv"):
        assert (tmp_path / "run" / table).read_text() == (run_dir / table).read_text(), table
    assert (tmp_path / "run" / "metrics" / "computation_steps.csv").is_file()
    assert not (tmp_path / "run" / "notebooks").exists()
