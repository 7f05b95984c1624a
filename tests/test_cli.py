"""The crossmod command-line tool: help, metrics on files, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmod_lib.cli import build_parser, main

SUBCOMMANDS = ["run", "book", "phantom", "metrics", "data", "fetch", "profile", "models",
               "predict", "bench"]


@pytest.mark.parametrize("command", [[]] + [[c] for c in SUBCOMMANDS] + [["data", "list"], ["data", "inspect"]])
def test_help_on_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: crossmod" in out


def test_parser_lists_all_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(SUBCOMMANDS) <= set(sub.choices)


def test_installed_entry_point():
    script = Path(sys.executable).parent / "crossmod"
    if not script.exists():
        pytest.skip(f"crossmod script not installed beside {sys.executable} (pip install -e .)")
    result = subprocess.run([str(script), "profile"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "smoke" in result.stdout and "demo" in result.stdout and "full" in result.stdout


def _label_file(path, array, spacing=(0.98, 0.98, 2.5)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture
def label_pair(tmp_path):
    reference = np.zeros((10, 30, 30), np.uint8)
    reference[3:7, 5:12, 5:12] = 1
    reference[3:7, 15:25, 15:22] = 2
    prediction = np.roll(reference, 2, axis=2)  # shift 2 voxels in x: 1.96 mm
    return (_label_file(tmp_path / "manual.nrrd", reference),
            _label_file(tmp_path / "auto.nii.gz", prediction))


def test_metrics_table(label_pair, capsys):
    reference, prediction = label_pair
    assert main(["metrics", "--reference", str(reference), "--prediction", str(prediction),
                 "--labels", "1:Parotid_L,2:Parotid_R"]) == 0
    out = capsys.readouterr().out
    assert "Parotid_L" in out and "Parotid_R" in out and "HD95 [mm]" in out
    assert "1.960" in out  # HD of a 2-voxel shift at 0.98 mm


def test_metrics_json(label_pair, capsys):
    reference, prediction = label_pair
    assert main(["metrics", "--reference", str(reference), "--prediction", str(prediction), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {r["structure"]: r for r in result["structures"]}
    assert set(rows) == {"label_1", "label_2"}
    assert rows["label_1"]["hd"] == pytest.approx(1.96)
    assert 0 < rows["label_1"]["dsc"] < 1
    # every metric says what it computes: HD95 pooled as MedPy's, the directed maximum beside it
    assert "MedPy hd95" in result["conventions"]["hd95"] and "hd95_max" in result["conventions"]
    assert rows["label_1"]["hd95_max"] >= rows["label_1"]["hd95"] and "assd" in rows["label_1"]


def test_metrics_empty_prediction_json_has_no_infinity(tmp_path, capsys):
    reference = np.zeros((5, 10, 10), np.uint8)
    reference[2, 3:6, 3:6] = 1
    ref = _label_file(tmp_path / "a.nrrd", reference)
    pred = _label_file(tmp_path / "b.nrrd", np.zeros_like(reference))
    assert main(["metrics", "--reference", str(ref), "--prediction", str(pred), "--json",
                 "--labels", "1:Parotid_L"]) == 0
    text = capsys.readouterr().out
    assert "Infinity" not in text
    row = json.loads(text)["structures"][0]
    assert row["dsc"] == 0.0 and row["hd"] is None and "empty" in row["note"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["metrics", "--reference", "missing.nrrd", "--prediction", "missing2.nrrd"], "missing.nrrd"),
        (["metrics", "--reference", "{ref}", "--prediction", "{pred}", "--labels", "one"], "--labels"),
        (["run", "--profile", "nonexistent"], "profile 'nonexistent' not found"),
        (["profile", "nonexistent"], "profile 'nonexistent' not found"),
    ],
)
def test_errors_are_one_line(argv, message, label_pair, capsys):
    reference, prediction = label_pair
    argv = [a.format(ref=reference, pred=prediction) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("crossmod: error:") and message in err
    assert err.count("\n") == 1


def test_grid_mismatch_is_refused(tmp_path, capsys):
    a = _label_file(tmp_path / "a.nrrd", np.ones((4, 8, 8)))
    b = _label_file(tmp_path / "b.nrrd", np.ones((4, 8, 8)), spacing=(1.0, 1.0, 3.0))
    assert main(["metrics", "--reference", str(a), "--prediction", str(b)]) == 2
    err = capsys.readouterr().err
    assert "not on the same grid" in err and "spacing" in err


def test_unknown_stage_is_refused(tmp_path, capsys):
    assert main(["run", "--profile", "smoke", "--run-dir", str(tmp_path / "run"), "--stage", "42"]) == 2
    assert "no notebook for stage(s) [42]" in capsys.readouterr().err


def test_profile_prints_resolved_settings(capsys):
    assert main(["profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "name: smoke" in out and "ct_window" in out and "extends" not in out


def test_bench_metrics_runs(capsys):
    assert main(["bench", "metrics", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["name"] == "metrics" and result["median_ms"] > 0


def test_data_list_prints_every_manifest_entry(capsys):
    from crossmod_lib.datasets import load_manifest

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    for name in load_manifest():
        assert name in out


def test_fetch_unknown_dataset_is_one_line(tmp_path, capsys):
    assert main(["fetch", "no-such-dataset", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no-such-dataset" in err and err.count("\n") == 1


def test_data_inspect_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "nodicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    assert main(["data", "inspect", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "nodicom: no DICOM" in err and err.count("\n") == 1
    truncated = tmp_path / "cut.nrrd"
    good = _label_file(tmp_path / "good.nrrd", np.random.default_rng(0).integers(0, 3, (20, 40, 40)))
    truncated.write_bytes(good.read_bytes()[:400])
    assert main(["data", "inspect", str(truncated)]) == 2
    err = capsys.readouterr().err
    assert "cut.nrrd" in err and err.count("\n") == 1


def test_data_inspect_dicom_with_rtstruct(tmp_path, capsys):
    from crossmod_lib import dicom

    volume = np.zeros((6, 40, 40))
    volume[:, 5:35, 5:35] = 40
    dicom.write_dicom_series(tmp_path / "pat", volume, spacing=(1, 1, 2.5), origin=(0, 0, 0))
    image = dicom.read_dicom_series(tmp_path / "pat")
    mask = np.zeros((6, 40, 40), np.uint8)
    mask[2:4, 10:20, 25:32] = 1
    mask_image = sitk.GetImageFromArray(mask)
    mask_image.CopyInformation(image)
    dicom.write_rtstruct({"Parotid_L": mask_image, "Parotid_R": mask_image}, image, tmp_path / "pat" / "rs.dcm")
    assert main(["data", "inspect", str(tmp_path / "pat")]) == 0
    out = capsys.readouterr().out
    assert "dicom, 1 case(s)" in out and "Parotid_L_cc" in out and "0.35" in out  # 140 voxels x 2.5 mm3


def test_phantom_command_writes_cohorts(tmp_path, capsys):
    out = tmp_path / "phantom"
    assert main(["phantom", "--profile", "smoke", "--out", str(out), "--n-ct", "1", "--n-mr", "1",
                 "--workers", "1"]) == 0
    assert "1 CT, 1 MR" in capsys.readouterr().out
    assert (out / "ct" / "ct_000" / "img.nrrd").is_file()
    assert (out / "mr" / "mr_000" / "structures_observer2" / "Parotid_R.nrrd").is_file()
    assert (out / "phantom.json").is_file()


def test_models_prints_the_reference_architectures(capsys):
    assert main(["models", "--profile", "full", "--json"]) == 0
    networks = {row["network"]: row for row in json.loads(capsys.readouterr().out)["networks"]}
    # Zhu et al.'s ResNet-9 generator and 70x70 PatchGAN, and the paper's U-Net (Fig. 5)
    assert networks["generator G_MR (CT -> MR)"]["parameters"] == 11_365_633
    assert networks["discriminator D_MR (70x70 PatchGAN)"]["parameters"] == 2_762_689
    assert networks["U-Net (Fig. 5)"]["parameters"] == 31_036_611
    assert main(["models", "--profile", "demo"]) == 0
    out = capsys.readouterr().out
    assert "96 x 96" in out and "U-Net (Fig. 5)" in out


def _tiny_checkpoint(path):
    import torch

    from crossmod_lib import segmentation as seg

    torch.manual_seed(0)
    settings = {"preprocessing": {"pixel_mm": 2.0, "crop": 32, "ct_window": [40, 350],
                                  "mr_upper_percentile": 99.0, "head_threshold": 20.0,
                                  "cc_rule": "none", "cc_margin_mm": 0.0, "min_head_area_cm2": 0.0},
                "segmentation": {"base_features": 4, "levels": 2}}
    model = seg.build_model(settings)
    return seg.save_checkpoint({"format": seg.CHECKPOINT_FORMAT, "model": model.state_dict(),
                                "arch": model.arch, "config": {},
                                "meta": {"kind": "test", "preprocessing": settings["preprocessing"]}},
                               path)


def test_predict_writes_labels_on_the_input_grid(tmp_path, capsys):
    volume = np.zeros((6, 40, 50), np.float32)
    volume[:, 8:32, 10:40] = 300.0
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((1.5, 1.5, 4.0))
    image.SetOrigin((-30.0, 12.0, 5.0))
    sitk.WriteImage(image, str(tmp_path / "mr.nii.gz"))
    model = _tiny_checkpoint(tmp_path / "best.pt")
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "mr.nii.gz"),
                 "--output", str(tmp_path / "out"), "--no-lcc"]) == 0
    assert "mr_labels.nii.gz" in capsys.readouterr().out
    labels = sitk.ReadImage(str(tmp_path / "out" / "mr_labels.nii.gz"))
    assert labels.GetSize() == image.GetSize() and labels.GetSpacing() == image.GetSpacing()
    assert labels.GetOrigin() == image.GetOrigin()
    # a non-DICOM input cannot carry an RTSTRUCT; a missing model is named
    assert main(["predict", "--model", str(model), "--input", str(tmp_path / "mr.nii.gz"),
                 "--output", str(tmp_path / "out2"), "--rtstruct"]) == 2
    assert "DICOM" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path / "nope.pt"), "--input", str(tmp_path),
                 "--output", str(tmp_path / "o")]) == 2
    assert "nope.pt" in capsys.readouterr().err
