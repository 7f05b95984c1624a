"""What the CycleGAN and U-Net trainings share (crossmod_lib.training)."""

import pandas as pd
import pytest
import torch

from crossmod_lib import training
from crossmod_lib.errors import CrossmodError


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    training.save_checkpoint({"a": torch.ones(3)}, path)

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(training.torch, "save", broken_save)
    with pytest.raises(OSError):
        training.save_checkpoint({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(training.read_checkpoint(path)["a"], torch.ones(3))   # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]   # no leftovers


def test_read_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(CrossmodError, match="checkpoint not found"):
        training.read_checkpoint(tmp_path / "nowhere.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CrossmodError, match=r"cut.pt: cannot read checkpoint: .*truncated or corrupt") as info:
        training.read_checkpoint(tmp_path / "cut.pt")
    assert "\n" not in str(info.value)


def test_write_log_rewrites_the_csv_with_the_given_columns(tmp_path):
    path = tmp_path / "sub" / "log.csv"
    training.write_log([{"epoch": 1, "loss": 0.5, "extra": "ignored"}], ("epoch", "loss"), path)
    training.write_log([{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}], ("epoch", "loss"), path)
    table = pd.read_csv(path)
    assert list(table.columns) == ["epoch", "loss"] and table["loss"].tolist() == [0.5, 0.25]
    assert sorted(p.name for p in path.parent.iterdir()) == ["log.csv"]


def test_progress_bar_off_is_none():
    assert training.progress_bar(10, enabled=False) is None
    bar = training.progress_bar(10, 2, "x", "epoch", leave=False)
    assert bar.n == 2 and bar.total == 10
    bar.close()
