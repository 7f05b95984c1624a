"""Paper section 4.B and Fig. 9: the quality of the clinical CT contours, checked automatically.

The paper traces part of the gap between cross-modality learning and the CT-trained network to
the CT contours both were trained on: contoured in clinic for radiotherapy, not for a contouring
study, some enclose only part of a gland on some slices or miss it on a slice (Fig. 9). The paper
found them by eye. This module finds such contours from the contours alone.

The area profile
    For each gland, the contoured area (mm²) on every axial slice from the first to the last
    slice holding it (its *extent*). A parotid's profile rises from its cranial tip to its widest
    slice and falls to its caudal tip, smoothly at CT slice spacings (2.5 mm in the paper).

Two rules flag a slice
    ``missing``
        Area 0 on a slice strictly inside the extent: a gap in the contour.
    ``short``
        Area well below the gland's *expected* area on that slice: below ``short_ratio`` of it,
        and short by at least ``short_deficit`` of the gland's largest slice area (so the natural
        tips, where a few pixels make a large ratio, are left alone). The expected area is a
        quadratic in the slice position fitted to the *upper* side of the profile: an expectile
        regression (iteratively reweighted least squares, weight ``fit_tau`` for slices above the
        curve and ``1 - fit_tau`` below), because contour defects only ever remove area. A
        quadratic is the area profile of an ellipsoid, the first approximation of a gland; the
        upper fit rides over a run of part-contoured or missing slices instead of sinking into it.
        Where slices are flagged, the curve is fitted once more without them (a long defect still
        bends the first fit, which then overshoots at the gland's tips) and the rule applied
        again. Extents of fewer than 4 slices get no fit (only the ``missing`` rule).

Volume outliers
    A gland whose volume is far from the cohort's: the robust z-score
    ``0.6745 (v - median) / MAD`` over all glands of the cohort (both sides pooled: left and right
    parotids have the same size distribution), flagged beyond ``volume_z``. With fewer than
    ``min_cohort`` glands the volume is not assessed (NaN): a median and MAD of a handful of glands
    say nothing.

What a flag costs
    The prepared CT slices (``prepared/ct_slices.npz``, chapter 1) and the cleaned training slices
    (``cleaned/training_slices.npz``, chapter 3) carry the patient and the slice's index in its
    volume, so :func:`affected_slices` counts the 2D training examples whose labels come from a
    flagged slice.

Checking the checker
    The digital phantom injects exactly these defects into its CT contours and records them in
    ``raw/phantom/phantom.json``; :func:`detection_accuracy` compares the flags with that record
    (slice, defect and gland level). The default thresholds were chosen on a phantom cohort of
    seed 7 (60 CT patients, 208 x 208 x 60-70 voxels, each gland given each kind of defect with
    probability 0.5: slice sensitivity 0.95, precision 0.97) and checked on one of seed 8 (59
    patients: 0.92 and 0.97); the same 238 glands generated without defects gave one gland with
    a flagged slice. Chapter 6 measures them on the run's own phantom. On real clinical contours
    they are a screening aid, not a verdict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .defaults import section_defaults
from .errors import CrossmodError
from .io import PAROTIDS

#: Thresholds of the rules (see the module docstring): the ``contour_quality`` block of
#: ``profiles/full.yaml``, where each is explained; a profile's own section overrides them.
DEFAULTS = section_defaults("contour_quality")

RULES = ("missing", "short")

GLAND_COLUMNS = ["patient", "structure", "first_slice", "last_slice", "slices", "volume_cc",
                 "max_area_mm2", "n_flagged", "flagged_slices", "rules", "volume_z",
                 "volume_outlier", "flagged"]
PROFILE_COLUMNS = ["patient", "structure", "slice", "area_mm2", "expected_mm2", "ratio", "rule",
                   "flagged"]


def settings_from(profile: dict | None = None, **overrides) -> dict:
    """The thresholds: :data:`DEFAULTS`, a profile's ``contour_quality`` section, then overrides."""
    settings = dict(DEFAULTS)
    if profile:
        settings.update(profile.get("contour_quality") or {})
    settings.update(overrides)
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise CrossmodError(f"contour_quality: unknown setting(s) {sorted(unknown)}; "
                            f"known: {sorted(DEFAULTS)}")
    for key in ("short_ratio", "short_deficit", "fit_tau"):
        value = settings[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
            raise CrossmodError(f"contour_quality.{key}={value!r} must be a number between 0 and 1")
    if not isinstance(settings["volume_z"], (int, float)) or settings["volume_z"] <= 0:
        raise CrossmodError(f"contour_quality.volume_z={settings['volume_z']!r} must be positive")
    if not isinstance(settings["min_cohort"], int) or settings["min_cohort"] < 3:
        raise CrossmodError(f"contour_quality.min_cohort={settings['min_cohort']!r} must be an "
                            "integer >= 3")
    return settings


# ----------------------------------------------------------------------------------------------
# One gland


def area_profile(mask: np.ndarray, pixel_area_mm2: float = 1.0) -> np.ndarray:
    """Contoured area on each slice (axis 0) of a [z, y, x] mask, in mm² (non-zero = inside)."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise CrossmodError(f"area_profile: expected a 3D [z, y, x] mask, got shape {mask.shape}")
    return np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1) * float(pixel_area_mm2)


def expected_areas(areas, tau: float = DEFAULTS["fit_tau"], exclude=None,
                   iterations: int = 50) -> np.ndarray:
    """The quadratic (in slice position) fitted to the upper side of a profile (expectile ``tau``).

    Iteratively reweighted least squares: weight ``tau`` for values above the current curve,
    ``1 - tau`` below, until the weights stop changing (at most ``iterations`` rounds); values
    where ``exclude`` is True get weight 0. Negative values of the curve are set to 0. Fewer than
    4 values to fit: NaN (no fit).
    """
    a = np.asarray(areas, dtype=float)
    use = np.ones(a.size, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    if int(use.sum()) < 4:
        return np.full(a.shape, np.nan)
    z = np.arange(a.size, dtype=float)
    z = (z - z.mean()) / z.std()
    design = np.vander(z, 3)
    weights = np.where(use, 0.5, 0.0)
    fit = np.zeros_like(a)
    for _ in range(iterations):
        root = np.sqrt(weights[use])
        coef, *_ = np.linalg.lstsq(design[use] * root[:, None], a[use] * root, rcond=None)
        fit = design @ coef
        new = np.where(use, np.where(a > fit, tau, 1.0 - tau), 0.0)
        if np.array_equal(new, weights):
            break
        weights = new
    return np.maximum(fit, 0.0)


def _short(a: np.ndarray, expected: np.ndarray, ratio: float, deficit: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        short = (a < ratio * expected) & (expected - a > deficit * a.max())
    return np.nan_to_num(short, nan=False).astype(bool)


def flag_profile(areas, short_ratio: float = DEFAULTS["short_ratio"],
                 short_deficit: float = DEFAULTS["short_deficit"],
                 fit_tau: float = DEFAULTS["fit_tau"]) -> pd.DataFrame:
    """The rules applied to one gland's area profile (one value per slice, any units).

    Returns one row per slice of the extent (first to last non-zero slice): ``slice`` (index in
    ``areas``), ``area``, ``expected`` (:func:`expected_areas`), ``ratio`` (area / expected),
    ``rule`` (the matching rules joined by ``+``, empty if none) and ``flagged``. An all-zero
    profile gives an empty table.
    """
    a_all = np.asarray(areas, dtype=float)
    if a_all.ndim != 1 or not np.all(np.isfinite(a_all)) or np.any(a_all < 0):
        raise CrossmodError("flag_profile: expected a 1D profile of finite non-negative areas")
    present = np.flatnonzero(a_all > 0)
    columns = ["slice", "area", "expected", "ratio", "rule", "flagged"]
    if present.size == 0:
        return pd.DataFrame(columns=columns)
    first, last = int(present[0]), int(present[-1])
    a = a_all[first:last + 1]
    expected = expected_areas(a, fit_tau)
    short = _short(a, expected, short_ratio, short_deficit)
    suspect = short | (a == 0)
    if suspect.any() and int((~suspect).sum()) >= 4:
        # once more without the suspect slices, so that a long defect does not bend the curve
        expected = expected_areas(a, fit_tau, exclude=suspect)
        short = _short(a, expected, short_ratio, short_deficit)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(expected > 0, a / expected, np.nan)
    rules = {"missing": a == 0, "short": short}
    names = ["+".join(r for r in RULES if rules[r][k]) for k in range(a.size)]
    return pd.DataFrame({
        "slice": np.arange(first, last + 1),
        "area": a,
        "expected": expected,
        "ratio": ratio,
        "rule": names,
        "flagged": [bool(n) for n in names],
    }, columns=columns)


# ----------------------------------------------------------------------------------------------
# Cases and cohorts


@dataclass
class QualityReport:
    """Per gland (``glands``, :data:`GLAND_COLUMNS`) and per slice of each extent (``profiles``,
    :data:`PROFILE_COLUMNS`)."""

    glands: pd.DataFrame
    profiles: pd.DataFrame
    settings: dict

    @property
    def flagged_slices(self) -> pd.DataFrame:
        """The flagged (patient, structure, slice) rows of the profiles."""
        return self.profiles[self.profiles["flagged"]].reset_index(drop=True)


def assess_case(case, settings: dict | None = None, structures=PAROTIDS) -> tuple[list[dict], pd.DataFrame]:
    """Flag the slices of each gland of one :class:`~crossmod_lib.io.Case` (axis 0 = axial slices).

    Returns the gland rows (without the cohort's volume columns) and the profile table.
    """
    settings = settings_from(None, **(settings or {}))
    sx, sy, sz = case.image.GetSpacing()
    rows, profiles = [], []
    for name in structures:
        if name not in case.structures:
            rows.append({"patient": case.patient_id, "structure": name, "first_slice": np.nan,
                         "last_slice": np.nan, "slices": 0, "volume_cc": 0.0,
                         "max_area_mm2": 0.0, "n_flagged": 0, "flagged_slices": "",
                         "rules": "no contour"})
            continue
        mask = sitk.GetArrayViewFromImage(case.structures[name]) > 0
        areas = area_profile(mask, sx * sy)
        table = flag_profile(areas, settings["short_ratio"], settings["short_deficit"],
                             settings["fit_tau"])
        flagged = table[table["flagged"]]
        rows.append({
            "patient": case.patient_id, "structure": name,
            "first_slice": int(table["slice"].iloc[0]) if len(table) else np.nan,
            "last_slice": int(table["slice"].iloc[-1]) if len(table) else np.nan,
            "slices": len(table), "volume_cc": float(areas.sum() * sz / 1000.0),
            "max_area_mm2": float(areas.max()) if areas.size else 0.0,
            "n_flagged": len(flagged),
            "flagged_slices": ";".join(str(int(k)) for k in flagged["slice"]),
            "rules": ";".join(sorted({r for rule in flagged["rule"] for r in rule.split("+")})),
        })
        table = table.rename(columns={"area": "area_mm2", "expected": "expected_mm2"})
        table.insert(0, "structure", name)
        table.insert(0, "patient", case.patient_id)
        profiles.append(table)
    profile = (pd.concat(profiles, ignore_index=True) if profiles
               else pd.DataFrame(columns=PROFILE_COLUMNS))
    return rows, profile[PROFILE_COLUMNS]


def robust_z(values) -> np.ndarray:
    """``0.6745 (v - median) / MAD`` (Iglewicz and Hoaglin's modified z-score); NaN when the MAD
    is 0 (more than half the values equal)."""
    v = np.asarray(values, dtype=float)
    median = np.median(v)
    mad = np.median(np.abs(v - median))
    if mad == 0:
        return np.full(v.shape, np.nan)
    return 0.6745 * (v - median) / mad


def add_volume_outliers(glands: pd.DataFrame, volume_z: float = DEFAULTS["volume_z"],
                        min_cohort: int = DEFAULTS["min_cohort"]) -> pd.DataFrame:
    """Add ``volume_z``, ``volume_outlier`` and ``flagged`` to a gland table (both sides pooled).

    Glands without a contour are left out of the median and MAD; with fewer than ``min_cohort``
    contoured glands ``volume_z`` is NaN and ``volume_outlier`` False (not assessed).
    """
    glands = glands.copy()
    contoured = glands["volume_cc"] > 0
    z = np.full(len(glands), np.nan)
    if int(contoured.sum()) >= min_cohort:
        z[contoured.to_numpy()] = robust_z(glands.loc[contoured, "volume_cc"])
    glands["volume_z"] = z
    glands["volume_outlier"] = np.abs(np.nan_to_num(z, nan=0.0)) > volume_z
    glands["flagged"] = (glands["n_flagged"] > 0) | glands["volume_outlier"] | ~contoured
    return glands


def assess_cohort(cases, settings: dict | None = None, progress: bool = False) -> QualityReport:
    """Flags for every case of an iterable of Cases (or of a
    :class:`~crossmod_lib.preparation.CohortSource`, read one case at a time)."""
    settings = settings_from(None, **(settings or {}))
    if hasattr(cases, "items") and hasattr(cases, "read"):
        source = cases
        cases = (source.read(item) for item in source.items)
        total = len(source.items)
    else:
        total = None
    if progress:
        from tqdm.auto import tqdm

        cases = tqdm(cases, total=total, desc="contour quality", unit="case")
    rows, profiles = [], []
    for case in cases:
        r, p = assess_case(case, settings)
        rows += r
        profiles.append(p)
    if not rows:
        raise CrossmodError("contour quality: no cases to assess")
    glands = add_volume_outliers(pd.DataFrame(rows), settings["volume_z"], settings["min_cohort"])
    profile = pd.concat(profiles, ignore_index=True)
    return QualityReport(glands=glands[GLAND_COLUMNS], profiles=profile, settings=settings)


# ----------------------------------------------------------------------------------------------
# What the flags cost: affected training slices


def _slice_keys(path: Path, what: str) -> pd.DataFrame:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "patient" not in data.files or "slice_index" not in data.files:
                raise CrossmodError(f"{path}: {what} without 'patient' and 'slice_index' arrays")
            return pd.DataFrame({"patient": data["patient"].astype(str),
                                 "slice": data["slice_index"].astype(np.int64)})
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: unreadable {what} ({exc})") from None


def affected_slices(report: QualityReport, prepared: str | Path | None = None,
                    cleaned: str | Path | None = None) -> pd.DataFrame:
    """Per patient: flagged CT slices (either gland) and how many 2D training examples carry them.

    ``prepared``: ``prepared/ct_slices.npz``; ``cleaned``: ``cleaned/training_slices.npz`` (either
    may be None or missing: its columns are then NaN). Columns: patient, flagged_slices (distinct
    slice indices flagged in either gland), prepared_slices, prepared_affected, training_slices,
    training_affected; a last row ``all`` holds the totals.
    """
    flagged = report.flagged_slices[["patient", "slice"]].drop_duplicates()
    patients = sorted(report.glands["patient"].unique())
    table = pd.DataFrame({"patient": patients})
    table["flagged_slices"] = [int((flagged["patient"] == p).sum()) for p in patients]
    for path, stem, what in ((prepared, "prepared", "prepared CT slices"),
                             (cleaned, "training", "cleaned training slices")):
        if path is None or not Path(path).is_file():
            table[f"{stem}_slices"] = np.nan
            table[f"{stem}_affected"] = np.nan
            continue
        keys = _slice_keys(Path(path), what)
        hit = keys.merge(flagged, on=["patient", "slice"], how="inner")
        table[f"{stem}_slices"] = [int((keys["patient"] == p).sum()) for p in patients]
        table[f"{stem}_affected"] = [int((hit["patient"] == p).sum()) for p in patients]
    total = {"patient": "all"}
    for column in table.columns[1:]:
        values = table[column]
        total[column] = values.sum() if values.notna().any() else np.nan
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


# ----------------------------------------------------------------------------------------------
# Checking the checker on the phantom's record


def phantom_defects(path: str | Path, patients=None) -> pd.DataFrame:
    """The defects the phantom injected (``phantom.json``), one row per defective slice.

    Columns: defect (a number per recorded defect), patient, structure, kind (``partial`` or
    ``missing``), part (which half a partial contour kept; empty for missing), slice.
    ``patients``: keep only these (the cohort the run assessed).
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CrossmodError(f"{path}: not found (the phantom's record of its contour defects)") from None
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: unreadable phantom record ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("defects"), list):
        raise CrossmodError(f"{path}: no 'defects' list (not a crossmod phantom.json)")
    rows = []
    for number, defect in enumerate(record["defects"]):
        try:
            for k in defect["slices"]:
                rows.append({"defect": number, "patient": str(defect["patient"]),
                             "structure": str(defect["structure"]), "kind": str(defect["kind"]),
                             "part": str(defect.get("part", "")), "slice": int(k)})
        except (KeyError, TypeError, ValueError):
            raise CrossmodError(f"{path}: defect {number} lacks patient/structure/kind/slices") from None
    table = pd.DataFrame(rows, columns=["defect", "patient", "structure", "kind", "part", "slice"])
    if patients is not None:
        table = table[table["patient"].isin(set(patients))].reset_index(drop=True)
    return table


def _rate(hits: int, total: int) -> float:
    return hits / total if total else math.nan


def detection_accuracy(report: QualityReport, defects: pd.DataFrame) -> pd.DataFrame:
    """Flags against the phantom's record, at three levels.

    ``slice``: a defective slice is found when it is flagged (sensitivity per defect kind and in
    all; precision: the share of flagged slices that are defective). ``defect``: a recorded defect
    (a run of slices) is found when any of its slices is flagged. ``gland``: a gland with any
    defect against a gland flagged by any rule, the volume outlier included (precision and
    specificity). Columns: level, kind, n (true items), found, flagged, false_alarms,
    sensitivity, precision, specificity.
    """
    profiles = report.profiles
    flagged = {(p, s, int(k)) for p, s, k in
               profiles.loc[profiles["flagged"], ["patient", "structure", "slice"]].itertuples(index=False)}
    rows = []
    key = ["patient", "structure", "slice"]
    truth_all = {(p, s, int(k)) for p, s, k in defects[key].itertuples(index=False)}
    for kind in ("partial", "missing", "all"):
        part = defects if kind == "all" else defects[defects["kind"] == kind]
        truth = {(p, s, int(k)) for p, s, k in part[key].itertuples(index=False)}
        found = len(truth & flagged)
        row = {"level": "slice", "kind": kind, "n": len(truth), "found": found,
               "sensitivity": _rate(found, len(truth))}
        if kind == "all":
            row.update(flagged=len(flagged), false_alarms=len(flagged - truth_all),
                       precision=_rate(len(flagged & truth_all), len(flagged)))
        rows.append(row)
    for kind in ("partial", "missing", "all"):
        part = defects if kind == "all" else defects[defects["kind"] == kind]
        groups = [g for _, g in part.groupby("defect")]
        found = sum(any((p, s, int(k)) in flagged for p, s, k in g[key].itertuples(index=False))
                    for g in groups)
        rows.append({"level": "defect", "kind": kind, "n": len(groups), "found": found,
                     "sensitivity": _rate(found, len(groups))})
    glands = report.glands
    defective = {(p, s) for p, s in defects[["patient", "structure"]].itertuples(index=False)}
    is_defective = np.array([(p, s) in defective for p, s in
                             glands[["patient", "structure"]].itertuples(index=False)], dtype=bool)
    is_flagged = glands["flagged"].to_numpy(dtype=bool)
    tp = int((is_defective & is_flagged).sum())
    fp = int((~is_defective & is_flagged).sum())
    tn = int((~is_defective & ~is_flagged).sum())
    rows.append({"level": "gland", "kind": "all", "n": int(is_defective.sum()), "found": tp,
                 "flagged": int(is_flagged.sum()), "false_alarms": fp,
                 "sensitivity": _rate(tp, int(is_defective.sum())),
                 "precision": _rate(tp, tp + fp), "specificity": _rate(tn, tn + fp)})
    columns = ["level", "kind", "n", "found", "flagged", "false_alarms", "sensitivity",
               "precision", "specificity"]
    return pd.DataFrame(rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# The run folder


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def assess_run(run, settings: dict | None = None, progress: bool = False) -> dict:
    """Chapter 6: assess the run's CT cohort and write the tables under ``metrics/``.

    Returns ``{"report": QualityReport, "affected": DataFrame, "defects": DataFrame or None,
    "accuracy": DataFrame or None}``; ``defects`` and ``accuracy`` only where the CT cohort is the
    phantom. Writes ``metrics/contour_quality_glands.csv``, ``contour_quality_slices.csv`` (every
    slice of every extent with its rule) and, for the phantom, ``contour_quality_detection.csv``.
    """
    from .preparation import cohort_sources

    settings = settings_from(run.profile, **(settings or {}))
    source = cohort_sources(run, progress=False)["CT"]
    report = assess_cohort(source, settings, progress=progress)
    affected = affected_slices(report, run.ct_slices, run.training_slices)
    _write_csv(report.glands, run.output("contour_quality_glands"))
    _write_csv(report.profiles, run.output("contour_quality_slices"))
    defects = accuracy = None
    if source.dataset == "phantom":
        defects = phantom_defects(run.phantom_record,
                                  patients=report.glands["patient"].unique())
        accuracy = detection_accuracy(report, defects)
        _write_csv(accuracy, run.output("contour_quality_detection"))
    return {"report": report, "affected": affected, "defects": defects, "accuracy": accuracy,
            "source": source}


def _window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2.0
    return np.clip((hu.astype(np.float32) - lo) / width, 0.0, 1.0)


def run(run, progress: bool = False) -> dict:
    """Stage 6 (beyond the paper) over a run folder: :func:`assess_run` with the profile's
    settings; writes ``metrics/contour_quality_*.csv``."""
    return assess_run(run, progress=progress)


def figure9_examples(run, assessed: dict, n: int = 3, margin_mm: float = 15.0) -> list[dict]:
    """Fig. 9 data: up to ``n`` flagged slices, one per gland, each beside a healthy slice.

    Picks glands in order of their most deficient flagged slice (the largest area missing against
    the expected area), taking a part-contoured slice, a missing one, ... in turn so the kinds of
    defect are shown. Each item: patient, structure, slice, rule, ratio (area /
    expected area), ct (the windowed axial CT slice, 0-1, cropped around the gland), mask (the
    contour on it), neighbour and neighbour_ct / neighbour_mask (the nearest unflagged slice of
    the same gland, None if there is none), spacing (row, column mm).
    """
    report: QualityReport = assessed["report"]
    source = assessed["source"]
    flagged = report.flagged_slices
    if flagged.empty:
        return []
    window = run.profile["preprocessing"]["ct_window"]
    flagged = flagged.assign(kind=np.where(flagged["rule"].str.contains("missing"), "missing",
                                           "partial"))
    flagged = flagged.assign(deficit=(flagged["expected_mm2"] - flagged["area_mm2"]).fillna(0.0))
    worst = (flagged.sort_values("deficit", ascending=False)
             .groupby(["patient", "structure"], sort=False).head(1))
    # alternate kinds: the worst missing, the worst partial, the next missing, ...
    by_kind = {k: list(g.itertuples(index=False)) for k, g in worst.groupby("kind", sort=False)}
    order, turn = [], 0
    kinds = sorted(by_kind, key=lambda k: k != "partial")
    while len(order) < n and any(by_kind.values()):
        kind = kinds[turn % len(kinds)]
        if by_kind[kind]:
            order.append(by_kind[kind].pop(0))
        turn += 1
    items = dict(zip(source.patient_ids(), source.items))
    examples = []
    for row in order:
        case = source.read(items[row.patient])
        image = sitk.GetArrayViewFromImage(case.image)
        mask = sitk.GetArrayViewFromImage(case.structures[row.structure]) > 0
        sx, sy, _ = case.image.GetSpacing()
        rows_any = np.flatnonzero(mask.any(axis=(0, 2)))
        cols_any = np.flatnonzero(mask.any(axis=(0, 1)))
        my, mx = round(margin_mm / sy), round(margin_mm / sx)
        box = (slice(max(rows_any[0] - my, 0), rows_any[-1] + my + 1),
               slice(max(cols_any[0] - mx, 0), cols_any[-1] + mx + 1))
        gland = report.profiles[(report.profiles["patient"] == row.patient)
                                & (report.profiles["structure"] == row.structure)]
        healthy = gland.loc[~gland["flagged"], "slice"].to_numpy()
        neighbour = int(healthy[np.argmin(np.abs(healthy - row.slice))]) if healthy.size else None
        k = int(row.slice)
        examples.append({
            "patient": row.patient, "structure": row.structure, "slice": k, "rule": row.rule,
            "ratio": float(row.ratio),
            "ct": _window(image[k][box], window["level"], window["width"]),
            "mask": np.array(mask[k][box]),
            "neighbour": neighbour,
            "neighbour_ct": (None if neighbour is None else
                             _window(image[neighbour][box], window["level"], window["width"])),
            "neighbour_mask": None if neighbour is None else np.array(mask[neighbour][box]),
            "spacing": (sy, sx),
        })
    return examples
