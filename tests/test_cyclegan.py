"""Section 2.C: the CycleGAN (networks, objective, training, resume, DDP, synthesis, CLI).

Small sizes throughout (32-64 pixel slices, 4-8 feature widths); the full-width networks are
only built on the meta device (no memory, no arithmetic). Training runs pin one CPU thread
(``cpu_threads: 1``), which keeps them fast and bit-reproducible on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmod_lib import cyclegan as cg
from crossmod_lib.errors import CrossmodError

REPO = Path(__file__).resolve().parents[1]
# The exact fp32 mode (no bf16, channels_last or compile): what the determinism and resume
# tests hold bit for bit.
TINY = {"ngf": 4, "ndf": 4, "n_blocks": 1, "epochs_constant": 1, "epochs_decay": 1,
        "batch_size": 2, "cpu_threads": 1, "seed": 7, "bf16": False, "channels_last": False,
        "compile": False}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: small tensors gain nothing from two, and lose a lot when the cores are
    shared with other processes (threads waiting for each other)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_npz(path: Path, n: int, size: int, seed: int) -> Path:
    images, masks = cg._synthetic_heads(n, size, seed)
    labels = np.zeros((n, size, size), np.uint8)
    labels[:, size // 2:size // 2 + 3, size // 4:size // 4 + 3] = 1
    np.savez_compressed(
        path, image=images.numpy(), head_mask=masks.numpy(), labels=labels,
        patient=np.array([f"p{k // 4}" for k in range(n)]),
        slice_index=np.arange(n, dtype=np.int32), z_mm=np.arange(n, dtype=np.float32) * 2.5)
    return path


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slices")
    return (write_npz(folder / "ct_slices.npz", 12, 32, seed=1),
            write_npz(folder / "mr_slices.npz", 8, 32, seed=2))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Real prepared slices: a one-patient phantom through section 2.A at the smoke crop (64)."""
    from crossmod_lib import config, phantom, preparation

    folder = tmp_path_factory.mktemp("phantom")
    phantom.write_phantom(folder / "raw", seed=3, n_ct=1, n_mr=1, ct_matrix=256,
                          ct_slices=(40, 40), mr_matrix=512, mr_slices=12, workers=1,
                          progress=False)
    settings = config.load_profile("smoke")["preprocessing"]
    coverage = preparation.mr_coverage_mm(folder / "raw" / "mr")
    preparation.prepare_cohort(folder / "raw" / "mr", "MR", settings, folder / "prepared",
                               progress=False)
    preparation.prepare_cohort(folder / "raw" / "ct", "CT", settings, folder / "prepared",
                               coverage_mm=coverage, progress=False)
    return folder / "prepared" / "ct_slices.npz", folder / "prepared" / "mr_slices.npz"


