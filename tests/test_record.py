"""Recorded runs (crossmod_lib.record): copy with provenance, verify, refuse tampering."""

import json
from pathlib import Path

import pandas as pd
import pytest

from crossmod_lib import record
from crossmod_lib.cli import main
from crossmod_lib.errors import CrossmodError


def _notebook(path, commit, date="2026-01-02T03:04:05+00:00"):
    table = ("| | |\n|---|---|\n"
             f"| commit | {commit} |\n| date (UTC) | {date} |\n| profile | tiny |\n"
             "| device | x86_64, 2 CPU cores |\n")
    cell = {"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
            "outputs": [{"output_type": "display_data", "metadata": {},
                         "data": {"text/markdown": table, "text/plain": "<Markdown>"}}]}
    path.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))


def _finished_run(root):
    (root / "metrics").mkdir(parents=True)
    (root / "figures").mkdir()
    (root / "notebooks").mkdir()
    (root / "cleaned").mkdir()
    (root / "profile.yaml").write_text("name: tiny\ndescription: a tiny run\n")
    pd.DataFrame({"ROI": ["Right parotid"], "Method": ["Cross-modality"], "DSC": ["0.70 ± 0.10"]}).to_csv(
        root / "metrics" / "table_2_lcc.csv", index=False)
    (root / "cleaned" / "summary.json").write_text(json.dumps({"slices": 10, "accepted_final": 8}))
    (root / "figures" / "fig8_boxplots.png").write_bytes(b"\x89PNG fake")
    (root / "figures" / "not_recorded.png").write_bytes(b"\x89PNG other")
    (root / "model").mkdir()
    (root / "model" / "big.pt").write_bytes(b"0" * 1000)
    _notebook(root / "notebooks" / "01_data_preparation.ipynb", "abc123def456")
    _notebook(root / "notebooks" / "05_evaluation.ipynb", "fedcba654321")
    (root / "notebooks" / "08_review.ipynb").write_text(json.dumps({"cells": []}))
    (root / "notebooks" / "timings.json").write_text(json.dumps(
        {"notebooks": {"01_data_preparation": {"seconds": 12.5}}}))
    return root


def test_record_prefers_the_provenance_the_library_wrote(tmp_path):
    # crossmod run keeps each notebook's commit, start and device in notebooks/timings.json; the
    # record takes those rather than reading them back from the rendered provenance table
    run = _finished_run(tmp_path / "run")
    (run / "notebooks" / "timings.json").write_text(json.dumps({"notebooks": {"01_data_preparation": {
        "seconds": 3.0, "commit": "0123456789ab", "started": "2026-12-06T05:00:00+00:00",
        "device": {"cpu": "Some CPU", "cpu_cores": 2}, "profile": "tiny"}}}))
    info = record.record_run(run, tmp_path / "recorded" / "tiny")
    chapter = info["chapters"]["01_data_preparation"]
    assert chapter["commit"] == "0123456789ab" and chapter["date"].startswith("2026-12-06T05:00")
    assert "Some CPU" in chapter["device"] and chapter["seconds"] == 3.0
    assert info["chapters"]["05_evaluation"]["commit"] == "fedcba654321"  # older notebook: its table


def test_record_round_trip_keeps_provenance_and_only_results(tmp_path):
    run = _finished_run(tmp_path / "run")
    info = record.record_run(run, tmp_path / "recorded" / "tiny")
    assert info["chapters"]["01_data_preparation"]["commit"] == "abc123def456"
    assert info["chapters"]["01_data_preparation"]["seconds"] == 12.5
    assert info["chapters"]["05_evaluation"]["commit"] == "fedcba654321"
    assert info["chapters"]["08_review"] == {}  # no provenance table: none invented
    assert set(info["files"]) == {"profile.yaml", "metrics/table_2_lcc.csv", "cleaned/summary.json",
                                  "notebooks/timings.json", "figures/fig8_boxplots.png"}
    records = record.recorded_runs(tmp_path / "recorded")
    assert [r.name for r in records] == ["tiny"]
    rec = records[0]
    assert rec.table("metrics/table_2_lcc.csv")["DSC"].tolist() == ["0.70 ± 0.10"]
    assert rec.json("cleaned/summary.json")["accepted_final"] == 8
    assert rec.path("figures/not_recorded.png") is None
    provenance = rec.provenance_table()
    assert provenance.loc["08_review", "commit"] == "not recorded"
    assert not list((tmp_path / "recorded").glob(".*tmp*")), "temporary folder left behind"


def test_read_record_refuses_changed_or_missing_files(tmp_path):
    run = _finished_run(tmp_path / "run")
    out = tmp_path / "recorded" / "tiny"
    record.record_run(run, out)
    table = out / "metrics" / "table_2_lcc.csv"
    table.write_text(table.read_text().replace("0.70", "0.90"))
    with pytest.raises(CrossmodError, match=r"table_2_lcc.csv: changed since it was recorded"):
        record.read_record(out)
    table.unlink()
    with pytest.raises(CrossmodError, match=r"table_2_lcc.csv: listed in record.json but missing"):
        record.read_record(out)
    (out / "record.json").write_text("{not json")
    with pytest.raises(CrossmodError, match=r"record.json: not valid JSON"):
        record.read_record(out)
    with pytest.raises(CrossmodError, match=r"record.json: missing"):
        record.read_record(tmp_path)
    assert record.recorded_runs(tmp_path / "nowhere") == []


