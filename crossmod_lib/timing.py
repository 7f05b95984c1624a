"""Paper sections 2.F and 3.B: how long each stage of a run took, and on what machine.

The paper timed its pipeline on a single Tesla V100 (16 GB): CycleGAN training about 72 h, U-Net
training about 150 min, inference 0.86 +- 0.02 s per patient (mean and SD over its 27 MR patients).
This module gathers the same kind of figures for a run folder from what the stages already write,
so the computation-time chapter shows measured numbers only:

``notebooks/timings.json``
    Written by :func:`crossmod_lib.pipeline.run_notebooks` through :func:`record_notebook`: per
    executed notebook its wall time, start and end (UTC), status (ok/failed) and the device
    (:func:`device_info`). Entries are merged, so re-running one stage updates only its entry.
``synthetic/<folder>/summary.json`` + ``losses.csv``
    CycleGAN training (:func:`crossmod_lib.cyclegan.train`): total seconds, images per second and
    the seconds since the start at every iteration (per-iteration spread).
``synthetic/synthesis.json`` (optional)
    The summary :func:`crossmod_lib.cyclegan.synthesise` returns (slices, seconds), if the
    CycleGAN chapter saved it.
``cleaned/decisions.csv``
    Wall and CPU seconds of every slice's elastix registration (``registration_time_s``,
    ``registration_cpu_s``; ``cached`` rows were timed by an earlier cleaning call and reused).
``model/<name>/summary.json`` + ``log.csv``
    U-Net training (:func:`crossmod_lib.segmentation.train`): total seconds and seconds per epoch.
``predictions/index.csv`` (optional)
    One row per model and patient with the inference ``seconds`` (and, if present, the seconds of
    the ``predict`` step alone and the torch ``device``; else ``predictions/summary.json``'s
    ``device``, if any).
``metrics/bench_<name>.json`` (optional)
    Benchmarks saved by :func:`crossmod_lib.bench.save_benchmark`.

:func:`collect` returns all of it as one tidy table; :func:`paper_comparison` puts the paper's
figures beside the run's; :func:`extrapolate` scales the run's (or a recorded benchmark's)
measured throughput to the paper's amount of work, as an explicitly labelled estimate.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CrossmodError
from .runs import RunFolder, TrainingFiles

TIMINGS_NAME = RunFolder.timings.name
TIMINGS_FORMAT = "crossmod-timings-1"
COLUMNS = ("stage", "step", "seconds", "per_unit_s", "per_unit_sd_s", "unit", "n", "device", "source",
           "note")

#: The paper's machine (section 2.F).
PAPER_DEVICE = "single NVIDIA Tesla V100 with 16 GB VRAM"

#: The paper's computation times (section 3.B), as stated; seconds are the stated values converted.
PAPER_TIMES = pd.DataFrame(
    [
        {"step": "CycleGAN training", "paper (as stated)": "approximately 72 h",
         "seconds": 72 * 3600.0, "sd_s": math.nan, "unit": "whole training"},
        {"step": "U-Net training", "paper (as stated)": "approximately 150 min",
         "seconds": 150 * 60.0, "sd_s": math.nan, "unit": "whole training"},
        {"step": "Inference", "paper (as stated)": "0.86 ± 0.02 s per patient (mean ± SD, 27 patients)",
         "seconds": 0.86, "sd_s": 0.02, "unit": "patient"},
    ]
).set_index("step")

#: The paper's amount of work, for the extrapolation (sections 2.A, 2.C.2, 2.E, Table I).
PAPER_SCALE = {
    "ct_patients": 202,          # section 2.A
    "mr_patients": 27,           # section 2.A
    "mr_slices_per_patient": 30, # Table I
    "cyclegan_epochs": 200,      # section 2.C.2: 100 constant + 100 decaying
    "unet_training_slices": 1500,  # section 2.E: "approximately 1500"
    "unet_val_fraction": 0.2,    # section 2.E: 80 % training, 20 % validation
    "unet_epochs": 100,          # section 2.E: at most 100 (early stopping)
    "crop": 256,                 # section 2.A: 256 x 256 slices
}


# ----------------------------------------------------------------------------------------------
# The device


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def _gpu_name() -> str | None:
    """The first CUDA GPU's name as torch reports it, asked in a child process so that this
    process neither imports torch nor holds a CUDA context; None without torch or GPU."""
    code = ("import torch\n"
            "print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    name = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
    return name[0] if name and name[0] else None


def device_info() -> dict:
    """The machine: CPU model, logical cores (and those this process may use), GPU name or None."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable,
            "cpu_vector": cpu_vector_features(), "gpu": _gpu_name()}


