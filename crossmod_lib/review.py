"""Manual review of the synthetic MR slices (paper section 2.D, Fig. 6).

The automatic cleaning (:mod:`crossmod_lib.cleaning`) decides from the head outline and the
registration; a person can look at each synthetic MR beside its CT and overrule it. Decisions are
kept in ``cleaned/review.json`` (written atomically after each one), keyed by patient and slice
index, with the time they were made; :func:`crossmod_lib.cleaning.clean` honours them, so the next
cleaning run writes the slices accepted by hand to ``training_slices.npz`` and leaves out those
rejected by hand.

Three layers:

- :class:`ReviewState`: the state, plain Python (testable without a browser): the slices and their
  automatic decisions, the manual decisions, sorting (outline Dice ascending/descending, position),
  filtering (all / accepted / rejected / undecided), the current slice, accept / reject / clear /
  undo, counts, load and save.
- :class:`ReviewWidget`: ipywidgets controls and a rendered image on top of a state.
- :func:`static_gallery`: a matplotlib figure of example slices (or of the outline Dice of every
  slice when only a table is given), for headless builds of the book.

:func:`review` picks the widget in a live Jupyter kernel and the gallery otherwise; pass
``interactive=False`` when executing a notebook headlessly (papermill has a live kernel but no
one to click).

``review.json``::

    {"format": "crossmod-review/1", "updated": "<UTC time>",
     "decisions": {"<patient>/<slice_index>": {"patient": "...", "slice_index": 12,
                   "decision": "accept" | "reject", "time": "<UTC time>",
                   "outline_dice": 0.91, "accepted_auto": true}, ...}}
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import CrossmodError
from .runs import RunFolder
from .review_file import (  # noqa: F401 (re-exported: the review file is part of the review API)
    FORMAT, _decision_value, _key_text, _now, _plain, load_review, normalise_decisions, save_review,
)

__all__ = [
    "FILTERS", "SORTS", "ReviewState", "ReviewWidget", "load_review", "normalise_decisions",
    "render_slice", "review", "save_review", "static_gallery",
]

FILTERS = ("all", "accepted", "rejected", "undecided")
SORTS = {
    "dice_ascending": "outline Dice, lowest first",
    "dice_descending": "outline Dice, highest first",
    "position": "patient, then inferior to superior",
    "row": "input order",
}
# ----------------------------------------------------------------------------------------------
# State


class ReviewState:
    """What the reviewer sees and decides; no widgets, so it can be tested and scripted.

    ``table``: one row per slice with at least ``row``, ``patient``, ``slice_index``,
    ``outline_dice`` and ``accepted_auto`` (a decisions table of :func:`crossmod_lib.cleaning.clean`
    or its outline QC). ``review_path``: the ``review.json`` to load and save (``None``: in memory).
    ``images``: optional arrays for display, indexed by ``row``: ``ct``, ``synthetic``, ``labels``,
    ``head_mask`` ([N, H, W]) and ``registered`` (a dict row -> [H, W]).
    """

    def __init__(self, table: pd.DataFrame, review_path=None, images: dict | None = None,
                 threshold: float | None = None, head_threshold: float = 20.0, autosave: bool = True):
        required = ("row", "patient", "slice_index", "outline_dice", "accepted_auto")
        missing = [c for c in required if c not in table.columns]
        if missing:
            raise CrossmodError(f"review table lacks column(s) {', '.join(missing)}")
        t = table.copy().reset_index(drop=True)
        t["patient"] = t["patient"].astype(str)
        t["slice_index"] = t["slice_index"].astype(int)
        t["accepted_auto"] = t["accepted_auto"].astype(bool)
        if "reason" not in t.columns:
            t["reason"] = ""
        self.table = t
        self._pos = {int(r): k for k, r in enumerate(t["row"])}
        self.review_path = Path(review_path) if review_path is not None else None
        self.decisions = load_review(self.review_path) if self.review_path is not None else {}
        self.images = images or {}
        self.threshold = threshold
        self.head_threshold = head_threshold
        self.autosave = autosave
        self.history: list[tuple] = []
        self.sort = "dice_ascending"
        self.filter = "all"
        self.index = 0
        self._order = self._compute_order()

    # -- construction from files ------------------------------------------------------------

    @classmethod
    def from_paths(cls, synthetic_path, ct_path, cleaned_dir, profile: dict, **kw) -> ReviewState:
        """A state over the slices of ``synthetic_path``/``ct_path``, decisions in ``cleaned_dir``.

        Uses ``cleaned_dir/decisions.csv`` when it matches the inputs (after :func:`clean`), else
        the outline QC computed now; registered images come from the cleaning's cache.
        """
        from . import cleaning

        settings = cleaning.cleaning_settings(profile)
        syn, ct = cleaning.load_inputs(synthetic_path, ct_path)
        cleaned_dir = Path(cleaned_dir)
        table = None
        csv = cleaned_dir / RunFolder.decisions.in_folder
        if csv.is_file():
            candidate = cleaning.load_decisions(csv)
            same = len(candidate) == len(ct["image"]) and np.array_equal(
                candidate["patient"].astype(str).to_numpy(), ct["patient"].astype(str)) and np.array_equal(
                candidate["slice_index"].to_numpy(int), ct["slice_index"].astype(int))
            table = candidate if same else None
        if table is None:
            table = cleaning.outline_table(syn, ct, settings)
        images = {
            "ct": ct["image"], "synthetic": syn["image"], "labels": ct["labels"],
            "head_mask": ct["head_mask"].astype(bool),
            "registered": cleaning.registered_images(cleaned_dir, syn, ct, settings),
        }
        return cls(table, cleaned_dir / RunFolder.review.in_folder, images=images,
                   threshold=settings["outline_dice_threshold"], head_threshold=settings["head_threshold"], **kw)

    @classmethod
    def from_run(cls, run, **kw) -> ReviewState:
        """A state over a run: ``synthetic/synthetic_mr.npz`` + ``prepared/ct_slices.npz``, ``cleaned/``."""
        synthetic, ct = run.inputs("synthetic_mr", "ct_slices")
        return cls.from_paths(synthetic, ct, run.stage("cleaned"), run.profile, **kw)

    # -- decisions ----------------------------------------------------------------------------

    def _record(self, row: int) -> pd.Series:
        if int(row) not in self._pos:
            raise CrossmodError(f"review: no slice with row {row}")
        return self.table.iloc[self._pos[int(row)]]

    def key(self, row: int) -> tuple[str, int]:
        record = self._record(row)
        return (str(record["patient"]), int(record["slice_index"]))

    def manual(self, row: int) -> str:
        """The manual decision of a slice: ``"accept"``, ``"reject"`` or ``""`` (undecided)."""
        entry = self.decisions.get(self.key(row))
        return entry["decision"] if entry else ""

    def auto(self, row: int) -> bool:
        return bool(self._record(row)["accepted_auto"])

    def final(self, row: int) -> bool:
        """Whether the slice will be used: the manual decision if any, else the automatic one."""
        manual = self.manual(row)
        return self.auto(row) if not manual else manual == "accept"

    def _set(self, row, decision: str | None) -> tuple[str, int]:
        row = self.current if row is None else int(row)
        if row is None:
            raise CrossmodError("review: no slice selected (the filtered list is empty)")
        key = self.key(row)
        previous = self.decisions.get(key)
        self.history.append((key, None if previous is None else dict(previous), row))
        if decision is None:
            self.decisions.pop(key, None)
        else:
            record = self._record(row)
            self.decisions[key] = {
                "decision": decision, "time": _now(),
                "outline_dice": _plain(float(record["outline_dice"])),
                "accepted_auto": bool(record["accepted_auto"]),
            }
        self._changed(row)
        return key

    def accept(self, row: int | None = None) -> tuple[str, int]:
        """Accept a slice by hand (default: the current one); saved at once when ``autosave``."""
        return self._set(row, "accept")

    def reject(self, row: int | None = None) -> tuple[str, int]:
        """Reject a slice by hand (default: the current one)."""
        return self._set(row, "reject")

    def clear(self, row: int | None = None) -> tuple[str, int]:
        """Remove the manual decision of a slice: back to the automatic one."""
        return self._set(row, None)

    def undo(self) -> tuple[str, int] | None:
        """Undo the last accept / reject / clear; returns its slice key (None if nothing to undo)."""
        if not self.history:
            return None
        key, previous, row = self.history.pop()
        if previous is None:
            self.decisions.pop(key, None)
        else:
            self.decisions[key] = previous
        self._changed(row, follow=True)
        return key

    def _changed(self, row: int, follow: bool = False) -> None:
        current = self.current
        self._order = self._compute_order()
        if follow and row in self._order:
            self.index = self._order.index(row)
        elif current is not None and current in self._order:
            self.index = self._order.index(current)
        self.index = max(0, min(self.index, len(self._order) - 1))
        if self.autosave and self.review_path is not None:
            self.save()

    def save(self) -> Path | None:
        """Write the manual decisions to ``review.json`` (atomically)."""
        if self.review_path is None:
            return None
        return save_review(self.decisions, self.review_path)

    def reload(self) -> None:
        """Re-read ``review.json`` (e.g. after another session changed it)."""
        self.decisions = load_review(self.review_path) if self.review_path is not None else {}
        self.history.clear()
        self._changed(self.current if self.current is not None else -1)

    # -- order, filter, navigation -----------------------------------------------------------

    def set_sort(self, name: str) -> None:
        if name not in SORTS:
            raise CrossmodError(f"review: sort {name!r} must be one of {', '.join(SORTS)}")
        current = self.current
        self.sort = name
        self._order = self._compute_order()
        self.index = self._order.index(current) if current in self._order else 0

    def set_filter(self, name: str) -> None:
        if name not in FILTERS:
            raise CrossmodError(f"review: filter {name!r} must be one of {', '.join(FILTERS)}")
        current = self.current
        self.filter = name
        self._order = self._compute_order()
        self.index = self._order.index(current) if current in self._order else 0

    def _compute_order(self) -> list[int]:
        t = self.table
        if self.sort == "dice_ascending":
            t = t.sort_values(["outline_dice", "row"], ascending=[True, True], kind="mergesort")
        elif self.sort == "dice_descending":
            t = t.sort_values(["outline_dice", "row"], ascending=[False, True], kind="mergesort")
        elif self.sort == "position":
            by = ["patient", "z_mm"] if "z_mm" in t.columns else ["patient", "slice_index"]
            t = t.sort_values(by + ["row"], kind="mergesort")
        else:
            t = t.sort_values("row", kind="mergesort")
        rows = [int(r) for r in t["row"]]
        if self.filter == "accepted":
            rows = [r for r in rows if self.final(r)]
        elif self.filter == "rejected":
            rows = [r for r in rows if not self.final(r)]
        elif self.filter == "undecided":
            rows = [r for r in rows if not self.manual(r)]
        return rows

    @property
    def order(self) -> list[int]:
        """Rows of the slices in view, in display order."""
        return list(self._order)

    @property
    def current(self) -> int | None:
        """Row of the slice shown now (None when the view is empty)."""
        return self._order[self.index] if self._order else None

    def go(self, index: int) -> int | None:
        if self._order:
            self.index = max(0, min(int(index), len(self._order) - 1))
        return self.current

    def next(self) -> int | None:
        return self.go(self.index + 1)

    def previous(self) -> int | None:
        return self.go(self.index - 1)

    # -- summaries -----------------------------------------------------------------------------

    def counts(self) -> dict:
        """Automatic vs manual vs final counts over all slices (not only those in view)."""
        rows = [int(r) for r in self.table["row"]]
        auto = [self.auto(r) for r in rows]
        manual = [self.manual(r) for r in rows]
        final = [self.final(r) for r in rows]
        known = {self.key(r) for r in rows}
        return {
            "slices": len(rows),
            "accepted_auto": int(sum(auto)),
            "rejected_auto": int(len(rows) - sum(auto)),
            "manual_accept": int(sum(m == "accept" for m in manual)),
            "manual_reject": int(sum(m == "reject" for m in manual)),
            "undecided": int(sum(not m for m in manual)),
            "overridden": int(sum(bool(m) and (m == "accept") != a for m, a in zip(manual, auto))),
            "accepted_final": int(sum(final)),
            "rejected_final": int(len(rows) - sum(final)),
            "in_view": len(self._order),
            "unmatched_decisions": len(set(self.decisions) - known),
        }

    def decisions_table(self) -> pd.DataFrame:
        """The table with the manual and final decisions as they stand now."""
        t = self.table.copy()
        rows = [int(r) for r in t["row"]]
        t["manual_decision"] = [self.manual(r) for r in rows]
        t["accepted_final"] = [self.final(r) for r in rows]
        t["decided_by"] = np.where(t["manual_decision"] != "", "manual", "auto")
        return t

    def describe(self, row: int | None = None) -> str:
        """One line about a slice (default: the current one)."""
        row = self.current if row is None else row
        if row is None:
            return "no slice in view"
        r = self._record(row)
        manual = self.manual(row)
        after = r.get("outline_dice_after", math.nan)
        after_text = f", after registration {after:.3f}" if isinstance(after, float) and math.isfinite(after) else ""
        return (
            f"{r['patient']} slice {int(r['slice_index'])}: outline Dice {float(r['outline_dice']):.3f}{after_text}; "
            f"auto {'accept' if r['accepted_auto'] else 'reject'} ({r['reason'] or 'n/a'}); "
            f"manual {manual or 'none'}; final {'ACCEPT' if self.final(row) else 'REJECT'}"
        )


# ----------------------------------------------------------------------------------------------
# Drawing


def _outline(ax, mask, color, style="-", width=1.0):
    mask = np.asarray(mask, dtype=float)
    if mask.any() and not mask.all():
        ax.contour(mask, levels=[0.5], colors=[color], linestyles=[style], linewidths=width)


def _contours(ax, labels):
    labels = np.asarray(labels)
    for value, color in ((1, "#ff4040"), (2, "#40a0ff")):
        _outline(ax, labels == value, color, width=1.2)


def _frame(ax, accepted: bool):
    color = "#2ca02c" if accepted else "#d62728"
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(3)


def _panel(ax, image, title):
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def render_slice(state: ReviewState, row: int | None = None, size: float = 3.0):
    """Figure of one slice: CT | synthetic MR | registered synthetic MR (when there is one).

    Yellow: the CT's head outline; cyan dashed: the synthetic MR's own outline; red/blue: the CT's
    left/right parotid contours. The frame is green when the slice will be used, red when not.
    """
    from matplotlib.figure import Figure

    from .preparation import head_mask

    row = state.current if row is None else row
    if row is None or "ct" not in state.images:
        raise CrossmodError("review: no images to show (build the state with ReviewState.from_run)")
    ct, syn = state.images["ct"][row], state.images["synthetic"][row]
    mask = state.images["head_mask"][row]
    labels = state.images["labels"][row]
    registered = state.images.get("registered", {}).get(row)
    panels = 3 if registered is not None else 2
    fig = Figure(figsize=(size * panels, size + 0.4))
    axes = fig.subplots(1, panels)
    final = state.final(row)
    _panel(axes[0], ct, "CT + labels")
    _outline(axes[0], mask, "yellow")
    _contours(axes[0], labels)
    record = state._record(row)
    _panel(axes[1], syn, f"synthetic MR (outline Dice {float(record['outline_dice']):.2f})")
    _outline(axes[1], mask, "yellow")
    _outline(axes[1], head_mask(syn, state.head_threshold), "cyan", "--")
    _contours(axes[1], labels)
    if registered is not None:
        after = record.get("outline_dice_after", math.nan)
        text = f" (Dice {after:.2f})" if isinstance(after, float) and math.isfinite(after) else ""
        _panel(axes[2], registered, "registered" + text)
        _outline(axes[2], mask, "yellow")
        _outline(axes[2], head_mask(registered, state.head_threshold), "cyan", "--")
        _contours(axes[2], labels)
    for ax in axes:
        _frame(ax, final)
    manual = state.manual(row)
    fig.suptitle(f"{record['patient']} slice {int(record['slice_index'])} - "
                 f"{'accepted' if final else 'rejected'} ({'manual' if manual else 'auto'})", fontsize=9)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _spread(items: list, n: int) -> list:
    if n <= 0 or not items:
        return []
    picks = sorted(set(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int).tolist()))
    return [items[k] for k in picks]


def _gallery_rows(state: ReviewState, n: int) -> list[int]:
    """``n`` rows spread over the current order; with the filter "all", half rejected, half used."""
    order = state.order
    if state.filter != "all":
        return _spread(order, n)
    rejected = [r for r in order if not state.final(r)]
    used = [r for r in order if state.final(r)]
    k = min(len(rejected), n // 2) if used else min(len(rejected), n)
    chosen = set(_spread(rejected, k)) | set(_spread(used, n - k))
    return [r for r in order if r in chosen]


def _drop_label(record: pd.Series, manual: str, final: bool) -> str:
    """Why a slice is not used, one word (:func:`crossmod_lib.cleaning.drop_kind`); "" when used."""
    from .cleaning import drop_kind

    if final:
        return ""
    one = pd.DataFrame([{
        "accepted_final": False, "manual_decision": manual,
        "registration_status": str(record.get("registration_status", "") or ""),
        "reason": str(record.get("reason", "") or ""),
    }])
    return str(drop_kind(one).iloc[0])


def static_gallery(state_or_table, n: int = 12, columns: int = 3, size: float = 2.2):
    """A matplotlib Figure for headless builds.

    Given a :class:`ReviewState` with images: ``n`` slices spread evenly over the current order
    (with the filter "all": half of them rejected, half used, when there are enough), each as a CT |
    synthetic MR pair framed green (used) or red (not used), as in the paper's Fig. 6. Given a
    decisions table (or a state without images): the outline Dice of every slice against its
    cranio-caudal position, coloured by the final decision, with the threshold.
    """
    from matplotlib.figure import Figure

    from .preparation import head_mask

    state = state_or_table if isinstance(state_or_table, ReviewState) else None
    if state is not None and "ct" in state.images and state.order:
        rows = _gallery_rows(state, n)
        lines = math.ceil(len(rows) / columns)
        fig = Figure(figsize=(size * 2 * min(columns, len(rows)), size * lines + 0.3))
        axes = np.atleast_2d(fig.subplots(lines, 2 * min(columns, len(rows)), squeeze=False))
        for ax in axes.ravel():
            ax.axis("off")
        for k, row in enumerate(rows):
            a_ct, a_syn = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
            record = state._record(row)
            manual = state.manual(row)
            for ax in (a_ct, a_syn):
                ax.axis("on")
            _panel(a_ct, state.images["ct"][row], f"{record['patient']} z{int(record['slice_index'])} CT")
            _outline(a_ct, state.images["head_mask"][row], "yellow")
            _contours(a_ct, state.images["labels"][row])
            syn = state.images["synthetic"][row]
            why = _drop_label(record, manual, state.final(row))
            _panel(a_syn, syn, f"sMR Dice {float(record['outline_dice']):.2f}{' (manual)' if manual else ''}"
                               f"{f' · {why}' if why else ''}")
            _outline(a_syn, state.images["head_mask"][row], "yellow")
            _outline(a_syn, head_mask(syn, state.head_threshold), "cyan", "--")
            for ax in (a_ct, a_syn):
                _frame(ax, state.final(row))
        fig.suptitle("CT and synthetic MR: green used for training, red rejected "
                     "(yellow CT outline, cyan synthetic outline)", fontsize=9)
        fig.tight_layout()
        return fig
    table = state.decisions_table() if state is not None else state_or_table
    if not isinstance(table, pd.DataFrame):
        raise CrossmodError("static_gallery: expected a ReviewState or a decisions table")
    final_col = "accepted_final" if "accepted_final" in table.columns else "accepted_auto"
    used = table[final_col].astype(bool).to_numpy()
    x = table["position"].to_numpy(float) if "position" in table.columns else table["row"].to_numpy(float)
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.scatter(x[used], table["outline_dice"].to_numpy(float)[used], s=8, c="#2ca02c", label="used")
    ax.scatter(x[~used], table["outline_dice"].to_numpy(float)[~used], s=8, c="#d62728", label="rejected")
    threshold = state.threshold if state is not None and state.threshold is not None else 0.8
    ax.axhline(threshold, color="gray", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("position in patient (0 inferior, 1 superior)" if "position" in table.columns else "row")
    ax.set_ylabel("outline Dice (synthetic MR vs CT)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower center")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Widget


class _WidgetFrame:
    """What the review widgets share: previous / next over their state, and display of ``box``
    (a subclass sets ``state``, ``box`` and ``refresh``)."""

    def _on_previous(self, _):
        self.state.previous()
        self.refresh()

    def _on_next(self, _):
        self.state.next()
        self.refresh()

    def show(self) -> None:
        """Display the widget in the notebook."""
        from IPython.display import display

        display(self.box)

    def _repr_mimebundle_(self, **kwargs):
        return self.box._repr_mimebundle_(**kwargs)


class ReviewWidget(_WidgetFrame):
    """ipywidgets front end of a :class:`ReviewState`: sort, filter, browse, accept / reject / undo.

    Every decision is written to ``review.json`` at once; re-run the cleaning
    (:func:`crossmod_lib.cleaning.clean_run`) to apply the decisions to ``training_slices.npz``.
    """

    def __init__(self, state: ReviewState, size: float = 3.0):
        import ipywidgets as w

        self.state = state
        self.size = size
        self.sort = w.Dropdown(options=[(label, name) for name, label in SORTS.items()], value=state.sort,
                               description="sort")
        self.filter = w.ToggleButtons(options=list(FILTERS), value=state.filter, description="show")
        self.slider = w.IntSlider(min=0, max=max(0, len(state.order) - 1), value=state.index,
                                  description="slice", continuous_update=False)
        self.buttons = {
            "previous": w.Button(description="◀ previous"),
            "next": w.Button(description="next ▶"),
            "accept": w.Button(description="accept", button_style="success"),
            "reject": w.Button(description="reject", button_style="danger"),
            "clear": w.Button(description="use automatic"),
            "undo": w.Button(description="undo"),
        }
        self.info = w.HTML()
        self.counts = w.HTML()
        self.image = w.Image(format="png")
        self.sort.observe(self._on_sort, names="value")
        self.filter.observe(self._on_filter, names="value")
        self.slider.observe(self._on_slider, names="value")
        for name, button in self.buttons.items():
            button.on_click(getattr(self, f"_on_{name}"))
        self.box = w.VBox([
            w.HBox([self.sort, self.filter]),
            w.HBox([self.buttons["previous"], self.slider, self.buttons["next"]]),
            w.HBox([self.buttons["accept"], self.buttons["reject"], self.buttons["clear"], self.buttons["undo"]]),
            self.info, self.image, self.counts,
        ])
        self._busy = False
        self.refresh()

    def refresh(self) -> None:
        state = self.state
        self._busy = True
        try:
            self.slider.max = max(0, len(state.order) - 1)
            self.slider.value = state.index
        finally:
            self._busy = False
        row = state.current
        if row is None:
            self.info.value = "<b>no slice in this view</b>"
            self.image.value = b""
        else:
            self.info.value = f"<b>{state.index + 1} / {len(state.order)}</b> &nbsp; {state.describe(row)}"
            if "ct" in state.images:
                self.image.value = _png(render_slice(state, row, self.size))
        c = state.counts()
        self.counts.value = (
            f"automatic: {c['accepted_auto']} accepted, {c['rejected_auto']} rejected &nbsp;|&nbsp; "
            f"manual: {c['manual_accept']} accepted, {c['manual_reject']} rejected "
            f"({c['overridden']} overriding the automatic decision) &nbsp;|&nbsp; "
            f"final: <b>{c['accepted_final']}</b> of {c['slices']} slices used"
        )

    def _on_sort(self, change):
        self.state.set_sort(change["new"])
        self.refresh()

    def _on_filter(self, change):
        self.state.set_filter(change["new"])
        self.refresh()

    def _on_slider(self, change):
        if not self._busy:
            self.state.go(change["new"])
            self.refresh()

    def _decide(self, action):
        before = self.state.current
        if before is None:
            return
        action()
        if self.state.current == before:  # still in view: move on to the next slice
            self.state.next()
        self.refresh()

    def _on_accept(self, _):
        self._decide(self.state.accept)

    def _on_reject(self, _):
        self._decide(self.state.reject)

    def _on_clear(self, _):
        self._decide(self.state.clear)

    def _on_undo(self, _):
        self.state.undo()
        self.refresh()


def _live_kernel() -> bool:
    # crossmod run / crossmod book execute notebooks headlessly (papermill) in a real kernel:
    # they set CROSSMOD_HEADLESS so the review shows its static gallery there.
    if os.environ.get("CROSSMOD_HEADLESS"):
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def review(run, interactive: bool | None = None, n: int = 12):
    """Review the synthetic MR of a run: the widget in a live Jupyter kernel, else a static gallery.

    ``interactive=None`` chooses by the environment (a Jupyter kernel with ipywidgets: widget);
    ``False`` always returns :func:`static_gallery` (a matplotlib Figure), as a headless book
    build needs; ``True`` always the :class:`ReviewWidget`.
    """
    state = ReviewState.from_run(run)
    if interactive is None:
        interactive = _live_kernel()
    if interactive:
        return ReviewWidget(state)
    return static_gallery(state, n=n)