def checkpoint_parameters(path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{net}.{key}": value for net, state in data["networks"].items()
            for key, value in state.items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def run_cli(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "crossmod_lib.cyclegan", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ----------------------------------------------------------------------------------------------
# Networks (paper Fig. 4)


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out          # every convolution has a bias (instance norm)


def test_parameter_counts_equal_the_reference_architecture():
    # Reference ResnetGenerator(1, 1, ngf=64, n_blocks=9, instance norm without affine, use_bias):
    g = (conv_params(1, 64, 7) + conv_params(64, 128, 3) + conv_params(128, 256, 3)
         + 9 * 2 * conv_params(256, 256, 3)
         + conv_params(256, 128, 3) + conv_params(128, 64, 3) + conv_params(64, 1, 7))
    # Reference NLayerDiscriminator(1, ndf=64, n_layers=3):
    d = (conv_params(1, 64, 4) + conv_params(64, 128, 4) + conv_params(128, 256, 4)
         + conv_params(256, 512, 4) + conv_params(512, 1, 4))
    assert g == 11_365_633
    assert d == 2_762_689
    with torch.device("meta"):
        assert cg.count_parameters(cg.Generator(1, 1, 64, 9)) == g
        assert cg.count_parameters(cg.Discriminator(1, 64)) == d


def test_flop_counter_matches_hand_count():
    with torch.device("meta"):
        generator, discriminator = cg.Generator(1, 1, 64, 9), cg.Discriminator(1, 64)
    macs_g = (256**2 * 64 * 1 * 49 + 128**2 * 128 * 64 * 9 + 64**2 * 256 * 128 * 9
              + 18 * 64**2 * 256 * 256 * 9
              + 64**2 * 256 * 128 * 9 + 128**2 * 128 * 64 * 9   # transposed: input pixels
              + 256**2 * 1 * 64 * 49)
    macs_d = (128**2 * 64 * 16 + 64**2 * 128 * 64 * 16 + 32**2 * 256 * 128 * 16
              + 31**2 * 512 * 256 * 16 + 30**2 * 1 * 512 * 16)
    assert cg.flops_per_slice(generator, 256) == 2 * macs_g
    assert cg.flops_per_slice(discriminator, 256) == 2 * macs_d
    per_image = cg.training_flops_per_image({}, 256)
    assert per_image["total"] == 18 * 2 * macs_g + 12 * 2 * macs_d


def test_architecture_table_at_the_full_profile():
    from crossmod_lib.config import load_profile

    rows = cg.architecture_table(load_profile("full"))
    assert [r["parameters"] for r in rows[:4]] == [11_365_633] * 2 + [2_762_689] * 2
    assert rows[0]["gflops_per_slice"] == pytest.approx(97.46, abs=0.01)
    assert all(set(r) == {"name", "parameters", "gflops_per_slice"} for r in rows)


def test_generator_shape_and_range():
    torch.manual_seed(0)
    net = cg.init_weights(cg.Generator(1, 1, ngf=4, n_blocks=2))
    y = net(torch.randn(2, 1, 32, 32) * 3)
    assert y.shape == (2, 1, 32, 32)
    assert y.min() >= -1 and y.max() <= 1


def test_patchgan_gives_30x30_scores_with_a_70x70_receptive_field():
    torch.manual_seed(0)
    net = cg.init_weights(cg.Discriminator(1, ndf=2)).double()
    x = torch.randn(1, 1, 256, 256, dtype=torch.float64, requires_grad=True)
    assert net(x).shape == (1, 1, 30, 30)
    # The receptive field is the convolutions' (instance norm's statistics span the whole slice).
    for k, layer in enumerate(net.model):
        if isinstance(layer, cg.InstanceNorm):
            net.model[k] = torch.nn.Identity()
    net(x)[0, 0, 15, 15].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


# ----------------------------------------------------------------------------------------------
# Differentiable head mask and losses


def ellipse(size, a, b, cy=0.0, cx=0.0):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    return ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1


def test_soft_mask_fills_a_dark_hole_and_not_an_open_bay():
    head = ellipse(64, 0.7, 0.8)
    airway = ellipse(64, 0.12, 0.15, cy=0.1)
    bay = ellipse(64, 0.15, 0.3, cy=0.8)                     # dark notch open to the outside
    image = torch.where(head & ~airway & ~bay, 120.0, 3.0)
    mask = cg.soft_head_mask(image, value_range=(0.0, 255.0))
    assert torch.equal(mask > 0.5, head & ~bay)                  # airway counted as head
    assert mask[airway].min() > 0.99 and mask[~head].max() < 0.05


def test_soft_mask_is_differentiable_and_holes_take_the_weakest_wall():
    size = 24
    image = torch.zeros(size, size)                            # a one-pixel square wall
    image[5, 5:19] = image[18, 5:19] = image[5:19, 5] = image[5:19, 18] = 100.0
    weak = (12, 5)                                             # one pixel of the wall, dimmer
    image[weak] = 25.0                                         # logit (25 - 20) / 5 = 1
    x = (image / 127.5 - 1).requires_grad_()
    mask = cg.soft_head_mask(x)
    centre = (size // 2, size // 2)
    assert mask[centre].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    mask[centre].backward()
    assert torch.count_nonzero(x.grad) == 1 and x.grad[weak] > 0
    # Through the geometric loss every pixel gets a finite gradient, many non-zero.
    x.grad = None
    loss = cg.geometric_loss(x, torch.zeros(size, size))
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) > size * size // 2


def test_compiled_fill_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(cg, "_compiled_fill", broken)
    x = torch.rand(2, 1, 24, 24) * 2 - 1
    with pytest.warns(RuntimeWarning, match="eagerly"):
        compiled = cg.head_logits(x, compiled=True)
    assert cg._compiled_fill is False
    flat = (((x + 1.0) * 127.5 - cg.DEFAULT_HEAD_THRESHOLD) / 5.0).reshape(2, 24, 24)
    eager = cg._fill_sources_iterated((-flat).clamp_min(-cg._HEAD_CLIP))
    assert torch.equal(compiled, flat.flatten(1).gather(1, eager.flatten(1)).view_as(compiled))


@pytest.mark.parametrize("seed", range(6))
def test_reconstruction_fill_gives_the_iterated_escape_values(seed):
    # Noisy heads and pure noise: the one-shot reconstruction (the CPU path) and the iterated
    # steps (the GPU path) give every pixel the same escape value, and each source pixel holds
    # that value (a bottleneck of the wall, or the pixel itself).
    g = torch.Generator().manual_seed(seed)
    images, _ = cg._synthetic_heads(3, 40, seed=seed)
    noise = torch.randn(images.shape, generator=g) * (5.0 if seed % 2 else 60.0)
    logits = ((images.float() + noise) - 20.0) / 5.0
    outside = (-logits).clamp_min(-cg._HEAD_CLIP)
    iterated = cg._fill_sources_iterated(outside)
    reconstructed = cg._fill_sources_reconstruction(outside)
    value = lambda sources: outside.flatten(1).gather(1, sources.flatten(1))  # noqa: E731
    assert torch.equal(value(iterated), value(reconstructed))
    own = reconstructed.flatten(1) == torch.arange(40 * 40)
    assert own.float().mean() > 0.5 and (~own).any()            # some pixels are enclosed


def test_soft_mask_matches_the_prepared_head_mask(prepared):
    for path in prepared:
        data = np.load(path)
        soft = cg.soft_head_mask(torch.from_numpy(data["image"]).float(),
                                 threshold=20.0, value_range=(0.0, 255.0)) > 0.5
        hard = torch.from_numpy(data["head_mask"])
        dice = 2 * (soft & hard).sum((1, 2)) / (soft.sum((1, 2)) + hard.sum((1, 2)))
        assert dice.min() >= 0.95, (path.name, dice.min())


def test_geometric_loss_small_when_outlines_agree_large_when_not():
    images, masks = cg._synthetic_heads(4, 48, seed=0)
    x = images.float() / 127.5 - 1
    agree = cg.geometric_loss(x, masks.float())
    swapped = cg.geometric_loss(x, (~masks).float())
    shifted = cg.geometric_loss(x, torch.roll(masks, 12, dims=2).float())
    assert agree < 0.05
    assert swapped > 5 and shifted > 10 * agree


def test_geometric_targets_grow_the_ct_mask_and_shrink_the_mr_mask_by_the_offset():
    disc = np.hypot(*np.mgrid[-16:16, -16:16]) < 10
    ct = np.stack([disc, np.zeros_like(disc)])       # a head and an empty slice
    edge = np.zeros((2, 32, 32), bool)
    edge[:, :, :8] = True                            # a head cut by the crop's left edge
    same_ct, same_mr = cg.geometric_targets(ct, edge, 0)
    assert same_ct is not None and np.array_equal(same_ct, ct) and np.array_equal(same_mr, edge)
    grown, shrunk = cg.geometric_targets(ct, edge, 2)
    radius = lambda m: np.sqrt(m.sum() / np.pi)  # noqa: E731
    assert 1.5 < radius(grown[0]) - radius(ct[0]) < 2.5 and not grown[1].any()  # no slice bleeds into the next
    assert shrunk[0, :, :6].all() and not shrunk[0, :, 6:].any()  # only the inner edge moves, not the crop's
    back_ct, back_mr = cg.geometric_targets(grown, shrunk, -2)
    assert np.array_equal(back_ct, ct) and back_mr[0, :, :8].all()
    with pytest.raises(CrossmodError, match="cyclegan.geo_mask_offset_px"):
        cg.check_settings({"geo_mask_offset_px": 1.5})
    assert cg.check_settings({})["geo_mask_offset_px"] == 0   # the paper: the masks as they are


def test_training_with_a_mask_offset_holds_the_translations_to_the_moved_masks(tiny_data, tmp_path):
    ct, mr = tiny_data
    settings = {**TINY, "max_iterations_per_epoch": 1}
    plain = cg.train(ct, mr, tmp_path / "plain", settings, 20.0, progress=False)
    offset = cg.train(ct, mr, tmp_path / "offset", {**settings, "geo_mask_offset_px": 2}, 20.0, progress=False)
    log = lambda run: np.genfromtxt(run / cg.LOSSES_NAME, delimiter=",", names=True)  # noqa: E731
    first_plain, first_offset = log(tmp_path / "plain")[0], log(tmp_path / "offset")[0]
    # the same networks and slices at the first iteration: only the masks they are held to differ
    assert first_plain["cycle_CT"] == first_offset["cycle_CT"]
    assert first_plain["geo_CT"] != first_offset["geo_CT"]
    assert json.loads((tmp_path / "offset" / cg.SETTINGS_NAME).read_text())["geo_mask_offset_px"] == 2
    assert plain["iteration"] == offset["iteration"] == 2


def test_lsgan_targets():
    assert cg.lsgan_loss(torch.ones(2, 1, 3, 3), True) == 0
    assert cg.lsgan_loss(torch.zeros(2, 1, 3, 3), False) == 0
    assert cg.lsgan_loss(torch.zeros(2, 1, 3, 3), True) == 1
    assert cg.lsgan_loss(torch.full((1, 1, 2, 2), 0.5), False) == 0.25


def test_image_pool_semantics():
    assert torch.equal(cg.ImagePool(0).query(torch.ones(3, 1, 2, 2)), torch.ones(3, 1, 2, 2))
    pool, g = cg.ImagePool(50), torch.Generator().manual_seed(0)
    for k in range(25):                                       # filling: returned and stored
        batch = torch.full((2, 1, 2, 2), float(k))
        assert torch.equal(pool.query(batch, g), batch)
    assert len(pool.images) == 50
    swapped = 0
    for k in range(200):
        new = torch.full((1, 1, 2, 2), 1000.0 + k)
        out = pool.query(new, g)
        if not torch.equal(out, new):
            swapped += 1
            assert out[0, 0, 0, 0].item() < 1000 + k          # an older image from the pool
            assert any(torch.equal(im, new[0]) for im in pool.images)   # new one stored
    assert 70 < swapped < 130                                 # probability 1/2
    assert len(pool.images) == 50
    copy = cg.ImagePool(50)
    copy.load(pool.state())
    assert all(torch.equal(a, b) for a, b in zip(copy.images, pool.images))


def test_learning_rate_constant_then_linear_to_zero():
    assert [cg.lr_factor(e, 2, 2) for e in range(4)] == pytest.approx([1, 1, 2 / 3, 1 / 3])
    factors = [cg.lr_factor(e, 100, 100) for e in range(200)]
    assert factors[:100] == [1.0] * 100
    assert factors[100] == pytest.approx(100 / 101) and factors[199] == pytest.approx(1 / 101)
    steps = np.diff(factors[99:])
    assert np.allclose(steps, -1 / 101)                       # linear, reaching 0 at epoch 200


def test_step_runs_with_bf16_and_channels_last_on_cpu():
    # The GPU's fast path (bf16 autocast, channels_last), exercised on the CPU.
    torch.manual_seed(0)
    model = cg.CycleGAN({**TINY}, 20.0, "cpu", bf16=True, channels_last=True,
                        draw_generator=torch.Generator().manual_seed(0))
    images, masks = cg._synthetic_heads(4, 32, seed=0)
    losses = model.step(model.prepare(images[:2]), model.prepare(images[2:]),
                        masks[:2].unsqueeze(1), masks[2:].unsqueeze(1))
    assert losses.shape == (len(cg.LOSS_TERMS),) and torch.isfinite(losses).all()


# ----------------------------------------------------------------------------------------------
# Settings and profiles


def test_full_profile_block_holds_every_setting_with_the_paper_values():
    from crossmod_lib.config import load_profile

    full = load_profile("full")
    assert set(full["cyclegan"]) == set(cg.DEFAULT_SETTINGS)
    assert full["cyclegan"] == cg.DEFAULT_SETTINGS
    # the paper's values, read from full.yaml (the one place they are written)
    paper = {"ngf": 64, "ndf": 64, "n_blocks": 9, "epochs_constant": 100, "epochs_decay": 100,
             "batch_size": 1, "lr": 2e-4, "beta1": 0.5, "lambda_adv": 1.0, "lambda_cycle": 10.0,
             "lambda_geo": 10.0, "geometric_loss": True}
    assert {k: cg.DEFAULT_SETTINGS[k] for k in paper} == paper
    for name in ("demo", "smoke"):
        cg.check_settings(load_profile(name)["cyclegan"])
    settings = cg.settings_from_profile(full)
    assert settings["seed"] == full["seed"] and settings["head_threshold"] == 20


def test_bad_settings_are_one_line_errors():
    with pytest.raises(CrossmodError, match="cyclegan.ngff"):
        cg.check_settings({"ngff": 3})
    with pytest.raises(CrossmodError, match="cyclegan.lr"):
        cg.check_settings({"lr": -1})
    with pytest.raises(CrossmodError, match="cyclegan.geometric_loss"):
        cg.check_settings({"geometric_loss": "yes"})
    assert cg.ablation_settings({"ablation_iterations_per_epoch": 3}, False)[
        "max_iterations_per_epoch"] == 3


# ----------------------------------------------------------------------------------------------
# Training: log, determinism, resume, checkpoints


def test_training_log_and_schedule(tiny_data, tmp_path):
    ct, mr = tiny_data
    settings = {**TINY, "epochs_constant": 1, "epochs_decay": 2, "max_iterations_per_epoch": 2}
    summary = cg.train(ct, mr, tmp_path, settings, 20.0, progress=False)
    assert summary["completed"] and summary["iteration"] == 6
    with open(tmp_path / "losses.csv") as handle:
        header = handle.readline().strip().split(",")
        rows = [line.strip().split(",") for line in handle]
    assert header == ["epoch", "iteration", *cg.LOSS_TERMS, "lr", "seconds"]
    assert [int(r[1]) for r in rows] == list(range(1, 7))
    lrs = {int(r[0]): float(r[-2]) for r in rows}
    assert lrs == pytest.approx({1: 2e-4, 2: 2e-4 * 2 / 3, 3: 2e-4 / 3}, rel=1e-5)
    assert all(np.isfinite([float(v) for v in r[2:]]).all() for r in rows)


def test_same_seed_same_weights(tiny_data, tmp_path):
    ct, mr = tiny_data
    a = cg.train(ct, mr, tmp_path / "a", TINY, 20.0, progress=False)
    b = cg.train(ct, mr, tmp_path / "b", TINY, 20.0, progress=False)
    assert a["weights_digest"] == b["weights_digest"]
    assert_bit_identical(checkpoint_parameters(tmp_path / "a" / "checkpoint.pt"),
                         checkpoint_parameters(tmp_path / "b" / "checkpoint.pt"))
    c = cg.train(ct, mr, tmp_path / "c", {**TINY, "seed": 8}, 20.0, progress=False)
    assert c["weights_digest"] != a["weights_digest"]


def test_resume_after_a_stop_mid_epoch_is_bit_identical(tiny_data, tmp_path):
    ct, mr = tiny_data
    settings = {**TINY, "pool_size": 3}                       # pool full and swapping by then
    whole = cg.train(ct, mr, tmp_path / "whole", settings, 20.0, progress=False)
    first = cg.train(ct, mr, tmp_path / "split", settings, 20.0, progress=False,
                     max_iterations=8)                         # epoch 2 of 2, iteration 2 of 6
    assert not first["completed"] and first["iteration"] == 8
    rest = cg.train(ct, mr, tmp_path / "split", settings, 20.0, progress=False, resume=True)
    assert rest["completed"] and rest["iterations_this_call"] == 4
    assert rest["weights_digest"] == whole["weights_digest"]
    assert_bit_identical(checkpoint_parameters(tmp_path / "whole" / "checkpoint.pt"),
                         checkpoint_parameters(tmp_path / "split" / "checkpoint.pt"))
    lines = (tmp_path / "split" / "losses.csv").read_text().splitlines()
    assert [int(line.split(",")[1]) for line in lines[1:]] == list(range(1, 13))


def test_resume_after_the_process_is_killed_is_bit_identical(tiny_data, tmp_path):
    ct, mr = tiny_data
    settings = {**TINY, "batch_size": 1, "pool_size": 4,      # 12 iterations per epoch,
                "epochs_decay": 2}                             # 3 epochs
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**settings, "head_threshold": 20.0}))
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "crossmod_lib.cyclegan", "train", "--ct", ct, "--mr", mr,
         "--out", out, "--config", config, "--no-progress"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "checkpoint.pt").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)                       # in epoch 2 (or 3 if slow)
    process.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)["state"]
    assert state["epoch"] in (1, 2) and state["iteration"] == 12 * state["epoch"]
    resumed = cg.train(ct, mr, out, settings, 20.0, progress=False, resume=True)
    cg.train(ct, mr, tmp_path / "whole", settings, 20.0, progress=False)
    assert resumed["completed"] and resumed["iterations_this_call"] == 36 - state["iteration"]
    assert_bit_identical(checkpoint_parameters(out / "checkpoint.pt"),
                         checkpoint_parameters(tmp_path / "whole" / "checkpoint.pt"))


