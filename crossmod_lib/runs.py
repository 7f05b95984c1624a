"""The run folder: the on-disk contract between the pipeline's stages.

Data flows one way through it (like nnU-Net's raw -> preprocessed -> results folders)::

    <run>/profile.yaml      the resolved settings the run was made with
    <run>/raw/              cohorts as they come (here: the phantom written to disk)
    <run>/prepared/         section 2.A: 2D slices, labels and head masks (.npz) + case tables
    <run>/synthetic/        section 2.C: synthetic MR per CT slice
    <run>/cleaned/          section 2.D: accepted, registered synthetic MR with CT labels
    <run>/model/            section 2.E: U-Net checkpoints
    <run>/predictions/      predicted MR label maps
    <run>/metrics/          section 2.G: metric tables
    <run>/figures/          figures as files
    <run>/notebooks/        the executed notebooks

Each stage reads the previous stage's folder and writes its own, so a notebook can be re-run alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .config import load_profile, save_profile
from .errors import CrossmodError

STAGE_FOLDERS = (
    "raw", "prepared", "synthetic", "cleaned", "model", "predictions", "metrics", "figures",
    "notebooks",
)


def project_root() -> Path:
    """The repository root (holds notebooks/, book/, _config.yml)."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "notebooks").is_dir():
        raise CrossmodError(
            f"{root}: no notebooks/ folder here; run crossmod from a clone of the repository "
            "(pip install -e .)"
        )
    return root


def default_run_dir(profile_name: str) -> Path:
    return Path(os.environ.get("CROSSMOD_RUNS", project_root() / "runs")) / profile_name


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run; ``RunFolder.open(profile, run_dir)`` also loads and snapshots the profile."""

    root: Path
    profile: dict

    @classmethod
    def open(cls, profile: str | Path | dict, run_dir: str | Path | None = None) -> RunFolder:
        settings = profile if isinstance(profile, dict) else load_profile(profile)
        root = Path(run_dir) if run_dir else default_run_dir(settings["name"])
        root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        save_profile(settings, root / "profile.yaml")
        return cls(root=root, profile=settings)

    def stage(self, name: str) -> Path:
        """The folder of one stage, created on first use."""
        if name not in STAGE_FOLDERS:
            raise ValueError(f"unknown stage folder {name!r}; one of {STAGE_FOLDERS}")
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def require(self, name: str, *files: str) -> Path:
        """The folder of an earlier stage, checking that it has been produced."""
        path = self.root / name
        missing = [f for f in files if not (path / f).exists()] if files else []
        if not path.is_dir() or missing:
            what = ", ".join(missing) if missing else "the folder"
            raise CrossmodError(
                f"{path}: stage output missing ({what}); run the earlier notebook first "
                f"(crossmod run --profile {self.profile['name']} --run-dir {self.root})"
            )
        return path


def git_commit(root: Path | None = None) -> str:
    """The commit of the code, with '+dirty' when the working tree has changes."""
    where = root or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def provenance(run: RunFolder | None = None) -> dict:
    """What produced a result: commit, date, machine, library versions, profile."""
    import importlib.metadata as md

    versions = {}
    for package in ("numpy", "scipy", "SimpleITK", "itk-elastix", "torch", "pandas", "matplotlib"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    from .timing import cpu_vector_features

    vector = cpu_vector_features()
    device = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
              + (f" ({vector})" if vector else ""))
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    info = {
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "versions": versions,
    }
    if run is not None:
        info["profile"] = run.profile["name"]
        info["run_dir"] = str(run.root)
    return info


def write_json(data, path: Path) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def provenance_markdown(run: RunFolder | None = None) -> str:
    """The provenance as a Markdown table, for the end of each chapter."""
    info = provenance(run)
    versions = ", ".join(f"{k} {v}" for k, v in info.pop("versions").items())
    rows = [("commit", info["commit"]), ("date (UTC)", info["date"]),
            ("profile", info.get("profile", "")), ("device", info["device"]),
            ("platform", info["platform"]), ("Python", info["python"]), ("libraries", versions)]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)
