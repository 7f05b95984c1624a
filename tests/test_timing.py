"""Computation time (chapter 7): collecting a run's measured times, timings.json, benchmarks."""

import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest

from crossmod_lib import bench, timing
from crossmod_lib.errors import CrossmodError
from crossmod_lib.runs import RunFolder

CPU = {"cpu": "Test CPU 3000", "cpu_cores": 8, "cpu_cores_usable": 2, "gpu": None}
GPU = {"cpu": "Test CPU 3000", "cpu_cores": 16, "cpu_cores_usable": 16, "gpu": "Test GPU X"}


def _entry(stage, seconds, device=CPU, status="ok", hour=10):
    started = dt.datetime(2026, 1, 2, hour, 0, 0, tzinfo=dt.timezone.utc)
    return timing.notebook_entry(stage, started, seconds, status, device, "smoke")


def test_notebook_entry_times_are_consistent():
    entry = _entry(3, 75.5)
    assert entry["started"] == "2026-01-02T10:00:00+00:00"
    assert entry["ended"] == "2026-01-02T10:01:15+00:00"  # 75.5 s later, to the second
    assert entry["seconds"] == 75.5 and entry["status"] == "ok" and entry["stage"] == 3


def test_timings_merge_across_partial_reruns(tmp_path):
    timing.record_notebook(tmp_path, "01_data_preparation", _entry(1, 10.0))
    timing.record_notebook(tmp_path, "03_cleaning", _entry(3, 30.0))
    # re-running stage 3 alone replaces its entry and keeps stage 1's
    timing.record_notebook(tmp_path, "03_cleaning", _entry(3, 12.5, GPU, hour=11))
    data = json.loads((tmp_path / "notebooks" / "timings.json").read_text())
    assert data["format"] == timing.TIMINGS_FORMAT
    assert set(data["notebooks"]) == {"01_data_preparation", "03_cleaning"}
    assert data["notebooks"]["01_data_preparation"]["seconds"] == 10.0
    assert data["notebooks"]["03_cleaning"]["seconds"] == 12.5
    assert not list((tmp_path / "notebooks").glob("*.tmp"))
    table = timing.notebook_table(tmp_path)
    assert list(table["notebook"]) == ["01_data_preparation", "03_cleaning"]
    assert table.loc[1, "device"].startswith("Test GPU X")
    # the most recently finished notebook gives the run's device
    assert timing.run_device(tmp_path)["gpu"] == "Test GPU X"


def test_timings_missing_and_damaged(tmp_path):
    assert timing.read_timings(tmp_path) == {"format": timing.TIMINGS_FORMAT, "notebooks": {}}
    assert timing.notebook_table(tmp_path).empty and timing.run_device(tmp_path) is None
    path = tmp_path / "notebooks" / "timings.json"
    path.parent.mkdir()
    path.write_text("{not json")
    with pytest.raises(CrossmodError) as info:
        timing.record_notebook(tmp_path, "01_x", _entry(1, 1.0))
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    path.write_text(json.dumps({"notebooks": []}))
    with pytest.raises(CrossmodError, match="not a crossmod-timings-1 record"):
        timing.read_timings(tmp_path)
    with pytest.raises(ValueError):
        timing.record_notebook(tmp_path / "other", "01_x", {"status": "ok"})


def test_describe_device():
    assert timing.describe_device(CPU, "cpu") == "Test CPU 3000 (2 cores)"
    assert timing.describe_device(GPU, "cuda:0") == "Test GPU X"
    assert timing.describe_device(GPU) == "Test GPU X; Test CPU 3000 (16 cores)"
    assert timing.describe_device(None, "cpu") == "cpu"
    # the vector instructions that decide CPU training speed, where recorded
    assert timing.describe_device({**CPU, "cpu_vector": "AVX-512 bf16"}, "cpu") == \
        "Test CPU 3000 (2 cores, AVX-512 bf16)"
    assert timing.cpu_vector_features() in ("AVX-512 bf16", "AVX-512", "AVX2", "")
    info = timing.device_info()
    assert info["cpu_cores"] >= 1 and info["cpu"]


