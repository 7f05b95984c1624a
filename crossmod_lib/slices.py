"""The 2D slice files every stage passes on (``prepared/*.npz``, ``synthetic/*.npz``, ...).

One ``.npz`` per cohort or stage: an ``image`` array uint8 [N, H, W] and per-slice arrays beside
it (``labels`` [N, H, W], ``head_mask``, ``patient``, ``slice_index``, ``z_mm``, ...). This module
imports numpy only, so the training code that reads these files runs on a bare GPU machine with
torch + numpy and the carried ``.npz`` files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import CrossmodError


def read_slices(path: str | Path, what: str = "slices", required=("image",)) -> dict[str, np.ndarray]:
    """The arrays of a slices ``.npz``, checked: the file exists and reads, the ``required``
    arrays are there, the first of them is [N, H, W] and every other required array has N rows.
    Problems are one-line :class:`CrossmodError` naming the file and ``what`` it should hold."""
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: {what} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as exc:  # noqa: BLE001 - zip, pickle or truncation: the same user error
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CrossmodError(f"{path}: cannot read {what} ({reason})") from None
    missing = [key for key in required if key not in arrays]
    if missing:
        raise CrossmodError(f"{path}: {what} lack the array(s) {', '.join(missing)}")
    if required:
        first = arrays[required[0]]
        if first.ndim != 3:
            raise CrossmodError(f"{path}: '{required[0]}' must be [N, H, W], got shape {list(first.shape)}")
        for key in required[1:]:
            if len(arrays[key]) != len(first):
                raise CrossmodError(f"{path}: '{key}' has {len(arrays[key])} rows, "
                                    f"'{required[0]}' {len(first)}")
    return arrays


def write_slices(arrays: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write arrays as a compressed ``.npz`` atomically (a temporary file renamed into place:
    a reader never sees half a file, and a failed write leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def annotated_patients(arrays: dict[str, np.ndarray]) -> list[str]:
    """The patients of a slices file with manual contours, in order of first appearance: those
    whose ``annotated`` flag is set (files written before the flag existed: every patient).
    An unannotated MR patient feeds the CycleGAN but neither trains nor tests on MR labels."""
    patients = np.asarray(arrays["patient"]).astype(str)
    order = list(dict.fromkeys(patients.tolist()))
    if "annotated" not in arrays:
        return order
    flagged = set(patients[np.asarray(arrays["annotated"], dtype=bool)].tolist())
    return [p for p in order if p in flagged]