def test_record_refuses_an_unfinished_run_and_leaves_nothing(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    (run / "metrics" / "table_2_lcc.csv").unlink()
    out = tmp_path / "recorded" / "tiny"
    assert main(["record", "--run-dir", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("crossmod: error:") and "table_2_lcc.csv" in err and "\n" not in err
    assert not (tmp_path / "recorded").exists()


def test_cli_record_writes_the_folder(tmp_path, capsys):
    run = _finished_run(tmp_path / "run")
    out = tmp_path / "rec"
    assert main(["record", "--run-dir", str(run), "--out", str(out), "--note", "a test run"]) == 0
    assert "recorded 5 files" in capsys.readouterr().out
    info = record.read_record(out).info
    assert info["profile"] == "tiny" and info["note"] == "a test run"


def test_committed_records_verify():
    # whatever is committed under recorded/ must pass its own checksums (the book reads them)
    for rec in record.recorded_runs():
        assert rec.info["chapters"], rec.root
        # a run shows its Table II (chapter 9), a study its points (chapter 10)
        needed = {"study": "metrics/convergence.csv", "unet-seeds": "metrics/unet_seeds.csv"}.get(
            rec.info.get("kind"), "metrics/table_2_lcc.csv")
        assert rec.path(needed) is not None, rec.root


def test_with_rejected_slices_picks_records_that_show_rejections(tmp_path):
    kept_all = _finished_run(tmp_path / "all_kept")
    some_rejected = _finished_run(tmp_path / "some_rejected")
    (some_rejected / "cleaned" / "summary.json").write_text(json.dumps(
        {"slices": 10, "accepted_final": 7, "rejected_final": 3, "rejected_outline": 1,
         "rejected_registration": 1, "manual_reject": 1}))
    (some_rejected / "figures" / "fig6_cleaning_examples.png").write_bytes(b"\x89PNG fig6")
    (kept_all / "figures" / "fig6_cleaning_examples.png").write_bytes(b"\x89PNG fig6")
    record.record_run(kept_all, tmp_path / "recorded" / "a")
    record.record_run(some_rejected, tmp_path / "recorded" / "b")
    chosen = record.with_rejected_slices(record.recorded_runs(tmp_path / "recorded"))
    assert [rec.root.name for rec in chosen] == ["b"]
    assert chosen[0].cleaning_counts() == (
        "7 of 10 synthetic slices kept (70%); 1 dropped by the outline check (before or after "
        "registration), 1 by the other registration checks, 1 by hand")
    # a record that rejected slices but lacks the figure has nothing to show
    (some_rejected / "figures" / "fig6_cleaning_examples.png").unlink()
    record.record_run(some_rejected, tmp_path / "recorded2" / "b")
    assert record.with_rejected_slices(record.recorded_runs(tmp_path / "recorded2")) == []


def test_committed_records_include_rejected_examples():
    # chapter 3 falls back on these when the demo phantom rejects nothing
    assert record.with_rejected_slices(record.recorded_runs()), "no recorded run shows rejected slices"


def test_every_recorded_study_is_a_profile_on_main():
    """A recorded study can be run again: some profile of the repository has its settings (the
    study's own seeds, budgets and networks, and what each point sets for itself, aside)."""
    import yaml

    from crossmod_lib import config, convergence

    profiles = {path.stem: config.load_profile(path.stem)
                for path in sorted((Path(config.__file__).parent / "profiles").glob("*.yaml"))}
    studies = [rec for rec in record.recorded_runs() if rec.info.get("kind") == "study"]
    assert studies, "no recorded study"
    for rec in studies:
        theirs = yaml.safe_load((rec.root / "profile.yaml").read_text())
        matches = [name for name, ours in profiles.items()
                   if not convergence.settings_differences(ours, theirs, convergence.STUDY_CHOICES)]
        assert matches, f"{rec.root.name}: no profile has its settings"


def test_settings_sentence_names_what_changed_since_the_record(tmp_path):
    import yaml

    from crossmod_lib.config import load_profile

    ran = load_profile("smoke")
    ran["seed"] = 99  # a run's own seed is no setting of the profile's
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(ran))
    rec = record.Record(root=tmp_path, info={"profile": "smoke", "kind": "run"})
    assert rec.settings_sentence().startswith("Settings: those of the profile `smoke`")
    ran["cyclegan"]["lambda_identity"] = 0.25
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(ran))
    sentence = rec.settings_sentence()
    assert "earlier settings" in sentence and "`cyclegan.lambda_identity`" in sentence
    assert "No profile `gone`" in record.Record(root=tmp_path, info={"profile": "gone"}).settings_sentence()