@pytest.fixture
def fabricated_run(tmp_path):
    """A run folder holding the files the stages write, with known times."""
    root = tmp_path / "run"
    RunFolder.open("smoke", root)            # profile.yaml (smoke)
    timing.record_notebook(root, "02_cyclegan", _entry(2, 40.0))
    gan = root / "synthetic" / "cyclegan"
    gan.mkdir(parents=True)
    (gan / "summary.json").write_text(json.dumps({
        "iteration": 4, "batch_size": 2, "world_size": 1, "seconds_total": 2.0, "device": "cpu",
        "images_per_second": 4.0}))
    # seconds since the start at each iteration: steps 0.5, 0.5, 0.6, 0.4 s per batch of 2
    pd.DataFrame({"epoch": 1, "iteration": [1, 2, 3, 4], "G_total": 1.0,
                  "seconds": [0.5, 1.0, 1.6, 2.0]}).to_csv(gan / "losses.csv", index=False)
    (root / "synthetic" / "synthesis.json").write_text(json.dumps({"slices": 8, "seconds": 0.4}))
    cleaned = root / "cleaned"
    cleaned.mkdir()
    pd.DataFrame({"row": range(5), "registration_time_s": [0.2, 0.4, np.nan, 0.0, 0.6],
                  "registration_cpu_s": [0.1, 0.2, np.nan, 0.0, 0.3],
                  "cached": [False, True, False, False, False]}).to_csv(cleaned / "decisions.csv",
                                                                      index=False)
    for name, seconds in (("cross_modality", [1.0, 2.0, 3.0]), ("ct_only", [0.5, 0.5])):
        folder = root / "model" / name
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps({
            "name": name, "epochs_run": len(seconds), "seconds": sum(seconds) + 0.5, "device": "cpu",
            "slices": {"train": 20, "val": 6}}))
        pd.DataFrame({"epoch": range(1, len(seconds) + 1), "seconds": seconds}).to_csv(
            folder / "log.csv", index=False)
    naive = root / "model" / "naive"
    naive.mkdir()
    (naive / "summary.json").write_text(json.dumps({"name": "naive", "trained": False,
                                                    "epochs_run": 0, "seconds": 0.0}))
    predictions = root / "predictions"
    predictions.mkdir()
    pd.DataFrame({"model": ["cross_modality"] * 3 + ["ct_only"],
                  "patient": ["mr_000", "mr_001", "mr_002", "ct_009"],
                  "seconds": [1.0, 1.2, 1.4, 3.0], "predict": [0.2, 0.2, 0.2, 0.5]}).to_csv(
        predictions / "index.csv", index=False)
    prepared = root / "prepared"
    prepared.mkdir()
    pd.DataFrame({"patient": ["ct_000", "ct_001"], "slices_kept": [40, 50]}).to_csv(
        prepared / "ct_cases.csv", index=False)
    pd.DataFrame({"patient": ["mr_000", "mr_001"], "slices_total": [30, 30]}).to_csv(
        prepared / "mr_cases.csv", index=False)
    return root


def _step(table, step):
    rows = table[table["step"] == step]
    assert len(rows) == 1, (step, list(table["step"]))
    return rows.iloc[0]


