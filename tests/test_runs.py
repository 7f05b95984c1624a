"""The run folder's contract: every artefact named once, in runs.py, with the stage that writes it."""

import re
from pathlib import Path

import pytest

from crossmod_lib import pipeline, runs
from crossmod_lib.errors import CrossmodError
from crossmod_lib.runs import Artefact, Figures, RunFolder, TrainingFiles

REPO = Path(__file__).resolve().parents[1]
WRITERS = set(pipeline.STAGES) | {"runs", "review", "contour_review", "pipeline", "record",
                                  "convergence", "bench"}


def _run(tmp_path) -> RunFolder:
    return RunFolder(root=tmp_path, profile={"name": "test"})


def test_artefacts_are_unique_and_live_in_stage_folders():
    artefacts = RunFolder.artefacts()
    assert len(artefacts) > 30
    paths = [a.relpath for a in artefacts.values()]
    assert len(paths) == len(set(paths)), "two artefacts share a path"
    for name, artefact in artefacts.items():
        assert artefact.folder in runs.STAGE_FOLDERS + ("",), name
        assert artefact.writer in WRITERS, (name, artefact.writer)
        assert artefact.what, name


def test_artefact_paths_on_a_run_and_on_any_folder(tmp_path):
    run = _run(tmp_path)
    assert run.ct_slices == tmp_path / "prepared" / "ct_slices.npz"
    assert isinstance(RunFolder.ct_slices, Artefact)
    assert RunFolder.decisions.at("/elsewhere") == Path("/elsewhere/cleaned/decisions.csv")
    assert RunFolder.elastix_rigid.in_folder == "elastix/rigid.txt"
    assert RunFolder.prepared("MR") == (RunFolder.mr_slices, RunFolder.mr_cases)
    assert RunFolder.table_2("raw") is RunFolder.table_2_raw
    assert run.model_dir("ct_only") == tmp_path / "model" / "ct_only"
    assert run.executed_notebook("01_x") == tmp_path / "notebooks" / "01_x.ipynb"


def test_output_creates_the_folder_and_inputs_checks_existence(tmp_path):
    run = _run(tmp_path)
    path = run.output("decisions")
    assert path.parent.is_dir() and not path.exists()
    with pytest.raises(CrossmodError, match=r"decisions.csv: stage output missing .*cleaning stage"):
        run.inputs("decisions")
    path.write_text("x")
    run.ct_slices.parent.mkdir(parents=True)
    run.ct_slices.write_text("y")
    assert run.inputs("decisions") == path
    assert run.inputs("decisions", "ct_slices") == (path, run.ct_slices)
    assert run.figure(Figures.BOXPLOTS).parent.is_dir()


def test_model_recipes_name_the_artefacts_they_train_on(tmp_path):
    from crossmod_lib import config, segmentation

    profile = config.load_profile("smoke")
    recipes = segmentation.model_recipes(profile)
    artefacts = RunFolder.artefacts()
    assert {r["data"] for r in recipes} - {None} <= set(artefacts)
    assert {r["name"]: r["data"] for r in recipes}["cross_modality"] == "training_slices"
    run = RunFolder(root=tmp_path, profile=profile)
    with pytest.raises(CrossmodError, match=r"training_slices.npz: stage output missing .*cleaning stage"):
        segmentation.train_run(run, kinds=["cross_modality"])


def _names():
    """Every file name runs.py gives: artefacts, training-folder files and figures."""
    names = {a.name for a in RunFolder.artefacts().values() if "." in a.name}
    names |= {v for k, v in vars(TrainingFiles).items() if k.isupper()}
    names |= {v for k, v in vars(Figures).items() if k.isupper()}
    names |= {v for k, v in vars(runs.RawFiles).items() if k.isupper()}
    return names


def test_no_artefact_name_is_written_outside_runs_py():
    # A file name typed again elsewhere would let two stages disagree about the contract.
    names = _names()
    pattern = re.compile(r"""["']([^"'\s]*?)["']""")
    offenders = []
    sources = [p for p in (REPO / "crossmod_lib").glob("*.py") if p.name != "runs.py"]
    sources += list((REPO / "notebooks").glob("*.py"))
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for literal in pattern.findall(code):
                if literal.rsplit("/", 1)[-1] in names:
                    offenders.append(f"{path.name}:{number}: {literal}")
    assert not offenders, "\n".join(offenders)


def test_pipeline_stages_each_have_a_run():
    import importlib

    for name, (module, number) in pipeline.STAGES.items():
        assert callable(getattr(importlib.import_module(f"crossmod_lib.{module}"), "run")), name
    assert [n for _, n in pipeline.STAGES.values()] == sorted(n for _, n in pipeline.STAGES.values())
    assert pipeline.stage_order(["timing", "preparation"]) == ["preparation", "timing"]
    with pytest.raises(CrossmodError, match="unknown stage 'x'"):
        pipeline.stage_order(["x"])