def test_branch_of_a_constant_rate_trunk_equals_a_run_of_that_length(tiny_data, tmp_path):
    # the convergence study's saving: budgets of k + k epochs branch off one constant-rate trunk
    ct, mr = tiny_data
    trunk = {**TINY, "epochs_constant": 3, "epochs_decay": 0}
    budget = {**TINY, "epochs_constant": 2, "epochs_decay": 2}
    cg.train(ct, mr, tmp_path / "trunk", trunk, 20.0, progress=False, max_iterations=12)
    cg.branch(tmp_path / "trunk", tmp_path / "branch", budget, 20.0)
    branched = cg.train(ct, mr, tmp_path / "branch", budget, 20.0, progress=False, resume=True)
    whole = cg.train(ct, mr, tmp_path / "whole", budget, 20.0, progress=False)
    assert branched["completed"] and branched["iterations_this_call"] == 12
    assert branched["weights_digest"] == whole["weights_digest"]
    lrs = [line.split(",")[-2] for line in (tmp_path / "branch" / "losses.csv").read_text().splitlines()]
    assert lrs == [line.split(",")[-2] for line in (tmp_path / "whole" / "losses.csv").read_text().splitlines()]
    # the trunk carries on after the branch as if never stopped (its last epoch at rate 1 too)
    cg.train(ct, mr, tmp_path / "trunk", trunk, 20.0, progress=False, resume=True)
    cg.branch(tmp_path / "trunk", tmp_path / "long", {**TINY, "epochs_constant": 3,
                                                      "epochs_decay": 3}, 20.0)


