# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Reviewing the synthetic slices by hand
#
# The automatic cleaning of chapter 3 judges each synthetic MR by its head outline only. Here a
# person can look at every synthetic slice beside its CT (outlines and parotid contours overlaid),
# sort them by outline Dice, and accept or reject slices by hand. Decisions are saved at once to
# `cleaned/review.json`; re-running the cleaning (the last cell, or chapter 3) applies them: a manual
# decision overrides the automatic one, and what the U-Net trains on changes accordingly.
#
# Open this notebook in JupyterLab (`jupytext --to ipynb notebooks/08_review.py`, or open the `.py`
# directly with the Jupytext extension) with the run folder of your profile. In a headless run
# (papermill) it shows the static gallery instead of the widget.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import io

from IPython.display import Image, display

from crossmod_lib import cleaning, review, runs

run = runs.RunFolder.open(profile_path or profile, run_dir or None)
state = review.ReviewState.from_run(run)
print(state.counts())

# %%
view = review.review(run)  # the widget in a live kernel, a static gallery otherwise
if isinstance(view, review.ReviewWidget):
    view.show()
else:  # a matplotlib Figure: shown as a PNG so it renders in any headless build
    buffer = io.BytesIO()
    view.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    display(Image(data=buffer.getvalue()))

# %% [markdown]
# ## Apply the decisions
# Re-run the cleaning with the manual decisions: `training_slices.npz` then holds the slices kept
# after review (registrations are cached, so this is quick).

# %%
decisions = cleaning.clean_run(run, progress=False)
print(cleaning.summarise_decisions(decisions))