def cpu_vector_features() -> str:
    """The CPU's widest vector instructions, as they decide CPU training speed: "AVX-512 bf16"
    (the CycleGAN's fast mode uses bf16 there), "AVX-512", "AVX2" or "" where unknown. Machines
    called "AMD EPYC" differ here: the same CycleGAN step measured 0.19 s with AVX-512 bf16 and
    0.68 s on one without AVX-512."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "AVX-512 bf16"
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else ""


def describe_device(info: dict | None, torch_device: str | None = None) -> str:
    """One line for a device record; ``torch_device`` ("cpu", "cuda:0") picks CPU or GPU."""
    if not info:
        return torch_device or "unknown"
    cores = info.get("cpu_cores_usable") or info.get("cpu_cores")
    vector = f", {info['cpu_vector']}" if info.get("cpu_vector") else ""
    cpu = f"{info.get('cpu', 'CPU')} ({cores} cores{vector})"
    gpu = info.get("gpu")
    if torch_device is None:
        return f"{gpu}; {cpu}" if gpu else cpu
    if str(torch_device).startswith("cuda"):
        return gpu or str(torch_device)
    return cpu


# ----------------------------------------------------------------------------------------------
# notebooks/timings.json


def _root(run_or_root) -> Path:
    """The run folder of a RunFolder or of a path (a Path's own ``.root`` is "/", not this)."""
    if isinstance(run_or_root, (str, os.PathLike)):
        return Path(run_or_root)
    return Path(run_or_root.root)


def _timings_path(run_or_root) -> Path:
    root = _root(run_or_root)
    return RunFolder.timings.at(root)


def read_timings(run_or_root) -> dict:
    """``<run>/notebooks/timings.json`` as ``{"format", "notebooks": {stem: entry}}`` (empty if
    the file does not exist yet). A file that is not such a record: one-line CrossmodError."""
    path = _timings_path(run_or_root)
    if not path.is_file():
        return {"format": TIMINGS_FORMAT, "notebooks": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: not readable as JSON ({' '.join(str(exc).split())[:120]}); "
                            "delete it to start the record afresh") from None
    if not isinstance(data, dict) or data.get("format") != TIMINGS_FORMAT or \
            not isinstance(data.get("notebooks"), dict):
        raise CrossmodError(f"{path}: not a {TIMINGS_FORMAT} record (format or notebooks missing); "
                            "delete it to start the record afresh")
    return data


def record_notebook(run_or_root, stem: str, entry: dict) -> Path:
    """Merge one notebook's entry into ``<run>/notebooks/timings.json`` (atomic write; the other
    notebooks' entries are kept). ``entry`` needs ``seconds``; returns the file's path."""
    if "seconds" not in entry:
        raise ValueError("record_notebook: the entry needs 'seconds'")
    path = _timings_path(run_or_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{TIMINGS_NAME}.lock")
    with open(lock, "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)   # two runs on one folder do not lose entries
        except ImportError:                      # not POSIX: no lock, the write is still atomic
            pass
        data = read_timings(run_or_root)
        data["notebooks"][stem] = {"notebook": stem, **entry}
        data["notebooks"] = dict(sorted(data["notebooks"].items()))
        tmp = path.with_name(f".{TIMINGS_NAME}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        os.replace(tmp, path)
    return path


def notebook_entry(number: int, started: _dt.datetime, seconds: float, status: str,
                   device: dict | None, profile: str | None = None, error: str | None = None,
                   commit: str | None = None) -> dict:
    """The entry :func:`record_notebook` stores for one executed notebook: its provenance (the
    code's commit, start and end, device, profile) as the library measured it."""
    ended = started + _dt.timedelta(seconds=seconds)
    entry = {"stage": int(number), "status": status, "seconds": round(float(seconds), 3),
             "started": started.isoformat(timespec="seconds"),
             "ended": ended.isoformat(timespec="seconds"), "device": device, "profile": profile,
             "commit": commit}
    if error:
        entry["error"] = error
    return entry


def notebook_table(run_or_root) -> pd.DataFrame:
    """One row per recorded notebook: stage, notebook, status, seconds, started, ended, device."""
    def moment(text):
        return str(text or "").replace("T", " ").removesuffix("+00:00")

    entries = read_timings(run_or_root)["notebooks"].values()
    rows = [{"stage": e.get("stage"), "notebook": e.get("notebook"), "status": e.get("status"),
             "seconds": e.get("seconds"), "started (UTC)": moment(e.get("started")),
             "ended (UTC)": moment(e.get("ended")), "device": describe_device(e.get("device"))}
            for e in entries]
    columns = ["stage", "notebook", "status", "seconds", "started (UTC)", "ended (UTC)", "device"]
    return pd.DataFrame(rows, columns=columns).sort_values("stage", kind="stable").reset_index(drop=True)


def run_device(run_or_root) -> dict | None:
    """The device record of the most recently executed notebook (None if nothing is recorded)."""
    entries = [e for e in read_timings(run_or_root)["notebooks"].values() if e.get("device")]
    if not entries:
        return None
    return max(entries, key=lambda e: e.get("ended") or "")["device"]


# ----------------------------------------------------------------------------------------------
# Reading the stages' own records


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: not readable as JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict):
        raise CrossmodError(f"{path}: expected a JSON object")
    return data


def _read_csv(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: not readable as CSV ({' '.join(str(exc).split())[:120]})") from None
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise CrossmodError(f"{path}: column(s) {', '.join(missing)} missing")
    return table


def _mean_sd(values) -> tuple[float, float, int]:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan, 0
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), sd, len(values)


def _row(stage, step, seconds, per_unit=math.nan, sd=math.nan, unit="", n=None, device="",
         source="", note="") -> dict:
    return {"stage": stage, "step": step, "seconds": float(seconds) if seconds is not None else math.nan,
            "per_unit_s": per_unit, "per_unit_sd_s": sd, "unit": unit, "n": n, "device": device,
            "source": source, "note": note}


CYCLEGAN_FOLDERS = {"cyclegan": "CycleGAN training",
                    "ablation_geo": "CycleGAN training, ablation arm with geometric loss",
                    "ablation_nogeo": "CycleGAN training, ablation arm without geometric loss"}


def _cyclegan_rows(root: Path, info: dict | None) -> list[dict]:
    rows = []
    synthetic = RunFolder.synthesis.at(root).parent
    folders = sorted(p.parent for p in synthetic.glob(f"*/{TrainingFiles.SUMMARY}")) if synthetic.is_dir() else []
    for folder in sorted(folders, key=lambda p: (p.name != "cyclegan", p.name)):
        summary = _read_json(folder / TrainingFiles.SUMMARY)
        if "seconds_total" not in summary:
            continue
        batch = int(summary.get("batch_size") or 1) * int(summary.get("world_size") or 1)
        images = int(summary.get("iteration") or 0) * batch
        per = sd = math.nan
        n = images
        losses = folder / TrainingFiles.LOSSES
        if losses.is_file():
            table = _read_csv(losses, ("iteration", "seconds"))
            elapsed = table.sort_values("iteration")["seconds"].to_numpy(float)
            steps = np.diff(np.concatenate([[0.0], elapsed]))
            steps = steps[steps > 0] / batch
            per, sd, _ = _mean_sd(steps)
        if not math.isfinite(per) and images:
            per = float(summary["seconds_total"]) / images
        rows.append(_row("2 synthetic MR (CycleGAN)",
                         CYCLEGAN_FOLDERS.get(folder.name, f"CycleGAN training ({folder.name})"),
                         summary["seconds_total"], per, sd, "image-iteration", n,
                         describe_device(info, summary.get("device")),
                         str(folder.relative_to(root) / TrainingFiles.SUMMARY),
                         f"{summary.get('iteration')} iterations of batch {batch}"
                         + ("" if summary.get("completed", True) else " (training not finished)")))
    path = RunFolder.synthesis.at(root)
    if path.is_file():
        summary = _read_json(path)
        if "seconds" in summary:
            slices = int(summary.get("slices") or 0)
            rows.append(_row("2 synthetic MR (CycleGAN)", "synthesis of every CT slice",
                             summary["seconds"], summary["seconds"] / slices if slices else math.nan,
                             math.nan, "slice", slices, describe_device(info, summary.get("device")),
                             RunFolder.synthesis.relpath))
    return rows


def _cleaning_rows(root: Path, info: dict | None) -> list[dict]:
    path = RunFolder.decisions.at(root)
    if not path.is_file():
        return []
    table = _read_csv(path, ("registration_time_s",))
    wall = pd.to_numeric(table["registration_time_s"], errors="coerce")
    timed = table[wall.notna() & (wall > 0)]
    if not len(timed):
        return []
    cached = int(timed["cached"].astype(str).str.lower().isin(("true", "1")).sum()) \
        if "cached" in timed.columns else 0
    note = f"{cached} of the {len(timed)} slices timed by an earlier cleaning call, reused from its " \
        "cache" if cached else ""
    device = describe_device(info, "cpu")
    rows = []
    mean, sd, n = _mean_sd(timed["registration_time_s"])
    rows.append(_row("3 cleaning and registration", "elastix registration, wall time",
                     float(pd.to_numeric(timed["registration_time_s"]).sum()), mean, sd, "slice", n,
                     device, RunFolder.decisions.relpath, note))
    if "registration_cpu_s" in timed.columns:
        mean, sd, n = _mean_sd(pd.to_numeric(timed["registration_cpu_s"], errors="coerce"))
        if n:
            rows.append(_row("3 cleaning and registration", "elastix registration, CPU time",
                             float(pd.to_numeric(timed["registration_cpu_s"], errors="coerce").sum()),
                             mean, sd, "slice", n, device, RunFolder.decisions.relpath, note))
    return rows


def _unet_rows(root: Path, info: dict | None) -> list[dict]:
    rows = []
    model = RunFolder.model_root.at(root)
    if not model.is_dir():
        return rows
    for summary_path in sorted(model.glob(f"*/{TrainingFiles.SUMMARY}"),
                               key=lambda p: (p.parent.name != "cross_modality", p.parent.name)):
        summary = _read_json(summary_path)
        if summary.get("trained") is False or not summary.get("epochs_run"):
            continue                               # e.g. naive: the CT network reused, not trained
        per = sd = math.nan
        n = int(summary["epochs_run"])
        log = summary_path.parent / TrainingFiles.LOG
        if log.is_file():
            per, sd, n = _mean_sd(_read_csv(log, ("epoch", "seconds"))["seconds"])
        name = summary.get("name") or summary_path.parent.name
        rows.append(_row("4 U-Net", f"U-Net training: {name}", summary.get("seconds", math.nan),
                         per, sd, "epoch", n, describe_device(info, summary.get("device")),
                         str(summary_path.relative_to(root))))
    return rows


MODEL_COLUMNS = ("model", "name", "method")


def _inference_rows(root: Path, info: dict | None) -> list[dict]:
    path = RunFolder.prediction_index.at(root)
    if not path.is_file():
        return []
    table = _read_csv(path, ("seconds",))
    key = next((c for c in MODEL_COLUMNS if c in table.columns), None)
    groups = table.groupby(key, sort=False) if key else [("", table)]
    rows = []
    summary_path = RunFolder.prediction_summary.at(root)
    summary_device = _read_json(summary_path).get("device") if summary_path.is_file() else None
    for name, group in groups:
        if "device" in group.columns:
            device = describe_device(info, str(group["device"].iloc[0]))
        elif summary_device:
            device = describe_device(info, str(summary_device))
        else:
            device = describe_device(info)   # the machine; CPU or GPU is not recorded
        seconds = pd.to_numeric(group["seconds"], errors="coerce")
        mean, sd, n = _mean_sd(seconds)
        rows.append(_row("5 inference", f"inference: {name}" if name else "inference", seconds.sum(),
                         mean, sd, "patient", n, device, RunFolder.prediction_index.relpath))
    return rows


def _notebook_rows(root: Path) -> list[dict]:
    rows = []
    for entry in read_timings(root)["notebooks"].values():
        stem = str(entry.get("notebook", ""))
        status = entry.get("status")
        rows.append(_row(f"notebook {stem}", "whole notebook, wall time", entry.get("seconds"),
                         device=describe_device(entry.get("device")), n=1,
                         source=RunFolder.timings.relpath,
                         note="" if status == "ok" else f"status: {status}"))
    return sorted(rows, key=lambda r: r["stage"])


def collect(run_or_root) -> pd.DataFrame:
    """Every measured time of a run as one tidy table (columns :data:`COLUMNS`).

    ``seconds`` is the step's total; ``per_unit_s`` ± ``per_unit_sd_s`` its time per ``unit``
    (``image-iteration``: one CT image through one CycleGAN training iteration; slice, epoch,
    patient) over ``n`` units, where the stage records the single times (SD: sample SD, NaN for
    fewer than two). ``device`` is the hardware (from the notebooks' record) the stage says it ran
    on; ``source`` the file each row comes from; ``note`` what else the reader should know.
    Files that do not exist are skipped; unreadable ones raise a one-line CrossmodError.
    """
    root = _root(run_or_root)
    info = run_device(root)
    rows = (_notebook_rows(root) + _cyclegan_rows(root, info) + _cleaning_rows(root, info)
            + _unet_rows(root, info) + _inference_rows(root, info))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["n"] = table["n"].astype("Int64")
    return table


def format_seconds(seconds: float) -> str:
    """``3.2 s``, ``4.5 min``, ``7.1 h``, ``3.0 d`` (NaN: empty)."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.3g} min"
    if seconds < 100 * 3600:
        return f"{seconds / 3600:.3g} h"
    days = seconds / 86400
    if days < 1000:
        return f"{days:.3g} d"
    return f"{days:,.0f} d (≈ {days / 365.25:,.3g} years)"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`collect`'s table for reading: readable totals, per-unit time as ``mean ± SD``."""
    def per_unit(row):
        if not math.isfinite(row["per_unit_s"]):
            return ""
        text = f"{row['per_unit_s']:.3g}"
        if math.isfinite(row["per_unit_sd_s"]):
            text += f" ± {row['per_unit_sd_s']:.2g}"
        return f"{text} s per {row['unit']}"

    out = pd.DataFrame({
        "stage": table["stage"], "step": table["step"],
        "total": table["seconds"].map(format_seconds),
        "per unit (mean ± SD)": table.apply(per_unit, axis=1) if len(table) else [],
        "n": table["n"], "device": table["device"],
    })
    return out.set_index(["stage", "step"])


# ----------------------------------------------------------------------------------------------
# Beside the paper


def _first(table: pd.DataFrame, step: str) -> pd.Series | None:
    found = table[table["step"] == step]
    return found.iloc[0] if len(found) else None


def _ours_for_paper(table: pd.DataFrame) -> dict:
    inference = table[table["step"].str.startswith("inference")]
    preferred = inference[inference["step"].str.endswith("cross_modality")]
    return {
        "CycleGAN training": _first(table, "CycleGAN training"),
        "U-Net training": _first(table, "U-Net training: cross_modality"),
        "Inference": (preferred.iloc[0] if len(preferred)
                      else inference.iloc[0] if len(inference) else None),
    }


def paper_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The paper's three figures (:data:`PAPER_TIMES`, on :data:`PAPER_DEVICE`) beside the run's
    measured ones for the same steps (CycleGAN main run, cross-modality U-Net, its inference per
    patient); a step the run has not recorded is left empty."""
    rows = []
    for step, ours in _ours_for_paper(table).items():
        paper = PAPER_TIMES.loc[step]
        if ours is None:
            measured, device, what = "", "", "not recorded in this run"
        elif step == "Inference":
            measured = f"{ours['per_unit_s']:.3g}"
            if math.isfinite(ours["per_unit_sd_s"]):
                measured += f" ± {ours['per_unit_sd_s']:.2g}"
            measured += f" s per patient (n = {ours['n']})"
            device, what = ours["device"], ours["step"]
        else:
            measured, device, what = format_seconds(ours["seconds"]), ours["device"], ours["step"]
        rows.append({"step": step, f"paper ({PAPER_DEVICE})": paper["paper (as stated)"],
                     "this run (measured)": measured, "this run's device": device,
                     "measured step": what})
    return pd.DataFrame(rows).set_index("step")


# ----------------------------------------------------------------------------------------------
# Extrapolation to the paper's scale


def _profile_of(run_or_root) -> dict:
    profile = getattr(run_or_root, "profile", None)
    if profile is not None:
        return profile
    from .config import load_profile

    path = RunFolder.settings_file.at(run_or_root)
    if not path.is_file():
        raise CrossmodError(f"{path}: missing; the run folder has no profile snapshot")
    return load_profile(path)


def _paper_ct_slices(root: Path) -> tuple[float, str]:
    """CT slices per CycleGAN epoch at the paper's scale: 202 patients x the mean CT slices per
    patient this run kept (same cranio-caudal rule), with how it was obtained."""
    path = RunFolder.ct_cases.at(root)
    if path.is_file():
        cases = _read_csv(path, ("slices_kept",))
        per_patient = float(pd.to_numeric(cases["slices_kept"]).mean())
        how = (f"{PAPER_SCALE['ct_patients']} CT patients × {per_patient:.1f} slices per patient "
               "(this run's mean after the cranio-caudal restriction)")
        return PAPER_SCALE["ct_patients"] * per_patient, how
    raise CrossmodError(f"{path}: missing; the CT slices per patient come from chapter 1's case table")


def _estimate(step, source, basis, throughput, paper_work, seconds, paper_seconds):
    return {"step": step, "from": source, "basis of the estimate": basis,
            "measured throughput": throughput,
            "paper-scale work": paper_work, "estimate (extrapolated)": format_seconds(seconds),
            "estimate_s": seconds, "paper (V100)": paper_seconds}


def paper_work(run_or_root) -> dict[str, dict]:
    """FLOPs of each paper step at the paper's scale (:data:`PAPER_SCALE`, the ``full`` profile's
    networks at 256 x 256): ``{step: {"flop", "description"}}`` for "CycleGAN training",
    "U-Net training" (the maximum of 100 epochs; 3 x forward per training slice, 1 x per
    validation slice) and "Inference" (one patient of 30 slices, the network alone). The CT slices
    per CycleGAN epoch are 202 patients x this run's mean CT slices per patient."""
    from . import cyclegan, segmentation
    from .config import load_profile

    root = _root(run_or_root)
    full = load_profile("full")
    size = PAPER_SCALE["crop"]
    f_gan = cyclegan.training_flops_per_image(cyclegan.settings_from_profile(full), size)["total"]
    f_seg = segmentation.flops_per_slice(full, size)
    ct_slices, how = _paper_ct_slices(root)
    n_train = PAPER_SCALE["unet_training_slices"] * (1 - PAPER_SCALE["unet_val_fraction"])
    n_val = PAPER_SCALE["unet_training_slices"] * PAPER_SCALE["unet_val_fraction"]
    return {
        "CycleGAN training": {
            "flop": PAPER_SCALE["cyclegan_epochs"] * ct_slices * f_gan,
            "description": f"{PAPER_SCALE['cyclegan_epochs']} epochs × {ct_slices:,.0f} CT slices "
                           f"({how}) × {f_gan / 1e9:,.0f} GFLOP per image-iteration (paper networks, "
                           f"{size} × {size})"},
        "U-Net training": {
            "flop": PAPER_SCALE["unet_epochs"] * (3 * n_train + n_val) * f_seg,
            "description": f"{PAPER_SCALE['unet_epochs']} epochs (the maximum; early stopping may end "
                           f"sooner) × ({n_train:.0f} training × 3 + {n_val:.0f} validation) slices × "
                           f"{f_seg / 1e9:.1f} GFLOP (paper U-Net, {size} × {size})"},
        "Inference": {
            "flop": PAPER_SCALE["mr_slices_per_patient"] * f_seg,
            "description": f"{PAPER_SCALE['mr_slices_per_patient']} slices × {f_seg / 1e9:.1f} GFLOP "
                           "(the network only)"},
    }


def paper_implied_throughput(run_or_root) -> pd.DataFrame:
    """The paper's work (:func:`paper_work`) over the paper's stated time: the FLOPs per second
    its V100 must have sustained if our count of its work is right. A plausibility check of the
    extrapolation: a V100's peak is 14-15.7 TFLOP/s in fp32 (112-125 with fp16 tensor cores).
    For inference the stated time also covers reading and resampling, so this is a lower bound."""
    rows = []
    for step, work in paper_work(run_or_root).items():
        seconds = PAPER_TIMES.loc[step, "seconds"]
        rows.append({"step": step, "paper-scale work (TFLOP)": work["flop"] / 1e12,
                     "paper (as stated)": PAPER_TIMES.loc[step, "paper (as stated)"],
                     "implied TFLOP/s on the V100": work["flop"] / seconds / 1e12})
    return pd.DataFrame(rows).set_index("step")


def extrapolate(run_or_root, table: pd.DataFrame | None = None,
                recorded: dict | None = None) -> pd.DataFrame:
    """Estimated time of each paper step at the paper's scale on *this run's* device, from
    measured throughput: the FLOPs per second achieved (the FLOPs of the networks the run used, by
    :func:`crossmod_lib.cyclegan.training_flops_per_image` and
    :func:`crossmod_lib.segmentation.flops_per_slice`, over the measured time) applied to the
    paper's work (:func:`paper_work`). Recorded benchmarks (``recorded``, from
    :func:`crossmod_lib.bench.load_benchmarks`) of the CycleGAN and of inference give further
    rows. These are **extrapolations**, not measurements: small networks use a device far less
    efficiently than the paper's, so rows based on a small run overestimate; a GPU's throughput
    also depends on batch size and precision.
    """
    from . import cyclegan, segmentation

    root = _root(run_or_root)
    table = collect(root) if table is None else table
    profile = _profile_of(run_or_root)
    run_size = int(profile["preprocessing"]["crop"])
    work = paper_work(root)
    rows = []

    def paper(step):
        return PAPER_TIMES.loc[step, "paper (as stated)"]

    # CycleGAN: training FLOPs per CT image-iteration of the run's networks over the measured time.
    gan = work["CycleGAN training"]
    main = _first(table, "CycleGAN training")
    summary_path = RunFolder.cyclegan_summary.at(root)
    if main is not None and summary_path.is_file():
        summary = _read_json(summary_path)
        s = cyclegan.settings_from_profile(profile)
        f_run = cyclegan.training_flops_per_image(s, run_size)["total"]
        images = int(summary.get("iteration") or 0) * int(summary.get("batch_size") or 1) \
            * int(summary.get("world_size") or 1)
        if images and main["seconds"] > 0:
            rate = images * f_run / main["seconds"]
            rows.append(_estimate(
                "CycleGAN training", "this run",
                f"{images} image-iterations of ngf {s['ngf']}, {s['n_blocks']} blocks at "
                f"{run_size} × {run_size} in {format_seconds(main['seconds'])} on {main['device']}",
                f"{rate / 1e9:.3g} GFLOP/s", gan["description"], gan["flop"] / rate,
                paper("CycleGAN training")))
    for record in (recorded or {}).values():
        result = record.get("result", {})
        if result.get("name") != "cyclegan":
            continue
        for mode in ("reference", "fast"):
            rate = result.get(f"{mode}_tflops")
            if isinstance(rate, (int, float)) and rate > 0:
                rows.append(_estimate(
                    "CycleGAN training", f"benchmark, {mode} mode",
                    f"recorded {str(record.get('saved', ''))[:10]} on {result.get('device')}: "
                    f"{mode} mode ({result.get(f'{mode}_mode')}), ngf {result.get('ngf')}, "
                    f"{result.get('n_blocks')} blocks, {result.get('size')} × {result.get('size')}",
                    f"{rate * 1e3:.3g} GFLOP/s", gan["description"], gan["flop"] / (rate * 1e12),
                    paper("CycleGAN training")))

    # U-Net training: FLOPs of one epoch of the run over its mean epoch time.
    unet_work = work["U-Net training"]
    unet = _first(table, "U-Net training: cross_modality")
    unet_summary = RunFolder.model_root.at(root) / "cross_modality" / TrainingFiles.SUMMARY
    if unet is not None and unet_summary.is_file() and math.isfinite(unet["per_unit_s"]):
        summary = _read_json(unet_summary)
        cfg = segmentation.segmentation_config(profile)
        f_run = segmentation.flops_per_slice(profile, run_size)
        slices = summary.get("slices") or {}
        trained = int(slices.get("train", 0))
        if cfg["max_steps_per_epoch"]:
            trained = min(trained, int(cfg["max_steps_per_epoch"]) * int(cfg["batch_size"]))
        validated = int(slices.get("val", 0))
        run_epoch = (3 * trained + validated) * f_run
        if run_epoch > 0:
            rate = run_epoch / unet["per_unit_s"]
            rows.append(_estimate(
                "U-Net training", "this run",
                f"{format_seconds(unet['per_unit_s'])} per epoch of {trained} training + "
                f"{validated} validation slices, {cfg['base_features']} base features, "
                f"{cfg['levels']} levels, {run_size} × {run_size}, on {unet['device']}",
                f"{rate / 1e9:.3g} GFLOP/s", unet_work["description"], unet_work["flop"] / rate,
                paper("U-Net training")))

    # Inference per patient: the network's part scaled by FLOPs; reading, resampling and writing
    # are kept as measured.
    infer_work = work["Inference"]
    inference = _ours_for_paper(table)["Inference"]
    index = RunFolder.prediction_index.at(root)
    mr_cases = RunFolder.mr_cases.at(root)
    if inference is not None and index.is_file() and mr_cases.is_file():
        predictions = _read_csv(index, ("seconds",))
        key = next((c for c in MODEL_COLUMNS if c in predictions.columns), None)
        name = inference["step"].split(": ", 1)[-1]
        if key:
            predictions = predictions[predictions[key].astype(str) == name]
        slices = float(pd.to_numeric(_read_csv(mr_cases, ("slices_total",))["slices_total"]).mean())
        f_run = segmentation.flops_per_slice(profile, run_size)
        total = float(pd.to_numeric(predictions["seconds"], errors="coerce").mean())
        if "predict" in predictions.columns:
            network = float(pd.to_numeric(predictions["predict"], errors="coerce").mean())
            basis = "the predict step scaled by FLOPs, the rest (read, resample, write) as measured"
        else:
            network = total
            basis = ("the whole inference time scaled by FLOPs (no per-step times recorded, so "
                     "reading and resampling are scaled too: an upper bound)")
        if network > 0 and math.isfinite(total):
            rate = slices * f_run / network
            rows.append(_estimate(
                "Inference (per patient)", "this run", f"{basis}; {slices:.0f} slices per patient, "
                f"on {inference['device']}", f"{rate / 1e9:.3g} GFLOP/s", infer_work["description"],
                (total - network) + infer_work["flop"] / rate, paper("Inference")))
    for record in (recorded or {}).values():
        result = record.get("result", {})
        if result.get("name") != "inference" or not result.get("gflops_per_patient"):
            continue
        predict = float((result.get("stages") or {}).get("predict", result["seconds_mean"]))
        if predict <= 0:
            continue
        rest = float(result["seconds_mean"]) - predict
        rate = float(result["gflops_per_patient"]) * 1e9 / predict
        rows.append(_estimate(
            "Inference (per patient)", "benchmark",
            f"recorded {str(record.get('saved', ''))[:10]} on {result.get('device')}: profile "
            f"{result.get('profile')}, {result.get('volume')} MR, {float(result['seconds_mean']):.3g} s "
            "per patient; its predict step scaled by FLOPs, the rest as measured",
            f"{rate / 1e9:.3g} GFLOP/s", infer_work["description"],
            rest + infer_work["flop"] / rate, paper("Inference")))
    columns = ["step", "from", "basis of the estimate", "measured throughput", "paper-scale work",
               "estimate (extrapolated)", "estimate_s", "paper (V100)"]
    return pd.DataFrame(rows, columns=columns)


def paper_flops() -> pd.DataFrame:
    """The paper's amount of work in FLOPs per step (full profile's networks at 256 x 256)."""
    from . import cyclegan, segmentation
    from .config import load_profile

    full = load_profile("full")
    size = PAPER_SCALE["crop"]
    gan = cyclegan.training_flops_per_image(cyclegan.settings_from_profile(full), size)["total"]
    seg = segmentation.flops_per_slice(full, size)
    return pd.DataFrame([
        {"network": "CycleGAN, one training iteration per CT image", "GFLOP": gan / 1e9},
        {"network": "U-Net, one forward pass per slice", "GFLOP": seg / 1e9},
    ]).set_index("network")


def run(run) -> dict:
    """Stage 7 over a run folder: every measured time (:func:`collect`), the benchmarks saved in
    the run and in the repository (a run's own first), and the paper-scale estimates
    (:func:`extrapolate`). Writes ``metrics/computation_steps.csv`` and
    ``metrics/computation_estimates.csv``; returns ``measured``, ``recorded``, ``estimates``."""
    from . import bench

    measured = collect(run)
    recorded = {**bench.recorded_benchmarks(), **bench.load_benchmarks(run)}
    estimates = extrapolate(run, measured, recorded)
    measured.to_csv(run.output("computation_steps"), index=False)
    estimates.to_csv(run.output("computation_estimates"), index=False)
    return {"measured": measured, "recorded": recorded, "estimates": estimates}