def test_a_constant_rate_trunk_lengthened_onto_itself_equals_the_longer_trunk(tiny_data, tmp_path):
    # a study carried on with a larger budget: its trunk's checkpoint is branched onto itself
    ct, mr = tiny_data
    short = {**TINY, "epochs_constant": 2, "epochs_decay": 0}
    longer = {**TINY, "epochs_constant": 3, "epochs_decay": 0}
    cg.train(ct, mr, tmp_path / "trunk", short, 20.0, progress=False)
    with pytest.raises(CrossmodError, match="epochs_constant"):
        cg.train(ct, mr, tmp_path / "trunk", longer, 20.0, progress=False, resume=True)
    cg.branch(tmp_path / "trunk", tmp_path / "trunk", longer, 20.0)
    lengthened = cg.train(ct, mr, tmp_path / "trunk", longer, 20.0, progress=False, resume=True)
    whole = cg.train(ct, mr, tmp_path / "whole", longer, 20.0, progress=False)
    assert lengthened["completed"] and lengthened["iterations_this_call"] == 6
    assert lengthened["weights_digest"] == whole["weights_digest"]
    def logged(run):  # every column but the seconds
        return [line.rsplit(",", 1)[0] for line in (tmp_path / run / "losses.csv").read_text().splitlines()]

    assert logged("trunk") == logged("whole")


def assert_refused_where_it_does_not_apply(tiny_data, tmp_path, key, value, bad, not_for):
    """A CycleGAN-only training setting ``key`` set to ``value``: a run started with it does not
    resume without it, CUT refuses it (``not_for``: the message's tail) and ``bad`` is refused."""
    ct, mr = tiny_data
    with pytest.raises(CrossmodError, match=key):
        cg.train(ct, mr, tmp_path / "part", TINY, 20.0, progress=False, resume=True)
    with pytest.raises(CrossmodError, match=f"{key}.*{not_for}"):
        cg.check_settings({**TINY, key: value, "translator": not_for.split("'")[1]})
    with pytest.raises(CrossmodError, match=f"cyclegan.{key}"):
        cg.check_settings({**TINY, key: bad})


def assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, settings, split, part="part"):
    """A training option draws random numbers: it changes the weights against TINY, and a run
    stopped after ``split`` iterations and resumed ends bit-identical to one run through."""
    ct, mr = tiny_data
    whole = cg.train(ct, mr, tmp_path / "whole", settings, 20.0, progress=False)
    plain = cg.train(ct, mr, tmp_path / "plain", TINY, 20.0, progress=False)
    assert whole["weights_digest"] != plain["weights_digest"]
    cg.train(ct, mr, tmp_path / part, settings, 20.0, progress=False, max_iterations=split)
    resumed = cg.train(ct, mr, tmp_path / part, settings, 20.0, progress=False, resume=True)
    assert resumed["weights_digest"] == whole["weights_digest"]


def test_cycle_noise_changes_training_and_resumes_exactly(tiny_data, tmp_path):
    noisy = {**TINY, "cycle_noise_sd": 0.3}
    assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, noisy, split=4)
    assert_refused_where_it_does_not_apply(tiny_data, tmp_path, "cycle_noise_sd", 0.3, -0.1, "'cut' has none")