def test_collect_reads_every_stage(fabricated_run):
    table = timing.collect(fabricated_run)
    assert list(table.columns) == list(timing.COLUMNS)

    notebook = _step(table, "whole notebook, wall time")
    assert notebook["seconds"] == 40.0 and notebook["stage"] == "notebook 02_cyclegan"

    gan = _step(table, "CycleGAN training")
    assert gan["seconds"] == 2.0 and gan["n"] == 8  # 4 iterations x batch 2
    per_image = np.array([0.5, 0.5, 0.6, 0.4]) / 2
    assert gan["per_unit_s"] == pytest.approx(per_image.mean())
    assert gan["per_unit_sd_s"] == pytest.approx(per_image.std(ddof=1))
    assert gan["device"] == "Test CPU 3000 (2 cores)"  # "cpu" resolved with the recorded machine

    synthesis = _step(table, "synthesis of every CT slice")
    assert synthesis["per_unit_s"] == pytest.approx(0.05) and synthesis["n"] == 8

    wall = table[table["step"].str.startswith("elastix registration, wall time")].iloc[0]
    assert wall["n"] == 3 and wall["seconds"] == pytest.approx(1.2)  # NaN and 0 s rows not timed
    assert wall["per_unit_s"] == pytest.approx(0.4) and wall["per_unit_sd_s"] == pytest.approx(0.2)
    assert wall["note"].startswith("1 of the 3 slices timed by an earlier cleaning call")
    cpu = table[table["step"].str.startswith("elastix registration, CPU time")].iloc[0]
    assert cpu["seconds"] == pytest.approx(0.6)

    unet = _step(table, "U-Net training: cross_modality")
    assert unet["seconds"] == 6.5 and unet["n"] == 3
    assert unet["per_unit_s"] == pytest.approx(2.0) and unet["per_unit_sd_s"] == pytest.approx(1.0)
    assert "U-Net training: naive" not in set(table["step"])  # not trained: no time to report

    inference = _step(table, "inference: cross_modality")
    assert inference["n"] == 3 and inference["unit"] == "patient"
    assert inference["per_unit_s"] == pytest.approx(1.2)
    assert inference["per_unit_sd_s"] == pytest.approx(0.2)
    assert _step(table, "inference: ct_only")["per_unit_sd_s"] != inference["per_unit_sd_s"]

    shown = timing.display_table(table)
    assert shown.loc[("5 inference", "inference: cross_modality"), "per unit (mean ± SD)"] == \
        "1.2 ± 0.2 s per patient"


