"""Recorded runs: the results of a run made elsewhere (a GPU session, a long CPU run), kept with
their provenance so the book can show them, labelled as recorded.

A run folder is large (images, models, slices) and lives outside git. ``record_run`` copies
what a reader needs to see the run's results (the metric tables, the cleaning summary, the
timings, the profile and a few figures) into a small folder, normally ``recorded/<profile>/`` in
the repository, with ``record.json``: where and when each chapter ran (commit, date, device, read
from the executed notebooks' own provenance tables), when it was recorded, and the sha256 of
every file. ``read_record`` checks those hashes, so a recorded table cannot be edited by hand
without the book refusing it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import CrossmodError
from .io import staged_folder
from .runs import Figures, RunFolder, provenance

FORMAT = "crossmod-record-1"

# What a record holds, relative to the run folder. Metric tables and JSON summaries are small;
# the figures are the ones the recorded-runs chapter shows (paper Figs 6-8 and the synthesis).
RECORDED_GLOBS = (RunFolder.settings_file.relpath, "metrics/*.csv", "metrics/*.json",
                  RunFolder.cleaning_summary.relpath, RunFolder.synthesis.relpath,
                  RunFolder.cyclegan_summary.relpath, RunFolder.timings.relpath)
RECORDED_FIGURES = (Figures.CYCLEGAN_EXAMPLES, Figures.CLEANING_EXAMPLES, Figures.CLEANING_BY_POSITION,
                    Figures.BOXPLOTS, Figures.CONTOURS, Figures.COMPUTATION_TIME)
MAX_BYTES = 8 * 1024 * 1024  # a record is committed to git: refuse anything bigger


STUDY_RUNS = RunFolder.convergence_runs.relpath  # crossmod_lib.convergence: one entry per study point


def study_provenance(path: Path, entries: str = "points") -> dict:
    """Per study point (``seed<S>/budget<B>``, or per run ``<variant>/seed<S>`` of a U-Net seed
    study: ``entries="runs"``): the commit, date and device it ran on and its wall seconds, from
    a study's runs JSON; the "chapters" of a study's record."""
    try:
        points = json.loads(Path(path).read_text()).get(entries, {})
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: unreadable study record ({exc})") from None
    out = {}
    for key, point in sorted(points.items()):
        device = point.get("device", {})
        if isinstance(device, dict):
            device = f"{device.get('cpu', '?')}, {device.get('cpu_cores_usable', '?')} CPU cores" + (
                f" ({device['cpu_vector']})" if device.get("cpu_vector") else "") + (
                f", {device['gpu']}" if device.get("gpu") else "")
        seconds = point.get("seconds", {})
        if isinstance(seconds, dict):  # a point's stages (the CycleGAN's total includes the trunk's)
            seconds = sum(v for k, v in seconds.items() if k != "cyclegan_total")
        out[key] = {"commit": point.get("commit", "not recorded"), "date": point.get("date", ""),
                    "device": device, "seconds": seconds}
    return out


def default_folder() -> Path:
    """``recorded/`` at the top of the repository."""
    return Path(__file__).resolve().parents[1] / "recorded"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_ROW = re.compile(r"^\|\s*(commit|date \(UTC\)|device|profile)\s*\|\s*(.*?)\s*\|\s*$", re.MULTILINE)


def notebook_provenance(ipynb: str | Path) -> dict:
    """Commit, date, device and profile from an executed chapter's provenance table (its last
    Markdown output with a ``commit`` row); an empty dict when the notebook has none. Used for runs
    made before ``notebooks/timings.json`` kept each notebook's commit (:func:`record_run` prefers
    that)."""
    try:
        notebook = json.loads(Path(ipynb).read_text())
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{ipynb}: not a readable notebook ({exc})") from None
    found: dict = {}
    for cell in notebook.get("cells", []):
        for output in cell.get("outputs", []):
            text = output.get("data", {}).get("text/markdown")
            if not text:
                continue
            rows = dict(_ROW.findall("".join(text) if isinstance(text, list) else text))
            if "commit" in rows:
                found = {"commit": rows["commit"], "date": rows.get("date (UTC)", ""),
                         "device": rows.get("device", ""), "profile": rows.get("profile", "")}
    return found


def record_run(run_dir: str | Path, out_dir: str | Path, figures=RECORDED_FIGURES,
               note: str = "") -> dict:
    """Copy a finished run's results into ``out_dir`` (replaced atomically) with ``record.json``.

    ``note``: the recorder's words on what the run was (shown with it, never mixed into its files).

    The run must have its executed notebooks and Table II (chapter 5); a chapter whose notebook
    lacks a provenance table is recorded with an empty provenance, never a guessed one.
    """
    run_dir, out_dir = Path(run_dir).absolute(), Path(out_dir).absolute()
    study, unet_seeds = run_dir / STUDY_RUNS, RunFolder.unet_seeds_runs.at(run_dir)
    kind = "study" if study.is_file() else "unet-seeds" if unet_seeds.is_file() else "run"
    if kind != "run":
        # A study folder (crossmod study convergence / unet-seeds): no notebooks; each point's or
        # run's provenance is in the study's own JSON, written by the library as it finished.
        if not RunFolder.settings_file.at(run_dir).is_file():
            raise CrossmodError(f"{run_dir}: no {RunFolder.settings_file.relpath}; not a study folder")
        study, entries = (study, "points") if kind == "study" else (unet_seeds, "runs")
        chapters = study_provenance(study, entries)
        if not chapters:
            raise CrossmodError(f"{study}: no finished study point to record")
    else:
        for needed in (RunFolder.settings_file.relpath, RunFolder.table_2_lcc.relpath):
            if not (run_dir / needed).is_file():
                raise CrossmodError(f"{run_dir}: no {needed}; record a run that finished chapter 5")
        notebooks_dir = RunFolder.timings.at(run_dir).parent
        chapters = {p.stem: notebook_provenance(p)
                    for p in sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb"))}
        if not chapters:
            raise CrossmodError(f"{notebooks_dir}: no executed notebooks")
        timings = {}
        if RunFolder.timings.at(run_dir).is_file():
            timings = json.loads(RunFolder.timings.at(run_dir).read_text()).get("notebooks", {})
        for stem, info in chapters.items():
            entry = timings.get(stem)
            if entry is None:
                continue
            info["seconds"] = entry.get("seconds")
            if entry.get("commit"):  # written by the library as the notebook ran (crossmod run)
                from .timing import describe_device

                info.update(commit=entry["commit"], date=entry.get("started", ""),
                            device=describe_device(entry.get("device")),
                            profile=entry.get("profile") or info.get("profile", ""))
    sources = sorted({p for pattern in RECORDED_GLOBS for p in run_dir.glob(pattern) if p.is_file()})
    figures_dir = run_dir / "figures"
    sources += [figures_dir / name for name in figures if (figures_dir / name).is_file()]
    size = sum(p.stat().st_size for p in sources)
    if size > MAX_BYTES:
        raise CrossmodError(f"{run_dir}: the record would be {size / 2**20:.1f} MiB "
                            f"(limit {MAX_BYTES / 2**20:.0f} MiB); record fewer figures")
    import yaml

    try:
        profile = yaml.safe_load(RunFolder.settings_file.at(run_dir).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CrossmodError(f"{RunFolder.settings_file.at(run_dir)}: unreadable ({exc})") from None
    if not isinstance(profile, dict):
        raise CrossmodError(f"{RunFolder.settings_file.at(run_dir)}: not a profile (a mapping of settings)")

    with staged_folder(out_dir) as tmp:
        files = {}
        for source in sources:
            relative = source.relative_to(run_dir).as_posix()
            target = tmp / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            files[relative] = {"sha256": _sha256(target), "bytes": target.stat().st_size}
        recorded = provenance()
        recorded.pop("versions", None)
        info = {
            "format": FORMAT,
            "kind": kind,
            "profile": profile.get("name", ""),
            "description": profile.get("description", ""),
            "run_dir": str(run_dir),
            "note": str(note),
            "chapters": chapters,
            "recorded": {**recorded, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
            "files": files,
        }
        RunFolder.record_file.at(tmp).write_text(json.dumps(info, indent=1))
    return info


@dataclass
class Record:
    """A verified recorded run: ``info`` is record.json, ``root`` its folder."""

    root: Path
    info: dict

    @property
    def name(self) -> str:
        return self.info.get("profile") or self.root.name

    def path(self, relative) -> Path | None:
        """The recorded file (a path relative to the run, or a :class:`~crossmod_lib.runs.Artefact`),
        or None when the record does not hold it."""
        relative = getattr(relative, "relpath", relative)
        return self.root / relative if relative in self.info["files"] else None

    def table(self, relative: str) -> pd.DataFrame | None:
        path = self.path(relative)
        return pd.read_csv(path) if path is not None else None

    def json(self, relative: str) -> dict | None:
        path = self.path(relative)
        return json.loads(path.read_text()) if path is not None else None

    def settings_sentence(self) -> str:
        """Whether the record's settings are those of the profile of its name on this commit, and
        the settings that differ if not (a profile changes as the project learns; the record's
        profile.yaml keeps what it ran with). A run's own seeds and a study's own seeds, budgets
        and networks do not count."""
        import yaml

        from . import config, convergence

        try:
            ours = config.load_profile(self.name)
        except CrossmodError:
            return f"No profile `{self.name}` on this commit; the record's profile.yaml holds its settings."
        theirs = yaml.safe_load(RunFolder.settings_file.at(self.root).read_text()) or {}
        ignore = ["seed", *convergence.STUDY_CHOICES] if self.info.get("kind") == "study" else ["seed"]
        differ = convergence.settings_differences(ours, theirs, ignore)
        if not differ:
            return f"Settings: those of the profile `{self.name}` on this commit."
        return (f"Recorded with earlier settings of the profile `{self.name}`; on this commit it differs in "
                + ", ".join(f"`{key}`" for key in differ[:8]) + (" ..." if len(differ) > 8 else "")
                + " (the record's profile.yaml holds what it ran with).")

    def cleaning_counts(self) -> str | None:
        """The recorded run's cleaning outcome in one sentence (chapters 3 and 9), or None."""
        c = self.json(RunFolder.cleaning_summary)
        if c is None:
            return None
        return (f"{c['accepted_final']} of {c['slices']} synthetic slices kept "
                f"({c['accepted_final'] / max(c['slices'], 1):.0%}); {c['rejected_outline']} dropped by the "
                f"outline check (before or after registration), {c['rejected_registration']} by the other "
                f"registration checks, {c['manual_reject']} by hand")

    def provenance_table(self) -> pd.DataFrame:
        """One row per chapter: the commit, date and device it ran on (and its wall time)."""
        rows = [{"chapter": stem, "commit": c.get("commit", "not recorded"),
                 "date (UTC)": c.get("date", ""), "device": c.get("device", ""),
                 "seconds": c.get("seconds")} for stem, c in self.info["chapters"].items()]
        return pd.DataFrame(rows).set_index("chapter")