def test_branch_refuses_what_a_fresh_run_would_not_have_done(tiny_data, tmp_path):
    ct, mr = tiny_data
    cg.train(ct, mr, tmp_path / "run", TINY, 20.0, progress=False)       # 1 + 1: decayed
    with pytest.raises(CrossmodError, match="learning rate"):
        cg.branch(tmp_path / "run", tmp_path / "b", {**TINY, "epochs_constant": 3}, 20.0)
    with pytest.raises(CrossmodError, match="cyclegan.ngf"):
        cg.branch(tmp_path / "run", tmp_path / "b", {**TINY, "ngf": 8, "epochs_decay": 3}, 20.0)
    cg.train(ct, mr, tmp_path / "mid", {**TINY, "epochs_constant": 2}, 20.0, progress=False,
             max_iterations=3)
    with pytest.raises(CrossmodError, match="epoch boundary"):
        cg.branch(tmp_path / "mid", tmp_path / "c", {**TINY, "epochs_constant": 2}, 20.0)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_resume_refuses_other_settings(tiny_data, tmp_path):
    ct, mr = tiny_data
    cg.train(ct, mr, tmp_path, TINY, 20.0, progress=False, max_iterations=2)
    with pytest.raises(CrossmodError, match="cyclegan.ngf"):
        cg.train(ct, mr, tmp_path, {**TINY, "ngf": 8}, 20.0, progress=False, resume=True)
    with pytest.raises(CrossmodError, match="cyclegan.random_flip"):
        cg.train(ct, mr, tmp_path, {**TINY, "random_flip": True}, 20.0, progress=False, resume=True)
    # a checkpoint from before the random-crop settings existed ran without them: it resumes
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key in ("random_crop_scale", "random_flip"):
        del checkpoint["settings"][key]
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    assert cg.train(ct, mr, tmp_path, TINY, 20.0, progress=False, resume=True)["completed"]


def test_jitter_batch_crops_scaled_slices_and_mirrors_with_the_mask():
    images, masks = cg._synthetic_heads(6, 32, seed=3)
    x, m = images.float().unsqueeze(1) / 255, masks.unsqueeze(1)
    same = cg.jitter_batch(x, m, torch.Generator().manual_seed(0), 1.0, False)
    assert torch.equal(same[0], x) and torch.equal(same[1], m)
    a = cg.jitter_batch(x, m, torch.Generator().manual_seed(0), 1.25, True)
    b = cg.jitter_batch(x, m, torch.Generator().manual_seed(0), 1.25, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])       # seeded
    assert a[0].shape == x.shape and a[1].shape == m.shape and a[1].dtype == m.dtype
    assert not torch.equal(a[0], x)
    # the mask moves with its slice: bright pixels stay inside the head
    assert float(a[0][~a[1]].mean()) < 0.05 and float(a[0][a[1]].mean()) > 0.3
    scaled = a[1].sum(dim=(1, 2, 3)).float() / m.sum(dim=(1, 2, 3)).float()
    assert bool(((scaled > 1.1) & (scaled < 1.7)).all())               # enlarged (1.25**2, less what is cut)
    flipped = cg.jitter_batch(x, m, torch.Generator().manual_seed(1), 1.0, True)[0]
    mirrored = [torch.equal(flipped[k], x[k].flip(-1)) for k in range(6)]
    assert any(mirrored) and not all(mirrored)
    with pytest.raises(CrossmodError, match="cyclegan.random_crop_scale"):
        cg.check_settings({"random_crop_scale": 0.9})


def test_resume_with_random_crops_is_bit_identical(tiny_data, tmp_path):
    settings = {**TINY, "random_crop_scale": 1.12, "random_flip": True}
    assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, settings, split=5, part="split")


class NotAWeight:
    pass


def test_checkpoints_load_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": NotAWeight()}, path)
    with pytest.raises(CrossmodError, match="cannot read checkpoint"):
        cg.load_checkpoint(path)


# ----------------------------------------------------------------------------------------------
# Several processes, synthesis, command line, imports


def test_ddp_gloo_two_processes_end_identical(tiny_data, tmp_path):
    ct, mr = tiny_data
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**TINY, "batch_size": 1, "max_iterations_per_epoch": 3,
                                  "head_threshold": 20.0}))
    out = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "crossmod_lib.cyclegan", "train", "--ct", ct, "--mr", mr, "--out", out,
         "--config", config, "--no-progress", "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["completed"]
    assert len(summary["rank_digests"]) == 2 and summary["ranks_identical"]
    assert summary["iteration"] == 6                          # 2 epochs x 3 iterations
    assert (out / "ranks").is_dir() and len(list((out / "ranks").glob("rank1-it6.pt"))) == 1


def test_synthesis_and_example_grid(prepared, tmp_path):
    ct, mr = prepared
    settings = {**TINY, "max_iterations_per_epoch": 2}
    cg.train(ct, mr, tmp_path / "run", settings, 20.0, progress=False)
    out = tmp_path / "synthetic_mr.npz"
    summary = cg.synthesise(tmp_path / "run" / "checkpoint.pt", ct, out, batch_size=8)
    source, result = np.load(ct), np.load(out)
    assert summary["slices"] == len(source["image"])
    assert set(result.files) == {"image", "reconstructed_ct", "labels", "head_mask", "patient",
                                 "slice_index", "z_mm"}
    for key in ("image", "reconstructed_ct"):
        assert result[key].dtype == np.uint8 and result[key].shape == source["image"].shape
    for key in ("labels", "head_mask", "patient", "slice_index", "z_mm"):
        assert np.array_equal(result[key], source[key])
    grid = cg.example_grid(tmp_path / "run" / "checkpoint.pt", ct, mr, [0, 5, 9])
    for key in ("ct", "synthetic_mr", "reconstructed_ct", "mr", "synthetic_ct",
                "reconstructed_mr"):
        assert grid[key].shape == (3, 64, 64) and grid[key].dtype == np.uint8
    assert np.array_equal(grid["synthetic_mr"], result["image"][[0, 5, 9]])