def test_collect_on_an_empty_run_and_bad_files(tmp_path):
    table = timing.collect(tmp_path)
    assert table.empty and list(table.columns) == list(timing.COLUMNS)
    comparison = timing.paper_comparison(table)
    assert (comparison["this run (measured)"] == "").all()
    assert (comparison["measured step"] == "not recorded in this run").all()
    summary = tmp_path / "model" / "cross_modality" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{truncated")
    with pytest.raises(CrossmodError) as info:
        timing.collect(tmp_path)
    assert str(summary) in str(info.value) and "\n" not in str(info.value)
    summary.unlink()
    bad = tmp_path / "predictions" / "index.csv"
    bad.parent.mkdir()
    bad.write_text("model,patient\ncross_modality,mr_000\n")
    with pytest.raises(CrossmodError, match="seconds"):
        timing.collect(tmp_path)


def test_paper_figures_and_comparison(fabricated_run):
    # section 3.B as stated: 72 h, 150 min, 0.86 +- 0.02 s per patient; 2.F: one V100 (16 GB)
    assert timing.PAPER_TIMES.loc["CycleGAN training", "seconds"] == 72 * 3600
    assert timing.PAPER_TIMES.loc["U-Net training", "seconds"] == 150 * 60
    assert timing.PAPER_TIMES.loc["Inference", ["seconds", "sd_s"]].tolist() == [0.86, 0.02]
    assert "V100" in timing.PAPER_DEVICE and "16 GB" in timing.PAPER_DEVICE
    comparison = timing.paper_comparison(timing.collect(fabricated_run))
    assert comparison.loc["CycleGAN training", "this run (measured)"] == "2 s"
    assert comparison.loc["U-Net training", "measured step"] == "U-Net training: cross_modality"
    assert comparison.loc["Inference", "this run (measured)"] == "1.2 ± 0.2 s per patient (n = 3)"


def test_format_seconds():
    assert timing.format_seconds(3.21) == "3.21 s"
    assert timing.format_seconds(5400) == "90 min"
    assert timing.format_seconds(9000) == "2.5 h"
    assert timing.format_seconds(72 * 3600) == "72 h"
    assert timing.format_seconds(10 * 86400) == "10 d"
    assert "years" in timing.format_seconds(3000 * 86400)
    assert timing.format_seconds(math.nan) == ""


def test_extrapolation_scales_with_measured_time(fabricated_run):
    work = timing.paper_work(fabricated_run)
    # 202 CT patients x this run's 45 slices per patient, 200 epochs
    assert "9,090 CT slices" in work["CycleGAN training"]["description"]
    assert work["Inference"]["flop"] == pytest.approx(30 * work["U-Net training"]["flop"]
                                                      / (100 * (3 * 1200 + 300)))
    first = timing.extrapolate(fabricated_run).set_index("step")
    assert set(first.index) == {"CycleGAN training", "U-Net training", "Inference (per patient)"}
    # twice the measured CycleGAN time -> twice the estimate
    summary = fabricated_run / "synthetic" / "cyclegan" / "summary.json"
    data = json.loads(summary.read_text())
    data["seconds_total"] = 4.0
    summary.write_text(json.dumps(data))
    second = timing.extrapolate(fabricated_run).set_index("step")
    assert second.loc["CycleGAN training", "estimate_s"] == pytest.approx(
        2 * first.loc["CycleGAN training", "estimate_s"])
    # inference: the non-network part (1.2 - 0.2 s) is kept as measured, the network part scaled
    assert first.loc["Inference (per patient)", "estimate_s"] > 1.0
    implied = timing.paper_implied_throughput(fabricated_run)
    assert implied.loc["CycleGAN training", "implied TFLOP/s on the V100"] == pytest.approx(
        work["CycleGAN training"]["flop"] / (72 * 3600) / 1e12)


def test_extrapolation_uses_recorded_benchmarks(fabricated_run):
    result = {"name": "cyclegan", "device": "Test GPU X", "size": 256, "ngf": 64, "n_blocks": 9,
              "reference_mode": "fp32, batch 1, eager", "reference_tflops": 10.0,
              "fast_mode": "bf16", "fast_tflops": 40.0}
    bench.save_benchmark(result, fabricated_run, {"profile": "full"})
    rows = timing.extrapolate(fabricated_run, recorded=bench.load_benchmarks(fabricated_run))
    gan = rows[rows["from"].str.startswith("benchmark")]
    assert set(gan["from"]) == {"benchmark, reference mode", "benchmark, fast mode"}
    flop = timing.paper_work(fabricated_run)["CycleGAN training"]["flop"]
    assert sorted(gan["estimate_s"]) == pytest.approx([flop / 40e12, flop / 10e12])


def test_benchmarks_are_saved_and_loaded(tmp_path):
    assert bench.load_benchmarks(tmp_path) == {}
    result = {"name": "metrics", "median_ms": np.float64(12.5), "grid": (512, 512, 150),
              "meets_target": np.bool_(True), "hd": float("inf")}
    path = bench.save_benchmark(result, tmp_path, {"repeats": 3})
    assert path == tmp_path / "metrics" / "bench_metrics.json"
    record = bench.load_benchmarks(RunFolder(root=tmp_path, profile={}))["metrics"]
    assert record["result"]["median_ms"] == 12.5 and record["result"]["grid"] == [512, 512, 150]
    assert record["result"]["meets_target"] is True and record["result"]["hd"] == "inf"
    assert record["options"] == {"repeats": 3} and "commit" in record["provenance"]
    with pytest.raises(CrossmodError, match="plain 'name'"):
        bench.save_benchmark({"median_ms": 1.0}, tmp_path)
    with pytest.raises(CrossmodError, match="no such run folder"):
        bench.save_benchmark(result, tmp_path / "absent")
    (tmp_path / "metrics" / "bench_broken.json").write_text("[]")
    with pytest.raises(CrossmodError, match="bench_broken.json"):
        bench.load_benchmarks(tmp_path)


def test_benchmark_result_table():
    table = bench.result_table({"name": "inference", "seconds_mean": 1.23456, "meets_target": True,
                                "stages": {"read": 0.5, "predict": 0.25}})
    assert list(table.index) == ["name", "seconds_mean", "meets_target", "stages: read",
                                 "stages: predict"]
    assert list(table["value"]) == ["inference", "1.235", "yes", "0.500", "0.250"]
