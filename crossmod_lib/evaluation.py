"""Paper sections 2.G and 3.D: geometric evaluation of the contours.

The interobserver reference
    The paper compares its automatic contours with the variability between human observers: the
    metrics (DSC, HD, MSD; :mod:`crossmod_lib.metrics`) between two observers' contours of the
    same MR, per patient and per gland, summarised as mean and standard deviation over patients
    (:func:`interobserver`, chapter 1).

The automatic contours (chapter 5)
    :func:`evaluate_predictions` compares every prediction that chapter 4 listed in
    ``predictions/index.csv`` with the manual contours of the same patient, per gland, for both
    versions of the prediction (``raw``: as the network gave it; ``lcc``: its largest 3D
    connected component per gland), and writes ``metrics/segmentation.csv``.
    :func:`table_ii` lays the result out as the paper's Table II (mean ± SD per gland and
    method, the interobserver row last); :func:`per_patient` averages both glands per patient as
    the paper's Fig. 8 does; :func:`paired_tests` asks whether cross-modality learning differs
    from each other method (Wilcoxon signed-rank on the MR patients every MR method was tested
    on; Mann-Whitney U against CT only, whose test patients are CT patients, not the same
    people). :func:`contour_examples` picks the typical patients of Fig. 7.

    Every method is summarised over its own test patients: cross-modality, naive and domain
    randomisation over all MR patients, the MR oracle over all MR patients (each predicted by the
    fold that did not train on it), few-shot k over the MR patients it was not fine-tuned on, CT
    only over its held-out CT patients.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .errors import CrossmodError
from .io import PAROTIDS, Case, list_cases, read_case
from .metrics import compare_images, summarise

PAROTID_LABELS = {value: name for value, name in enumerate(PAROTIDS, start=1)}


def label_image(case: Case) -> sitk.Image:
    """The case's parotids as one label image (1 left, 2 right) on its grid."""
    image = sitk.GetImageFromArray(case.label_array(PAROTIDS))
    image.CopyInformation(case.image)
    return image


def compare_observers(patient: str, first: Case, second: Case, names=("observer 1", "observer 2")
                      ) -> pd.DataFrame:
    """Metrics between two Cases' parotids (same grid), one row per gland."""
    table = compare_images(label_image(first), label_image(second), PAROTID_LABELS, names=names)
    table.insert(0, "patient", patient)
    return table


def interobserver(cohort_dir: str | Path, reference: str = "structures",
                  other: str = "structures_observer2") -> pd.DataFrame:
    """Metrics between two observers' parotid contours for every case of a cohort folder.

    One row per patient and gland: patient, structure, dsc, hd, hd95, msd (mm).
    """
    rows = []
    for folder in list_cases(cohort_dir):
        if not (folder / other).is_dir():
            raise CrossmodError(f"{folder}: no second observer's contours ({other}/)")
        rows.append(compare_observers(folder.name, read_case(folder, structures_dir=reference),
                                      read_case(folder, structures_dir=other), (reference, other)))
    return pd.concat(rows, ignore_index=True)


def interobserver_deepmind(root: str | Path, scans=None, progress: bool = False) -> pd.DataFrame:
    """Oncologist vs radiographer on the DeepMind TCIA scans (Nikolov et al. 2018), scan by scan.

    Reads one pair at a time (each scan is a 512 x 512 x ~150 grid per observer and gland), so the
    memory stays that of one scan. Adds the split (test / validation) of each scan.
    """
    from tqdm.auto import tqdm

    from .datasets import DEEPMIND_OBSERVERS, deepmind_pairs, deepmind_scans

    chosen = [s for s in deepmind_scans(root) if all(o in s.folders for o in DEEPMIND_OBSERVERS)]
    if scans is not None:
        wanted = set(scans)
        chosen = [s for s in chosen if s.scan in wanted]
    rows = []
    for scan in tqdm(chosen, desc="DeepMind interobserver", disable=not progress):
        ((name, oncologist, radiographer),) = deepmind_pairs(root, scans=[scan.scan])
        table = compare_observers(name, oncologist, radiographer, ("oncologist", "radiographer"))
        table.insert(1, "split", scan.split)
        rows.append(table)
    if not rows:
        raise CrossmodError(f"{root}: no DeepMind scan with both observers' contours")
    return pd.concat(rows, ignore_index=True)


