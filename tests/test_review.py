"""Manual review of the cleaning (section 2.D): the state logic without a browser, review.json,
and the pipeline honouring manual decisions."""

import json

import numpy as np
import pandas as pd
import pytest
from test_cleaning import PIXEL, fabricate_inputs, fast_settings

from crossmod_lib import cleaning, review
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.review import ReviewState
from crossmod_lib.runs import RunFolder

pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute")


def small_table():
    return pd.DataFrame({
        "row": [0, 1, 2, 3, 4],
        "patient": ["a", "a", "a", "b", "b"],
        "slice_index": [5, 6, 7, 5, 6],
        "z_mm": [0.0, 2.5, 5.0, 0.0, 2.5],
        "outline_dice": [0.95, 0.40, 0.85, 0.70, 0.99],
        "accepted_auto": [True, False, True, False, True],
        "reason": ["ok", "outline Dice 0.400 < 0.8", "ok", "outline Dice 0.700 < 0.8", "ok"],
    })


def test_sorting_filtering_and_navigation():
    state = ReviewState(small_table())
    assert state.order == [1, 3, 2, 0, 4]  # outline Dice ascending by default
    assert state.current == 1
    state.set_sort("dice_descending")
    assert state.order == [4, 0, 2, 3, 1]
    assert state.current == 1 and state.index == 4  # stays on the same slice
    state.set_sort("position")
    assert state.order == [0, 1, 2, 3, 4]
    state.set_filter("rejected")
    assert state.order == [1, 3]
    state.set_filter("accepted")
    assert state.order == [0, 2, 4]
    assert state.next() == 2 and state.next() == 4 and state.next() == 4  # clamps at the end
    assert state.previous() == 2
    state.go(-5)
    assert state.current == 0
    with pytest.raises(CrossmodError):
        state.set_filter("maybe")
    with pytest.raises(CrossmodError):
        state.set_sort("random")


def test_accept_reject_clear_undo_and_counts():
    state = ReviewState(small_table())
    counts = state.counts()
    assert counts["accepted_auto"] == 3 and counts["undecided"] == 5 and counts["accepted_final"] == 3
    state.accept(1)  # overrides an automatic rejection
    state.reject(4)  # overrides an automatic acceptance
    state.accept(0)  # agrees with the automatic decision
    assert state.manual(1) == "accept" and state.final(1)
    assert state.manual(4) == "reject" and not state.final(4)
    counts = state.counts()
    assert counts["manual_accept"] == 2 and counts["manual_reject"] == 1
    assert counts["overridden"] == 2 and counts["undecided"] == 2
    assert counts["accepted_final"] == 3  # 0, 1, 2
    state.clear(4)
    assert state.manual(4) == "" and state.final(4)
    assert state.undo() == ("b", 6)  # the clear is undone
    assert state.manual(4) == "reject"
    state.undo()
    state.undo()
    state.undo()
    assert state.undo() is None
    assert state.decisions == {}
    table = state.decisions_table()
    assert list(table["decided_by"]) == ["auto"] * 5


def test_undecided_filter_moves_on_after_a_decision():
    state = ReviewState(small_table())
    state.set_filter("undecided")
    first = state.current
    state.reject()
    assert first not in state.order and state.current == state.order[0]
    assert len(state.order) == 4
    state.undo()
    assert state.current == first  # undo brings the slice back and shows it


def test_decisions_round_trip_through_review_json(tmp_path):
    path = tmp_path / "cleaned" / "review.json"
    state = ReviewState(small_table(), path)
    state.accept(3)
    state.reject(0)
    data = json.loads(path.read_text())
    assert data["format"] == "crossmod-review/1"
    assert set(data["decisions"]) == {"a/5", "b/5"}
    entry = data["decisions"]["b/5"]
    assert entry["decision"] == "accept" and entry["patient"] == "b" and entry["slice_index"] == 5
    assert entry["time"].endswith("+00:00") and entry["accepted_auto"] is False
    again = ReviewState(small_table(), path)
    assert again.manual(3) == "accept" and again.manual(0) == "reject" and again.manual(1) == ""
    assert review.load_review(path) == again.decisions
    assert not list(path.parent.glob(".*.tmp"))


def test_bad_review_files_are_one_line_errors(tmp_path):
    path = tmp_path / "review.json"
    path.write_text("{not json")
    with pytest.raises(CrossmodError, match="review.json") as err:
        review.load_review(path)
    assert "\n" not in str(err.value)
    path.write_text(json.dumps({"decisions": {"a/5": {"decision": "perhaps"}}}))
    with pytest.raises(CrossmodError, match="review.json.*'accept' or 'reject'"):
        ReviewState(small_table(), path)
    assert review.normalise_decisions({("a", 5): True, "b/6": "Reject"}) == {
        ("a", 5): {"decision": "accept", "time": ""}, ("b", 6): {"decision": "reject", "time": ""}}
    with pytest.raises(CrossmodError):
        review.normalise_decisions({"a5": "accept"})


def test_static_gallery_from_a_table():
    fig = review.static_gallery(small_table())
    assert fig.axes and fig.axes[0].get_ylabel().startswith("outline Dice")


