"""Paper section 2.G: geometric evaluation, here the interobserver reference.

The paper compares its automatic contours with the variability between human observers: the metrics
(DSC, HD, MSD; :mod:`crossmod_lib.metrics`) between two observers' contours of the same MR, per
patient and per gland, summarised as mean and standard deviation over patients.
"""

from __future__ import annotations

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
