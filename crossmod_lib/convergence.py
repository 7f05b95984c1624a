"""The convergence study (beyond the paper): how the method's result depends on the CycleGAN budget.

The paper trained its CycleGAN for 72 h on a V100; this project trains it on two CPU cores. The
study asks how far that is from enough: for each of several seeds and CycleGAN budgets (number
of training iterations), it runs the pipeline from the prepared slices on (CycleGAN → synthetic
MR → cleaning → U-Nets → predictions → metrics) and records

- the cross-modality U-Net's DSC on the real MR per parotid (mean and SD over patients), beside
  the baselines that do not depend on the CycleGAN (CT only, naive, domain randomisation), trained
  once per seed;
- the quality of the synthetic MR itself (:func:`synthesis_quality`): the parotid/head contrast of
  chapter 2, the head-outline Dice of chapter 3, a histogram distance and a kernel inception
  distance (KID) on slice texture features between synthetic and real MR.

**Budgets share a trunk.** A budget of B iterations is k + k epochs of ``iterations_per_epoch``
(constant learning rate, then linear decay, as every profile trains). Its first k epochs are
those of any longer run of the same seed, so one *trunk* is trained at a constant rate and every
budget is branched off it where its decay starts (:func:`crossmod_lib.cyclegan.branch`): the
budgets 430, 860, 2,150 and 4,300 cost 6,020 iterations instead of 7,740, and each is bit for bit
the run a profile of that budget would train (tested).

Layout of a study folder (``crossmod study convergence --profile openkbp --out DIR``)::

    DIR/base/                     raw/ and prepared/ (stage 1, shared by every point)
    DIR/seed<S>/trunk/            the constant-rate CycleGAN of seed S
    DIR/seed<S>/budget<B>/        a run folder: synthetic/, cleaned/, model/, predictions/, metrics/
    DIR/metrics/convergence.csv   one row per seed, budget, model and parotid
    DIR/metrics/convergence_quality.csv   one row per seed and budget (synthetic-MR quality)
    DIR/metrics/convergence_runs.json     provenance of each point (commit, date, device, seconds)
    DIR/profile.yaml              the profile the study ran

A finished point is not run again (delete its folder to redo it); ``crossmod record`` keeps the
tables with their provenance for the book.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CrossmodError
from .runs import RunFolder, TrainingFiles

QUALITY_COLUMNS = ("seed", "budget", "parotid_ratio", "real_parotid_ratio", "outline_dice_median",
                   "outline_dice_share", "histogram_w1", "kid", "kid_sd", "real_kid")
POINT_COLUMNS = ("seed", "budget", "model", "title", "structure", "dsc_mean", "dsc_sd", "n", "note")
SIDES = {"Parotid_R": "right", "Parotid_L": "left"}


# ----------------------------------------------------------------------------------------------
# Settings


def study_settings(profile: dict) -> dict:
    """The profile's ``convergence`` block, checked: budgets (iterations, increasing, each a
    multiple of 2 × ``iterations_per_epoch``), seeds (integers), models (U-Net recipe names)."""
    block = profile.get("convergence")
    if not isinstance(block, dict):
        raise CrossmodError("convergence: the profile has no convergence block (see full.yaml)")
    ipe, budgets, seeds, models = (block.get(k) for k in ("iterations_per_epoch", "budgets",
                                                           "seeds", "models"))
    if not isinstance(ipe, int) or isinstance(ipe, bool) or ipe < 1:
        raise CrossmodError(f"convergence.iterations_per_epoch must be a positive integer, got {ipe!r}")
    if (not isinstance(budgets, list) or not budgets
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in budgets)):
        raise CrossmodError(f"convergence.budgets must be a list of positive integers, got {budgets!r}")
    if budgets != sorted(set(budgets)):
        raise CrossmodError(f"convergence.budgets must increase, got {budgets}")
    odd = [b for b in budgets if b % (2 * ipe)]
    if odd:
        raise CrossmodError(f"convergence.budgets {odd}: each must be a multiple of 2 x "
                            f"iterations_per_epoch ({2 * ipe}): k constant + k decaying epochs")
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise CrossmodError(f"convergence.seeds must be a list of integers, got {seeds!r}")
    if not isinstance(models, list) or "cross_modality" not in models:
        raise CrossmodError(f"convergence.models must be a list of U-Net recipes including "
                            f"cross_modality, got {models!r}")
    return {"iterations_per_epoch": ipe, "budgets": list(budgets), "seeds": list(seeds),
            "models": list(models)}


#: The settings :func:`point_profile` sets for each point (a study's profile.yaml keeps the profile's).
POINT_SETTINGS = ("cyclegan.epochs_constant", "cyclegan.epochs_decay", "cyclegan.max_iterations_per_epoch",
                  "cyclegan.seed", "segmentation.seed")


#: What a study chooses for itself and its points, never a setting of the profile it studies:
#: compared with a profile, a recorded study skips these (and its seeds and budgets).
STUDY_CHOICES = ("convergence.models", *POINT_SETTINGS)


def point_profile(profile: dict, seed: int, budget: int, iterations_per_epoch: int) -> dict:
    """The profile of one study point: the CycleGAN trains ``budget`` iterations (k + k epochs)
    and both networks take ``seed``; the profile's own seed (which keys the data, e.g. the
    simulated MR) is left as it is."""
    k = budget // (2 * iterations_per_epoch)
    point = copy.deepcopy(profile)
    point["name"] = f"{profile['name']}-seed{seed}-budget{budget}"
    point["cyclegan"].update({"epochs_constant": k, "epochs_decay": k, "seed": int(seed),
                              "max_iterations_per_epoch": iterations_per_epoch})
    point["segmentation"]["seed"] = int(seed)
    return point


# ----------------------------------------------------------------------------------------------
# Quality of the synthetic MR


def texture_features(images: np.ndarray, head_masks: np.ndarray) -> np.ndarray:
    """Per-slice features [N, 36] for a distribution distance between MR-like image sets.

    No pretrained network is available offline (KID usually takes Inception features), so the
    features are hand-chosen to see what distinguishes an under-trained generator's output from
    real MR: the in-head intensity histogram (16 bins over 0-255), the histogram of the
    gradient magnitude (16 bins, 0-128 per pixel), and four texture energies inside the head,
    each the mean absolute response of a small filter relative to the mean intensity: the 2 × 2
    checkerboard (the transposed convolutions' artefact), the 3 × 3 Laplacian (speckle), and the
    horizontal and vertical first differences.
    """
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(head_masks, dtype=bool)
    if images.shape != masks.shape or images.ndim != 3:
        raise CrossmodError(f"texture features: images {images.shape} and head masks "
                            f"{masks.shape} must both be [N, H, W]")
    features = np.zeros((len(images), 36), dtype=np.float64)
    bins = np.linspace(0, 255, 17)
    grad_bins = np.linspace(0, 128, 17)
    for i, (image, mask) in enumerate(zip(images, masks)):
        inner = mask[1:-1, 1:-1]
        if inner.sum() < 16:
            continue
        features[i, :16] = np.histogram(image[mask], bins=bins)[0] / mask.sum()
        gy, gx = np.gradient(image)
        magnitude = np.hypot(gx, gy)[mask]
        features[i, 16:32] = np.histogram(np.clip(magnitude, 0, 128), bins=grad_bins)[0] / mask.sum()
        scale = max(float(image[mask].mean()), 1.0)
        checker = np.abs(image[:-1, :-1] - image[1:, :-1] - image[:-1, 1:] + image[1:, 1:])
        laplace = np.abs(4 * image[1:-1, 1:-1] - image[:-2, 1:-1] - image[2:, 1:-1]
                         - image[1:-1, :-2] - image[1:-1, 2:])
        features[i, 32] = checker[mask[:-1, :-1]].mean() / scale
        features[i, 33] = laplace[inner].mean() / scale
        features[i, 34] = np.abs(np.diff(image, axis=1))[mask[:, :-1]].mean() / scale
        features[i, 35] = np.abs(np.diff(image, axis=0))[mask[:-1, :]].mean() / scale
    return features


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 50,
                              subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): the unbiased squared MMD between two feature sets under the
    cubic polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets; returns
    (mean, SD over subsets). Zero in expectation for samples of one distribution.

    Written here (a few lines of numpy) rather than taken from torchmetrics / torch-fidelity,
    whose KID is tied to their Inception feature extractor and its downloaded weights.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise CrossmodError(f"KID: feature sets {a.shape} and {b.shape} must be [N, d] alike")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise CrossmodError("KID: need at least 2 samples in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = m * (m - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off
                      - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


#: Version of :func:`synthesis_quality`'s definition, stored with each study point's numbers;
#: a study recomputes the quality of points made under another one from their stored slices.
#: 2: features standardised on the real MR alone (1: on synthetic and real pooled, which made
#: the real-MR floor move with the synthetic set it was pooled with).
QUALITY_DEFINITION = 2
#: Smallest SD a feature is scaled by: every feature is a fraction or a ratio to the mean
#: intensity, where differences under 0.01 mean nothing; without a floor, a feature almost
#: constant in real MR (an empty histogram bin) would dominate the kernel.
FEATURE_SD_FLOOR = 0.01


def _standardised(*sets: np.ndarray, reference: np.ndarray) -> list[np.ndarray]:
    # every feature on one scale, the real MR's, so no feature dominates the kernel by its units
    # and the scale does not depend on the synthetic set being measured
    mean, sd = reference.mean(axis=0), reference.std(axis=0)
    sd = np.maximum(sd, FEATURE_SD_FLOOR)
    return [(s - mean) / sd for s in sets]


def synthesis_quality(synthetic_npz, ct_npz, mr_npz, head_threshold: float,
                      outline_threshold: float = 0.8, seed: int = 0) -> dict:
    """How MR-like a CycleGAN's synthetic MR is, without a segmentation network.

    ``parotid_ratio`` / ``real_parotid_ratio``: mean intensity in the parotids over the rest of
    the head (:func:`crossmod_lib.cyclegan.parotid_contrast`); ``outline_dice_median`` and
    ``outline_dice_share`` (≥ ``outline_threshold``): the head outline against the CT's
    (:func:`crossmod_lib.cleaning.outline_dice`); ``histogram_w1``: the 1-Wasserstein distance
    between the in-head intensities (0-255) of synthetic and real MR; ``kid`` ± ``kid_sd``:
    :func:`kernel_inception_distance` on :func:`texture_features` (standardised on the real MR's
    mean and SD, each SD at least :data:`FEATURE_SD_FLOOR`), and ``real_kid``: the same between
    two halves of the real MR patients (the floor of the measure, the same for every budget of a
    seed); ``definition``: :data:`QUALITY_DEFINITION`.
    """
    from scipy.stats import wasserstein_distance

    from .cleaning import outline_dice
    from .cyclegan import parotid_contrast
    from .slices import read_slices

    synthetic = read_slices(synthetic_npz, "synthetic MR slices", ("image", "labels", "head_mask"))
    ct = read_slices(ct_npz, "prepared CT slices", ("image", "head_mask"))
    mr = read_slices(mr_npz, "prepared MR slices", ("image", "head_mask", "patient"))
    contrast = {row["images"]: row["parotid / rest of head"]
                for row in parotid_contrast(synthetic_npz, mr_npz)}
    dice = outline_dice(synthetic["image"], ct["head_mask"], head_threshold)
    rng = np.random.default_rng(seed)
    syn_mask = ct["head_mask"].astype(bool)  # the synthetic MR stands on its CT's head
    mr_mask = mr["head_mask"].astype(bool)
    syn_pixels = synthetic["image"][syn_mask]
    mr_pixels = mr["image"][mr_mask]
    syn_pixels = rng.choice(syn_pixels, min(len(syn_pixels), 200_000), replace=False)
    mr_pixels = rng.choice(mr_pixels, min(len(mr_pixels), 200_000), replace=False)
    w1 = wasserstein_distance(syn_pixels.astype(np.float64), mr_pixels.astype(np.float64))
    syn_features = texture_features(synthetic["image"], syn_mask)
    mr_features = texture_features(mr["image"], mr_mask)
    patients = np.unique(mr["patient"])
    half = np.isin(mr["patient"], patients[::2])
    syn_z, mr_z = _standardised(syn_features, mr_features, reference=mr_features)
    kid, kid_sd = kernel_inception_distance(syn_z, mr_z, seed=seed)
    real_kid, _ = kernel_inception_distance(mr_z[half], mr_z[~half], seed=seed)
    return {"parotid_ratio": contrast["synthetic MR (CT labels)"],
            "real_parotid_ratio": contrast["real MR (MR labels)"],
            "outline_dice_median": float(np.median(dice)),
            "outline_dice_share": float(np.mean(dice >= outline_threshold)),
            "histogram_w1": float(w1), "kid": kid, "kid_sd": kid_sd, "real_kid": real_kid,
            "definition": QUALITY_DEFINITION}


# ----------------------------------------------------------------------------------------------
# Running the study


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() != target.resolve():
            raise CrossmodError(f"{link}: exists and is not the study's shared {target.name}/")
        return
    link.symlink_to(target.resolve(), target_is_directory=True)


def _provenance(commit: str | None = None) -> dict:
    """Commit, date and device of a study point. ``commit``: the one the study process started
    from (its code is imported then), not the checkout's HEAD when the point starts, which may
    have moved on while a study of hours runs."""
    from .runs import git_commit
    from .timing import device_info

    return {"commit": commit or git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info()}


def _atomic_csv(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def dsc_by_model(metrics: pd.DataFrame, models, postprocess: str = "lcc") -> list[dict]:
    """Mean and SD over patients of the DSC per model and parotid, from ``metrics/segmentation.csv``."""
    rows = []
    chosen = metrics[metrics["postprocess"] == postprocess]
    for model in models:
        for structure in SIDES:
            values = chosen[(chosen["model"] == model) & (chosen["structure"] == structure)]["dsc"]
            if values.empty:
                continue
            title = chosen[chosen["model"] == model]["title"].iloc[0]
            rows.append({"model": model, "title": title, "structure": structure,
                         "dsc_mean": float(values.mean()), "dsc_sd": float(values.std(ddof=1)),
                         "n": int(len(values)), "note": ""})
    return rows


def scored_models(models) -> list[str]:
    """The methods a point reports for its trained ``models``: with ``ct_only`` comes its paired
    control (:data:`crossmod_lib.segmentation.PAIRED_CT`) where the MR is simulated from CT."""
    from .segmentation import PAIRED_CT

    models = list(models)
    return models + [PAIRED_CT] if "ct_only" in models and PAIRED_CT not in models else models


def run_point(point, trunk_dir: Path, baseline_from: Path | None, models, log=print) -> dict:
    """One study point (a :class:`~crossmod_lib.runs.RunFolder` with ``raw`` and ``prepared``
    linked): CycleGAN branched off the trunk and finished, synthesis, cleaning, the U-Nets
    (``models``; those not depending on the CycleGAN copied from ``baseline_from``, the seed's
    first point, when given), predictions and metrics. Returns seconds per stage."""
    from . import cleaning, cyclegan, evaluation, segmentation

    seconds = {}
    settings = cyclegan.settings_from_profile(point.profile)
    head_threshold = point.profile["preprocessing"]["head_threshold"]
    ct_slices, mr_slices = point.inputs("ct_slices", "mr_slices")
    folder = point.output("cyclegan_dir")
    t0 = time.perf_counter()
    if not (folder / cyclegan.SUMMARY_NAME).is_file():
        cyclegan.branch(trunk_dir, folder, settings, head_threshold)
    summary = cyclegan.train(ct_slices, mr_slices, folder, settings,
                             head_threshold, resume=True, progress=False)
    seconds["cyclegan_decay"] = time.perf_counter() - t0
    seconds["cyclegan_total"] = summary["seconds_total"]
    t0 = time.perf_counter()
    cyclegan.synthesise(folder / cyclegan.CHECKPOINT_NAME, ct_slices, point.synthetic_mr, settings)
    seconds["synthesis"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    decisions = cleaning.clean_run(point, progress=False)
    seconds["cleaning"] = time.perf_counter() - t0
    kept = int(decisions["accepted_final"].astype(bool).sum())
    if kept == 0:
        # Nothing to train the cross-modality U-Net on: the method yields no contour at this
        # budget, i.e. DSC 0 on every patient. Recorded as such, with the reason.
        models = [m for m in models if m != "cross_modality"]
    if baseline_from is not None:
        for name in models:
            source = baseline_from / "model" / name
            recipe_data = next(r["data"] for r in segmentation.model_recipes(point.profile)
                               if r["name"] == name)
            # A model on the translator's output (written by the CycleGAN or cleaning stage)
            # changes with the budget; the others are shared by every point.
            depends = name == "cross_modality" or (
                recipe_data is not None
                and RunFolder.artefacts()[recipe_data].writer in ("cyclegan", "cleaning"))
            if not depends and source.is_dir() and not (point.root / "model" / name).exists():
                shutil.copytree(source, point.root / "model" / name)
    t0 = time.perf_counter()
    kinds = {r["kind"] for r in segmentation.model_recipes(point.profile) if r["name"] in models}
    segmentation.train_run(point, kinds=sorted(kinds), progress=False)
    seconds["segmentation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    segmentation.predict_run(point, models=models)
    metrics = evaluation.evaluate_predictions(point)
    seconds["predict_evaluate"] = time.perf_counter() - t0
    dsc = dsc_by_model(metrics, scored_models(models))
    if kept == 0:
        mr_patients = metrics[metrics["modality"] == "MR"]["patient"].nunique()
        dsc = [{"model": "cross_modality", "title": "Cross-modality (synthetic MR, CT labels)",
                "structure": structure, "dsc_mean": 0.0, "dsc_sd": 0.0, "n": int(mr_patients),
                "note": "no synthetic slice passed cleaning: no network, no contour"}
               for structure in SIDES] + dsc
    log(f"  {point.root.name}: {kept} slices kept; " + ", ".join(
        f"{r['model']} {SIDES[r['structure']][0].upper()} {r['dsc_mean']:.2f}" for r in dsc))
    return {"seconds": seconds, "cyclegan_iterations": summary["iteration"],
            "speed_mode": summary["speed_mode"], "kept_slices": kept,
            "slices": int(len(decisions)), "dsc": dsc}


def _differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys where two nested settings differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _with_later_defaults(recorded: dict) -> dict:
    """A recorded profile with the settings added to ``full.yaml`` since it was recorded, at
    their defaults: a new setting's default keeps the behaviour from before it existed."""
    from .config import load_profile

    def fill(into: dict, defaults: dict) -> None:
        for key, value in defaults.items():
            if key not in into:
                into[key] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(into[key], dict):
                fill(into[key], value)

    fill(recorded, {block: defaults for block, defaults in load_profile("full").items()
                    if isinstance(defaults, dict)})
    return recorded


def settings_differences(ours: dict, theirs: dict, ignore=()) -> list[str]:
    """Dotted keys in which two profiles' settings differ, ``theirs`` a recorded profile (the
    settings added to ``full.yaml`` since it was recorded take their defaults). Names,
    descriptions and the study's own seeds and budgets never count; ``ignore``: dotted keys or
    blocks (``"cyclegan"``) that do not count either."""
    ours, theirs = copy.deepcopy(ours), _with_later_defaults(copy.deepcopy(theirs))
    for block in (ours, theirs):
        for key in ("seeds", "budgets"):
            (block.get("convergence") or {}).pop(key, None)
        block.pop("name", None)
        block.pop("description", None)
    return [key for key in _differences(ours, theirs)
            if not any(key == skip or key.startswith(skip + ".") for skip in ignore)]


def _read_study(recorded: Path) -> tuple[dict, dict]:
    """A recorded study's provenance (convergence_runs.json) and profile, or a one-line error."""
    import yaml

    runs_path, profile_path = RunFolder.convergence_runs.at(recorded), RunFolder.settings_file.at(recorded)
    if not runs_path.is_file() or not profile_path.is_file():
        raise CrossmodError(f"{recorded}: not a recorded study (no metrics/convergence_runs.json "
                            "and profile.yaml)")
    try:
        return json.loads(runs_path.read_text()), yaml.safe_load(profile_path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CrossmodError(f"{recorded}: unreadable study record ({' '.join(str(exc).split())[:120]})") from None


def carried_points(profile: dict, recorded) -> dict:
    """The finished points of a recorded study (``crossmod record`` of a study folder), to carry
    on with in a new study folder: checked to come from the same profile (every setting but the
    study's own seeds and budgets), each marked ``carried_from``. A point's numbers do not
    depend on where it ran, so a study can be finished over several sessions or machines; each
    point keeps its own provenance."""
    recorded = Path(recorded)
    info, theirs = _read_study(recorded)
    differ = settings_differences(profile, theirs)
    if differ:
        raise CrossmodError(f"{recorded}: recorded with other settings than this profile "
                            f"({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); "
                            "its points cannot be carried on")
    return {key: {**point, "carried_from": str(recorded)} for key, point in info.get("points", {}).items()}


#: Settings the baselines (CT only, domain randomisation, naive) do not depend on: they never see
#: the CycleGAN, the cleaning or the cross-modality network's augmentation, so any study of the
#: same data and U-Net settings holds them for its seeds, whatever its translator.
BASELINE_FREE_SETTINGS = ("cyclegan", "cleaning", "segmentation.cross_modality_appearance")
#: The networks that never see the translator (``ct_only_paired``: segmentation.PAIRED_CT).
BASELINE_MODELS = ("ct_only", "domain_random", "naive", "ct_only_paired")
#: Settings the translator does not see: a study that differs from another only in these (its
#: cleaning, its U-Nets) can take that study's CycleGANs and synthetic MR as they are
#: (``translator_from`` of :func:`run_study`), clean them again and train only its U-Nets. The
#: cleaning reruns in any case; it takes from the copied registration cache only registrations
#: whose inputs and parameters are its own (:func:`crossmod_lib.cleaning.clean`).
TRANSLATOR_FREE_SETTINGS = ("cleaning", "segmentation", "convergence.models")
#: The stages of a point that a study taking another's translator copies (from the CycleGAN on).
_TRANSLATOR_STAGES = ("synthetic", "cleaned")


def _translator_source(profile: dict, study: Path) -> tuple[Path, bool]:
    """Check that a local study folder ran the same translator as ``profile`` (every setting but
    :data:`TRANSLATOR_FREE_SETTINGS` and the study's own choices); returns it and whether its
    cleaning settings are the profile's too."""
    import yaml

    study = Path(study).absolute()
    settings_path = RunFolder.settings_file.at(study)
    if not settings_path.is_file():
        raise CrossmodError(f"{study}: not a study folder (no profile.yaml) to take translators from")
    theirs = yaml.safe_load(settings_path.read_text())
    differ = settings_differences(profile, theirs, list(STUDY_CHOICES) + list(TRANSLATOR_FREE_SETTINGS))
    if differ:
        raise CrossmodError(f"{study}: its translators were trained with other settings than this "
                            f"profile's ({', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}); "
                            "only cleaning and U-Net settings may differ")
    not_cleaning = [key for key in STUDY_CHOICES + TRANSLATOR_FREE_SETTINGS if key != "cleaning"]
    return study, not settings_differences(profile, theirs, not_cleaning)


def taken_stage_seconds(seconds: dict, source_study: Path, key: str) -> dict:
    """A point's stage seconds when it took its translator from ``source_study``'s point ``key``:
    the CycleGAN's come with its summary, but the cleaning found its output copied and took
    seconds only, so its time is the source point's (what a run of the profile spends on it)."""
    try:
        source = json.loads(RunFolder.convergence_runs.at(Path(source_study)).read_text())["points"][key]["seconds"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return dict(seconds)
    out = dict(seconds)
    if "cleaning" in source:
        out["cleaning"] = max(float(seconds.get("cleaning", 0.0)), float(source["cleaning"]))
    return out


def _take_translator(source_point: Path, point_dir: Path) -> bool:
    """Copy a finished point's CycleGAN, synthetic MR and cleaned slices into a new point folder;
    False (nothing copied) when the source point has no finished CycleGAN."""
    from . import cyclegan

    if not (source_point / RunFolder.cyclegan_dir.relpath / cyclegan.SUMMARY_NAME).is_file():
        return False
    for stage in _TRANSLATOR_STAGES:
        if (source_point / stage).is_dir():
            shutil.copytree(source_point / stage, point_dir / stage, dirs_exist_ok=True)
    return True
# The wall seconds of a point that a run of its profile spends from the prepared slices on (the
# CycleGAN in all, trunk included; the trunk's own entry is the part trained for this point).
_RUN_STAGES = ("cyclegan_total", "synthesis", "cleaning", "segmentation", "predict_evaluate")


def shares_baselines(tier_profile: dict, study) -> bool:
    """Whether a recorded study's baselines are the tier's: the same data and U-Net settings, so
    it may differ from ``tier_profile`` only in :data:`BASELINE_FREE_SETTINGS` and the study's own
    choices (a translator or CycleGAN comparison). Other MR, or other U-Net settings, make their
    own baselines (:func:`variant_table` sets such studies beside the tier)."""
    _, theirs = _read_study(Path(study))
    return _same_baselines(tier_profile, theirs)


def _same_baselines(tier_profile: dict, theirs: dict) -> bool:
    return not settings_differences(tier_profile, theirs, list(STUDY_CHOICES) + list(BASELINE_FREE_SETTINGS))


def tier_run(tier_profile: dict, studies) -> dict:
    """The recorded runs of a tier profile as it stands (e.g. ``openkbp`` on main), from recorded
    studies (paths of ``crossmod record`` study folders): the cross-modality points at the
    profile's budget (:func:`profile_budget`) of every study recorded with exactly the profile's
    settings (its convergence block apart from ``iterations_per_epoch`` aside), and the
    baselines of the same seeds from any study that differs from it only in
    :data:`BASELINE_FREE_SETTINGS`. Returns ``{"budget", "points"`` (the rows of
    :data:`POINT_COLUMNS` at that budget, ready for :func:`tier_criteria` and
    :func:`summary_table`), ``"cross_modality_from"``, ``"baselines_from"`` (study names),
    ``"seconds"`` (per seed: the point's stages from the CycleGAN on, plus the U-Nets of the
    baselines' point when that is another point, which may include a cross-modality network of
    its own: an upper bound on a run of the profile from its prepared slices), ``"quality"`` (the synthetic-MR quality rows of
    those points, :data:`QUALITY_COLUMNS`), ``"reason"`` (why nothing was found, else None)``}``."""
    ipe = (tier_profile.get("convergence") or {}).get("iterations_per_epoch")
    budget = profile_budget(tier_profile, ipe)
    found = {"budget": budget, "points": pd.DataFrame(columns=list(POINT_COLUMNS)),
             "cross_modality_from": [], "baselines_from": [], "seconds": {},
             "quality": pd.DataFrame(columns=list(QUALITY_COLUMNS)), "reason": None}
    if budget is None:
        found["reason"] = ("the profile's CycleGAN budget is no study point (k + k epochs of "
                           f"{ipe} iterations)")
        return found
    ignore = list(STUDY_CHOICES)  # a point's schedule is checked through the budget
    cross, baselines, quality = [], [], []
    for folder in map(Path, studies):
        info, theirs = _read_study(folder)
        table = pd.read_csv(RunFolder.convergence.at(folder))
        if not settings_differences(tier_profile, theirs, ignore):
            rows = table[(table["model"] == "cross_modality") & (table["budget"] == budget)]
            if not rows.empty:
                cross.append((folder.name, rows, info))
                if RunFolder.convergence_quality.at(folder).is_file():
                    quality.append(pd.read_csv(RunFolder.convergence_quality.at(folder)))
        if _same_baselines(tier_profile, theirs):
            rows = table[table["model"].isin(BASELINE_MODELS)]
            if not rows.empty:
                baselines.append((folder.name, rows, info))
    if not cross:
        found["reason"] = f"no recorded study ran the profile's settings at {budget:,} CycleGAN iterations"
        return found
    ours = (pd.concat([rows.assign(_from=name) for name, rows, _ in cross])
            .drop_duplicates(["seed", "structure"]))
    seeds = sorted(set(ours["seed"]))
    shown = ours.groupby("seed")["_from"].first().to_dict()  # the study whose network a seed shows
    theirs_rows = []
    for name, rows, info in baselines:
        rows = rows[rows["seed"].isin(seeds)]
        if not rows.empty:
            # a seed's baselines come first from the study that ran its cross-modality network
            # (same machine and code); from the first other study that has them otherwise
            rank = rows["seed"].map(lambda seed: 0 if shown.get(seed) == name else 1)
            theirs_rows.append(rows.assign(budget=budget, _from=name, _rank=rank))
    points = (pd.concat([ours.assign(_rank=-1), *theirs_rows])
              .sort_values("_rank", kind="stable").drop_duplicates(["seed", "model", "structure"]))
    used = points[points["model"].isin(BASELINE_MODELS)].groupby("seed")["_from"].first().to_dict()
    found["baselines_from"] = [name for name, _, _ in baselines if name in used.values()]
    found["points"] = (points.drop(columns=["_from", "_rank"])
                       .sort_values(["seed", "model", "structure"]).reset_index(drop=True))
    found["cross_modality_from"] = [name for name, _, _ in cross]
    if quality:
        quality = pd.concat(quality)
        found["quality"] = (quality[(quality["budget"] == budget) & quality["seed"].isin(seeds)]
                            .drop_duplicates("seed").sort_values("seed").reset_index(drop=True))
    for seed in seeds:
        total, timed = 0.0, None
        for name, _, info in cross:
            point = info.get("points", {}).get(f"seed{seed}/budget{budget:05d}")
            if point:
                total = sum(point.get("seconds", {}).get(stage, 0.0) for stage in _RUN_STAGES)
                timed = (name, budget)
                break
        for name, _, info in baselines:  # the seed's first point trained its baselines
            firsts = [p for p in info.get("points", {}).values() if p.get("seed") == seed]
            if firsts and name == used.get(seed):
                first = min(firsts, key=lambda p: p["budget"])
                if (name, first["budget"]) != timed:  # else already in that point's U-Nets
                    total += first.get("seconds", {}).get("segmentation", 0.0)
                break
        found["seconds"][int(seed)] = total
    return found


def _requality(runs_info: dict, study_dir: Path, base, profile: dict, log=print) -> None:
    """Recompute, from the stored synthetic slices, the quality of the points measured under an
    older :data:`QUALITY_DEFINITION` (a carried point without its folder keeps its numbers)."""
    for key, point in sorted(runs_info["points"].items()):
        if point.get("quality", {}).get("definition") == QUALITY_DEFINITION:
            continue
        synthetic = RunFolder.synthetic_mr.at(study_dir / key)
        if not synthetic.is_file():
            continue
        log(f"{key}: synthesis quality recomputed (definition {QUALITY_DEFINITION})")
        point["quality"] = synthesis_quality(
            synthetic, base.ct_slices, base.mr_slices,
            profile["preprocessing"]["head_threshold"], profile["cleaning"]["outline_dice_threshold"],
            seed=point["seed"])


def _add_paired_control(runs_info: dict, study_dir: Path, profile: dict, log=print) -> None:
    """Give the finished points of a study on simulated MR that predate the paired control
    (CT only on the MR patients' own CT) its numbers: each point's networks predict and are
    evaluated again (deterministic on the CPU: the other methods' numbers must come out the
    same, which is checked and recorded) and the control's rows are added. A carried point
    without its folder keeps what it has."""
    from . import evaluation, segmentation

    if profile["data"]["mr"].get("dataset") != "simulated_mr":
        return
    study = study_settings(profile)
    for key, point in sorted(runs_info["points"].items()):
        if "paired_control" in point or any(r["model"] == segmentation.PAIRED_CT for r in point["dsc"]):
            continue
        point_dir = study_dir / key
        if not (point_dir / "model" / "ct_only" / TrainingFiles.BEST).is_file():
            continue
        run = RunFolder.open(point_profile(profile, point["seed"], point["budget"],
                                           study["iterations_per_epoch"]), point_dir)
        models = [m for m in study["models"] if (point_dir / "model" / m / TrainingFiles.BEST).is_file()]
        log(f"{key}: predicting again with the paired control ({', '.join(models)}) ...")
        t0 = time.perf_counter()
        segmentation.predict_run(run, models=models)
        metrics = evaluation.evaluate_predictions(run)
        rows = dsc_by_model(metrics, scored_models(models))
        new = {(r["model"], r["structure"]): r["dsc_mean"] for r in rows}
        changed = sorted({r["model"] for r in point["dsc"] if (r["model"], r["structure"]) in new
                          and abs(new[(r["model"], r["structure"])] - r["dsc_mean"]) > 1e-9})
        if changed:
            log(f"{key}: predicting again changed {', '.join(changed)}; their recorded numbers are kept")
        point["dsc"] = point["dsc"] + [r for r in rows if r["model"] == segmentation.PAIRED_CT]
        point["paired_control"] = {**_provenance(), "seconds": time.perf_counter() - t0,
                                   "others_changed": changed}


def _lengthen_trunk(trunk_dir: Path, settings: dict, head_threshold: float, log) -> None:
    """A study carried on with a larger budget than its trunk was started for (a later session
    adding 17,200 to a study of 8,600): the trunk's constant rate runs on, so its checkpoint is
    re-set to the longer constant schedule (:func:`cyclegan.branch` onto itself, which checks that
    every epoch done ran at the rate the longer trunk would have used) and training resumes."""
    from . import cyclegan

    checkpoint = trunk_dir / cyclegan.CHECKPOINT_NAME
    if not checkpoint.is_file():
        return
    old = cyclegan.load_checkpoint(checkpoint)["settings"]
    if old.get("epochs_decay") == 0 and old.get("epochs_constant", 0) < settings["epochs_constant"]:
        cyclegan.branch(trunk_dir, trunk_dir, settings, head_threshold)
        log(f"{trunk_dir}: trunk lengthened from {old['epochs_constant']} to "
            f"{settings['epochs_constant']} constant-rate epochs")


def run_study(profile: dict, study_dir, log=print, progress: bool = False,
              carry_on=None, new_points: bool = True,
              translator_from=None) -> dict[str, pd.DataFrame]:
    """Run (or carry on) the convergence study of ``profile`` in ``study_dir``; see the module.

    Points are visited seed by seed, budgets in increasing order, the trunk trained up to each
    budget's branching epoch in turn. After every point the tables under ``metrics/`` are
    rewritten (atomically), so an interrupted study keeps what it finished. Returns the tables
    ``points`` and ``quality``. ``carry_on``: a recorded study of the same profile whose finished
    points are taken as they are (:func:`carried_points`), e.g. to add seeds in a later session;
    a seed whose first point was carried trains its baselines again (same seed: same networks).
    ``new_points=False``: run no point, only bring the finished ones' quality measures up to
    :data:`QUALITY_DEFINITION` and rewrite the tables. ``translator_from``: a local study folder
    of the same translator settings (only cleaning and U-Net settings may differ) whose finished
    points' CycleGAN, synthetic MR and cleaned slices are copied, so that only the U-Nets train
    (the synthesis is run again from the copied CycleGAN, the cleaning again with its own settings,
    finding in the copied cache the registrations whose parameters are its own); each such point
    names its source (``translator_from``) and keeps the source's CycleGAN seconds, and the
    source's cleaning seconds where the cleaning settings are the same.
    """
    from . import cyclegan, preparation
    from .config import save_profile
    from .runs import git_commit

    study = study_settings(profile)
    same_cleaning = True
    if translator_from is not None:
        translator_from, same_cleaning = _translator_source(profile, translator_from)
    code_commit = git_commit()  # the code this process runs, whatever HEAD does meanwhile
    study_dir = Path(study_dir).absolute()
    study_dir.mkdir(parents=True, exist_ok=True)
    save_profile(profile, RunFolder.settings_file.at(study_dir))
    runs_path = RunFolder.convergence_runs.at(study_dir)
    runs_info = json.loads(runs_path.read_text()) if runs_path.is_file() else {"points": {}}
    runs_info["study"] = study
    if carry_on is not None:
        for key, point in carried_points(profile, carry_on).items():
            runs_info["points"].setdefault(key, point)

    base = RunFolder.open(profile, study_dir / "base")
    prepared = base.root / "prepared"
    if base.ct_slices.is_file():
        _requality(runs_info, study_dir, base, profile, log)
        _add_paired_control(runs_info, study_dir, profile, log)
    elif not new_points:
        raise CrossmodError(f"{study_dir}: no prepared slices (base/prepared/): nothing to bring "
                            "up to date without running the study")
    if not base.ct_slices.is_file():
        log("preparing the cohorts (stage 1) ...")
        t0 = time.perf_counter()
        preparation.prepare_run(base, progress=progress)
        runs_info["preparation"] = {**_provenance(code_commit), "seconds": time.perf_counter() - t0}
    prepared = base.root / "prepared"
    head_threshold = profile["preprocessing"]["head_threshold"]
    outline_threshold = profile["cleaning"]["outline_dice_threshold"]
    ipe = study["iterations_per_epoch"]
    from .slices import read_slices

    n_ct = len(read_slices(base.ct_slices, "prepared CT slices", ("image",))["image"])
    batch = cyclegan.settings_from_profile(profile)["batch_size"]
    if ipe > -(-n_ct // batch):
        raise CrossmodError(f"convergence.iterations_per_epoch {ipe}: more than an epoch of the "
                            f"{n_ct} prepared CT slices holds at batch {batch} "
                            f"({-(-n_ct // batch)} iterations); budgets would not be exact")

    def tables():
        point_rows, quality_rows = [], []
        for key, info in sorted(runs_info["points"].items()):
            point_rows += [{"seed": info["seed"], "budget": info["budget"], **row} for row in info["dsc"]]
            quality_rows.append({"seed": info["seed"], "budget": info["budget"], **info["quality"]})
        points = pd.DataFrame(point_rows, columns=list(POINT_COLUMNS))
        quality = pd.DataFrame(quality_rows, columns=list(QUALITY_COLUMNS))
        return points, quality

    def write_tables():
        points, quality_table = tables()
        _atomic_csv(points, RunFolder.convergence.at(study_dir))
        _atomic_csv(quality_table, RunFolder.convergence_quality.at(study_dir))
        tmp = runs_path.with_name(f".{runs_path.name}.tmp")
        tmp.write_text(json.dumps(runs_info, indent=1))
        os.replace(tmp, runs_path)
        return points, quality_table

    for seed in study["seeds"]:
        trunk_dir = study_dir / f"seed{seed}" / "trunk"
        k_max = study["budgets"][-1] // (2 * ipe)
        trunk_settings = cyclegan.settings_from_profile(
            point_profile(profile, seed, study["budgets"][-1], ipe))
        trunk_settings.update({"epochs_constant": k_max, "epochs_decay": 0})
        first_point = None
        for budget in study["budgets"]:
            key = f"seed{seed}/budget{budget:05d}"
            point_dir = study_dir / key
            if key in runs_info["points"]:
                if (point_dir / "model").is_dir():  # a carried point has no folder here
                    first_point = first_point or point_dir
                continue
            if not new_points:
                continue
            k = budget // (2 * ipe)
            point = RunFolder.open(point_profile(profile, seed, budget, ipe), point_dir)
            taken = translator_from is not None and _take_translator(translator_from / key, point_dir)
            trunk_seconds = 0.0
            if taken:
                log(f"seed {seed}, budget {budget} iterations: translator from {translator_from / key} ...")
            else:
                log(f"seed {seed}, budget {budget} iterations: trunk to {k * ipe} ...")
                t0 = time.perf_counter()
                _lengthen_trunk(trunk_dir, trunk_settings, head_threshold, log)
                cyclegan.train(base.ct_slices, base.mr_slices, trunk_dir,
                               trunk_settings, head_threshold, resume=True, progress=progress,
                               max_iterations=k * ipe)
                trunk_seconds = time.perf_counter() - t0
            _link(base.root / "raw", point.root / "raw")
            _link(prepared, point.root / "prepared")
            started = _provenance(code_commit)
            outcome = run_point(point, trunk_dir, first_point, study["models"], log=log)
            outcome["seconds"]["trunk_this_point"] = trunk_seconds
            if taken and same_cleaning:  # its registrations came cached: a run spends the source's
                outcome["seconds"] = taken_stage_seconds(outcome["seconds"], translator_from, key)
            quality = synthesis_quality(point.synthetic_mr, base.ct_slices, base.mr_slices,
                                        head_threshold, outline_threshold, seed=seed)
            runs_info["points"][key] = {
                "seed": seed, "budget": budget, **started,
                "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **outcome, "quality": quality,
                **({"translator_from": str(translator_from / key)} if taken else {}),
            }
            write_tables()
            first_point = first_point or point_dir
    points, quality_table = write_tables() if runs_info["points"] else tables()
    return {"points": points, "quality": quality_table}


def summary_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per budget, model and parotid: the mean over seeds of the patient-mean DSC, the SD over
    seeds, the worst seed, and the mean patient SD."""
    grouped = points.groupby(["budget", "model", "title", "structure"], sort=True)
    out = grouped.agg(seeds=("seed", "nunique"), dsc=("dsc_mean", "mean"),
                      seed_sd=("dsc_mean", "std"), worst_seed=("dsc_mean", "min"),
                      patient_sd=("dsc_sd", "mean")).reset_index()
    return out


def overtakes(points: pd.DataFrame, model: str = "cross_modality",
              baseline: str = "domain_random") -> dict:
    """At which budget the cross-modality DSC reaches the baseline's: per parotid, the smallest
    budget where the seed mean is at least the baseline's seed mean (None: at no budget
    studied), and from which budget every seed does (``all_seeds``; only at a budget that ran
    every seed of the table: a budget run for one seed says nothing of the others)."""
    answer = {}
    for structure in SIDES:
        side = points[points["structure"] == structure]
        every_seed = set(side.loc[side["model"] == model, "seed"])
        found, all_seeds = None, None
        for budget, group in side.groupby("budget", sort=True):
            ours = group[group["model"] == model].set_index("seed")["dsc_mean"]
            theirs = group[group["model"] == baseline].set_index("seed")["dsc_mean"]
            common = ours.index.intersection(theirs.index)
            if common.empty:
                continue
            if found is None and ours[common].mean() >= theirs[common].mean():
                found = int(budget)
            if (all_seeds is None and set(common) == every_seed
                    and bool((ours[common] >= theirs[common]).all())):
                all_seeds = int(budget)
        answer[structure] = {"mean": found, "all_seeds": all_seeds}
    return answer


def verdict(points: pd.DataFrame, model: str = "cross_modality", baseline: str = "domain_random",
            baseline_title: str = "domain randomisation") -> str:
    """One paragraph for the book: per parotid, from which budget the seed-mean cross-modality
    DSC reaches the baseline's (and from which every seed does), or that it does not within the
    budgets studied, with the largest budget's numbers."""
    if points.empty:
        return "No study point has finished yet."
    found = overtakes(points, model, baseline)
    top = points[points["budget"] == points["budget"].max()]
    sentences = []
    for structure, side in SIDES.items():
        ours = top[(top["model"] == model) & (top["structure"] == structure)]["dsc_mean"]
        theirs = top[(top["model"] == baseline) & (top["structure"] == structure)]["dsc_mean"]
        numbers = (f"at {int(top['budget'].iloc[0]):,} iterations {ours.mean():.2f} ± {ours.std(ddof=1):.2f} "
                   f"against {theirs.mean():.2f} ± {theirs.std(ddof=1):.2f} (mean ± SD over "
                   f"{ours.size} seeds)") if len(ours) > 1 and len(theirs) > 1 else \
            (f"at {int(top['budget'].iloc[0]):,} iterations {ours.mean():.2f} against {theirs.mean():.2f}"
             + (f", seed {int(top.loc[ours.index[0], 'seed'])} only" if len(ours) == 1 else ""))
        when = found[structure]
        if when["mean"] is None:
            sentences.append(f"{side.capitalize()} parotid: the cross-modality network does **not** reach "
                             f"{baseline_title} at any budget studied ({numbers}).")
        else:
            every = (f"every seed from {when['all_seeds']:,}" if when["all_seeds"] is not None
                     else "but not for every seed at any budget")
            sentences.append(f"{side.capitalize()} parotid: the cross-modality network reaches "
                             f"{baseline_title} from {when['mean']:,} CycleGAN iterations on the seed "
                             f"mean, {every} ({numbers}).")
    return " ".join(sentences)


def translator_table(studies: dict[str, pd.DataFrame], baseline: str = "domain_random",
                     reference: str | None = None) -> pd.DataFrame:
    """The translators side by side (issue: CUT / FastCUT beside the CycleGAN): for each study
    (label -> its points) the cross-modality DSC per budget and parotid over the seeds it ran,
    beside the baselines of the same seeds (taken from whichever study trained them: they do not
    depend on the translator). Columns: translator, budget, structure, seeds, dsc, seed_sd,
    worst_seed, and ``<baseline>`` / ``ct_only`` seed means; with ``reference`` (a label of
    ``studies``) also ``reference_dsc``: that study's cross-modality DSC on the same seeds and
    budget (a variant run on one seed is compared with the reference's same seed, not its mean)."""
    baselines = pd.concat([p[p["model"] != "cross_modality"] for p in studies.values()])
    baselines = baselines.drop_duplicates(["seed", "budget", "model", "structure"])
    rows = []
    for label, points in studies.items():
        ours = points[points["model"] == "cross_modality"]
        for (budget, structure), group in ours.groupby(["budget", "structure"], sort=True):
            seeds = sorted(group["seed"])
            row = {"translator": label, "budget": int(budget), "structure": structure,
                   "seeds": len(seeds), "dsc": group["dsc_mean"].mean(),
                   "seed_sd": group["dsc_mean"].std(ddof=1) if len(seeds) > 1 else float("nan"),
                   "worst_seed": group["dsc_mean"].min()}
            for model in (baseline, "ct_only"):
                same = baselines[(baselines["model"] == model) & (baselines["structure"] == structure)
                                 & baselines["seed"].isin(seeds)]
                # a baseline is the same network at every budget of a seed: any budget will do
                same = same.drop_duplicates("seed")
                row[model] = same["dsc_mean"].mean() if len(same) == len(seeds) else float("nan")
            if reference is not None:
                theirs = studies[reference]
                theirs = theirs[(theirs["model"] == "cross_modality") & (theirs["budget"] == budget)
                                & (theirs["structure"] == structure) & theirs["seed"].isin(seeds)]
                row["reference_dsc"] = (theirs["dsc_mean"].mean() if theirs["seed"].nunique() == len(seeds)
                                        else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


#: The tier's acceptance criteria (issue 14): per seed and parotid, the cross-modality DSC at least
#: CT-only's minus this margin and at least domain randomisation's; the naive network at most
#: NAIVE_CEILING (it must keep failing: the MR really is a different modality).
CT_ONLY_MARGIN = 0.05
NAIVE_CEILING = 0.5


def tier_criteria(points: pd.DataFrame, budget: int, margin: float = CT_ONLY_MARGIN,
                  naive_ceiling: float = NAIVE_CEILING) -> pd.DataFrame:
    """The tier's criteria at one budget, per seed and parotid: the patient-mean DSC of the
    cross-modality, CT-only, domain-randomisation and naive networks, and whether
    cross-modality ≥ CT-only − ``margin`` (``vs_ct_only``), cross-modality ≥ domain
    randomisation (``vs_domain_random``) and naive ≤ ``naive_ceiling`` (``naive_fails``) hold;
    ``holds`` is all three. A model missing at that seed gives NaN and the criterion False.
    Where the points hold the paired control (CT only on the MR patients' own CT,
    :data:`crossmod_lib.segmentation.PAIRED_CT`), ``ct_only_paired`` and ``vs_ct_only_paired``
    (cross-modality ≥ it − ``margin``) are added beside them: the same comparison on the same
    patients, so that only the modality differs; ``holds`` stays the criteria above."""
    from .segmentation import PAIRED_CT

    at = points[points["budget"] == budget]
    if at.empty:
        raise CrossmodError(f"convergence: no study point at budget {budget:,} "
                            f"(budgets: {', '.join(f'{b:,}' for b in sorted(set(points['budget'])))})")
    wide = at.pivot_table(index=["seed", "structure"], columns="model", values="dsc_mean",
                          aggfunc="first")
    for model in ("cross_modality", "ct_only", "domain_random", "naive"):
        if model not in wide:
            wide[model] = np.nan
    out = wide[["cross_modality", "ct_only", "domain_random", "naive"]].reset_index()
    out.columns.name = None
    # comparisons with NaN are False: a missing network never passes a criterion
    out["vs_ct_only"] = out["cross_modality"] >= out["ct_only"] - margin
    out["vs_domain_random"] = out["cross_modality"] >= out["domain_random"]
    out["naive_fails"] = out["naive"] <= naive_ceiling
    out["holds"] = out["vs_ct_only"] & out["vs_domain_random"] & out["naive_fails"]
    if PAIRED_CT in wide:
        out[PAIRED_CT] = wide[PAIRED_CT].to_numpy()
        out[f"vs_{PAIRED_CT}"] = out["cross_modality"] >= out[PAIRED_CT] - margin
    return out


def tier_verdict(criteria: pd.DataFrame, budget: int) -> str:
    """One sentence on :func:`tier_criteria`: whether every seed and parotid meets the criteria
    at ``budget``, and which fail otherwise (seed, side, criterion)."""
    n = len(criteria)
    if criteria["holds"].all():
        return (f"At {budget:,} CycleGAN iterations the tier holds for all {n} seed × parotid "
                f"pairs: cross-modality ≥ CT-only − {CT_ONLY_MARGIN:g}, ≥ domain randomisation, "
                f"naive ≤ {NAIVE_CEILING:g}." + _paired_sentence(criteria))
    names = {"vs_ct_only": f"below CT-only − {CT_ONLY_MARGIN:g}",
             "vs_domain_random": "below domain randomisation",
             "naive_fails": f"naive above {NAIVE_CEILING:g}"}
    failures = []
    for _, row in criteria[~criteria["holds"]].iterrows():
        why = ", ".join(text for column, text in names.items() if not row[column])
        failures.append(f"seed {row['seed']} {SIDES.get(row['structure'], row['structure'])} ({why})")
    return (f"At {budget:,} CycleGAN iterations the tier holds for {int(criteria['holds'].sum())} "
            f"of {n} seed × parotid pairs; it fails for " + "; ".join(failures) + "."
            + _paired_sentence(criteria))


def _paired_sentence(criteria: pd.DataFrame) -> str:
    """The CT-only comparison again on the same patients (the paired control), when measured."""
    from .segmentation import PAIRED_CT

    if PAIRED_CT not in criteria or criteria[PAIRED_CT].isna().all():
        return ""
    paired = criteria[criteria[PAIRED_CT].notna()]
    held = paired[f"vs_{PAIRED_CT}"]
    gap = paired["cross_modality"] - paired[PAIRED_CT]
    held_out = paired["cross_modality"] - paired["ct_only"]
    misses = [f"seed {row['seed']} {SIDES.get(row['structure'], row['structure'])}"
              for _, row in paired[~held].iterrows()]
    # The seed mean per side: what the change of modality costs these patients, seeds pooled.
    side_mean = gap.groupby(paired["structure"]).mean()
    sides = [side for side in SIDES if side in side_mean.index]
    return (f" Against the CT-only network on the same patients' own CT (the paired control: "
            f"only the modality differs), cross-modality ≥ it − {CT_ONLY_MARGIN:g} for "
            f"{int(held.sum())} of {len(paired)} pairs"
            + (f" (not: {', '.join(misses)})" if misses else "")
            + f"; cross-modality minus the control per pair: {gap.min():+.3f} to {gap.max():+.3f} "
            f"(minus CT only on its held-out CT patients: {held_out.min():+.3f} to {held_out.max():+.3f})"
            + (f"; seed mean of cross-modality minus the control: "
               + ", ".join(f"{SIDES[side]} {side_mean[side]:+.2f}" for side in sides) if sides else "")
            + ".")


#: The synthetic-MR measures set beside each variant's DSC: how MR-like its translator's output is.
_VARIANT_QUALITY = ("parotid_ratio", "real_parotid_ratio", "kid", "real_kid")


def variant_table(profiles: dict[str, dict], studies) -> tuple[pd.DataFrame, dict[str, str]]:
    """The tier beside its variants (issue 14 item 4: a second MR appearance, the MR read from
    DICOM): for each profile (label -> settings) its recorded runs as :func:`tier_run` finds
    them, and per seed and parotid the four networks' patient-mean DSC with the tier's criteria
    (:func:`tier_criteria`), beside its synthetic MR's parotid/head ratio and KID (and the real
    MR's). Returns the table (columns ``profile``, ``budget``, those of :func:`tier_criteria` and
    the quality measures; ``ct_only_paired``, the paired control, NaN where not measured) and,
    per label without a recorded run, why."""
    tables, missing = [], {}
    for label, profile in profiles.items():
        found = tier_run(profile, studies)
        if found["reason"]:
            missing[label] = found["reason"]
            continue
        criteria = tier_criteria(found["points"], found["budget"])
        quality = found["quality"][["seed", *_VARIANT_QUALITY]].astype(float).astype({"seed": int})
        criteria = criteria.merge(quality, on="seed", how="left")
        tables.append(criteria.assign(profile=label, budget=found["budget"]))
    # ct_only_paired (segmentation.PAIRED_CT): NaN where a variant's runs predate the control
    columns = ["profile", "budget", "seed", "structure", "cross_modality", "ct_only", "ct_only_paired",
               "domain_random", "naive", "vs_ct_only", "vs_domain_random", "naive_fails", "holds",
               *_VARIANT_QUALITY]
    table = (pd.concat(tables, ignore_index=True).reindex(columns=columns) if tables
             else pd.DataFrame(columns=columns))
    return table, missing


def variant_summary(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`variant_table` per profile and parotid: the seeds, the seed means of the four
    networks, cross-modality's seed SD, how many seeds meet all the tier's criteria, and the
    seed means of the synthetic MR's parotid/head ratio and KID (beside the real MR's)."""
    grouped = table.groupby(["profile", "structure"], sort=False)
    out = grouped.agg(seeds=("seed", "nunique"), cross_modality=("cross_modality", "mean"),
                      cross_modality_seed_sd=("cross_modality", "std"),
                      domain_random=("domain_random", "mean"), ct_only=("ct_only", "mean"),
                      ct_only_paired=("ct_only_paired", "mean"),
                      naive=("naive", "mean"), seeds_holding=("holds", "sum"),
                      parotid_ratio=("parotid_ratio", "mean"), real_parotid_ratio=("real_parotid_ratio", "mean"),
                      kid=("kid", "mean"), real_kid=("real_kid", "mean")).reset_index()
    out["seeds_holding"] = out["seeds_holding"].astype(int)
    return out


def profile_budget(profile: dict, iterations_per_epoch: int | None = None) -> int | None:
    """The CycleGAN budget a profile trains, in the study's terms: (epochs_constant +
    epochs_decay) × its cap ``max_iterations_per_epoch``, when that cap is the study's
    ``iterations_per_epoch`` (default: the profile's own convergence block) and the two epoch
    counts are equal, i.e. when a run of the profile is the study point of that budget (for the
    seed it takes). None otherwise: the profile's run is no point of the study."""
    cyclegan = profile.get("cyclegan", {})
    if iterations_per_epoch is None:
        iterations_per_epoch = (profile.get("convergence") or {}).get("iterations_per_epoch")
    constant, decay = cyclegan.get("epochs_constant"), cyclegan.get("epochs_decay")
    if (cyclegan.get("max_iterations_per_epoch") != iterations_per_epoch or constant != decay
            or not isinstance(constant, int) or constant < 1):
        return None
    return 2 * constant * iterations_per_epoch


def quality_sentence(quality: pd.DataFrame) -> str:
    """One sentence on how MR-like the synthetic MR is at the smallest and largest budget: the
    parotid/head contrast against the real MR's, and the KID against its real-vs-real floor (the
    seed mean at each budget); the "why" beside :func:`verdict`."""
    if quality.empty:
        return ""
    by_budget = quality.groupby("budget", sort=True).mean(numeric_only=True)
    low, high = by_budget.index[0], by_budget.index[-1]
    real = by_budget["real_parotid_ratio"].iloc[-1]

    def at(budget):
        row = by_budget.loc[budget]
        return (f"{row['parotid_ratio']:.2f} (KID {row['kid']:.1f}, floor {row['real_kid']:.1f}) "
                f"at {int(budget):,} iterations")

    return (f"The synthetic MR's parotid/head intensity ratio, {real:.2f} on the real MR, is {at(low)}"
            + (f" and {at(high)}" if high != low else "")
            + ": the closer to the real MR's, the better the CT contours fit the synthetic MR's parotids.")


# ----------------------------------------------------------------------------------------------
# The U-Net side of one point


UNET_SEED_COLUMNS = ("variant", "unet_seed", "model", "title", "structure", "dsc_mean", "dsc_sd", "n")


def unet_seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """A U-Net seed study (:func:`run_unet_seed_study`) per variant, model and parotid: the U-Net
    seeds, the mean, SD, lowest and highest of their patient-mean DSCs: how far one point's
    result moves with the U-Net's seed alone (same synthetic MR, same cleaned slices)."""
    grouped = table.groupby(["variant", "model", "title", "structure"], sort=False)
    return grouped.agg(unet_seeds=("unet_seed", "nunique"), dsc=("dsc_mean", "mean"),
                       seed_sd=("dsc_mean", "std"), lowest=("dsc_mean", "min"),
                       highest=("dsc_mean", "max"), patient_sd=("dsc_sd", "mean")).reset_index()


def unet_spread_sentence(study: str, info: dict, table: pd.DataFrame, model: str = "cross_modality") -> str:
    """One sentence on a U-Net seed study (``info``: its ``unet_seeds_runs.json``, ``table``: its
    ``unet_seeds.csv``): how far ``model``'s patient-mean DSC moves with the U-Net seed alone, per
    parotid, over the runs that trained as the point did (variants changing no setting). "" when
    fewer than two such runs of ``model`` exist (no spread to give)."""
    if info.get("training"):  # trained on other slices than the point's (an ideal translation)
        return ""
    as_point = [name for name, changes in (info.get("variants") or {}).items() if not changes]
    rows = table[table["variant"].isin(as_point) & (table["model"] == model)]
    # the runs as the point, pooled into one variant
    spread = unet_seed_summary(rows.assign(variant="as the point", title=model)).set_index("structure")
    sides = [side for side in SIDES if side in spread.index and spread.loc[side, "unet_seeds"] >= 2]
    if not sides:
        return ""
    parts = [f"{SIDES[side]} {spread.loc[side, 'dsc']:.2f} ± {spread.loc[side, 'seed_sd']:.2f} "
             f"({spread.loc[side, 'lowest']:.2f}–{spread.loc[side, 'highest']:.2f})" for side in sides]
    return (f"The {model.replace('_', '-')} U-Net trained again under {int(spread.loc[sides, 'unet_seeds'].max())} "
            f"U-Net seeds on the same cleaned slices of one run (recorded U-Net seed study `{study}`) scores DSC "
            + ", ".join(parts) + ": a difference smaller than that spread is one U-Net's draw.")


# The stages a U-Net seed study's runs share with their point (linked, never written).
_POINT_STAGES = ("raw", "prepared", "synthetic", "cleaned")


def run_unet_seed_study(point_dir, out_dir, seeds, variants: dict[str, dict],
                        models=("cross_modality",), log=print, extra: dict | None = None) -> pd.DataFrame:
    """How much of a point's result is the U-Net's: the U-Nets of one finished study point (or
    any run folder with ``synthetic/`` and ``cleaned/``) trained again with other U-Net seeds,
    under each variant of the segmentation settings (``{"paper": {}, "appearance":
    {"cross_modality_appearance": True}}``), on the point's own slices, and scored on its MR.

    ``OUT/<variant>/seed<S>/`` is a run folder whose earlier stages link to the point's; the
    tables are ``OUT/metrics/unet_seeds.csv`` and ``unet_seeds_runs.json`` (provenance per run),
    rewritten after every run, so an interrupted study keeps what it finished and resumes.
    ``seeds`` None or empty: the point's ``convergence.seeds`` (else its own seed). ``extra``:
    what else the study's JSON keeps about it (e.g. :func:`run_ideal_translation_study`'s
    ``training``: the U-Nets did not train on the point's own slices).
    """
    import yaml

    from . import evaluation, segmentation

    point_dir, out_dir = Path(point_dir).absolute(), Path(out_dir).absolute()
    settings_path = RunFolder.settings_file.at(point_dir)
    if not settings_path.is_file():
        raise CrossmodError(f"{point_dir}: not a run folder (no profile.yaml)")
    base_profile = yaml.safe_load(settings_path.read_text())
    if not seeds:  # the point's study seeds, else its own
        seeds = (base_profile.get("convergence") or {}).get("seeds") or [base_profile.get("seed", 2021)]
    for name, changes in variants.items():  # a bad setting stops before any work
        trial = copy.deepcopy(base_profile)
        trial["segmentation"].update(changes)
        try:
            segmentation.segmentation_config(trial)
        except CrossmodError as exc:
            raise CrossmodError(f"variant {name!r}: {exc}") from None
    recipes = segmentation.model_recipes(base_profile)
    unknown = sorted(set(models) - {r["name"] for r in recipes} - {r["kind"] for r in recipes})
    if unknown:
        raise CrossmodError(f"{point_dir}: no U-Net named {', '.join(unknown)} in its profile "
                            f"(models: {', '.join(dict.fromkeys(segmentation._method_name(r) for r in recipes))})")
    for stage in _POINT_STAGES:
        if not (point_dir / stage).is_dir():
            raise CrossmodError(f"{point_dir / stage}: stage output missing (the point's {stage}/)")
    code_commit = _provenance()["commit"]
    out_dir.mkdir(parents=True, exist_ok=True)  # the point's profile: what the study varies from
    tmp = out_dir / f".{RunFolder.settings_file.relpath}.tmp"
    shutil.copyfile(settings_path, tmp)
    os.replace(tmp, RunFolder.settings_file.at(out_dir))
    runs_path = RunFolder.unet_seeds_runs.at(out_dir)
    info = json.loads(runs_path.read_text()) if runs_path.is_file() else {"runs": {}}
    info.update({"point": str(point_dir), "variants": variants, "models": list(models), **(extra or {})})

    def write_tables() -> pd.DataFrame:
        rows = [{"variant": r["variant"], "unet_seed": r["unet_seed"], **row}
                for _, r in sorted(info["runs"].items()) for row in r["dsc"]]
        table = pd.DataFrame(rows, columns=list(UNET_SEED_COLUMNS))
        _atomic_csv(table, RunFolder.unet_seeds.at(out_dir))
        tmp = runs_path.with_name(f".{runs_path.name}.tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, runs_path)
        return table

    table = write_tables()
    for name, changes in variants.items():
        for seed in seeds:
            key = f"{name}/seed{seed}"
            if key in info["runs"]:
                continue
            log(f"{key}: training {', '.join(models)} ...")
            profile = copy.deepcopy(base_profile)
            profile["name"] = f"{base_profile.get('name', 'point')}-{name}-unet{seed}"
            profile["segmentation"].update({**changes, "seed": int(seed)})
            run = RunFolder.open(profile, out_dir / name / f"seed{seed}")
            for stage in _POINT_STAGES:
                _link(point_dir / stage, run.root / stage)
            started = _provenance(code_commit)
            t0 = time.perf_counter()
            # a model is named as its recipe or its kind (mr_oracle: its folds, one method)
            recipes = [r for r in segmentation.model_recipes(profile)
                       if r["name"] in models or r["kind"] in models]
            methods = list(dict.fromkeys(segmentation._method_name(r) for r in recipes))
            segmentation.train_run(run, kinds=sorted({r["kind"] for r in recipes}), progress=False)
            segmentation.predict_run(run, models=[r["name"] for r in recipes])
            dsc = dsc_by_model(evaluation.evaluate_predictions(run), methods)
            info["runs"][key] = {"variant": name, "unet_seed": int(seed), "changes": changes, **started,
                                 "seconds": time.perf_counter() - t0, "dsc": dsc}
            table = write_tables()
            log(f"  {key}: " + ", ".join(f"{r['model']} {SIDES[r['structure']][0].upper()} "
                                         f"{r['dsc_mean']:.2f}" for r in dsc))
    return table


# ----------------------------------------------------------------------------------------------
# What the translator costs: the ideal translation (beyond the paper)

IDEAL_VARIANT = "ideal-translation"
IDEAL_TRAINING = ("ideal translation: the simulator's own MR of each CT patient, labelled by "
                  "its contours, in place of the cleaned synthetic MR")


def run_ideal_translation_study(point_dir, out_dir, seeds=None, slice_mm: float | None = None,
                                workers: int = 1, log=print) -> pd.DataFrame:
    """What the CT -> MR translator costs a finished point whose MR cohort is simulated from CT:
    its cross-modality U-Net trained again, under U-Net ``seeds``, on the *ideal* translation of
    the same CT patients (:func:`crossmod_lib.simulation.ideal_translation_slices`: the
    simulator's own MR of each, prepared as the MR cohort, with its own contours) instead of the
    cleaned synthetic MR, and tested on the same MR cohort.

    ``OUT/ideal_point/`` is the point with those slices in ``cleaned/`` (its other stages
    linked); the U-Nets run as a U-Net seed study of it (:func:`run_unet_seed_study`, variant
    ``ideal-translation``), whose JSON also keeps ``training`` and the point's own DSC per model
    (``point_dsc``: the CycleGAN's cross-modality network, CT only and its paired control), so a
    record of ``OUT`` holds both sides of the comparison. ``slice_mm``: the ideal MR drawn at
    another slice thickness than the MR cohort's (:func:`~crossmod_lib.simulation.ideal_translation_slices`).
    """
    import yaml

    from . import datasets, simulation
    from .runs import RawFiles
    from .preparation import SIMULATED_MR
    from .segmentation import PAIRED_CT
    from .slices import read_slices, write_slices

    point_dir, out_dir = Path(point_dir).absolute(), Path(out_dir).absolute()
    settings_path = RunFolder.settings_file.at(point_dir)
    if not settings_path.is_file():
        raise CrossmodError(f"{point_dir}: not a run folder (no profile.yaml)")
    profile = yaml.safe_load(settings_path.read_text())
    data = profile.get("data") or {}
    if (data.get("mr") or {}).get("dataset") != SIMULATED_MR:
        raise CrossmodError(f"{point_dir}: the ideal translation needs an MR cohort simulated from CT "
                            f"(data.mr.dataset: {SIMULATED_MR}), not {(data.get('mr') or {}).get('dataset')!r}")
    cohort_json = RunFolder.raw_simulated_mr.at(point_dir) / RawFiles.SIMULATION
    if not cohort_json.is_file():
        raise CrossmodError(f"{cohort_json}: missing (the point's simulated MR cohort)")
    cleaned = RunFolder.training_slices.at(point_dir)
    if not cleaned.is_file():
        raise CrossmodError(f"{cleaned}: missing (the point's cleaned synthetic MR)")
    patients = sorted(set(np.asarray(read_slices(cleaned, "training slices", ("image", "patient"))["patient"]).astype(str)))
    folders = {Path(f).name: Path(f) for f in datasets.cohort_cases(data["ct"], root=data.get("root"))}
    missing = [p for p in patients if p not in folders]
    if missing:
        raise CrossmodError(f"{point_dir}: CT patient(s) {', '.join(missing[:3])} of the cleaned slices "
                            "are not in the profile's CT cohort")

    try:  # the slice thickness the ideal MR is drawn at
        thickness = float(slice_mm if slice_mm is not None
                          else json.loads(cohort_json.read_text())["arguments"]["settings"]["slice_mm"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CrossmodError(f"{cohort_json}: no slice thickness ({exc.__class__.__name__}: {exc})") from None
    ideal = out_dir / "ideal_point"
    runs_path = RunFolder.unet_seeds_runs.at(out_dir)
    if runs_path.is_file():  # resuming: the slices already made must be the ones asked for
        made = json.loads(runs_path.read_text()).get("ideal_slice_mm")
        if made != thickness:
            raise CrossmodError(f"{out_dir}: its ideal translation was drawn at {made!r} mm slices, "
                                f"not {thickness:g} mm; give another --out")
    (ideal / "cleaned").mkdir(parents=True, exist_ok=True)
    for stage in ("raw", "prepared", "synthetic"):
        _link(point_dir / stage, ideal / stage)
    shutil.copyfile(settings_path, RunFolder.settings_file.at(ideal))
    for item in cleaned.parent.iterdir():  # the cleaning's other files, as the point has them
        link = ideal / "cleaned" / item.name
        if item.name != cleaned.name and not (link.exists() or link.is_symlink()):
            link.symlink_to(item.resolve(), target_is_directory=item.is_dir())
    slices_path = RunFolder.training_slices.at(ideal)
    if not slices_path.is_file():
        log(f"ideal translation of {len(patients)} CT patients ...")
        write_slices(simulation.ideal_translation_slices(
            cohort_json, [folders[p] for p in patients], profile["preprocessing"], slice_mm=slice_mm,
            workers=workers), slices_path)
    point_dsc = []
    metrics_path = RunFolder.segmentation_metrics.at(point_dir)
    if metrics_path.is_file():
        point_dsc = dsc_by_model(pd.read_csv(metrics_path), ["cross_modality", "ct_only", PAIRED_CT])
    return run_unet_seed_study(ideal, out_dir, seeds, {IDEAL_VARIANT: {}}, models=("cross_modality",),
                               log=log, extra={"training": IDEAL_TRAINING, "translated_point": str(point_dir),
                                               "translated_profile": profile.get("name", ""),
                                               "ideal_slice_mm": thickness,
                                               "point_dsc": point_dsc})


def ideal_translation_table(records) -> pd.DataFrame:
    """One row per recorded ideal-translation study and parotid: the point's CycleGAN
    cross-modality DSC, the ideal translation's (mean, SD and range over U-Net seeds), the
    translator's cost (ideal - CycleGAN), CT only and its paired control (the MR patients' own
    CT). ``records``: (name, runs JSON, unet_seeds table) triples."""
    rows = []
    for name, info, table in records:
        if info.get("training") != IDEAL_TRAINING:
            continue
        point = {(r["model"], r["structure"]): r["dsc_mean"] for r in info.get("point_dsc") or []}
        summary = unet_seed_summary(table[table["model"] == "cross_modality"]).set_index("structure")
        parts = Path(info.get("translated_point", "")).parts
        where = "/".join(parts[-3:]) if len(parts) > 2 and parts[-2].startswith("seed") else (parts[-1] if parts else "")
        for side in SIDES:
            if side not in summary.index:
                continue
            cyclegan = point.get(("cross_modality", side), np.nan)
            rows.append({"study": name, "profile": info.get("translated_profile", ""), "point": where,
                         "slice_mm": info.get("ideal_slice_mm", np.nan), "structure": side,
                         "cyclegan": cyclegan, "ideal": summary.loc[side, "dsc"],
                         "ideal_seed_sd": summary.loc[side, "seed_sd"],
                         "ideal_lowest": summary.loc[side, "lowest"], "ideal_highest": summary.loc[side, "highest"],
                         "unet_seeds": int(summary.loc[side, "unet_seeds"]),
                         "translator_cost": summary.loc[side, "dsc"] - cyclegan,
                         "ct_only": point.get(("ct_only", side), np.nan),
                         "ct_only_paired": point.get(("ct_only_paired", side), np.nan)})
    return pd.DataFrame(rows, columns=["study", "profile", "point", "slice_mm", "structure", "cyclegan", "ideal", "ideal_seed_sd",
                                       "ideal_lowest", "ideal_highest", "unet_seeds", "translator_cost",
                                       "ct_only", "ct_only_paired"])


def ideal_translation_sentence(table: pd.DataFrame) -> str:
    """What :func:`ideal_translation_table` says, one sentence per study: the ideal translation
    against the CycleGAN's network and against CT only's paired control, per parotid."""
    sentences = []
    for study, rows in table.groupby("study", sort=False):
        rows = rows.set_index("structure")
        sides = [side for side in SIDES if side in rows.index]

        def per_side(column, signed=False):
            return ", ".join(f"{SIDES[side]} {rows.loc[side, column]:+.2f}" if signed
                             else f"{SIDES[side]} {rows.loc[side, column]:.2f}" for side in sides)

        first = rows.iloc[0]
        text = (f"`{study}` (profile `{first['profile']}`, point `{first['point']}`): the ideal translation "
                f"in {first['slice_mm']:g} mm slices scores {per_side('ideal')} (mean of {int(first['unet_seeds'])} U-Net seeds, "
                + ", ".join(f"{SIDES[side]} {rows.loc[side, 'ideal_lowest']:.2f}–{rows.loc[side, 'ideal_highest']:.2f}"
                            for side in sides)
                + f") against the CycleGAN's {per_side('cyclegan')}: the translator costs {per_side('translator_cost', True)}")
        if rows.loc[sides, "ct_only_paired"].notna().all():
            rows = rows.assign(appearance=rows["ideal"] - rows["ct_only_paired"])
            text += (f"; the ideal translation minus CT only on the same patients' CT (the paired control, "
                     f"{per_side('ct_only_paired')}): {per_side('appearance', True)}")
        sentences.append(text + ".")
    return " ".join(sentences)