def mean_sd_table(metrics: pd.DataFrame, by: str = "structure",
                  columns=(("dsc", "DSC"), ("hd", "HD (mm)"), ("msd", "MSD (mm)")),
                  digits: int = 2) -> pd.DataFrame:
    """Table II style "mean ± SD" text per group, from :func:`crossmod_lib.metrics.summarise`.

    A metric that is infinite for some rows (an empty contour) is summarised over the rest, and the
    cell says how many were left out.
    """
    summary = summarise(metrics, by=by).set_index(by).sort_index()
    table = pd.DataFrame(index=summary.index)
    for key, title in columns:
        mean, sd, n_inf = summary[f"{key}_mean"], summary[f"{key}_sd"].fillna(0.0), summary[f"{key}_n_inf"]
        cells = [("n.a." if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}")
                 + (f" ({k} undefined)" if k else "") for m, s, k in zip(mean, sd, n_inf)]
        table[title] = cells
    table["n"] = summary["n"]
    return table


# ----------------------------------------------------------------------------------------------
# Section 3.D: the automatic contours against the manual ones (Table II, Fig. 8, tests)

#: Columns of ``predictions/index.csv`` (chapter 4, :func:`crossmod_lib.segmentation.predict_run`).
INDEX_COLUMNS = ("model", "title", "patient", "modality", "labels", "labels_lcc", "reference",
                 "seconds", "common")
#: The two versions of every prediction: as the network gave it, and its largest 3D component.
POSTPROCESSING = {"raw": "labels", "lcc": "labels_lcc"}
#: Order of the methods in tables and figures; others follow, by name.
METHOD_ORDER = ("cross_modality", "ct_only", "ct_only_paired", "naive", "domain_random", "mr_oracle")
METRIC_TITLES = {"dsc": "DSC", "hd": "HD (mm)", "hd95": "HD95 (mm)", "msd": "MSD (mm)"}
SEGMENTATION_COLUMNS = ["model", "title", "patient", "modality", "common", "postprocess",
                        "structure", "label", "dsc", "hd", "hd95", "msd", "reference_voxels",
                        "prediction_voxels", "seconds"]


def _natural_key(name: str):
    import re

    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(name))]


def method_order(models) -> list[str]:
    """Methods in report order: :data:`METHOD_ORDER` first, the rest (few-shot k...) by name."""
    models = list(dict.fromkeys(models))
    known = [m for m in METHOD_ORDER if m in models]
    return known + sorted((m for m in models if m not in METHOD_ORDER), key=_natural_key)


def _as_bool(values, path) -> pd.Series:
    mapping = {"true": True, "false": False, "1": True, "0": False}
    out = []
    for v in values:
        if isinstance(v, (bool, np.bool_)):
            out.append(bool(v))
            continue
        key = str(v).strip().lower()
        if key not in mapping:
            raise CrossmodError(f"{path}: column 'common' holds {v!r}; expected True or False")
        out.append(mapping[key])
    return pd.Series(out, index=values.index, dtype=bool)