def test_command_line_trains_and_synthesises(prepared, tmp_path):
    ct, mr = prepared
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({**TINY, "max_iterations_per_epoch": 2, "head_threshold": 20}))
    result = run_cli("train", "--ct", ct, "--mr", mr, "--out", tmp_path / "run", "--config",
                     config, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["completed"]
    result = run_cli("synthesise", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--ct", ct,
                     "--out", tmp_path / "syn.npz")
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(tmp_path / "syn.npz")["image"].shape == np.load(ct)["image"].shape
    config.write_text(json.dumps({"ngf": 4}))
    result = run_cli("train", "--ct", ct, "--mr", mr, "--out", tmp_path / "x", "--config", config)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "head_threshold" in result.stderr


def test_bench_reports_both_modes():
    result = cg.bench_cyclegan({**TINY}, 32, device="cpu", iterations=1, warmup=1, batch_size=2)
    assert result["name"] == "cyclegan"
    assert result["reference_images_per_s"] > 0 and result["fast_images_per_s"] > 0
    assert result["speedup"] == pytest.approx(
        result["fast_images_per_s"] / result["reference_images_per_s"])
    assert result["peak_bf16_tflops"] is None                 # CPU: no tensor-core peak


def test_fast_cpu_mode_is_reproducible_and_close_to_exact(tiny_data, tmp_path):
    # The fast mode (bf16 autocast where the CPU has it, channels_last) trains the same seed to
    # the same weights twice, and its losses follow the exact fp32 run's.
    ct, mr = tiny_data
    fast = {**TINY, "bf16": True, "channels_last": True, "max_iterations_per_epoch": 3}
    a = cg.train(ct, mr, tmp_path / "a", fast, 20.0, progress=False)
    b = cg.train(ct, mr, tmp_path / "b", fast, 20.0, progress=False)
    exact = cg.train(ct, mr, tmp_path / "e", {**fast, "bf16": False, "channels_last": False},
                     20.0, progress=False)
    assert a["weights_digest"] == b["weights_digest"]
    assert a["speed_mode"].startswith("bf16" if cg.cpu_has_native_bf16() else "channels_last")
    assert exact["speed_mode"] == "fp32 exact"
    losses = [np.genfromtxt(tmp_path / run / "losses.csv", delimiter=",", names=True)["G_total"]
              for run in ("a", "e")]
    assert np.allclose(losses[0], losses[1], rtol=0.05)


def test_compiled_fast_mode_trains_the_same_weights_twice(tiny_data, tmp_path):
    # The profiles' CycleGAN mode (bf16 where the CPU has it, channels_last, torch.compile) is
    # what every recorded tier ran: the same seed and data must give the same weights run to run,
    # or a difference between two recorded runs could be the compiler's and not the data's.
    ct, mr = tiny_data
    fast = {**TINY, "bf16": True, "channels_last": True, "compile": True,
            "max_iterations_per_epoch": 2}
    a = cg.train(ct, mr, tmp_path / "a", fast, 20.0, progress=False)
    b = cg.train(ct, mr, tmp_path / "b", fast, 20.0, progress=False)
    assert "compile" in a["speed_mode"]
    assert a["weights_digest"] == b["weights_digest"]
    eager = cg.train(ct, mr, tmp_path / "e", {**fast, "compile": False}, 20.0, progress=False)
    losses = [np.genfromtxt(tmp_path / run / "losses.csv", delimiter=",", names=True)["G_total"]
              for run in ("a", "e")]
    assert np.allclose(losses[0], losses[1], rtol=0.05)


def test_instance_norm_is_the_reference_in_fp32_and_close_in_bf16():
    x = torch.randn(3, 5, 12, 12) * 4 + 2
    reference = torch.nn.InstanceNorm2d(5)(x)
    norm = cg.InstanceNorm(5)
    assert torch.equal(norm(x), reference)
    low = norm(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), reference, atol=0.05)
    assert list(norm.state_dict()) == []


def test_speed_mode_names_the_options():
    s = cg.check_settings({**TINY, "bf16": False, "channels_last": True, "compile": True})
    assert cg.speed_mode(s, "cpu", 4) == "channels_last + compile, batch 4"
    assert cg.speed_mode({**s, "channels_last": False, "compile": False}, "cpu") == "fp32 exact"


def test_import_needs_only_torch_and_numpy():
    code = ("import sys, crossmod_lib.cyclegan; "
            "print(sorted(m for m in ('SimpleITK', 'scipy', 'pandas', 'matplotlib', 'yaml') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_parotid_contrast_measures_the_inversion(tmp_path):
    from crossmod_lib.slices import write_slices

    labels = np.zeros((2, 8, 8), np.uint8)
    labels[:, 2:4, 2:4] = 1
    head = np.zeros((2, 8, 8), bool)
    head[:, 1:7, 1:7] = True
    dark = np.where(head, 100, 0).astype(np.uint8)
    dark[labels > 0] = 50        # CT-like: the gland darker than its surroundings
    bright = np.where(head, 100, 0).astype(np.uint8)
    bright[labels > 0] = 200     # T2w-like: brighter
    for name, image in (("syn.npz", dark), ("mr.npz", bright)):
        write_slices({"image": image, "labels": labels, "head_mask": head}, tmp_path / name)
    syn, real = cg.parotid_contrast(tmp_path / "syn.npz", tmp_path / "mr.npz")
    assert syn["parotid mean"] == 50 and syn["rest of head mean"] == 100
    assert syn["parotid / rest of head"] == 0.5 and real["parotid / rest of head"] == 2.0
    write_slices({"image": bright, "labels": np.zeros_like(labels), "head_mask": head}, tmp_path / "none.npz")
    with pytest.raises(CrossmodError, match="no parotid"):
        cg.parotid_contrast(tmp_path / "none.npz", tmp_path / "mr.npz")


# ----------------------------------------------------------------------------------------------
# CUT / FastCUT (crossmod_lib.cut), trained by the same loop


def test_patch_nce_prefers_the_same_location():
    from crossmod_lib import cut

    torch.manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(2, 32, 16), dim=-1)
    aligned = cut.patch_nce_loss(keys.clone(), keys)
    shuffled = cut.patch_nce_loss(keys[:, torch.randperm(32)], keys)
    assert aligned < 0.5 < shuffled                     # log(32) = 3.5 for chance
    query = keys.clone().requires_grad_(True)
    cut.patch_nce_loss(query, keys.requires_grad_(True)).backward()
    assert query.grad is not None and keys.grad is None  # no gradient through the keys


def test_nce_layers_exist_in_the_generator():
    from crossmod_lib import cut

    for n_blocks in (0, 1, 6, 9):
        layers = cut.nce_layers(n_blocks)
        generator = cg.Generator(1, 1, 4, n_blocks)
        features = cut.encode(generator, torch.zeros(1, 1, 16, 16), layers)
        assert len(features) == len(layers) == len(set(layers))
        assert features[0].shape[1] == 1                # pixel patches of the padded input


@pytest.mark.parametrize("translator", ["cut", "fastcut"])
def test_cut_trains_resumes_and_synthesises_through_the_same_loop(tiny_data, tmp_path, translator):
    ct, mr = tiny_data
    settings = {**TINY, "translator": translator, "nce_patches": 16, "nce_features": 8}
    whole = cg.train(ct, mr, tmp_path / "whole", settings, 20.0, progress=False)
    cg.train(ct, mr, tmp_path / "split", settings, 20.0, progress=False, max_iterations=8)
    rest = cg.train(ct, mr, tmp_path / "split", settings, 20.0, progress=False, resume=True)
    assert rest["weights_digest"] == whole["weights_digest"]      # exact resume, as the CycleGAN
    header = (tmp_path / "whole" / "losses.csv").read_text().splitlines()[0].split(",")
    assert header[2:-2] == list(__import__("crossmod_lib.cut", fromlist=["x"]).LOSS_TERMS)
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert set(state["networks"]) == {"g_mr", "d_mr", "f_mr"}     # one generator, no G_CT / D_CT
    out = cg.synthesise(tmp_path / "whole" / "checkpoint.pt", ct, tmp_path / "syn.npz", settings)
    synthetic = np.load(tmp_path / "syn.npz")
    assert out["slices"] == len(np.load(ct)["image"]) and "reconstructed_ct" not in synthetic.files
    grid = cg.example_grid(tmp_path / "whole" / "checkpoint.pt", ct, mr, [0, 1], settings=settings)
    assert set(grid) == {"ct", "synthetic_mr", "mr", "ct_indices", "mr_indices"}
    idt = __import__("pandas").read_csv(tmp_path / "whole" / "losses.csv")["nce_idt_MR"]
    assert (idt > 0).all() if translator == "cut" else (idt == 0).all()


