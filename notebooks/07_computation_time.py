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
# # 7. Computation time
#
# ## Overview
# This chapter reproduces **sections 2.F and 3.B** of {cite}`kieselmann2021`. The paper timed its
# pipeline on a single Tesla V100 with 16 GB of memory: training the CycleGAN {cite}`zhu2017` took
# about **72 h**, training the 2D U-Net {cite}`ronneberger2015` about **150 min**, and inference
# **0.86 ± 0.02 s per patient** (mean and SD over its 27 MR patients). Here are the times measured
# in *the run that built this book*, stage by stage, with the machine they ran on, the paper's
# figures beside them, and an extrapolation of this run's throughput to the paper's amount of work.
#
# | Prerequisite | Importance |
# |---|---|
# | Chapters 2–5 (the stages being timed) | necessary |
# | FLOPs as a measure of a network's work | helpful |
#
# The times come from the files the stages write (the CycleGAN's `summary.json` and `losses.csv`,
# the registration times in `cleaned/decisions.csv`, the U-Net's `summary.json` and `log.csv`, the
# inference times in `predictions/index.csv`) and from `notebooks/timings.json`, where `crossmod run`
# records the wall time and device of every notebook. Everything is read by `crossmod_lib.timing`.

# %% tags=["parameters", "remove-cell"]
# Defaults; papermill injects the run's values in the cell below (crossmod run / crossmod book).
profile = "smoke"
run_dir = ""
profile_path = ""

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from crossmod_lib import bench, plots, runs, timing

pd.set_option("display.max_colwidth", None)  # the paper's figures and the bases in full
run = runs.RunFolder.open(profile_path or profile, run_dir or None)
# The stage: every measured time, the benchmarks saved in this run folder and those kept in the
# repository (recorded/benchmarks; a run's own take precedence), the paper-scale estimates.
stage = timing.run(run)
measured, recorded = stage["measured"], stage["recorded"]
print(f"profile {run.profile['name']}: {len(measured)} measured steps, "
      f"{len(recorded)} recorded benchmark(s)")

# %% [markdown]
# ## The machine
# The device of the notebooks that produced this run (as `crossmod run` recorded it), beside the
# paper's. Each stage also records whether it ran on the CPU or a GPU; the tables below name it.

# %%
device = timing.run_device(run)
if device:
    display(Markdown(
        "| | this run | paper |\n|---|---|---|\n"
        f"| GPU | {device.get('gpu') or 'none'} | {timing.PAPER_DEVICE} |\n"
        f"| CPU | {device.get('cpu')} | not stated |\n"
        f"| CPU cores | {device.get('cpu_cores_usable')} usable of {device.get('cpu_cores')} | not stated |"
    ))
else:
    display(Markdown("No notebook times are recorded for this run yet (`notebooks/timings.json` "
                     "is written by `crossmod run`); the machine is the one in the provenance below."))

# %% [markdown]
# ## Every notebook
# Wall time of each executed notebook, from `notebooks/timings.json`. A notebook re-run alone
# (`crossmod run --stage N`) replaces its own entry only. This chapter runs before it is recorded,
# so its own line (and those of later notebooks) is from an earlier execution, if any; the start
# times tell them apart.

# %%
notebook_times = timing.notebook_table(run)
if len(notebook_times):
    shown = notebook_times.assign(**{"wall time": notebook_times["seconds"].map(timing.format_seconds)})
    dropped = ["seconds", "ended (UTC)"] + (["device"] if shown["device"].nunique() == 1 else [])
    display(shown.drop(columns=dropped).set_index("stage"))
    if shown["device"].nunique() == 1:
        print(f"all on {shown['device'].iloc[0]}")
else:
    print("no notebook times recorded")

# %% [markdown]
# ## Every measured step
# Each stage's own record, inside its notebook: the total time of the step and, where the stage
# times its units one by one, the time per unit as mean ± SD over the `n` units: an
# *image-iteration* is one CT image through one CycleGAN training iteration (the batch holds several),
# then a registered slice, a U-Net epoch, a patient at inference. Registrations run in parallel
# worker processes, so their summed wall time is larger than the cleaning chapter took.

# %%
steps = measured[~measured["stage"].str.startswith("notebook")]
shown = timing.display_table(steps)
devices = steps["device"].unique()
if len(devices) == 1:
    shown = shown.drop(columns=["device"])
display(shown)
notes = [f"- {row.step}: {row.note}" for row in steps.itertuples() if row.note]
display(Markdown((f"All steps ran on {devices[0]}.\n\n" if len(devices) == 1 else "") + "\n".join(notes)))

# %%
fig = plots.step_times(measured, f"Measured times, profile {run.profile['name']}")
if fig is not None:
    plots.save(fig, run, runs.Figures.COMPUTATION_TIME)
    plt.show()

# %% [markdown]
# ## Beside the paper (section 3.B)
# The paper's three figures, as stated, beside this run's measurement of the same step. The run's
# scale is the profile's (see chapters 2 and 4: cohort sizes, slice size, network widths and epochs
# differ from the paper's unless the profile is `full`), so the two columns time different amounts
# of work; the next section scales ours to the paper's.

# %%
display(timing.paper_comparison(measured))