@pytest.fixture(scope="module")
def cleaned_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("review")
    _, _, kinds, _ = fabricate_inputs(root)
    profile = load_profile("smoke")
    settings = fast_settings()
    profile["preprocessing"]["pixel_mm"] = PIXEL
    profile["cleaning"].update(
        spatial_samples=settings["spatial_samples"], workers=1, examples=2,
        rigid={"resolutions": 2, "iterations": 50}, bspline={**profile["cleaning"]["bspline"], "resolutions": 2,
                                                             "iterations": 60})
    run = RunFolder(root=root, profile=profile)
    table = cleaning.clean_run(run, progress=False)
    return {"run": run, "kinds": kinds, "table": table}


def test_manual_decisions_change_the_training_slices(cleaned_run, tmp_path):
    import shutil

    base = cleaned_run["run"]
    root = tmp_path / "run"
    shutil.copytree(base.root, root)
    run = RunFolder(root=root, profile=base.profile)
    kinds, auto = cleaned_run["kinds"], cleaned_run["table"]
    shrunk = int(np.flatnonzero(kinds == "shrunk")[0])
    good = int(np.flatnonzero(kinds == "good")[0])
    constant = int(np.flatnonzero(kinds == "constant")[0])
    assert not auto.loc[shrunk, "accepted_final"] and auto.loc[good, "accepted_final"]

    state = ReviewState.from_run(run, autosave=True)
    assert len(state.images["registered"]) == int((auto["registration_status"] == "ok").sum())
    state.accept(shrunk)
    state.reject(good)
    state.accept(constant)
    assert (root / "cleaned" / "review.json").is_file()

    table = cleaning.clean_run(run, progress=False)  # reads cleaned/review.json
    with np.load(root / "cleaned" / "training_slices.npz") as data:
        rows = list(data["source_row"])
        images = {int(r): data["image"][k] for k, r in enumerate(data["source_row"])}
    assert shrunk in rows and constant in rows and good not in rows
    expected = set(auto.loc[auto["accepted_final"], "row"]) | {shrunk, constant}
    assert set(rows) == expected - {good}
    assert table.loc[shrunk, "decided_by"] == "manual" and table.loc[shrunk, "manual_decision"] == "accept"
    assert not table.loc[shrunk, "accepted_auto"] and table.loc[shrunk, "accepted_final"]
    assert table.loc[shrunk, "image_source"] == "registered"  # registered once accepted by hand
    # the constant slice cannot be registered: kept as it is, and the table says so
    assert table.loc[constant, "registration_status"] == "error"
    assert table.loc[constant, "reason"].startswith("outline Dice")  # the automatic verdict
    assert "constant" in table.loc[constant, "registration_reason"]
    assert table.loc[constant, "image_source"] == "unregistered"
    with np.load(run.root / "synthetic" / "synthetic_mr.npz") as syn:
        assert np.array_equal(images[constant], syn["image"][constant])
    summary = cleaning.summarise_decisions(table)
    assert summary["manual_accept"] == 2 and summary["manual_reject"] == 1 and summary["overridden"] == 3
    assert summary["kept_unregistered"] == 1
    # slices registered in the first run come from the cache
    assert table.loc[auto["registration_status"] == "ok", "cached"].all()

    # the state sees the new decisions table; ignoring review.json restores the automatic decisions
    state = ReviewState.from_run(run)
    assert state.counts()["accepted_final"] == len(rows)
    plain = cleaning.clean_run(run, decisions_override=False, progress=False)
    assert list(plain["accepted_final"]) == list(auto["accepted_final"])
    mapping = cleaning.clean_run(run, decisions_override={(str(auto.loc[good, "patient"]),
                                                           int(auto.loc[good, "slice_index"])): "reject"},
                                 progress=False)
    assert not mapping.loc[good, "accepted_final"] and mapping["decided_by"].tolist().count("manual") == 1


def test_widget_and_gallery_without_a_browser(cleaned_run, tmp_path):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(cleaned_run["run"].root, root)
    run = RunFolder(root=root, profile=cleaned_run["run"].profile)
    fig = review.review(run, interactive=False, n=4)
    assert len([ax for ax in fig.axes if ax.images]) == 8  # 4 CT | synthetic MR pairs
    titles = [ax.get_title() for ax in fig.axes if ax.get_title().startswith("sMR")]
    assert any(title.endswith(" · outline") for title in titles)  # rejected ones say why
    assert any(" · " not in title for title in titles)  # used ones do not
    widget = review.review(run, interactive=True)
    assert isinstance(widget, review.ReviewWidget)
    assert widget.image.value[:4] == b"\x89PNG"
    state = widget.state
    first = state.current
    widget._on_accept(None)
    assert state.manual(first) == "accept" and state.current != first  # moved on
    widget._on_undo(None)
    assert state.manual(first) == "" and state.current == first
    widget.filter.value = "rejected"
    assert all(not state.final(r) for r in state.order)
    widget.sort.value = "dice_descending"
    dice = [float(state.table.set_index("row").loc[r, "outline_dice"]) for r in state.order]
    assert dice == sorted(dice, reverse=True)
    assert "final:" in widget.counts.value
    fig = review.render_slice(state, state.order[0])
    assert len(fig.axes) in (2, 3)
