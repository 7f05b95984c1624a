"""Papermill execution of notebooks: parameters reach the notebook, failures are one line."""

import json

import pytest

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
