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


def test_unet_bench_compares_fp32_with_bf16_where_the_cpu_has_it(monkeypatch):
    from crossmod_lib import cyclegan

    for native in (False, True):  # bf16 emulated where the CPU lacks it: the row still runs
        monkeypatch.setattr(cyclegan, "cpu_has_native_bf16", lambda native=native: native)
        result = bench.BENCHMARKS["unet"](repeats=2, profile="smoke")
        rates = {k: v for k, v in result.items() if k.endswith("slices/s")}
        assert result["name"] == "unet" and result["native bf16"] is native
        assert len(rates) == (2 if native else 1) and all(v > 0 for v in rates.values())
        assert any(k.startswith("smoke (64², base 4") for k in rates)
        if native:
            ratio = next(v for k, v in result.items() if k.endswith("bf16 / exact"))
            fp32, bf16 = (next(v for k, v in rates.items() if w in k) for w in ("exact", "bf16"))
            assert ratio == pytest.approx(bf16 / fp32)
    assert "\n" in bench.format_table(result)
