"""Benchmarks behind ``crossmod bench NAME``.

Each benchmark is a function returning a flat dict (``name`` first) that :func:`format_table`
renders as a small text table; :data:`BENCHMARKS` maps the names to the functions.

Results can be kept in a run folder with :func:`save_benchmark` (``<run>/metrics/bench_NAME.json``,
with the provenance of the machine that ran it); the computation-time chapter shows what
:func:`load_benchmarks` finds there.

``metrics``
    Times :func:`crossmod_lib.metrics.compare_masks` on one parotid-sized pair, two overlapping,
    slightly different perturbed ellipsoids of about 25 cc each (diameters about 27 x 37 x 47 mm,
    x, y, z), on a 512 x 512 x 150 uint8 grid at spacing 0.98 x 0.98 x 2.5 mm: the size of a head
    and neck CT. Target: 30 ms per pair.
``registration``, ``cyclegan``
    See :func:`bench_registration_profile` and :func:`bench_cyclegan_profile`.
``unet``
    U-Net training slices/s, exact fp32 against bf16 autocast on the CPU (:func:`bench_unet_profile`).
``inference``
    Seconds per MR patient end to end, as section 2.F times it (:func:`bench_inference_profile`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossmod_lib.metrics import compare_masks

__all__ = ["BENCHMARKS", "bench_cyclegan_profile", "bench_inference_profile", "bench_metrics",
           "bench_registration_profile", "bench_unet_profile", "format_table", "load_benchmarks", "parotid_pair",
           "peer_images_per_s", "peer_step_script", "recorded_benchmarks",
           "result_table", "save_benchmark"]

GRID_XYZ = (512, 512, 150)
SPACING_XYZ_MM = (0.98, 0.98, 2.5)
METRICS_TARGET_MS = 30


def _perturbed_ellipsoid(
    shape_zyx, spacing_zyx, centre_zyx_mm, radii_zyx_mm, coefficients: np.ndarray
) -> np.ndarray:
    """uint8 mask of an ellipsoid whose radius varies smoothly with direction.

    A voxel at offset ``d`` (mm) from the centre is inside when ``|u| <= 1 + f(u / |u|)``, with
    ``u = d / radii`` and ``f`` a quadratic polynomial in the unit direction whose 9 coefficients
    are ``coefficients`` (3 linear, 6 quadratic terms). Built on the ellipsoid's own box, then placed.
    """
    out = np.zeros(shape_zyx, dtype=np.uint8)
    reach = 1.0 + np.abs(coefficients).sum()
    lo, hi = [], []
    for c, r, s, n in zip(centre_zyx_mm, radii_zyx_mm, spacing_zyx, shape_zyx):
        lo.append(max(0, math.floor((c - reach * r) / s) - 1))
        hi.append(min(n, math.ceil((c + reach * r) / s) + 2))
    axes = [
        (np.arange(a, b) * s - c) / r
        for a, b, s, c, r in zip(lo, hi, spacing_zyx, centre_zyx_mm, radii_zyx_mm)
    ]
    uz, uy, ux = np.meshgrid(*axes, indexing="ij", sparse=True)
    norm = np.sqrt(uz**2 + uy**2 + ux**2)
    safe = np.where(norm > 0, norm, 1.0)
    nz, ny, nx = uz / safe, uy / safe, ux / safe
    terms = (nz, ny, nx, nz * nz, ny * ny, nx * nx, nz * ny, nz * nx, ny * nx)
    bound = 1.0 + sum(c * t for c, t in zip(coefficients, terms))
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = norm <= bound
    return out


def parotid_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """(reference, prediction, spacing_zyx): two overlapping parotid-like masks on the CT-sized grid.

    The prediction is the reference shape with its own small perturbation, a ~1.5 mm shift and
    radii a few per cent smaller, which gives a DSC around 0.85, typical of auto-segmentation.
    """
    rng = np.random.default_rng(seed)
    shape_zyx = tuple(reversed(GRID_XYZ))
    spacing_zyx = tuple(reversed(SPACING_XYZ_MM))
    centre = np.array([75 * 2.5, 300 * 0.98, 170 * 0.98])  # mm, (z, y, x): a left parotid position
    radii = np.array([23.5, 18.5, 13.5])  # mm, (z, y, x): about 25 cc
    base = rng.normal(0.0, 0.04, 9)
    reference = _perturbed_ellipsoid(shape_zyx, spacing_zyx, centre, radii, base)
    shift = rng.normal(0.0, 1.0, 3)
    shift *= 1.5 / np.linalg.norm(shift)
    prediction = _perturbed_ellipsoid(
        shape_zyx, spacing_zyx, centre + shift, radii * 0.97, base + rng.normal(0.0, 0.03, 9)
    )
    return reference, prediction, spacing_zyx


def bench_metrics(repeats: int = 20, seed: int = 0) -> dict:
    """Time :func:`compare_masks` on one parotid-sized pair (one warm-up call, then ``repeats``)."""
    repeats = max(1, int(repeats))
    reference, prediction, spacing_zyx = parotid_pair(seed)
    result = compare_masks(reference, prediction, spacing_zyx)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compare_masks(reference, prediction, spacing_zyx)
        times.append(time.perf_counter() - start)
    times_ms = np.asarray(times) * 1e3
    voxel_cc = float(np.prod(spacing_zyx)) / 1000.0
    median_ms = float(np.median(times_ms))
    return {
        "name": "metrics",
        "grid": GRID_XYZ,
        "spacing_mm": SPACING_XYZ_MM,
        "dtype": str(reference.dtype),
        "repeats": repeats,
        "median_ms": median_ms,
        "min_ms": float(times_ms.min()),
        "target_ms": METRICS_TARGET_MS,
        "meets_target": median_ms <= METRICS_TARGET_MS,
        "reference_cc": result["reference_voxels"] * voxel_cc,
        "prediction_cc": result["prediction_voxels"] * voxel_cc,
        "dsc": result["dsc"],
        "hd": result["hd"],
        "hd95": result["hd95"],
        "msd": result["msd"],
    }


def _format_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_format_value(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return " x ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in value)
    return str(value)


def format_table(result: dict) -> str:
    """Render a benchmark result dict as a two-column aligned text table (keys in dict order)."""
    rows = [(str(key), _format_value(value)) for key, value in result.items()]
    if not rows:
        return ""
    width_k = max(len(k) for k, _ in rows)
    width_v = max(len(v) for _, v in rows)
    rule = "-" * width_k + "  " + "-" * width_v
    lines = [rule]
    lines += [f"{k:<{width_k}}  {v:>{width_v}}" for k, v in rows]
    lines.append(rule)
    return "\n".join(lines)


def bench_registration_profile(repeats: int = 5, profile: str = "full") -> dict:
    """``crossmod bench registration``: elastix rigid + B-spline per slice at the profile's
    settings on 256 x 256 slices of 1 mm (target: <= 0.5 s per slice per core after the first)."""
    from .cleaning import bench_registration

    return bench_registration(size=256, pixel_mm=1.0, n=repeats, profile=profile)


#: The two settings ``crossmod bench cyclegan`` compares with the peer: the demo's networks and
#: crop, and the paper's (Fig. 4 widths, 256 x 256 crops, batch 1).
CYCLEGAN_BENCH_CASES = {
    "demo": {"size": 96, "ngf": 16, "ndf": 16, "n_blocks": 6, "batch": 4},
    "paper": {"size": 256, "ngf": 64, "ndf": 64, "n_blocks": 9, "batch": 1},
}


def peer_step_script() -> Path | None:
    """The peer's step timer (``peer_step.py`` of ``../shared/peers`` beside the repository, or
    ``$CROSSMOD_PEERS``), or None where it is not on this machine."""
    root = os.environ.get("CROSSMOD_PEERS")
    candidates = [Path(root)] if root else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "peers")
    for folder in candidates:
        if (folder / "peer_step.py").is_file():
            return folder / "peer_step.py"
    return None


def peer_images_per_s(case: dict, iterations: int, threads: int, model: str = "cycle_gan",
                      script: Path | None = None, timeout: float = 1800) -> dict:
    """Run the peer's own training step (``peer_step.py``: the CUT repository's CycleGAN, the
    reference implementation) at ``case``'s settings in a subprocess; its JSON line, or
    ``{"error": ...}`` (one line) when the peer is not here or fails."""
    import subprocess
    import sys

    script = script or peer_step_script()
    if script is None:
        return {"error": "peer not found (../shared/peers/peer_step.py or $CROSSMOD_PEERS)"}
    command = [sys.executable, str(script), "--model", model, "--size", str(case["size"]),
               "--ngf", str(case["ngf"]), "--ndf", str(case["ndf"]), "--blocks",
               str(case["n_blocks"]), "--batch", str(case["batch"]), "--iters", str(iterations),
               "--warmup", "2", "--threads", str(threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"peer step timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"peer step failed (exit {done.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


def bench_cyclegan_profile(repeats: int = 10, profile: str = "demo") -> dict:
    """``crossmod bench cyclegan``: training images/s of the peer (the reference CycleGAN, timed by
    its own ``optimize_parameters``) and of crossmod, in this one call on this machine, at the
    demo size (96 x 96, ngf 16, 6 blocks, batch 4) and at the paper's (256 x 256, widths 64,
    9 blocks, batch 1), each with the same thread count. crossmod runs twice per case: exact
    (fp32, eager, the determinism tests' mode) and fast (the ``profile``'s speed options: bf16
    autocast, channels_last, torch.compile). crossmod's step includes the geometric loss (the
    head mask's hole fill), which the peer has not. The paper-size case takes about a quarter of
    ``repeats``. Ratios are crossmod / peer."""
    import torch

    from .config import load_profile
    from .cyclegan import (check_settings, settings_from_profile, speed_mode,
                           training_flops_per_image, training_throughput)

    base = settings_from_profile(load_profile(profile))
    threads = torch.get_num_threads()
    result = {"name": "cyclegan", "device": f"cpu ({threads} threads)",
              "peer": "taesungp/contrastive-unpaired-translation@b3ac297 (reference CycleGAN)"}
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name(0)
    for label, case in CYCLEGAN_BENCH_CASES.items():
        iterations = max(2, int(repeats)) if label == "demo" else max(2, int(repeats) // 4)
        warmup = 3 if label == "demo" else 2
        s = check_settings({**base, "ngf": case["ngf"], "ndf": case["ndf"],
                            "n_blocks": case["n_blocks"], "batch_size": case["batch"]})
        peer = peer_images_per_s(case, iterations, threads)
        exact = training_throughput(s, case["size"], "cpu", case["batch"], iterations=iterations,
                                    warmup=warmup)
        fast = training_throughput(s, case["size"], "cpu", case["batch"], bf16=s["bf16"],
                                   channels_last=s["channels_last"], compile=s["compile"],
                                   iterations=iterations, warmup=warmup)
        # from the peer's seconds per iteration (4 decimals), not its rounded images/s
        peer_rate = case["batch"] / peer["s_per_iter"] if peer.get("s_per_iter") else None
        prefix = f"{label} ({case['size']}², ngf {case['ngf']}, {case['n_blocks']} blocks, batch {case['batch']})"
        result[f"{prefix}: peer images/s"] = peer_rate if peer_rate else peer.get("error")
        result[f"{prefix}: crossmod exact images/s"] = exact
        result[f"{prefix}: crossmod fast images/s"] = fast
        result[f"{prefix}: fast mode"] = speed_mode(s, "cpu")
        if peer_rate:
            result[f"{prefix}: exact / peer"] = exact / peer_rate
            result[f"{prefix}: fast / peer"] = fast / peer_rate
        if label == "paper":       # chapter 7's extrapolation reads these (paper-size networks)
            flops = training_flops_per_image(s, case["size"])["total"]
            result.update({"size": case["size"], "ngf": case["ngf"], "n_blocks": case["n_blocks"],
                           "reference_mode": "fp32 exact, batch 1",
                           "reference_tflops": exact * flops / 1e12,
                           "fast_mode": speed_mode(s, "cpu", case["batch"]),
                           "fast_tflops": fast * flops / 1e12})
    return result


def bench_unet_profile(repeats: int = 20, profile: str = "demo") -> dict:
    """``crossmod bench unet``: U-Net training slices/s of the ``profile``'s network at its crop
    size and batch on this CPU, exact fp32 against bf16 autocast with channels_last (what
    ``segmentation.cpu_bf16`` turns on; on a CPU without native bf16 the fast row is not run:
    training keeps fp32 there)."""
    import torch

    from .config import load_profile
    from .cyclegan import cpu_has_native_bf16
    from .segmentation import segmentation_config, training_throughput

    settings = load_profile(profile)
    cfg = segmentation_config(settings)
    size = int(settings["preprocessing"]["crop"])
    threads = torch.get_num_threads()
    iterations = max(2, int(repeats))
    prefix = (f"{profile} ({size}², base {cfg['base_features']}, {cfg['levels']} levels, "
              f"batch {cfg['batch_size']})")
    result = {"name": "unet", "device": f"cpu ({threads} threads)",
              "native bf16": cpu_has_native_bf16()}
    exact = training_throughput(settings, size, iterations=iterations)
    result[f"{prefix}: exact fp32 slices/s"] = exact
    if cpu_has_native_bf16():
        fast = training_throughput(settings, size, bf16=True, iterations=iterations)
        result[f"{prefix}: bf16 + channels_last slices/s"] = fast
        result[f"{prefix}: bf16 / exact"] = fast / exact
    steps = int(cfg["epochs"]) * int(cfg["max_steps_per_epoch"] or 0)
    if steps:  # the training steps of one model at the profile's settings (validation aside)
        result[f"{prefix}: minutes per {steps}-step model, exact"] = steps * cfg["batch_size"] / exact / 60
    return result


def bench_inference_profile(repeats: int = 3, profile: str = "demo") -> dict:
    """``crossmod bench inference``: seconds per MR patient end to end (read NIfTI, preprocess,
    U-Net, write NIfTI) on a Table-I-sized MR (512 x 512 x 30, 0.5 x 0.5 x 4 mm) with the profile's
    network (random weights: the time does not depend on them), as section 2.F times it (paper:
    0.86 +- 0.02 s per patient on a V100)."""
    from .config import load_profile
    from .segmentation import bench_inference

    settings = load_profile(profile)
    device = settings["segmentation"].get("device", "auto")
    result = bench_inference(settings, repeats=max(2, int(repeats)), device=device)
    return {"name": "inference", **result}


#: ``crossmod bench NAME`` → the function that runs it.
BENCHMARKS: dict[str, Callable[..., dict]] = {
    "metrics": lambda repeats=20, profile=None: bench_metrics(repeats=repeats),
    "registration": bench_registration_profile,
    "cyclegan": bench_cyclegan_profile,
    "inference": bench_inference_profile,
    "unet": bench_unet_profile,
}

BENCH_FORMAT = "crossmod-benchmark-1"


def _plain(value):
    """JSON-able copy of a result (numpy scalars and arrays, tuples, paths)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else str(value)  # JSON has no inf/nan
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def save_benchmark(result: dict, run, options: dict | None = None) -> Path:
    """Keep a benchmark's result in a run folder: ``<run>/metrics/bench_<name>.json`` (atomic),
    with the options it ran with and the provenance (commit, date, device, library versions) of
    this machine. ``run``: a :class:`~crossmod_lib.runs.RunFolder` or the run folder's path.
    A later save of the same benchmark replaces the file. Returns the path."""
    from .errors import CrossmodError
    from .runs import RunFolder, provenance

    name = result.get("name") if isinstance(result, dict) else None
    if not name or not str(name).replace("_", "").isalnum():
        raise CrossmodError(f"save_benchmark: the result needs a plain 'name' (got {name!r})")
    root = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)
    if not root.is_dir():
        raise CrossmodError(f"{root}: no such run folder to save the benchmark in")
    record = {"format": BENCH_FORMAT, "name": str(name),
              "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "options": _plain(options or {}), "provenance": _plain(provenance()),
              "result": _plain(result)}
    path = RunFolder.bench_result(name).at(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path


def result_table(result: dict):
    """A benchmark result as a one-column pandas table (``value``, one row per key; a nested
    dict's keys become ``key: subkey`` rows), values formatted as :func:`format_table` does."""
    import pandas as pd

    rows = {}
    for key, value in result.items():
        if isinstance(value, dict):
            rows.update({f"{key}: {k}": v for k, v in value.items()})
        else:
            rows[str(key)] = value
    return pd.DataFrame({"value": [_format_value(v) for v in rows.values()]}, index=list(rows))


def recorded_benchmarks(folder=None) -> dict[str, dict]:
    """The benchmarks kept in the repository (``crossmod bench NAME --save recorded/benchmarks``:
    ``recorded/benchmarks/metrics/bench_<name>.json``), name → record; {} when there are none."""
    from .record import default_folder

    folder = Path(folder) if folder else default_folder() / "benchmarks"
    return load_benchmarks(folder) if folder.is_dir() else {}


def load_benchmarks(run) -> dict[str, dict]:
    """The benchmarks saved in a run folder (:func:`save_benchmark`), name → record, sorted by
    name; {} when there are none. A file that is not such a record: one-line CrossmodError."""
    from .errors import CrossmodError
    from .runs import RunFolder

    root = Path(run) if isinstance(run, (str, os.PathLike)) else Path(run.root)
    records = {}
    for path in sorted(RunFolder.bench_result("*").at(root).parent.glob(RunFolder.bench_result("*").name)):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CrossmodError(f"{path}: not readable as JSON ({' '.join(str(exc).split())[:120]})") from None
        if not isinstance(record, dict) or record.get("format") != BENCH_FORMAT or \
                not isinstance(record.get("result"), dict):
            raise CrossmodError(f"{path}: not a saved benchmark ({BENCH_FORMAT} record expected)")
        records[record["name"]] = record
    return records
