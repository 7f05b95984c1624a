"""The layout of the design card, and pyproject.toml / environment.yml listing the same packages."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# conda-forge names that differ from the PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_packages() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {_name(r) for r in data["project"]["dependencies"]}
    for extra in data["project"].get("optional-dependencies", {}).values():
        names |= {_name(r) for r in extra}
    return names


def _conda_packages() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    names = set()
    for item in env["dependencies"]:
        if isinstance(item, dict):
            names |= {_name(r) for r in item.get("pip", [])}
        else:
            name = _name(item)
            names.add(CONDA_TO_PYPI.get(name, name))
    return names - {"python", "pip"}


def test_environment_yml_matches_pyproject():
    pyproject, conda = _pyproject_packages(), _conda_packages()
    assert pyproject == conda, (
        f"only in pyproject.toml: {sorted(pyproject - conda)}; "
        f"only in environment.yml: {sorted(conda - pyproject)}"
    )


def test_design_card_layout():
    for path in ("book", "notebooks", "crossmod_lib", "data_manifest.yaml", "environment.yml",
                 "tests", "_config.yml", "pyproject.toml", "Makefile", "README.md", ".ci/run",
                 "book/_toc.yml"):
        assert (ROOT / path).exists(), path


def test_ci_calls_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make book" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_notebooks_are_jupytext_sources_with_parameters():
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert sources, "no numbered notebooks"
    for source in sources:
        text = source.read_text()
        assert "format_name: percent" in text, source
        assert '# %% tags=["parameters"' in text, f"{source.name}: no papermill parameters cell"


def test_toc_lists_every_notebook():
    toc = (ROOT / "book" / "_toc.yml").read_text()
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        assert f"book/_executed/{source.stem}" in toc, f"{source.stem} missing from book/_toc.yml"
