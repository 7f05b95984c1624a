"""Reviewing the predicted contours patient by patient: accept or flag (chapter 5).

Where the MR has no manual contours (a user's cohort, usually) the predictions cannot be scored;
a person looks at each patient's contours and accepts them or flags them for correction before
they go to the planning system. Decisions are kept in ``predictions/contour_review.json``
(written atomically after each one), keyed by model and patient, with a free-text note and the
time they were made. Nothing downstream changes the contours: the file is the review's record,
read back by :func:`load_contour_review` (e.g. to export only the accepted patients).

Two layers, as :mod:`crossmod_lib.review` for the synthetic slices:

- :class:`ContourReviewState`: plain Python (testable without a browser): the patients of one
  model, the decisions, browsing, accept / flag / clear, counts, load and save.
- :class:`ContourReviewWidget`: ipywidgets controls and the patient's contours in three planes.

:func:`review_contours` picks the widget in a live Jupyter kernel and a static gallery otherwise.

``contour_review.json``::

    {"format": "crossmod-contour-review/1", "updated": "<UTC time>",
     "decisions": {"<model>/<patient>": {"model": "...", "patient": "...",
                   "decision": "accept" | "flag", "note": "...", "time": "<UTC time>"}, ...}}
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import pandas as pd

from .errors import CrossmodError
from .review import _WidgetFrame

FORMAT = "crossmod-contour-review/1"
DECISIONS = ("accept", "flag")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_contour_review(path) -> dict:
    """The decisions of a contour review file, checked ({} when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CrossmodError(f"{path}: not a contour review file ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CrossmodError(f"{path}: not a contour review file (format {FORMAT!r} expected)")
    decisions = data.get("decisions")
    if not isinstance(decisions, dict):
        raise CrossmodError(f"{path}: 'decisions' must be an object keyed model/patient")
    for key, entry in decisions.items():
        if not isinstance(entry, dict) or entry.get("decision") not in DECISIONS:
            raise CrossmodError(f"{path}: decision of {key!r} must be one of {', '.join(DECISIONS)}")
        if key != f"{entry.get('model')}/{entry.get('patient')}":
            raise CrossmodError(f"{path}: entry {key!r} names model {entry.get('model')!r} and "
                                f"patient {entry.get('patient')!r}")
    return decisions


def save_contour_review(decisions: dict, path) -> Path:
    """Write the decisions atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps({"format": FORMAT, "updated": _now(), "decisions": decisions},
                                  indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CrossmodError(f"{path}: cannot write the contour review ({exc.strerror or exc})") from None
    return path


class ContourReviewState:
    """The patients of one model's predictions and the reviewer's decisions on them.

    ``patients``: a table with ``patient`` and ``annotated`` (manual contours exist);
    ``loader(patient)``: the patient's example for :func:`crossmod_lib.plots.figure_contours`
    (image, prediction, reference or None); ``review_path``: where decisions are saved (None:
    in memory only).
    """

    def __init__(self, model: str, patients: pd.DataFrame, loader=None, review_path=None):
        if patients.empty:
            raise CrossmodError(f"contour review: model {model!r} has no MR patients")
        self.model = model
        self.patients = patients.reset_index(drop=True)
        self.loader = loader
        self.review_path = Path(review_path) if review_path is not None else None
        self.decisions = load_contour_review(self.review_path) if self.review_path else {}
        self.index = 0

    @classmethod
    def from_run(cls, run, model: str = "cross_modality", postprocess: str = "lcc",
                 unannotated_only: bool = False) -> ContourReviewState:
        """The MR patients ``model`` predicted in a run (``predictions/index.csv``), each read on
        demand; decisions in ``predictions/contour_review.json``."""
        from .evaluation import prediction_gallery, read_prediction_index

        index = read_prediction_index(run.prediction_index)
        rows = index[(index["model"] == model) & (index["modality"] == "MR")]
        if unannotated_only:
            rows = rows[rows["reference"] == ""]
        table = pd.DataFrame({"patient": rows["patient"].astype(str).to_numpy(),
                              "annotated": (rows["reference"] != "").to_numpy()})

        def loader(patient):
            return prediction_gallery(run, model, [patient], postprocess, unannotated_only=False)[0]

        return cls(model, table, loader, run.contour_review)

    # -- browsing
    @property
    def patient(self) -> str:
        return str(self.patients.loc[self.index, "patient"])

    def go(self, index: int) -> str:
        self.index = min(max(int(index), 0), len(self.patients) - 1)
        return self.patient

    def next(self) -> str:
        return self.go(self.index + 1)

    def previous(self) -> str:
        return self.go(self.index - 1)

    def example(self, patient: str | None = None) -> dict:
        if self.loader is None:
            raise CrossmodError("contour review: no image loader (state built from a table only)")
        return self.loader(patient or self.patient)

    # -- deciding
    def _key(self, patient: str) -> str:
        return f"{self.model}/{patient}"

    def decision(self, patient: str | None = None) -> str:
        entry = self.decisions.get(self._key(patient or self.patient))
        return entry["decision"] if entry else "undecided"

    def _set(self, decision: str | None, patient: str | None, note: str) -> str:
        patient = str(patient or self.patient)
        if patient not in set(self.patients["patient"]):
            raise CrossmodError(f"contour review: {patient!r} is not a patient of model {self.model}")
        key = self._key(patient)
        if decision is None:
            self.decisions.pop(key, None)
        else:
            self.decisions[key] = {"model": self.model, "patient": patient, "decision": decision,
                                   "note": str(note), "time": _now()}
        if self.review_path is not None:
            save_contour_review(self.decisions, self.review_path)
        return patient

    def accept(self, patient: str | None = None, note: str = "") -> str:
        return self._set("accept", patient, note)

    def flag(self, patient: str | None = None, note: str = "") -> str:
        """Mark the contours as needing correction (``note``: what is wrong)."""
        return self._set("flag", patient, note)

    def clear(self, patient: str | None = None) -> str:
        return self._set(None, patient, "")

    def counts(self) -> dict:
        values = [self.decision(p) for p in self.patients["patient"]]
        return {"patients": len(values), **{d: values.count(d) for d in (*DECISIONS, "undecided")}}

    def decisions_table(self) -> pd.DataFrame:
        """One row per patient: patient, annotated, decision, note, time."""
        rows = []
        for row in self.patients.itertuples(index=False):
            entry = self.decisions.get(self._key(row.patient), {})
            rows.append({"patient": row.patient, "annotated": bool(row.annotated),
                         "decision": entry.get("decision", "undecided"),
                         "note": entry.get("note", ""), "time": entry.get("time", "")})
        return pd.DataFrame(rows)

    def describe(self) -> str:
        row = self.patients.loc[self.index]
        manual = "manual contours in blue" if row["annotated"] else "no manual contours"
        return f"{self.patient} ({manual}): {self.decision()}"


class ContourReviewWidget(_WidgetFrame):
    """ipywidgets front end of a :class:`ContourReviewState`: browse, accept / flag with a note."""

    def __init__(self, state: ContourReviewState, panel: float = 3.0):
        import ipywidgets as w

        self.state = state
        self.panel = panel
        self.patient = w.Dropdown(options=list(state.patients["patient"]), description="patient")
        self.note = w.Text(placeholder="what is wrong (for a flag)", description="note")
        self.buttons = {"previous": w.Button(description="◀ previous"),
                        "next": w.Button(description="next ▶"),
                        "accept": w.Button(description="accept", button_style="success"),
                        "flag": w.Button(description="flag", button_style="warning"),
                        "clear": w.Button(description="undecided")}
        self.info = w.HTML()
        self.image = w.Image(format="png")
        self.patient.observe(self._on_patient, names="value")
        for name, button in self.buttons.items():
            button.on_click(getattr(self, f"_on_{name}"))
        self.box = w.VBox([
            w.HBox([self.buttons["previous"], self.patient, self.buttons["next"]]),
            w.HBox([self.buttons["accept"], self.buttons["flag"], self.note, self.buttons["clear"]]),
            self.info, self.image])
        self._busy = False
        self.refresh()

    def refresh(self) -> None:
        from .plots import figure_contours
        from .review import _png

        self._busy = True
        try:
            self.patient.value = self.state.patient
        finally:
            self._busy = False
        counts = self.state.counts()
        self.info.value = (f"<b>{self.state.index + 1} / {counts['patients']}</b> &nbsp; "
                           f"{self.state.describe()} &nbsp;|&nbsp; accepted {counts['accept']}, "
                           f"flagged {counts['flag']}, undecided {counts['undecided']}")
        self.image.value = _png(figure_contours([self.state.example()], panel=self.panel))

    def _on_patient(self, change):
        if not self._busy:
            self.state.go(list(self.state.patients["patient"]).index(change["new"]))
            self.refresh()

    def _decide(self, action):
        action()
        self.note.value = ""
        self.state.next()
        self.refresh()

    def _on_accept(self, _):
        self._decide(lambda: self.state.accept(note=self.note.value))

    def _on_flag(self, _):
        self._decide(lambda: self.state.flag(note=self.note.value))

    def _on_clear(self, _):
        self.state.clear()
        self.refresh()


def review_contours(run, model: str = "cross_modality", postprocess: str = "lcc",
                    interactive: bool | None = None, unannotated_only: bool = True):
    """Review a run's predicted MR contours: the widget in a live Jupyter kernel, else a table of
    the decisions so far (a headless build has no one to click; chapter 5 draws the gallery)."""
    from .review import _live_kernel

    state = ContourReviewState.from_run(run, model, postprocess, unannotated_only=unannotated_only)
    if interactive is None:
        interactive = _live_kernel()
    if interactive:
        return ContourReviewWidget(state)
    return state.decisions_table()