def test_translator_settings_are_checked(tiny_data, tmp_path):
    with pytest.raises(CrossmodError, match="translator"):
        cg.check_settings({**TINY, "translator": "unit"})
    with pytest.raises(CrossmodError, match="nce_temperature"):
        cg.check_settings({**TINY, "translator": "cut", "nce_temperature": 0})
    ct, mr = tiny_data
    cg.train(ct, mr, tmp_path, TINY, 20.0, progress=False, max_iterations=2)
    with pytest.raises(CrossmodError, match="cyclegan.translator"):
        cg.train(ct, mr, tmp_path, {**TINY, "translator": "cut"}, 20.0, progress=False, resume=True)


def test_settings_without_pyyaml_need_a_complete_config(monkeypatch):
    # A bare GPU machine has torch and numpy, maybe no PyYAML: the CPU side writes the JSON config
    # complete (settings_from_profile), and check_settings takes it as it is.
    from crossmod_lib.config import load_profile

    from crossmod_lib import defaults

    complete = cg.settings_from_profile(load_profile("smoke"))

    def no_yaml():
        raise ImportError("No module named 'yaml'")

    monkeypatch.setattr(defaults, "_full_profile", no_yaml)
    assert cg.DEFAULT_SETTINGS is None
    assert cg.check_settings(dict(complete)) == complete
    incomplete = {k: v for k, v in complete.items() if k != "ngf"}
    with pytest.raises(CrossmodError, match="'cyclegan.ngf' is missing, and without PyYAML"):
        cg.check_settings(incomplete)


@pytest.mark.parametrize("seed", [0, 1])
def test_resize_upsampling_leaves_no_checkerboard(seed):
    """A constant slice far from the borders: the transposed convolutions' uneven overlap writes
    a pattern into the output; a resize then convolution keeps it flat."""
    torch.manual_seed(seed)
    inner = {}
    for upsampling in cg.UPSAMPLING:
        net = cg.Generator(1, 1, ngf=8, n_blocks=1, upsampling=upsampling).eval()
        with torch.no_grad():
            out = net(torch.full((1, 1, 128, 128), 0.3))[0, 0]
        inner[upsampling] = float(out[48:-48, 48:-48].std())
    assert inner["transpose"] > 0.01
    assert inner["resize"] < 1e-5


def test_upsampling_setting_is_checked_and_defaults_to_the_papers():
    settings = cg.check_settings({})
    assert settings["upsampling"] == "transpose"  # a checkpoint from before the setting: as trained
    with pytest.raises(CrossmodError, match="cyclegan.upsampling' must be one of transpose, resize"):
        cg.check_settings({"upsampling": "bilinear"})
    resize = cg.Generator(1, 1, ngf=8, n_blocks=1, upsampling="resize")
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in resize.modules())
    flops = {u: cg.training_flops_per_image({"ngf": 8, "ndf": 8, "n_blocks": 1, "upsampling": u}, 32)["total"]
             for u in cg.UPSAMPLING}
    assert flops["resize"] > flops["transpose"]  # the convolutions run at the enlarged size


def test_a_resize_checkpoint_loads_back_with_its_upsampling(tiny_data, tmp_path):
    ct, mr = tiny_data
    cg.train(ct, mr, tmp_path / "run", {**TINY, "upsampling": "resize"}, 20.0, progress=False)
    checkpoint = tmp_path / "run" / cg.CHECKPOINT_NAME
    g_mr, g_ct = cg.load_generators(checkpoint, device="cpu")
    assert any(isinstance(m, torch.nn.Upsample) for m in g_mr.modules())
    with pytest.raises(CrossmodError, match="upsampling=transpose"):  # the wrong architecture, named
        cg.load_generators(checkpoint, {**TINY, "upsampling": "transpose"}, device="cpu")


def test_disc_augment_changes_training_and_resumes_exactly(tiny_data, tmp_path):
    ct, mr = tiny_data
    augmented = {**TINY, "disc_augment": ["brightness", "contrast", "translation", "cutout"]}
    assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, augmented, split=4)
    with pytest.raises(CrossmodError, match="disc_augment"):  # a checkpoint of other settings
        cg.train(ct, mr, tmp_path / "part", TINY, 20.0, progress=False, resume=True)
    with pytest.raises(CrossmodError, match="disc_augment' must be a list of distinct names"):
        cg.check_settings({**TINY, "disc_augment": ["colour"]})
    with pytest.raises(CrossmodError, match="disc_augment' must be a list"):
        cg.check_settings({**TINY, "disc_augment": "translation"})
    with pytest.raises(CrossmodError, match="disc_augment.*'cut' does not use it"):
        cg.check_settings({**augmented, "translator": "cut"})