def read_record(folder: str | Path) -> Record:
    """Read and verify ``folder/record.json``: every listed file present with its sha256."""
    folder = Path(folder)
    where = RunFolder.record_file.at(folder)
    try:
        info = json.loads(where.read_text())
    except FileNotFoundError:
        raise CrossmodError(f"{where}: missing (not a recorded run)") from None
    except ValueError as exc:
        raise CrossmodError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise CrossmodError(f"{where}: format is not {FORMAT}")
    for key in ("chapters", "recorded", "files"):
        if not isinstance(info.get(key), dict):
            raise CrossmodError(f"{where}: no '{key}' entry")
    for relative, entry in info["files"].items():
        path = folder / relative
        if not path.is_file():
            raise CrossmodError(f"{path}: listed in record.json but missing")
        if _sha256(path) != entry.get("sha256"):
            raise CrossmodError(f"{path}: changed since it was recorded (sha256 differs)")
    return Record(folder, info)


def recorded_runs(root: str | Path | None = None) -> list[Record]:
    """Every recorded run under ``root`` (default: the repository's ``recorded/``), verified."""
    root = Path(root) if root else default_folder()
    if not root.is_dir():
        return []
    return [read_record(p) for p in sorted(root.iterdir()) if RunFolder.record_file.at(p).is_file()]


def with_rejected_slices(records: list[Record]) -> list[Record]:
    """The records whose cleaning step rejected at least one slice and that keep its Fig. 6.

    The cleaning chapter shows one of these when its own run rejected nothing (the phantom's
    simple outlines rarely make the CycleGAN fail), so a reader still sees what a rejected slice
    looks like, labelled as recorded.
    """
    chosen = []
    for rec in records:
        summary = rec.json(RunFolder.cleaning_summary) or {}
        if summary.get("rejected_final", 0) > 0 and rec.path(Figures.relpath(Figures.CLEANING_EXAMPLES)):
            chosen.append(rec)
    return chosen
