"""The chapters' figures, drawn by crossmod_lib.plots from small made-up inputs."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from crossmod_lib import plots  # noqa: E402
from crossmod_lib.runs import Figures, RunFolder  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _slices(n=4, size=16, patients=("a", "b")):
    image = np.zeros((n, size, size), np.uint8)
    image[:, 4:12, 4:12] = 120
    mask = image > 0
    labels = np.zeros_like(image)
    labels[:, 5:7, 5:7] = 1
    labels[:, 9:11, 9:11] = 2
    return {"image": image, "head_mask": mask, "labels": labels,
            "patient": np.array([patients[i % len(patients)] for i in range(n)])}


def _example(kept=True):
    item = _slices(1)
    return {"ct": item["image"][0], "synthetic": item["image"][0], "registered": item["image"][0],
            "labels": item["labels"][0], "dice": 0.93 if kept else 0.41,
            "caption": "kept\npt a, 40 %" if kept else "outline\npt b, 90 %",
            "max_displacement_mm": 2.5, "folded_fraction": 0.0}


def test_save_writes_into_the_runs_figures_folder(tmp_path):
    run = RunFolder(root=tmp_path, profile={"name": "t"})
    fig = plots.intensity_histograms({"CT": _slices(), "MR": _slices()})
    plots.save(fig, run, Figures.PREPARED_HISTOGRAMS)
    assert (tmp_path / "figures" / Figures.PREPARED_HISTOGRAMS).stat().st_size > 1000


def test_intensity_histograms_one_line_per_patient():
    fig = plots.intensity_histograms({"CT": _slices(), "MR": _slices(patients=("x", "y", "z"))})
    left, right = fig.axes
    assert len(left.patches) == 2 and len(right.patches) == 3  # step histograms: one patch each
    assert right.get_legend() is not None


def test_loss_curves_split_generator_and_discriminator_terms():
    losses = pd.DataFrame({"iteration": np.arange(60), "G_adv_MR": np.linspace(1, 0, 60),
                           "cycle_CT": np.linspace(2, 1, 60), "D_MR": np.full(60, 0.25)})
    fig = plots.loss_curves(losses, ["G_adv_MR", "cycle_CT", "D_MR"])
    generator, discriminator = fig.axes
    assert [line.get_label() for line in generator.lines] == ["G_adv_MR", "cycle_CT"]
    assert [line.get_label() for line in discriminator.lines] == ["D_MR"]


def test_image_grid_leaves_out_missing_columns():
    grid = {"ct": _slices(3)["image"], "synthetic_mr": _slices(3)["image"]}
    fig = plots.image_grid(grid, (("ct", "CT"), ("synthetic_mr", "synthetic MR"),
                                  ("synthetic_ct", "synthetic CT")))
    assert len(fig.axes) == 3 * 2
    assert fig.axes[1].get_title() == "synthetic MR"


def test_outline_dice_histograms_marks_the_threshold():
    fig = plots.outline_dice_histograms({"a": np.array([0.9, 0.95]), "b": np.array([0.3, 0.85])}, 0.8)
    ax = fig.axes[0]
    assert len(ax.patches) == 2
    assert any(np.allclose(line.get_xdata(), 0.8) for line in ax.lines)


def test_cleaning_examples_frames_kept_green_and_dropped_red():
    assert plots.cleaning_examples([], []) is None
    fig = plots.cleaning_examples([_example(True)], [_example(False)])
    axes = fig.axes
    assert len(axes) == 4
    colours = {matplotlib.colors.to_hex(ax.spines["top"].get_edgecolor()) for ax in axes}
    assert colours == {plots.KEPT_COLOUR, plots.DROPPED_COLOUR}


def test_cleaning_checks_with_and_without_registrations():
    decisions = pd.DataFrame({"outline_dice": [0.7, 0.9, 0.95], "outline_dice_after": [np.nan, 0.93, 0.97],
                              "max_displacement_mm": [np.nan, 3.0, 12.0]})
    fig = plots.cleaning_checks(decisions, 0.8, 10.0)
    assert len(fig.axes[0].patches) > 0 and len(fig.axes[1].patches) > 0
    none = decisions.assign(outline_dice_after=np.nan, max_displacement_mm=np.nan)
    fig = plots.cleaning_checks(none, 0.8, 10.0)
    assert len(fig.axes[1].patches) == 0  # nothing registered: only the limit is drawn


def test_dropped_by_position_stacks_the_reasons():
    by_position = pd.DataFrame({"slices": [10, 10, 0], "dropped_outline": [2, 0, 0],
                                "dropped_registration": [1, 1, 0], "dropped_by_hand": [0, 1, 0]},
                               index=["0-33 %", "33-67 %", "67-100 %"])
    fig = plots.dropped_by_position(by_position)
    ax = fig.axes[0]
    heights = np.array([p.get_height() for p in ax.patches]).reshape(3, 3)
    assert np.allclose(heights.sum(axis=0), [0.3, 0.2, 0.0])  # an empty bin is 0, not NaN


def test_registration_examples_and_prediction_panels():
    assert plots.registration_examples([], 30) is None
    fig = plots.registration_examples([_example(True), _example(False)], 30)
    assert len(fig.axes) == 2 and "moved ≤ 2.5 mm" in fig.axes[0].get_title()
    labels = _slices(1)["labels"][0]
    example = {"predictions": {"m1": labels, "m2": np.zeros_like(labels), "m3": labels},
               "titles": {"m1": "one", "m2": "two", "m3": "three"}, "spacing": (1.0, 1.0),
               "image": _slices(1)["image"][0].astype(float), "box": (0, 16, 0, 16),
               "reference": labels, "patient": "p", "slice": 3, "annotated": True}
    fig = plots.prediction_panels(example, ncols=2)
    assert len(fig.axes) == 4 and fig.axes[1].get_title() == "two"
    assert "manual (blue)" in fig._suptitle.get_text()


def test_unet_training_curves_and_step_times():
    logs = pd.DataFrame({"model": ["a"] * 3 + ["b"] * 3, "epoch": [1, 2, 3] * 2,
                         "train_loss": np.linspace(1, 0.5, 6), "val_loss": np.linspace(1, 0.6, 6),
                         "val_dice": np.linspace(0.1, 0.7, 6)})
    fig = plots.unet_training_curves(logs)
    assert fig.axes[1].get_ylim() == (0, 1)
    measured = pd.DataFrame({"stage": ["notebook 01", "2 synthetic MR"], "step": ["", "training"],
                             "seconds": [30.0, 12.0]})
    fig = plots.step_times(measured, "times")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["01 (whole notebook)", "training"]
    assert plots.step_times(measured.assign(seconds=0.0), "times") is None
