"""The manual review file of the cleaning step: ``cleaned/review.json`` (paper section 2.D).

Its format, read and written here, is shared by the cleaning, which honours the decisions
(:func:`crossmod_lib.cleaning.clean`), and the review front ends that make them
(:mod:`crossmod_lib.review`); both import it, so neither imports the other for it.

``review.json``::

    {"format": "crossmod-review/1", "updated": "<UTC time>",
     "decisions": {"<patient>/<slice_index>": {"patient": "...", "slice_index": 12,
                   "decision": "accept" | "reject", "time": "<UTC time>",
                   "outline_dice": 0.91, "accepted_auto": true}, ...}}
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import CrossmodError

FORMAT = "crossmod-review/1"
_DECISIONS = ("accept", "reject")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _key_text(patient: str, slice_index: int) -> str:
    return f"{patient}/{int(slice_index)}"


def _decision_value(value, where: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "accept" if value else "reject"
    if isinstance(value, str) and value.strip().lower() in _DECISIONS:
        return value.strip().lower()
    raise CrossmodError(f"{where}: decision {value!r} must be 'accept' or 'reject'")


def normalise_decisions(decisions, where: str = "manual decisions") -> dict:
    """Manual decisions in any of the accepted forms -> ``{(patient, slice_index): {"decision", "time"}}``.

    Keys: ``(patient, slice_index)`` tuples or ``"patient/slice_index"`` strings; values:
    ``"accept"``/``"reject"``, ``True``/``False``, or dicts with a ``decision`` (and ``time``).
    """
    if not hasattr(decisions, "items"):
        raise CrossmodError(f"{where}: expected a mapping of slices to decisions, got {type(decisions).__name__}")
    out = {}
    for key, value in decisions.items():
        if isinstance(key, tuple) and len(key) == 2:
            patient, index = key
        elif isinstance(key, str) and "/" in key:
            patient, index = key.rsplit("/", 1)
        else:
            raise CrossmodError(f"{where}: slice key {key!r} must be (patient, slice_index) or 'patient/slice_index'")
        try:
            index = int(index)
        except (TypeError, ValueError):
            raise CrossmodError(f"{where}: slice key {key!r} has a non-integer slice index") from None
        entry = dict(value) if isinstance(value, dict) else {"decision": value}
        if isinstance(value, dict):
            patient = str(value.get("patient", patient))
            index = int(value.get("slice_index", index))
        entry["decision"] = _decision_value(entry.get("decision"), f"{where} [{key}]")
        entry.setdefault("time", "")
        out[(str(patient), index)] = entry
    return out


def load_review(path) -> dict:
    """Manual decisions from a ``review.json`` (``{}`` when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CrossmodError(f"{path}: not a readable review file ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not isinstance(data.get("decisions"), dict):
        raise CrossmodError(f"{path}: review file lacks a 'decisions' mapping")
    if data.get("format", FORMAT) != FORMAT:
        raise CrossmodError(f"{path}: unknown review file format {data.get('format')!r} (expected {FORMAT})")
    return normalise_decisions(data["decisions"], where=str(path))


def save_review(decisions: dict, path) -> Path:
    """Write manual decisions to ``review.json`` atomically (a reader never sees half a file)."""
    path = Path(path)
    entries = {}
    for (patient, index), entry in sorted(decisions.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        record = {"patient": patient, "slice_index": int(index)}
        record.update({k: _plain(v) for k, v in entry.items() if k not in ("patient", "slice_index")})
        entries[_key_text(patient, index)] = record
    data = {"format": FORMAT, "updated": _now(), "decisions": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def _plain(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