# %% [markdown]
# ## Extrapolation to the paper's scale
# **These are estimates, not measurements.** Each row takes a measured throughput — the floating
# point operations per second the run (or a recorded benchmark) achieved with its own networks —
# and divides the paper's amount of work by it: the CycleGAN of Fig. 4 at 256 × 256 for 200 epochs
# over 202 CT patients' slices, the U-Net of Fig. 5 for at most 100 epochs over about 1500 slices
# (80/20), inference on 30 MR slices. Small networks keep a device far from its peak, so estimates
# from a small run are too long; the benchmark rows, when recorded with the paper's network sizes,
# are closer. The paper-scale work is counted by our own FLOP formulas; the last table checks it
# against the paper's stated times.

# %%
estimates = stage["estimates"]
if len(estimates):
    display(estimates[["step", "from", "measured throughput", "estimate (extrapolated)", "paper (V100)"]]
            .set_index(["step", "from"]))
    work = timing.paper_work(run)
    display(Markdown(
        "**Paper-scale work**\n\n"
        + "\n".join(f"- {step}: {item['description']}" for step, item in work.items())
        + "\n\n**What each estimate is based on**\n\n"
        + "\n".join(f"- {step}, {source}: {basis}" for step, source, basis in
                    zip(estimates["step"], estimates["from"], estimates["basis of the estimate"]))))
else:
    display(Markdown("Nothing to extrapolate yet: no CycleGAN, U-Net or inference times recorded."))

# %% [markdown]
# What the paper's V100 must have sustained if our count of the paper's work is right (its work
# divided by its stated time). A V100 peaks at 14–15.7 TFLOP/s in fp32 and 112–125 TFLOP/s with fp16
# tensor cores; the paper used PyTorch 0.4 and Keras 2.2 in fp32. Inference also includes reading
# and resampling the MR, so its implied rate is a lower bound.

# %%
implied = timing.paper_implied_throughput(run)
display(implied.style.format({"paper-scale work (TFLOP)": "{:,.1f}",
                              "implied TFLOP/s on the V100": "{:.2f}"}))

# %% [markdown]
# ## Recorded benchmarks
# The benchmarks of the earlier chapters (`crossmod bench metrics|registration|cyclegan|unet|inference`)
# print a table; saved into a run folder or into the repository's `recorded/benchmarks`
# (`crossmod bench NAME --save FOLDER`, kept as `metrics/bench_<name>.json` with the machine and
# commit that ran it) they appear here. Benchmarks are run separately from the book, possibly on
# another machine: each table says which.
#
# `crossmod bench cyclegan` times the training step of the peer — the reference CycleGAN of
# {cite}`zhu2017`, as carried by the CUT repository {cite}`park2020`, through its own
# `optimize_parameters()` — and crossmod's, in one call, at the demo's size and the paper's. crossmod
# runs in two modes: *exact* (fp32, eager: what the determinism and resume tests check bit for bit)
# and *fast* (bf16 autocast, channels_last memory layout and `torch.compile`, the profiles' setting).
# crossmod's step does more than the peer's: it includes the geometric loss and its hole fill.
#
# `crossmod bench unet` times the U-Net's training step (forward, soft Dice, backward, Adam) at the
# demo's size, exact fp32 against bf16 autocast with channels_last: what `segmentation.cpu_bf16`
# turns on for training on a CPU that computes bf16 natively (the demo profile does; predictions
# stay fp32).

# %%
if recorded:
    for name, record in recorded.items():
        prov = record.get("provenance", {})
        display(Markdown(f"**`{name}`**, saved {record.get('saved', '?')} on {prov.get('device', '?')} "
                         f"(commit {prov.get('commit', '?')}; options {record.get('options') or 'defaults'})"))
        display(bench.result_table(record["result"]))
else:
    display(Markdown("No benchmark is recorded in this run folder. Run one and keep it with "
                     "`crossmod_lib.bench.save_benchmark(result, run_dir)`."))

# %% [markdown]
# ## Summary

# %%
lines = []
for step, row in timing.paper_comparison(measured).iterrows():
    ours = row["this run (measured)"] or "not recorded"
    where = row["this run's device"] or "n/a"
    stated = row[f"paper ({timing.PAPER_DEVICE})"]
    lines.append(f"- {step}: {ours} here ({where}); paper {stated} on a V100.")
if len(estimates):
    for step, group in estimates.groupby("step", sort=False):
        best = group.loc[group["estimate_s"].idxmin()]
        lines.append(f"- {step} at the paper's scale, *extrapolated* (not measured): "
                     f"{best['estimate (extrapolated)']} (the shortest estimate; from {best['from']}).")
total = notebook_times["seconds"].sum() if len(notebook_times) else float("nan")
lines.append(f"- All recorded notebooks together: {timing.format_seconds(total) or 'not recorded'} "
             f"(profile `{run.profile['name']}`).")
display(Markdown("\n".join(lines)))

# %% [markdown]
# ## What's next
# Chapter 8 is the interactive review of the cleaning decisions; its changes feed back into
# chapters 3–5 on the next run.
#
# ## Resources and references
# The sources cited in this chapter are listed on the [references](../references.md) page.
#
# ## Provenance

# %%
display(Markdown(runs.provenance_markdown(run)))