def read_prediction_index(path: str | Path) -> pd.DataFrame:
    """``predictions/index.csv``, checked: its columns, modalities, one row per (model, patient)."""
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: not found; run chapter 4 (segmentation) first")
    try:
        index = pd.read_csv(path, dtype={"patient": str, "model": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CrossmodError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise CrossmodError(f"{path}: missing column(s) {', '.join(missing)}")
    if index.empty:
        raise CrossmodError(f"{path}: no predictions listed")
    for column in ("model", "title", "patient", "modality", "labels", "labels_lcc"):
        empty = index[column].isna() | (index[column].astype(str).str.strip() == "")
        if empty.any():
            raise CrossmodError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 2} has no {column}")
    bad = sorted(set(index["modality"]) - {"MR", "CT"})
    if bad:
        raise CrossmodError(f"{path}: modality must be MR or CT, found {bad}")
    # no reference: an unannotated MR patient (predicted, not evaluated); a CT always has one
    index["reference"] = ["" if pd.isna(v) else str(v).strip() for v in index["reference"]]
    unreferenced = (index["reference"] == "") & (index["modality"] == "CT")
    if unreferenced.any():
        raise CrossmodError(f"{path}: row {int(np.flatnonzero(unreferenced)[0]) + 2} has no reference "
                            "(every CT test patient has manual contours)")
    duplicated = index[index.duplicated(["model", "patient"])]
    if len(duplicated):
        row = duplicated.iloc[0]
        raise CrossmodError(f"{path}: model {row['model']} lists patient {row['patient']} twice")
    index["common"] = _as_bool(index["common"], path)
    index["seconds"] = pd.to_numeric(index["seconds"], errors="coerce")
    return index


def evaluate_index(index: pd.DataFrame, root: str | Path, progress: bool = False) -> pd.DataFrame:
    """DSC, HD, HD95 and MSD of every prediction of an index against its manual labels.

    Paths in the index are relative to ``root`` (the run folder). Both versions of each
    prediction are compared (``postprocess`` ``raw`` and ``lcc``), per gland. One row per model,
    patient, version and gland (:data:`SEGMENTATION_COLUMNS`).
    """
    from .io import read_image
    from .metrics import compare_images

    root = Path(root)
    rows = []
    cached = (None, None)  # one reference image in memory: rows are visited reference by reference
    index = index[_has_reference(index["reference"])]  # unannotated: nothing to compare
    order = index.sort_values(["reference", "model"]).itertuples(index=False)
    if progress:
        from tqdm.auto import tqdm

        order = tqdm(list(order), desc="metrics", unit="prediction")
    for row in order:
        if cached[0] != row.reference:
            cached = (row.reference, read_image(root / row.reference))
        reference = cached[1]
        for variant, column in POSTPROCESSING.items():
            path = root / getattr(row, column)
            table = compare_images(reference, read_image(path), PAROTID_LABELS,
                                   names=(str(root / row.reference), str(path)))
            for record in table.to_dict("records"):
                rows.append({"model": row.model, "title": row.title, "patient": row.patient,
                             "modality": row.modality, "common": bool(row.common),
                             "postprocess": variant, **record, "seconds": row.seconds})
    metrics = pd.DataFrame(rows, columns=SEGMENTATION_COLUMNS)
    order = {m: k for k, m in enumerate(method_order(metrics["model"]))}
    metrics = metrics.sort_values(["postprocess", "model", "patient", "structure"],
                                  key=lambda s: s.map(order) if s.name == "model" else s)
    return metrics.reset_index(drop=True)


def annotation_counts(index: pd.DataFrame, modality: str = "MR") -> tuple[int, int]:
    """(patients with manual contours, patients predicted) of one cohort in a prediction index."""
    patients = index[index["modality"] == modality].drop_duplicates("patient")
    return int(_has_reference(patients["reference"]).sum()), int(len(patients))


def annotation_sentence(index: pd.DataFrame) -> str:
    """'n of m MR patients have manual contours: ...', what chapter 5 can evaluate."""
    annotated, total = annotation_counts(index)
    if total == 0:
        return "No MR patient was predicted."
    if annotated == total:
        return f"All {total} MR patients have manual contours: every prediction is evaluated."
    if annotated == 0:
        return (f"None of the {total} MR patients has manual contours: the predictions cannot be "
                "scored, only reviewed (the gallery below).")
    return (f"{annotated} of {total} MR patients have manual contours: the metrics are theirs; "
            f"the other {total - annotated} are predicted and shown for review, not scored.")


def evaluate_predictions(run, progress: bool = False) -> pd.DataFrame:
    """Chapter 5: metrics of every prediction of a run, written to ``metrics/segmentation.csv``.

    Reads ``predictions/index.csv`` (chapter 4) and the label maps it names; see
    :func:`evaluate_index` for the table. The CSV is written atomically.
    """
    index = read_prediction_index(run.inputs("prediction_index"))
    metrics = evaluate_index(index, run.root, progress=progress)
    out = run.output("segmentation_metrics")
    tmp = out.with_name(f".{out.name}.tmp")
    metrics.to_csv(tmp, index=False)
    tmp.replace(out)
    return metrics


def _choose(metrics: pd.DataFrame, postprocess: str) -> pd.DataFrame:
    if postprocess not in POSTPROCESSING:
        raise CrossmodError(f"postprocess={postprocess!r}: one of {sorted(POSTPROCESSING)}")
    if "postprocess" not in metrics.columns:
        raise CrossmodError("metrics table has no 'postprocess' column (not from evaluate_predictions)")
    chosen = metrics[metrics["postprocess"] == postprocess]
    if chosen.empty:
        raise CrossmodError(f"metrics table has no rows with postprocess {postprocess!r}")
    return chosen


def per_patient(metrics: pd.DataFrame, postprocess: str = "lcc", common_only: bool = False
                ) -> pd.DataFrame:
    """Each metric averaged over both glands, per method and patient (as in the paper's Fig. 8).

    An empty contour of either gland makes the patient's distances ``inf`` (undefined).
    ``common_only``: only the MR patients every MR method was tested on.
    """
    chosen = _choose(metrics, postprocess)
    if common_only:
        chosen = chosen[chosen["common"]]
    keys = ["model", "title", "modality", "common", "patient"]
    values = [m for m in ("dsc", "hd", "hd95", "msd") if m in chosen.columns]
    averaged = chosen.groupby(keys, sort=False)[values].mean().reset_index()
    averaged["structures"] = chosen.groupby(keys, sort=False).size().to_numpy()
    return averaged


def table_ii(metrics: pd.DataFrame, interobserver: pd.DataFrame | None = None,
             postprocess: str = "lcc", models=None,
             columns=(("dsc", "DSC"), ("hd", "HD (mm)"), ("msd", "MSD (mm)")), digits: int = 2,
             interobserver_title: str = "Interobserver variability") -> pd.DataFrame:
    """The paper's Table II: mean ± SD per gland (right, then left, as the paper) and method.

    ``metrics``: :func:`evaluate_predictions`' table; ``postprocess``: ``raw`` or ``lcc``;
    ``models``: which methods and in what order (default: all, :func:`method_order`); each method
    is summarised over the patients it was tested on (``n`` and ``tested on`` say which).
    ``interobserver``: per patient and gland metrics between two observers
    (``metrics/interobserver_mr.csv``), shown as the last row of each gland.
    """
    chosen = _choose(metrics, postprocess)
    models = method_order(chosen["model"]) if models is None else list(models)
    unknown = [m for m in models if m not in set(chosen["model"])]
    if unknown:
        raise CrossmodError(f"table_ii: no metrics for model(s) {unknown}")
    titles = chosen.drop_duplicates("model").set_index("model")["title"]
    modality = chosen.drop_duplicates("model").set_index("model")["modality"]
    blocks = []
    for structure, roi in (("Parotid_R", "Right parotid"), ("Parotid_L", "Left parotid")):
        rows = chosen[(chosen["structure"] == structure) & chosen["model"].isin(models)]
        if rows.empty:
            continue
        summary = mean_sd_table(rows, by="model", columns=columns, digits=digits)
        summary = summary.reindex([m for m in models if m in summary.index])
        summary["tested on"] = [f"{modality[m]}" for m in summary.index]
        summary.index = pd.MultiIndex.from_tuples([(roi, titles[m]) for m in summary.index],
                                                  names=["ROI", "Method"])
        blocks.append(summary)
        if interobserver is not None and len(interobserver):
            inter = interobserver[interobserver["structure"] == structure]
            if len(inter):
                row = mean_sd_table(inter.assign(group=structure), by="group", columns=columns,
                                    digits=digits)
                row["tested on"] = "MR (two observers)"
                row.index = pd.MultiIndex.from_tuples([(roi, interobserver_title)],
                                                      names=["ROI", "Method"])
                blocks.append(row)
    if not blocks:
        raise CrossmodError("table_ii: no Parotid_L / Parotid_R rows in the metrics table")
    return pd.concat(blocks)


def both_glands(metrics: pd.DataFrame, interobserver: pd.DataFrame | None = None,
                postprocess: str = "lcc", models=None,
                columns=(("dsc", "DSC"), ("hd", "HD (mm)"), ("msd", "MSD (mm)")), digits: int = 2,
                interobserver_title: str = "Interobserver variability") -> pd.DataFrame:
    """Mean ± SD over patients of each metric averaged over both glands, per method (the
    quantity of Fig. 8 and of the paper's section 3.D text), the interobserver row last."""
    table = per_patient(metrics, postprocess)
    models = method_order(table["model"]) if models is None else list(models)
    titles = table.drop_duplicates("model").set_index("model")["title"]
    out = mean_sd_table(table[table["model"].isin(models)], by="model", columns=columns,
                        digits=digits)
    out = out.reindex([m for m in models if m in out.index])
    out.index = pd.Index([titles[m] for m in out.index], name="Method")
    if interobserver is not None and len(interobserver):
        inter = interobserver_per_patient(interobserver).assign(group=interobserver_title)
        row = mean_sd_table(inter, by="group", columns=columns, digits=digits)
        row.index = pd.Index([interobserver_title], name="Method")
        out = pd.concat([out, row])
    return out


def method_summary(metrics: pd.DataFrame, postprocess: str = "lcc") -> pd.DataFrame:
    """Numbers behind :func:`both_glands`, per method (index: model): ``n`` (patients) and, per
    metric, ``<m>_mean``, ``<m>_sd`` and ``<m>_n_inf`` over patients
    (:func:`crossmod_lib.metrics.summarise` of :func:`per_patient`); ``glands`` and
    ``empty_glands`` (glands the method left without any contour)."""
    summary = summarise(per_patient(metrics, postprocess), by="model").set_index("model")
    chosen = _choose(metrics, postprocess)
    summary["glands"] = chosen.groupby("model").size()
    summary["empty_glands"] = (chosen["prediction_voxels"] == 0).groupby(chosen["model"]).sum()
    return summary


def postprocessing_effect(metrics: pd.DataFrame) -> pd.DataFrame:
    """What keeping the largest 3D component changed, per method: mean DSC and HD (finite values,
    per gland) without (``raw``) and with (``lcc``) it, and the glands it changed."""
    _choose(metrics, "raw"), _choose(metrics, "lcc")
    keys = ["model", "patient", "structure"]
    raw = metrics[metrics["postprocess"] == "raw"].set_index(keys)
    lcc = metrics[metrics["postprocess"] == "lcc"].set_index(keys)
    joined = raw.join(lcc, lsuffix="_raw", rsuffix="_lcc", how="inner")
    rows = []
    for model in method_order(joined.index.get_level_values("model")):
        part = joined.xs(model, level="model")

        def finite_mean(column, part=part):
            values = part[column].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            return float(values.mean()) if values.size else np.nan

        rows.append({"model": model, "title": part["title_raw"].iloc[0], "glands": len(part),
                     "changed": int((part["prediction_voxels_raw"] != part["prediction_voxels_lcc"]).sum()),
                     "dsc_raw": finite_mean("dsc_raw"), "dsc_lcc": finite_mean("dsc_lcc"),
                     "hd_raw": finite_mean("hd_raw"), "hd_lcc": finite_mean("hd_lcc"),
                     "msd_raw": finite_mean("msd_raw"), "msd_lcc": finite_mean("msd_lcc")})
    return pd.DataFrame(rows)


def read_interobserver(run) -> pd.DataFrame | None:
    """Chapter 1's ``metrics/interobserver_mr.csv`` (None where the MR cohort has no second
    observer, so chapter 1 wrote none)."""
    path = run.interobserver_mr
    if not path.is_file():
        return None
    try:
        table = pd.read_csv(path, dtype={"patient": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CrossmodError(f"{path}: unreadable CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in ("patient", "structure", "dsc", "hd", "msd") if c not in table.columns]
    if missing:
        raise CrossmodError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def _smallest_p(test: str, n1: int, n2: int = 0) -> float:
    """Smallest two-sided p-value the exact test can reach with these sample sizes."""
    if test == "wilcoxon":
        return min(1.0, 2.0 / 2 ** n1)
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def _holm(pvalues) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite])]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def paired_tests(metrics: pd.DataFrame, reference: str = "cross_modality", against=None,
                 values=("dsc", "hd", "msd"), postprocess: str = "lcc") -> pd.DataFrame:
    """Is ``reference`` different from each other method? Two-sided rank tests per metric.

    Per patient, each metric is averaged over both glands (:func:`per_patient`). Two methods
    tested on MR are compared **paired** on the common MR patients (every MR method's test set):
    Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`, exact for small samples without
    ties). A method tested on other patients (CT only: held-out CT patients) cannot be paired:
    Mann-Whitney U test (:func:`scipy.stats.mannwhitneyu`) of the two groups of patients, and
    the ``test`` column says so. The paired control (CT only on the CT each simulated MR patient
    was made from) shares the MR patients and is compared paired on every patient both have. Patients with an undefined distance (an empty contour) are left
    out of that metric's test and counted in ``note``. Fewer than 2 pairs (or 1 patient per
    group) gives NaN with a note instead of a result. ``p_holm``: Holm's adjustment over the
    comparisons of each metric.

    Columns: metric, reference, other, test, n_reference, n_other (pairs: both equal), median
    of each, median_difference (paired: of the differences; unpaired: of the medians), statistic,
    p, p_holm, smallest_exact_p (the smallest p the exact test can give with these n: with few
    patients a "significant" result is impossible, whatever the data), note. scipy computes p
    exactly for small samples without ties and with a normal approximation otherwise
    (``method="auto"``), so a tied sample may report a p below ``smallest_exact_p``.
    """
    from scipy import stats

    table = per_patient(metrics, postprocess)
    models = set(table["model"])
    if reference not in models:
        raise CrossmodError(f"paired_tests: no metrics for the reference model {reference!r}")
    if against is None:
        against = [m for m in method_order(models) if m != reference]
    unknown = [m for m in against if m not in models]
    if unknown:
        raise CrossmodError(f"paired_tests: no metrics for model(s) {unknown}")
    ref = table[table["model"] == reference]
    rows = []
    for metric in values:
        for other in against:
            oth = table[table["model"] == other]
            ref_mod, oth_mod = ref["modality"].iloc[0], oth["modality"].iloc[0]
            row = {"metric": metric, "reference": reference, "other": other}
            notes = []
            # CT and MR cohorts never share a patient, except the paired control: the CT an
            # MR patient was simulated from (segmentation.PAIRED_CT), tested on the same patients
            own_ct = (ref_mod == "MR" and oth_mod == "CT"
                      and bool(set(ref[ref["common"]]["patient"]) & set(oth["patient"])))
            if ref_mod == oth_mod == "MR" or own_ct:
                # the control is paired on every patient both have (not only the common ones)
                a = (ref if own_ct else ref[ref["common"]]).set_index("patient")[metric]
                b = (oth if own_ct else oth[oth["common"]]).set_index("patient")[metric]
                pair = pd.concat([a, b], axis=1, keys=["a", "b"], join="inner")
                finite = np.isfinite(pair).all(axis=1)
                if (~finite).any():
                    notes.append(f"{int((~finite).sum())} patient(s) with an undefined distance left out")
                pair = pair[finite]
                n = len(pair)
                row.update(test=("Wilcoxon signed-rank (paired: the same patients' MR and CT)" if own_ct
                                 else "Wilcoxon signed-rank (paired, common MR patients)"),
                           n_reference=n, n_other=n,
                           median_reference=float(pair["a"].median()) if n else np.nan,
                           median_other=float(pair["b"].median()) if n else np.nan,
                           median_difference=float((pair["a"] - pair["b"]).median()) if n else np.nan,
                           smallest_exact_p=_smallest_p("wilcoxon", n) if n else np.nan)
                if n < 2:
                    notes.append(f"too few pairs (n={n}) for a test")
                    row.update(statistic=np.nan, p=np.nan)
                elif np.allclose(pair["a"], pair["b"]):
                    notes.append("all paired differences are zero: no evidence of a difference")
                    row.update(statistic=np.nan, p=1.0)
                else:
                    result = stats.wilcoxon(pair["a"], pair["b"], alternative="two-sided")
                    row.update(statistic=float(result.statistic), p=float(result.pvalue))
            else:
                a = ref[metric].to_numpy(dtype=float)
                b = oth[metric].to_numpy(dtype=float)
                left_out = int((~np.isfinite(a)).sum() + (~np.isfinite(b)).sum())
                if left_out:
                    notes.append(f"{left_out} patient(s) with an undefined distance left out")
                a, b = a[np.isfinite(a)], b[np.isfinite(b)]
                row.update(test=f"Mann-Whitney U (unpaired: {reference} on {ref_mod}, "
                                f"{other} on {oth_mod} patients)",
                           n_reference=len(a), n_other=len(b),
                           median_reference=float(np.median(a)) if len(a) else np.nan,
                           median_other=float(np.median(b)) if len(b) else np.nan,
                           median_difference=(float(np.median(a) - np.median(b))
                                              if len(a) and len(b) else np.nan),
                           smallest_exact_p=(_smallest_p("mannwhitney", len(a), len(b))
                                       if len(a) and len(b) else np.nan))
                if len(a) < 1 or len(b) < 1 or len(a) + len(b) < 3:
                    notes.append(f"too few patients (n={len(a)} and {len(b)}) for a test")
                    row.update(statistic=np.nan, p=np.nan)
                else:
                    result = stats.mannwhitneyu(a, b, alternative="two-sided")
                    row.update(statistic=float(result.statistic), p=float(result.pvalue))
            row["note"] = "; ".join(notes)
            rows.append(row)
    columns = ["metric", "reference", "other", "test", "n_reference", "n_other",
               "median_reference", "median_other", "median_difference", "statistic", "p",
               "p_holm", "smallest_exact_p", "note"]
    out = pd.DataFrame(rows)
    out["p_holm"] = np.nan
    for metric, group in out.groupby("metric", sort=False):
        out.loc[group.index, "p_holm"] = _holm(group["p"])
    return out[columns]


def interobserver_per_patient(interobserver: pd.DataFrame) -> pd.DataFrame:
    """Interobserver metrics averaged over both glands per patient (the band of Fig. 8)."""
    values = [m for m in ("dsc", "hd", "hd95", "msd") if m in interobserver.columns]
    return interobserver.groupby("patient", sort=True)[values].mean().reset_index()


def _labels_on(image: sitk.Image, path: Path, patient: str) -> np.ndarray:
    """A label file as an array, refused when it is not on the MR's grid."""
    from .io import grid_differences, read_image

    label_image = read_image(path)
    differences = grid_differences(label_image, image)
    if differences:
        raise CrossmodError(f"{path}: not on the grid of MR {patient}: " + "; ".join(differences))
    return sitk.GetArrayFromImage(label_image)


def _has_reference(references: pd.Series) -> pd.Series:
    """Which prediction-index rows have manual contours (an unannotated MR patient has none)."""
    return pd.Series([not pd.isna(v) and str(v) != "" for v in references], index=references.index,
                     dtype=bool)


def contour_examples(run, metrics: pd.DataFrame, model: str = "cross_modality", n: int = 4,
                     postprocess: str = "lcc") -> list[dict]:
    """Fig. 7 data: up to ``n`` *typical* MR patients of one method with both contours.

    Typical: the patients whose DSC (averaged over both glands) is closest to the method's
    median DSC, in order of that DSC. Each item: patient, dsc, image (the MR, SimpleITK),
    reference and prediction (label arrays [z, y, x] on the image's grid).
    """
    from .preparation import cohort_sources

    table = per_patient(metrics, postprocess)
    table = table[(table["model"] == model) & (table["modality"] == "MR")]
    if table.empty:
        raise CrossmodError(f"contour_examples: no MR metrics for model {model!r}")
    median = table["dsc"].median()
    chosen = table.iloc[np.argsort(np.abs(table["dsc"].to_numpy() - median), kind="stable")[:n]]
    chosen = chosen.sort_values("dsc")
    index = read_prediction_index(run.prediction_index)
    index = index[index["model"] == model].set_index("patient")
    source = cohort_sources(run, progress=False)["MR"]
    items = dict(zip(source.patient_ids(), source.items))
    examples = []
    for patient, dsc in zip(chosen["patient"], chosen["dsc"]):
        if patient not in items:
            raise CrossmodError(f"MR cohort {source.root}: patient {patient!r} of the predictions "
                                "not found")
        image = source.read(items[patient]).image
        row = index.loc[patient]
        labels = {key: _labels_on(image, path, patient) for key, path in (
            ("reference", run.root / row["reference"]),
            ("prediction", run.root / row[POSTPROCESSING[postprocess]]))}
        examples.append({"patient": patient, "dsc": float(dsc), "image": image, **labels})
    return examples


def prediction_gallery(run, model: str = "cross_modality", patients=None,
                       postprocess: str = "lcc", unannotated_only: bool = True) -> list[dict]:
    """The predicted contours of MR patients, for visual review where there is nothing to score.

    ``patients``: which (default: every MR patient ``model`` predicted, or only those without
    manual contours when ``unannotated_only``). Items as :func:`contour_examples` (patient, image,
    prediction, and reference: the manual labels, or None for an unannotated patient), in the
    index's patient order.
    """
    from .preparation import cohort_sources

    if postprocess not in POSTPROCESSING:
        raise CrossmodError(f"postprocess={postprocess!r}: one of {sorted(POSTPROCESSING)}")
    index = read_prediction_index(run.prediction_index)
    rows = index[(index["model"] == model) & (index["modality"] == "MR")]
    if rows.empty:
        raise CrossmodError(f"{run.prediction_index}: no MR predictions of model {model!r}")
    if unannotated_only:
        rows = rows[rows["reference"] == ""]
    if patients is not None:
        wanted = [str(p) for p in patients]
        unknown = sorted(set(wanted) - set(rows["patient"]))
        if unknown:
            raise CrossmodError(f"prediction_gallery: {model} has no prediction for {', '.join(unknown)}")
        rows = rows.set_index("patient").loc[wanted].reset_index()
    source = cohort_sources(run, progress=False)["MR"]
    items = dict(zip(source.patient_ids(), source.items))
    examples = []
    for row in rows.itertuples(index=False):
        if row.patient not in items:
            raise CrossmodError(f"MR cohort {source.root}: patient {row.patient!r} of the predictions "
                                "not found")
        image = source.read(items[row.patient]).image
        labels = {"prediction": _labels_on(image, run.root / getattr(row, POSTPROCESSING[postprocess]),
                                           row.patient),
                  "reference": _labels_on(image, run.root / row.reference, row.patient)
                  if row.reference else None}
        examples.append({"patient": row.patient, "image": image, **labels})
    return examples


# ----------------------------------------------------------------------------------------------
# The stage

POSTPROCESS_TITLES = {"lcc": "largest 3D component per gland", "raw": "the network's raw output"}
INTEROBSERVER_TITLE = "Interobserver variability (this run's MR)"


def main_postprocess(profile: dict) -> tuple[str, str]:
    """(the post-processing of the main results, the other one) for a profile."""
    main = "lcc" if profile["segmentation"]["postprocess_lcc"] else "raw"
    return main, ("raw" if main == "lcc" else "lcc")


def run(run, progress: bool = False) -> dict:
    """Stage 5 (section 2.G) over a run folder: the metrics of every prediction against the
    manual contours, Table II under both post-processings and, where MR patients were scored,
    the rank tests of cross-modality learning against the other methods.

    Writes ``metrics/segmentation.csv``, ``metrics/table_2_lcc.csv``, ``metrics/table_2_raw.csv``
    and ``metrics/segmentation_tests.csv`` (removed when nothing could be tested). Returns
    ``metrics``, ``index``, ``interobserver``, ``tables`` (post-processing -> Table II),
    ``mr_scored`` and ``tests`` (or None).
    """
    metrics = evaluate_predictions(run, progress=progress)
    index = read_prediction_index(run.prediction_index)
    interobserver = read_interobserver(run)
    tables = {}
    for postprocess in main_postprocess(run.profile):
        tables[postprocess] = table_ii(metrics, interobserver, postprocess=postprocess,
                                       interobserver_title=INTEROBSERVER_TITLE)
        tables[postprocess].to_csv(run.output(f"table_2_{postprocess}"))
    mr_scored = "cross_modality" in set(metrics.loc[metrics["modality"] == "MR", "model"])
    tests = None
    if mr_scored:
        tests = paired_tests(metrics, reference="cross_modality",
                             postprocess=main_postprocess(run.profile)[0])
        tests.to_csv(run.output("segmentation_tests"), index=False)
    else:
        run.segmentation_tests.unlink(missing_ok=True)
    return {"metrics": metrics, "index": index, "interobserver": interobserver, "tables": tables,
            "mr_scored": mr_scored, "tests": tests}