def test_disc_augment_moves_each_slice_on_its_own_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.linspace(-1, 1, 32 * 32).view(1, 1, 32, 32).repeat(6, 1, 1, 1).requires_grad_(True)
    shifted = cg.disc_augment(x, ["translation"])
    assert shifted.shape == x.shape
    assert len({tuple(s.flatten()[:40].tolist()) for s in shifted.detach()}) > 1  # per slice
    for k in range(6):  # a shift: each slice is the input moved, its uncovered border -1
        s, found = shifted[k, 0].detach(), False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                moved = torch.full_like(s, -1.0)
                src = x[k, 0].detach()
                moved[max(dy, 0):32 + min(dy, 0), max(dx, 0):32 + min(dx, 0)] = \
                    src[max(-dy, 0):32 + min(-dy, 0), max(-dx, 0):32 + min(-dx, 0)]
                found |= torch.equal(moved, s)
        assert found
    holes = cg.disc_augment(x, ["cutout"]).detach()
    assert ((holes == 0) & (x.detach() != 0)).flatten(1).sum(1).eq(16 * 16).all()  # a 16 x 16 square each
    cg.disc_augment(x, ["brightness", "contrast", "translation", "cutout"]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert cg.disc_augment(x, []) is x


def _smooth_field(seed: int, size: int = 40) -> torch.Tensor:
    """A smooth random image [2, 1, size, size]: structure at a few pixels' scale."""
    noise = torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return cg._gaussian_blur(noise, 2.0)


def test_mind_descriptor_ignores_contrast_but_not_moved_edges():
    x = _smooth_field(0)
    descriptor = cg.mind_descriptor(x)
    assert descriptor.shape == (2, 8, 40, 40)
    assert float(descriptor.amax(1).min()) == pytest.approx(1.0)     # each pixel's largest is 1
    assert float(descriptor.min()) > 0
    # CT -> T2 MR inverts contrasts: an inverted or rescaled image describes the same
    for same in (-x, 3.0 * x + 0.5, 1.0 - 0.2 * x):
        difference = (cg.mind_descriptor(same) - descriptor).abs()
        assert float(difference.mean()) < 1e-3 and float(difference.max()) < 1e-2
    moved = torch.roll(x, 2, dims=-1)
    other = _smooth_field(1)
    mask = torch.ones_like(x)
    assert float(cg.mind_loss(-x, x, mask)) < 1e-4
    moved_loss, other_loss = float(cg.mind_loss(moved, x, mask)), float(cg.mind_loss(other, x, mask))
    assert 0.05 < moved_loss < other_loss
    # only the mask's pixels count: a difference outside it costs nothing
    changed = x.clone()
    changed[..., :, 20:] = other[..., :, 20:]
    left = torch.zeros_like(x)
    left[..., :, :14] = 1      # beyond the descriptor's reach (patch radius 3 + 1 neighbour) of column 20
    assert float(cg.mind_loss(changed, x, left)) < 1e-4
    assert float(cg.mind_loss(changed, x, mask)) > 0.05


def test_mind_loss_gradient_restores_the_source_structure():
    """Descending the loss moves an unrelated image towards the source's edges (its contrast free)."""
    source = _smooth_field(2)
    image = _smooth_field(3).clone().requires_grad_(True)
    mask = torch.ones_like(source)
    optimiser = torch.optim.Adam([image], lr=0.02)
    start = float(cg.mind_loss(image.detach(), source, mask))
    for _ in range(150):
        optimiser.zero_grad()
        cg.mind_loss(image, source, mask).backward()
        optimiser.step()
    assert float(cg.mind_loss(image.detach(), source, mask)) < 0.5 * start


def test_mind_loss_changes_training_logs_and_resumes_exactly(tiny_data, tmp_path):
    structured = {**TINY, "lambda_mind": 2.0}
    assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, structured, split=4)
    losses = np.genfromtxt(tmp_path / "whole" / cg.LOSSES_NAME, delimiter=",", names=True)
    assert (losses["mind_CT"] > 0).all() and (losses["mind_MR"] > 0).all()
    plain = np.genfromtxt(tmp_path / "plain" / cg.LOSSES_NAME, delimiter=",", names=True)
    assert (plain["mind_CT"] == 0).all()                              # off: logged as zeros
    assert cg.check_settings({})["lambda_mind"] == 0                  # the paper: no structure loss
    assert_refused_where_it_does_not_apply(tiny_data, tmp_path, "lambda_mind", 2.0, -1, "'cut' does not use it")


def test_task_loss_rewards_finding_the_parotids():
    parotid = torch.zeros(2, 1, 16, 16)
    parotid[..., 4:8, 4:8] = 1
    right = torch.cat((1 - parotid, parotid), 1) * 20.0 - 10.0     # confident and right
    wrong = -right
    assert float(cg.task_loss(right, parotid)) < 1e-3
    assert float(cg.task_loss(wrong, parotid)) > 5.0
    # the Dice term: missing the small glands costs ~1 even where the cross-entropy is small
    background = torch.cat((torch.full_like(parotid, 3.0), torch.full_like(parotid, -3.0)), 1)
    assert float(cg.task_loss(background, parotid)) > 0.9


def test_task_loss_reaches_the_ct_to_mr_generator_only():
    """One step with and without ``lambda_seg`` from the same initial networks: the task loss
    changes G_MR (whose synthetic MR the task network reads), not G_CT."""
    images, masks = cg._synthetic_heads(4, 32, seed=0)
    parotid = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    parotid[..., 16:20, 8:12] = True
    after = {}
    for weight in (0.0, 5.0):
        torch.manual_seed(3)
        model = cg.CycleGAN({**TINY, "lambda_seg": weight}, 20.0, "cpu",
                            draw_generator=torch.Generator().manual_seed(0))
        losses = model.step(model.prepare(images[:2]), model.prepare(images[2:]),
                            masks[:2].unsqueeze(1), masks[2:].unsqueeze(1), parotid)
        after[weight] = {name: [p.detach().clone() for p in net.parameters()]
                         for name, net in model.networks.items()}
        seg = losses[cg.LOSS_TERMS.index("seg_CT")]
        assert (float(seg) > 0) == (weight > 0)
        if weight:
            with pytest.raises(CrossmodError, match="lambda_seg.*parotid masks"):
                model.step(model.prepare(images[:2]), model.prepare(images[2:]),
                           masks[:2].unsqueeze(1), masks[2:].unsqueeze(1))
    same = lambda name: all(torch.equal(a, b) for a, b in zip(after[0.0][name], after[5.0][name]))  # noqa: E731
    assert not same("g_mr") and same("g_ct") and "segmenter" in after[5.0] and "segmenter" not in after[0.0]


def test_task_loss_changes_training_and_resumes_exactly(tiny_data, tmp_path):
    ct, mr = tiny_data
    tasked = {**TINY, "lambda_seg": 1.0}
    assert_changes_training_and_resumes_exactly(tiny_data, tmp_path, tasked, split=4)
    losses = np.genfromtxt(tmp_path / "whole" / cg.LOSSES_NAME, delimiter=",", names=True)
    assert (losses["seg_CT"] > 0).all()
    assert cg.check_settings({})["lambda_seg"] == 0                   # the paper: no task loss
    assert_refused_where_it_does_not_apply(tiny_data, tmp_path, "lambda_seg", 1.0, -1, "'fastcut' does not use it")
    # with the reference's crop and mirror the parotid masks move with their slices
    jittered = {**tasked, "random_crop_scale": 1.25, "random_flip": True}
    cg.train(ct, mr, tmp_path / "jittered", jittered, 20.0, progress=False, max_iterations=2)
    # CT slices without contours cannot train it: one line naming the file
    unlabelled = tmp_path / "unlabelled.npz"
    arrays = dict(np.load(ct))
    del arrays["labels"]
    np.savez(unlabelled, **arrays)
    with pytest.raises(CrossmodError, match="unlabelled.npz.*labels"):
        cg.train(unlabelled, mr, tmp_path / "none", tasked, 20.0, progress=False)
    cg.train(unlabelled, mr, tmp_path / "plain", TINY, 20.0, progress=False, max_iterations=1)
