"""crossmod bench: the CycleGAN benchmark beside the peer implementation (the reference CycleGAN)."""

import pytest

from crossmod_lib import bench

PEER = bench.peer_step_script()
TINY_CASE = {"size": 32, "ngf": 4, "ndf": 4, "n_blocks": 6, "batch": 1}


def test_missing_peer_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("CROSSMOD_PEERS", str(tmp_path))
    monkeypatch.setattr(bench, "peer_step_script", lambda: None)
    result = bench.peer_images_per_s(TINY_CASE, 1, 1)
    assert set(result) == {"error"} and "peer not found" in result["error"]


def test_failing_peer_is_one_line(tmp_path):
    script = tmp_path / "peer_step.py"
    script.write_text("import sys\nsys.exit('no torch here')\n")
    result = bench.peer_images_per_s(TINY_CASE, 1, 1, script=script)
    assert result == {"error": "peer step failed (exit 1): no torch here"}


@pytest.mark.skipif(PEER is None, reason="the peer implementation (../shared/peers) is not here")
def test_peer_step_runs_at_our_settings():
    result = bench.peer_images_per_s(TINY_CASE, 1, 1)
    assert "error" not in result, result
    assert result["model"] == "cycle_gan" and result["size"] == 32 and result["batch"] == 1
    assert result["images_per_s"] > 0


def test_recorded_benchmarks_load_with_provenance():
    records = bench.recorded_benchmarks()
    for name, record in records.items():
        assert record["name"] == name and record["provenance"]["commit"]
    if "cyclegan" in records:
        result = records["cyclegan"]["result"]
        ratios = [v for k, v in result.items() if k.endswith("fast / peer")]
        assert len(ratios) == 2 and all(isinstance(v, float) for v in ratios)


def test_recorded_benchmarks_of_a_missing_folder_are_none(tmp_path):
    assert bench.recorded_benchmarks(tmp_path / "nothing") == {}
