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


def interobserver(cohort_dir: str | Path, reference: str = "structures",
                  other: str = "structures_observer2") -> pd.DataFrame:
    """Metrics between two observers' parotid contours for every case of a cohort.

    One row per patient and gland: patient, structure, dsc, hd, hd95, msd (mm).
    """
    rows = []
    for folder in list_cases(cohort_dir):
        if not (folder / other).is_dir():
            raise CrossmodError(f"{folder}: no second observer's contours ({other}/)")
        first = read_case(folder, structures_dir=reference)
        second = read_case(folder, structures_dir=other)
        table = compare_images(label_image(first), label_image(second), PAROTID_LABELS,
                               names=(reference, other))
        table.insert(0, "patient", folder.name)
        rows.append(table)
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
