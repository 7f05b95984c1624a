"""Section 2.E-2.G: the U-Net, its loss, training loop, inference and baselines, on tiny inputs."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from crossmod_lib import segmentation as seg
from crossmod_lib.config import load_profile
from crossmod_lib.errors import CrossmodError
from crossmod_lib.io import Case, grid_differences, write_image

ROOT = Path(__file__).resolve().parents[1]

TINY = {"base_features": 4, "levels": 3, "batch_size": 4, "learning_rate": 1e-3, "epochs": 3,
        "max_steps_per_epoch": 2, "inference_batch": 8, "oracle_folds": 2, "few_shot_k": [1, 2],
        "few_shot_epochs": 2, "few_shot_lr": 1e-3, "cpu_threads": 1}
PRE = {"pixel_mm": 2.0, "crop": 32, "ct_window": {"level": 40, "width": 350},
       "mr_upper_percentile": 99.0, "head_threshold": 20, "cc_rule": "none", "cc_margin_mm": 0.0, "min_head_area_cm2": 0.0}


def settings(**overrides):
    return {"name": "test", "seed": 7, "preprocessing": dict(PRE),
            "segmentation": {**TINY, **overrides}}


def fake_slices(n_patients=5, per_patient=4, size=32, seed=0, prefix="p"):
    """Slices with a bright head and two glands whose side decides the label (left = 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels, patients = [], [], []
    for p in range(n_patients):
        for k in range(per_patient):
            cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
            head = ((yy - cy) / (size * 0.4)) ** 2 + ((xx - cx) / (size * 0.33)) ** 2 < 1
            left = ((yy - cy - 2) / 3.5) ** 2 + ((xx - cx - 7) / 2.5) ** 2 < 1
            right = ((yy - cy - 2) / 3.5) ** 2 + ((xx - cx + 7) / 2.5) ** 2 < 1
            img = np.where(head, 120, 0) + rng.normal(0, 5, head.shape)
            img[left | right] = 200
            lab = np.zeros(head.shape, np.uint8)
            if k % 4:  # some slices without parotids
                lab[left] = 1
                lab[right] = 2
            else:
                img[left | right] = 120
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(lab)
            patients.append(f"{prefix}{p:02d}")
    images = np.stack(images)
    return {"image": images, "labels": np.stack(labels), "head_mask": images > 20,
            "patient": np.array(patients), "slice_index": np.arange(len(images)) % per_patient,
            "z_mm": np.zeros(len(images), np.float32)}


# ----------------------------------------------------------------------------------------------
# Architecture


def expected_parameters(base, levels, norm):
    feats = [base * 2**i for i in range(levels)]
    extra = 2 if norm in ("batch", "instance") else 1  # norm weight+bias, or conv bias

    def double(cin, cout):
        return 9 * cin * cout + 9 * cout * cout + 2 * extra * cout

    total, cin = 0, 1
    for f in feats:
        total += double(cin, f)
        cin = f
    for i in range(levels - 1):
        total += 4 * feats[i + 1] * feats[i] + feats[i]  # transposed conv (weights + bias)
        total += double(2 * feats[i], feats[i])
    return total + feats[0] * 3 + 3


def test_unet_has_fig5_levels_and_features():
    model = seg.UNet()  # the paper's: 5 levels, 64 -> 1024
    assert len(model.encoders) == 5 and len(model.decoders) == 4
    assert [enc[0].out_channels for enc in model.encoders] == [64, 128, 256, 512, 1024]
    assert [dec[0].in_channels for dec in model.decoders] == [1024, 512, 256, 128]
    assert all(isinstance(m, nn.ConvTranspose2d) for m in model.ups)
    assert seg.count_parameters(model) == expected_parameters(64, 5, "batch")
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 1, 32, 32))
    assert out.shape == (1, 3, 32, 32)
    table = seg.architecture_table({"preprocessing": {"crop": 256}})
    assert table["parameters"].iloc[-1] == seg.count_parameters(model)
    assert table["out features"].max() == 1024


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_width_depth_norm_from_settings_and_odd_sizes(norm):
    model = seg.build_model({"segmentation": {"base_features": 4, "levels": 4, "norm": norm}})
    assert model.features == [4, 8, 16, 32]
    assert seg.count_parameters(model) == expected_parameters(4, 4, norm)
    with torch.no_grad():
        assert model.eval()(torch.rand(2, 1, 37, 30)).shape == (2, 3, 37, 30)
    # FLOPs: the first conv of a 64 x 64 slice alone is 2 * 64^2 * 9 * 4 multiply-adds
    assert seg.flops_per_slice(model, 64) > 2 * 64 * 64 * 9 * 4


# ----------------------------------------------------------------------------------------------
# Loss, splits, scheduler


def logits_of(probs):
    return torch.log(torch.as_tensor(probs, dtype=torch.float32).clamp_min(1e-12))


def test_soft_dice_loss_known_values():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, :] = 1          # 4 pixels of Parotid_L
    target[0, 1, :] = 2          # 4 pixels of Parotid_R
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    assert seg.soft_dice_loss(logits_of(perfect), target, smooth=0.0).item() == pytest.approx(0, abs=1e-6)
    half = perfect.clone()       # Parotid_L predicted on 2 of its pixels and 2 background pixels
    half[0, :, 0, 2:] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    half[0, :, 3, :2] = torch.tensor([0.0, 1.0, 0.0])[:, None]
    # Dice_L = 2*2 / (4 + 4) = 0.5, Dice_R = 1 -> loss 1 - 0.75
    assert seg.soft_dice_loss(logits_of(half), target, smooth=0.0).item() == pytest.approx(0.25, abs=1e-5)
    # with background: Dice_bg = 2*6 / (8 + 8) = 0.75 -> loss 1 - (0.75 + 0.5 + 1) / 3
    assert seg.soft_dice_loss(logits_of(half), target, include_background=True,
                              smooth=0.0).item() == pytest.approx(0.25, abs=1e-5)
    uniform = torch.full((1, 3, 4, 4), 1 / 3)  # soft: Dice_c = 2 * 4/3 / (16/3 + 4) = 2/7
    assert seg.soft_dice_loss(logits_of(uniform), target, smooth=0.0).item() == pytest.approx(5 / 7, abs=1e-5)
    nothing = torch.zeros(1, 4, 4, dtype=torch.long)  # no parotid anywhere, none predicted
    assert seg.soft_dice_loss(logits_of(torch.nn.functional.one_hot(nothing, 3).permute(0, 3, 1, 2)
                                         .float()), nothing, smooth=1.0).item() == pytest.approx(0, abs=1e-6)


def test_patient_split_is_disjoint_seeded_and_complete():
    patients = np.repeat([f"pt{i}" for i in range(10)], 7)
    train, val = seg.split_patients(patients, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8
    assert not set(train) & set(val) and set(train) | set(val) == set(patients)
    assert seg.split_patients(patients, 0.2, seed=3) == (train, val)
    assert any(seg.split_patients(patients, 0.2, seed=s)[1] != val for s in range(4, 10))
    assert seg.split_patients(["a"] * 5, 0.2, 0) == (["a"], [])
    assert len(seg.split_patients(["a", "b"], 0.2, 0)[1]) == 1
    folds = seg.oracle_folds(patients, 3, seed=1)
    assert sorted(p for fold in folds for p in fold) == sorted(set(patients)) and len(folds) == 3
    k1, k3 = seg.few_shot_patients(patients, 1, 1), seg.few_shot_patients(patients, 3, 1)
    assert len(k3) == 3 and set(k1) <= set(k3)
    with pytest.raises(CrossmodError, match="few_shot_k"):
        seg.few_shot_patients(patients, 11, 1)


def test_plateau_stopper_scripted_losses():
    stopper = seg.PlateauStopper(lr=1e-3, min_lr=3e-4, factor=0.5, lr_patience=2, patience=4,
                                 min_delta=0.01)
    script = [  # loss, improved, best, lr, stop
        (1.0, True, True, 1e-3, False),
        (0.9, True, True, 1e-3, False),
        (0.895, False, True, 1e-3, False),  # < 1 % better than 0.9
        (0.892, False, True, 5e-4, False),  # 2 epochs without improvement: lr halved
        (0.885, True, True, 5e-4, False),   # 0.885 < 0.9 * 0.99
        (0.9, False, False, 5e-4, False),
        (0.88, False, True, 3e-4, False),   # floor: min_lr
        (0.95, False, False, 3e-4, False),
        (0.95, False, False, 3e-4, True),   # 4 epochs without improvement: stop
    ]
    for loss, improved, best, lr, stop in script:
        expected = {"lr": lr, "improved": improved, "best": best, "stop": stop}
        assert stopper.step(loss) == expected, loss
    clone = seg.PlateauStopper(1.0)
    clone.load_state_dict(stopper.state_dict())
    assert clone.state_dict() == stopper.state_dict()


def test_dice_ce_loss_keeps_a_gradient_on_a_class_the_network_no_longer_predicts():
    # background predicted everywhere with high confidence; the target holds a left parotid
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:9, 4:9] = 1
    logits = torch.zeros(2, 3, 16, 16)
    logits[:, 0] = 12.0
    grads = {}
    for loss in ("dice", "dice_ce"):
        cfg = seg.segmentation_config({"segmentation": {"loss": loss}})
        x = logits.clone().requires_grad_(True)
        value = seg.training_loss(x, target, cfg)
        value.backward()
        grads[loss] = float(x.grad[:, 1][target == 1].abs().mean())
        if loss == "dice_ce":
            expected = seg.soft_dice_loss(logits, target) + torch.nn.functional.cross_entropy(logits, target)
            assert float(value.detach()) == pytest.approx(float(expected))
    assert grads["dice_ce"] > 100 * grads["dice"]
    with pytest.raises(CrossmodError, match="loss must be dice or dice_ce"):
        seg.segmentation_config({"segmentation": {"loss": "focal"}})


def test_cosine_schedule_anneals_over_the_epochs_and_keeps_the_last():
    schedule = seg.CosineSchedule(lr=1e-3, epochs=4, min_lr=0.0)
    assert schedule.lr == pytest.approx(1e-3)
    lrs, bests = [], []
    for loss in (1.0, 0.5, 0.9, 0.95):   # a noisy validation loss never picks the epoch
        decision = schedule.step(loss)
        lrs.append(decision["lr"])
        bests.append(decision["best"])
        assert not decision["stop"]
    assert lrs == pytest.approx([1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (1, 2, 3, 4)])
    assert lrs[-1] == pytest.approx(0.0) and all(bests)
    clone = seg.CosineSchedule(1.0, 1)
    clone.load_state_dict(schedule.state_dict())
    assert clone.state_dict() == schedule.state_dict()
    cfg = seg.segmentation_config({"segmentation": {"lr_schedule": "cosine"}})
    assert isinstance(seg.learning_rate_schedule(cfg, 1e-3, 10), seg.CosineSchedule)
    with pytest.raises(CrossmodError, match="lr_schedule must be plateau or cosine"):
        seg.segmentation_config({"segmentation": {"lr_schedule": "step"}})


def test_cosine_training_keeps_the_last_epoch_and_resumes_only_under_the_same_schedule(tmp_path):
    data = fake_slices()
    cfg = settings(epochs=3, lr_schedule="cosine")
    summary = seg.train_unet(data, tmp_path / "a", cfg, progress=False)
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 3
    assert state_equal(seg.load_checkpoint(tmp_path / "a" / "best.pt")["model"],
                       seg.load_checkpoint(tmp_path / "a" / "last.pt")["model"])
    seg.train_unet(data, tmp_path / "b", settings(epochs=3), progress=False, stop_after_epochs=1)
    with pytest.raises(CrossmodError, match="cannot resume: lr_schedule plateau there, cosine"):
        seg.train_unet(data, tmp_path / "b", cfg, progress=False, resume=True)


# ----------------------------------------------------------------------------------------------
# Training: determinism, resume, checkpoints


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_deterministic_and_resume_is_bit_identical(tmp_path):
    data = fake_slices()
    cfg = settings(epochs=3)
    full = seg.train_unet(data, tmp_path / "a", cfg, progress=False)
    seg.train_unet(data, tmp_path / "b", cfg, progress=False)
    part = seg.train_unet(data, tmp_path / "c", cfg, progress=False, stop_after_epochs=1)
    assert part["epochs_run"] == 1 and not part["finished"]
    resumed = seg.train_unet(data, tmp_path / "c", cfg, progress=False, resume=True)
    assert full["epochs_run"] == resumed["epochs_run"] == 3
    final = {d: seg.load_checkpoint(tmp_path / d / "last.pt") for d in "abc"}
    assert state_equal(final["a"]["model"], final["b"]["model"])
    assert state_equal(final["a"]["model"], final["c"]["model"])
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in final["a"]["history"]]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in final["c"]["history"]]
    assert state_equal(seg.load_checkpoint(tmp_path / "a" / "best.pt")["model"],
                       seg.load_checkpoint(tmp_path / "c" / "best.pt")["model"])
    log = (tmp_path / "c" / "log.csv").read_text().splitlines()
    assert log[0].split(",")[:8] == ["epoch", "train_loss", "val_loss", "val_dice", "val_dice_L",
                                     "val_dice_R", "lr", "seconds"]
    assert len(log) == 4
    # The split is by patient and recorded; a finished run resumes to itself.
    assert not set(full["train_patients"]) & set(full["val_patients"])
    assert seg.train_unet(data, tmp_path / "c", cfg, progress=False, resume=True)["epochs_run"] == 3
    # Plain torch.load with weights_only=True reads every checkpoint.
    torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert isinstance(final["a"]["torch_rng"], torch.Tensor)


def test_cpu_bf16_trains_reproducibly_close_to_fp32_and_only_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    # cpu_bf16 (beyond the paper) trains under bf16 autocast with channels_last on a CPU with
    # native bf16; the same seed gives the same weights twice, and its losses follow fp32's.
    from crossmod_lib import cyclegan, unet

    cpu = torch.device("cpu")
    monkeypatch.setattr(cyclegan, "cpu_has_native_bf16", lambda: False)
    assert not unet.training_bf16(seg.segmentation_config(settings(cpu_bf16=True)), cpu)
    monkeypatch.setattr(cyclegan, "cpu_has_native_bf16", lambda: True)  # emulated where absent
    assert unet.training_bf16(seg.segmentation_config(settings(cpu_bf16=True)), cpu)
    assert not unet.training_bf16(seg.segmentation_config(settings()), cpu)  # default: fp32
    data = fake_slices()
    a = seg.train_unet(data, tmp_path / "a", settings(cpu_bf16=True, epochs=2), progress=False)
    b = seg.train_unet(data, tmp_path / "b", settings(cpu_bf16=True, epochs=2), progress=False)
    exact = seg.train_unet(data, tmp_path / "e", settings(epochs=2), progress=False)
    ckpt = {d: seg.load_checkpoint(tmp_path / d / "last.pt") for d in "abe"}
    assert state_equal(ckpt["a"]["model"], ckpt["b"]["model"])
    assert not state_equal(ckpt["a"]["model"], ckpt["e"]["model"])  # bf16 really ran
    assert [r["train_loss"] for r in ckpt["a"]["history"]] == pytest.approx(
        [r["train_loss"] for r in ckpt["e"]["history"]], rel=0.05)
    # predictions on the CPU stay fp32 whatever the setting: the same weights, the same labels
    model = seg.load_model(a["best"])
    images = data["image"][:4]
    fp32 = model(seg._to_input(images, cpu, False)).argmax(1).numpy()
    assert np.array_equal(seg.predict_slices(model, images), fp32)
    with pytest.raises(CrossmodError, match="cpu_bf16"):
        seg.segmentation_config(settings(cpu_bf16="yes"))
    rate = seg.training_throughput(settings(), 32, bf16=True, iterations=1, warmup=1)
    assert rate > 0


def test_checkpoint_write_is_atomic_and_loading_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    seg.save_checkpoint({"format": seg.CHECKPOINT_FORMAT, "x": torch.ones(2)}, path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        seg.save_checkpoint({"format": seg.CHECKPOINT_FORMAT, "x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(seg.load_checkpoint(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": seg.CHECKPOINT_FORMAT, "obj": Path("x")}, unsafe)  # not weights-only
    with pytest.raises(CrossmodError, match="cannot read checkpoint"):
        seg.load_checkpoint(unsafe)
    with pytest.raises(CrossmodError, match="not found"):
        seg.load_checkpoint(tmp_path / "missing.pt")


def test_training_path_imports_torch_and_numpy_only(tmp_path):
    data = fake_slices(n_patients=3, per_patient=2)
    np.savez(tmp_path / "slices.npz", **data)
    (tmp_path / "cfg.json").write_text(json.dumps(settings(epochs=1)))
    script = textwrap.dedent(f"""
        import sys
        from crossmod_lib import segmentation
        code = segmentation.main(["train", "--slices", r"{tmp_path / 'slices.npz'}",
                                  "--out", r"{tmp_path / 'out'}", "--config",
                                  r"{tmp_path / 'cfg.json'}", "--quiet"])
        heavy = [m for m in ("SimpleITK", "scipy", "pandas") if m in sys.modules]
        print("HEAVY", heavy, "CODE", code)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert "HEAVY [] CODE 0" in result.stdout, result.stdout + result.stderr
    assert (tmp_path / "out" / "best.pt").is_file() and (tmp_path / "out" / "log.csv").is_file()


def test_settings_without_pyyaml_need_a_complete_config(monkeypatch):
    # On a bare GPU machine (torch and numpy, maybe no PyYAML) the defaults of full.yaml cannot be
    # read: a complete config (as segmentation_config writes it) trains, a partial one says what is missing.
    from crossmod_lib import defaults

    complete = seg.segmentation_config({"segmentation": {"epochs": 3}})

    def no_yaml():
        raise ImportError("No module named 'yaml'")

    monkeypatch.setattr(defaults, "_full_profile", no_yaml)
    assert seg.segmentation_config(dict(complete)) == complete
    with pytest.raises(CrossmodError, match="segmentation.base_features: missing, and without PyYAML"):
        seg.segmentation_config({k: v for k, v in complete.items() if k != "base_features"})


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(CrossmodError, match="unknown setting"):
        seg.segmentation_config({"segmentation": {"base_feature": 4}})
    with pytest.raises(CrossmodError, match="segmentation.norm"):
        seg.segmentation_config({"segmentation": {"norm": "group"}})
    data = fake_slices(n_patients=2, per_patient=2)
    unannotated = dict(data, labels=np.zeros_like(data["labels"]))
    with pytest.raises(CrossmodError, match="no parotid label"):
        seg.train_unet(unannotated, tmp_path / "u", settings(epochs=1), progress=False)
    seg.train_unet(data, tmp_path / "a", settings(epochs=1), progress=False)
    with pytest.raises(CrossmodError, match="architecture"):
        seg.train_unet(data, tmp_path / "b", settings(epochs=1, base_features=8),
                       init=tmp_path / "a" / "best.pt", progress=False)


# ----------------------------------------------------------------------------------------------
# Domain randomisation


def test_randomise_intensities_keeps_geometry_and_remaps_per_class():
    image = np.zeros((40, 40), np.uint8)  # air, a fat band, soft tissue, bone
    image[5:35, 5:35] = 40
    image[10:30, 10:30] = 110
    image[15:25, 15:20] = 255
    labels = np.zeros_like(image)
    labels[12:16, 22:28] = 1
    classes = [image == 0, image == 40, (image == 110) & (labels == 0), image == 255, labels > 0]
    quiet = {"class_sd": (0, 0), "blur_sigma": (0, 0), "noise_sd": (0, 0), "bias_strength": 0.0}
    outs = []
    for seed in range(6):
        out = seg.randomise_intensities(image, np.random.default_rng(seed), labels,
                                        monotone_prob=0.0, **quiet)
        assert out.shape == image.shape and out.dtype == np.uint8
        for mask in classes[1:]:
            assert np.ptp(out[mask]) <= 1  # one intensity per class: the geometry is kept
        assert out[classes[0]].max() <= 40  # air stays dark
        outs.append([int(out[m].mean()) for m in classes[1:]])
    assert len({tuple(o) for o in outs}) == 6
    orders = {tuple(np.argsort(o)) for o in outs}
    assert len(orders) > 1  # non-monotone: the order of the tissues changes
    for seed in range(6):    # monotone: increasing or decreasing with the CT intensity
        out = seg.randomise_intensities(image, np.random.default_rng(seed), None, monotone_prob=1.0,
                                        **quiet)
        means = np.array([out[m].mean() for m in (image == 40, image == 110, image == 255)])
        assert np.all(np.diff(means) >= -1) or np.all(np.diff(means) <= 1)
    batch = seg.randomise_intensities(np.stack([image] * 3), np.random.default_rng(0), np.stack([labels] * 3))
    assert batch.shape == (3, 40, 40)


def test_vary_appearance_keeps_geometry_and_air_and_is_seeded():
    image = np.zeros((40, 40), np.uint8)  # air around a head of two tissues
    image[5:35, 5:35] = 90
    image[12:28, 12:28] = 180
    outs = [seg.vary_appearance(image, np.random.default_rng(seed), blur_sigma=(0, 0), noise_sd=(0, 0),
                                bias_strength=0.0) for seed in range(4)]
    for out in outs:
        assert out.shape == image.shape and out.dtype == np.uint8
        assert out[image == 0].max() == 0  # air stays air
        assert np.ptp(out[image == 90]) == 0 and np.ptp(out[image == 180]) == 0  # no new edges
        assert out[image == 180][0] == 255 > out[image == 90][0]  # order kept, standardised
    assert len({int(o[20, 8]) for o in outs}) > 1  # the gamma differs per draw
    noisy = seg.vary_appearance(np.stack([image] * 3), np.random.default_rng(1))
    again = seg.vary_appearance(np.stack([image] * 3), np.random.default_rng(1))
    assert noisy.shape == (3, 40, 40) and np.array_equal(noisy, again)
    assert not np.array_equal(noisy[0], noisy[1])  # one draw per slice
    with pytest.raises(CrossmodError, match="cross_modality_appearance"):
        seg.segmentation_config({"segmentation": {"cross_modality_appearance": "yes"}})


# ----------------------------------------------------------------------------------------------
# Inference


class StubNet(nn.Module):
    """Returns a fixed label map per slice, in the order the slices come (one-hot logits)."""

    def __init__(self, labels, preprocessing):
        super().__init__()
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.meta = {"preprocessing": preprocessing}
        self.arch = {"base_features": 1, "levels": 1, "in_channels": 1, "classes": 3, "norm": "none"}
        self.position = 0

    def forward(self, x):
        n = x.shape[0]
        out = torch.nn.functional.one_hot(self.labels[self.position:self.position + n], 3)
        self.position = (self.position + n) % len(self.labels)
        return 10.0 * out.permute(0, 3, 1, 2).float() + 0 * self.dummy


def mr_case(spacing=(0.7, 0.6, 3.5), origin=(-31.0, 12.5, -40.0), size=(90, 110, 12), seed=0):
    """An MR head on an anisotropic, offset grid larger than the crop, with two glands."""
    nx, ny, nz = size
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(np.arange(nz) * spacing[2], np.arange(ny) * spacing[1],
                          np.arange(nx) * spacing[0], indexing="ij")
    cy, cx = 36.0, 30.0  # mm from the grid's corner: the head is off-centre
    head = ((y - cy) / 28.0) ** 2 + ((x - cx) / 22.0) ** 2 < 1
    left = ((y - cy - 4) / 7.0) ** 2 + ((x - cx + 12) / 5.0) ** 2 + ((z - 20) / 12.0) ** 2 < 1
    right = ((y - cy - 4) / 7.0) ** 2 + ((x - cx - 12) / 5.0) ** 2 + ((z - 20) / 12.0) ** 2 < 1
    array = np.abs(rng.normal(0, 3.0, head.shape))
    array[head] = 300.0 + rng.normal(0, 10, int(head.sum()))
    array[left | right] = 600.0
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    structures = {}
    for name, mask in (("Parotid_L", left), ("Parotid_R", right)):
        m = sitk.GetImageFromArray(mask.astype(np.uint8))
        m.CopyInformation(image)
        structures[name] = m
    return Case("mr_case", image, structures), np.where(left, 1, np.where(right, 2, 0)).astype(np.uint8)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def stub_for(case, island=False):
    from crossmod_lib.preparation import prepare_case

    prepared = prepare_case(case, "MR", PRE)
    assert prepared.info["resampled_size"] != f"{PRE['crop']}x{PRE['crop']}x12"
    labels = prepared.labels.copy()
    if island:  # a spurious blob of Parotid_L far from the gland
        labels[2, 1:3, 1:3] = 1
    return StubNet(labels, PRE)


def test_inference_maps_labels_back_to_the_native_grid():
    case, truth = mr_case()
    maps = seg.predict_label_maps(stub_for(case, island=True), case, settings())
    for key in ("raw", "lcc"):
        assert not grid_differences(maps[key], case.image)
    raw = sitk.GetArrayFromImage(maps["raw"])
    lcc = sitk.GetArrayFromImage(maps["lcc"])
    for value in (1, 2):
        assert dice(lcc == value, truth == value) >= 0.9, value
    assert (raw == 1).sum() > (lcc == 1).sum()  # the island is only in the raw map
    masks = seg.predict_case(stub_for(case), case, settings())
    assert set(masks) == {"Parotid_L", "Parotid_R"}
    assert dice(sitk.GetArrayFromImage(masks["Parotid_R"]) > 0, truth == 2) >= 0.9


def test_largest_components_per_side():
    labels = np.zeros((4, 10, 10), np.uint8)
    labels[0:3, 1:4, 1:4] = 1       # big left component
    labels[3, 6, 6] = 1             # small one: removed
    labels[1, 4, 4] = 1             # touches the big one diagonally (26-connected): kept
    labels[1:3, 6:9, 1:3] = 2
    out = seg.largest_components(labels)
    assert out[3, 6, 6] == 0 and out[1, 4, 4] == 1
    assert (out == 2).sum() == (labels == 2).sum()


def _as_dicom_case(case, series, patient_id):
    """``case`` written as a DICOM MR series in ``series`` and read back, its masks on that grid."""
    from crossmod_lib.dicom import read_dicom_series, write_dicom_series

    write_dicom_series(series, sitk.GetArrayFromImage(case.image), case.image.GetSpacing(),
                      case.image.GetOrigin(), modality="MR", patient_id=patient_id)
    source = read_dicom_series(series)
    structures = {}
    for name, mask in case.structures.items():
        on_series = sitk.Image(mask)
        on_series.CopyInformation(source)
        structures[name] = on_series
    return Case(patient_id, source, structures)


def test_predict_path_writes_nifti_and_rtstruct(tmp_path):
    from crossmod_lib.dicom import read_rtstruct
    from crossmod_lib.io import read_image

    case, truth = mr_case(spacing=(0.8, 0.8, 3.5), origin=(-36.0, -44.0, 10.0))
    write_image(case.image, tmp_path / "in" / "mr7.nii.gz")
    rows = seg.predict_path(stub_for(case), tmp_path / "in" / "mr7.nii.gz", tmp_path / "out",
                            settings())
    written = read_image(rows[0]["labels"])
    assert Path(rows[0]["labels"]).name == "mr7_labels.nii.gz"
    assert not grid_differences(written, case.image)
    assert dice(sitk.GetArrayFromImage(written) == 1, truth == 1) >= 0.9
    with pytest.raises(CrossmodError, match="DICOM"):
        seg.predict_path(stub_for(case), tmp_path / "in" / "mr7.nii.gz", tmp_path / "out",
                         settings(), rtstruct=True)
    for pid in ("a", "b"):  # a folder of patient folders
        write_image(case.image, tmp_path / "cohort" / pid / "img.nrrd")
    rows = seg.predict_path(stub_for(case), tmp_path / "cohort", tmp_path / "out2", settings())
    assert [Path(r["labels"]).name for r in rows] == ["a_labels.nii.gz", "b_labels.nii.gz"]
    # a patient that cannot be read does not stop the others: its row names the problem
    (tmp_path / "cohort" / "a" / "img.nrrd").write_bytes(b"NRRD0004\ntruncated")
    write_image(case.image, tmp_path / "cohort" / "c" / "img.nrrd")
    rows = seg.predict_path(stub_for(case), tmp_path / "cohort", tmp_path / "out3", settings())
    assert [r["patient"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["labels"] is None and "img.nrrd" in rows[0]["problem"]
    assert "\n" not in rows[0]["problem"]
    assert [Path(r["labels"]).name for r in rows[1:]] == ["b_labels.nii.gz", "c_labels.nii.gz"]
    assert not (tmp_path / "out3" / "a_labels.nii.gz").exists()

    series = tmp_path / "dicom"
    dicom_case = _as_dicom_case(case, series, "MR7")
    source = dicom_case.image
    rows = seg.predict_path(stub_for(dicom_case), series, tmp_path / "out_dcm", settings(),
                            rtstruct=True)
    labels = read_image(rows[0]["labels"])
    assert Path(rows[0]["labels"]).name == "dicom_labels.nii.gz"
    assert not grid_differences(labels, source)
    masks = read_rtstruct(rows[0]["rtstruct"], source)
    label_array = sitk.GetArrayFromImage(labels)
    for value, name in enumerate(("Parotid_L", "Parotid_R"), start=1):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(masks[name]) > 0, label_array == value)
        assert dice(label_array == value, truth == value) >= 0.9


def test_predict_path_with_a_trained_checkpoint_and_bench(tmp_path, capsys):
    data = fake_slices(n_patients=2, per_patient=2)
    summary = seg.train_unet(data, tmp_path / "m", settings(epochs=1), progress=False)
    case, _ = mr_case()
    write_image(case.image, tmp_path / "case.nrrd")
    rows = seg.predict_path(summary["best"], tmp_path / "case.nrrd", tmp_path / "out")
    assert Path(rows[0]["labels"]).is_file()  # preprocessing taken from the checkpoint
    labels = seg.predict_labels(summary["best"], case, None, postprocess=False)
    assert labels.GetSize() == case.image.GetSize()
    # the CLI on a cohort with one unreadable patient: the others contoured, the problem on one
    # line, exit 2
    from crossmod_lib import cli

    for pid in ("a", "b"):
        write_image(case.image, tmp_path / "cohort" / pid / "img.nrrd")
    (tmp_path / "cohort" / "a" / "img.nrrd").write_bytes(b"not an image")
    code = cli.main(["predict", "--model", summary["best"], "--input", str(tmp_path / "cohort"),
                     "--output", str(tmp_path / "cohort_out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 2 and "cohort/a/img.nrrd" in err[0]
    assert err[1] == "crossmod: 1 of 2 patients not contoured"
    assert sorted(p.name for p in (tmp_path / "cohort_out").iterdir()) == ["b_labels.nii.gz"]
    result = seg.bench_inference(settings(), n_slices=3, matrix=48, pixel_mm=1.5, repeats=1,
                                 workdir=tmp_path)
    assert result["seconds_mean"] > 0 and set(result["stages"]) >= {"preprocess", "predict", "write"}


# ----------------------------------------------------------------------------------------------
# Recipes and profiles


def test_every_recipe_trains_end_to_end(tmp_path):
    run = tmp_path / "run"
    ct = fake_slices(n_patients=5, per_patient=4, seed=1, prefix="ct")
    mr = fake_slices(n_patients=4, per_patient=4, seed=2, prefix="mr")
    synthetic = dict(ct, image=fake_slices(n_patients=5, per_patient=4, seed=3)["image"])
    for name, arrays in (("prepared/ct_slices.npz", ct), ("prepared/mr_slices.npz", mr),
                         ("cleaned/training_slices.npz", synthetic)):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        np.savez(run / name, **arrays)
    profile = settings(epochs=2)
    recipes = seg.model_recipes(profile)
    assert {r["kind"] for r in recipes} == set(seg.KINDS)
    names = [r["name"] for r in recipes]
    assert all(names.index(r["init_from"]) < names.index(r["name"]) for r in recipes if r["init_from"])
    summaries = {r["name"]: seg.train_recipe(r, run, profile, progress=False) for r in recipes}
    for name in summaries:
        assert (run / "model" / name / "best.pt").is_file(), name
    ct_only = summaries["ct_only"]
    assert ct_only["test_modality"] == "CT" and ct_only["test_patients"]
    assert not set(ct_only["test_patients"]) & set(ct_only["train_patients"] + ct_only["val_patients"])
    assert summaries["naive"]["trained"] is False
    assert seg.load_model(run / "model" / "naive" / "best.pt").meta["test_modality"] == "MR"
    oracle_tests = [p for f in range(2) for p in summaries[f"mr_oracle_fold{f}"]["test_patients"]]
    assert sorted(oracle_tests) == sorted(set(mr["patient"]))
    for f in range(2):
        s = summaries[f"mr_oracle_fold{f}"]
        assert not set(s["test_patients"]) & set(s["train_patients"] + s["val_patients"])
    few = summaries["few_shot_k2"]
    assert len(few["train_patients"]) == 2 and not set(few["train_patients"]) & set(few["test_patients"])
    assert few["init"].endswith("cross_modality/best.pt")
    assert summaries["few_shot_k1"]["common_test_patients"] == few["test_patients"]
    assert summaries["domain_random"]["transform"] == "randomise"
    assert summaries["cross_modality"]["transform"] is None  # the paper: the synthetic MR as it is
    varied = seg.train_recipe(recipes[0], run, settings(epochs=1, cross_modality_appearance=True),
                              progress=False)
    assert varied["transform"] == "appearance"


def test_profiles_hold_the_papers_segmentation_settings():
    full = seg.segmentation_config(load_profile("full"))
    assert (full["base_features"], full["levels"]) == (64, 5)
    assert full["learning_rate"] == 5e-5 and full["min_lr"] == 1e-7 and full["epochs"] == 100
    assert full["patience"] == 10 and full["min_delta"] == 0.01 and full["val_fraction"] == 0.2
    assert full["postprocess_lcc"] is True and full["few_shot_k"] == [1, 3, 5]
    for name in ("demo", "smoke"):
        cfg = seg.segmentation_config(load_profile(name))
        assert cfg["base_features"] < 64
        assert max(cfg["few_shot_k"]) <= load_profile(name)["phantom"]["n_mr"] - 1
        assert cfg["oracle_folds"] <= load_profile(name)["phantom"]["n_mr"]
    assert math.isclose(seg.flops_per_slice(load_profile("full")) / 1e9, 96.2, rel_tol=0.01)


# ----------------------------------------------------------------------------------------------
# A whole run: train_run -> predict_run (the contract chapter 5 reads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A smoke-profile run folder with prepared phantom slices; the CT slices stand in for the
    cleaned synthetic MR (only the plumbing is under test here)."""
    import shutil

    from crossmod_lib import preparation
    from crossmod_lib.runs import RunFolder

    profile = load_profile("smoke")
    profile["phantom"].update({"ct_matrix": 208, "ct_slices": [44, 48], "mr_matrix": 400})
    run = RunFolder.open(profile, tmp_path_factory.mktemp("run"))
    sources = preparation.cohort_sources(run, progress=False)
    pre = run.profile["preprocessing"]
    preparation.prepare_cohort(sources["MR"], "MR", pre, run.stage("prepared"), progress=False)
    preparation.prepare_cohort(sources["CT"], "CT", pre, run.stage("prepared"),
                               coverage_mm=preparation.mr_coverage_mm(sources["MR"]), progress=False)
    shutil.copy(run.root / "prepared" / "ct_slices.npz", run.stage("cleaned") / "training_slices.npz")
    return run


def test_train_run_and_predict_run_write_the_prediction_index(tiny_run):
    import pandas as pd

    run = tiny_run
    trained = seg.train_run(run)
    assert set(trained["name"]) == {r["name"] for r in seg.model_recipes(run.profile)}
    index = seg.predict_run(run)
    assert tuple(index.columns) == seg.PREDICTION_COLUMNS
    assert set(index["model"]) == {"cross_modality", "ct_only", "naive", "mr_oracle",
                                   "domain_random", "few_shot_k1"}
    mr_patients = {"mr_000", "mr_001", "mr_002"}
    # every MR patient predicted once by the oracle (out of fold), CT-only tested on held-out CT
    assert sorted(index[index["model"] == "mr_oracle"]["patient"]) == sorted(mr_patients)
    ct_rows = index[index["model"] == "ct_only"]
    assert (ct_rows["modality"] == "CT").all() and len(ct_rows) >= 1
    few = index[index["model"] == "few_shot_k1"]
    assert len(few) == 2  # its fine-tuning patient is not tested
    common = set(index[index["common"]]["patient"])
    assert common == set(few["patient"]) and common < mr_patients
    for _, row in index.iterrows():
        labels = sitk.ReadImage(str(run.root / row["labels"]))
        reference = sitk.ReadImage(str(run.root / row["reference"]))
        assert not grid_differences(labels, reference)
        assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}
        assert (sitk.GetArrayViewFromImage(reference) == 1).any()  # manual contours came along
        assert row["seconds"] > 0
    assert pd.read_csv(run.root / "predictions" / "index.csv").shape == index.shape
    example = seg.prediction_examples(run)
    assert next(iter(example["predictions"])) == "cross_modality"
    assert example["reference"].shape == example["image"].shape
    assert (example["reference"] > 0).any()
    logs = seg.training_logs(run)
    assert {"model", "epoch", "val_loss"} <= set(logs.columns)


def test_train_run_reuses_models_and_retrains_when_the_data_change(tiny_run):
    import os

    run = tiny_run
    seg.train_run(run)  # everything trained by the previous test (or now)
    best = run.root / "model" / "cross_modality" / "best.pt"
    stamp = best.stat().st_mtime_ns
    seg.train_run(run)
    assert best.stat().st_mtime_ns == stamp  # same inputs: reused
    data = run.root / "cleaned" / "training_slices.npz"
    arrays = dict(np.load(data))
    arrays["image"] = (255 - arrays["image"]).astype(np.uint8)
    np.savez(data, **arrays)
    os.utime(data)
    trained = seg.train_run(run, kinds=["few_shot"])
    assert set(trained["name"]) == {"cross_modality", "few_shot_k1"}  # few-shot pulls in its start
    assert best.stat().st_mtime_ns != stamp  # new data: trained again


def test_predict_run_without_models_is_a_clear_error(tmp_path):
    from crossmod_lib.runs import RunFolder

    run = RunFolder.open(load_profile("smoke"), tmp_path / "empty")
    with pytest.raises(CrossmodError, match="no trained model"):
        seg.predict_run(run)


def _dciodvfy_errors(path) -> list[str]:
    import shutil
    import subprocess

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed: make check-dicom runs this")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture()
def dicom_prediction(tmp_path):
    """A DICOM MR patient contoured with every output type at once."""
    case, _ = mr_case(spacing=(0.8, 0.7, 3.5), origin=(-36.0, -44.0, 10.0))
    series = tmp_path / "P7"
    dicom_case = _as_dicom_case(case, series, "P7")
    rows = seg.predict_path(stub_for(dicom_case), series, tmp_path / "out",
                            settings(), outputs=("nifti", "rtstruct", "seg"))
    return rows[0], dicom_case.image


def test_predict_writes_nifti_rtstruct_and_seg_that_read_back_to_the_same_masks(dicom_prediction):
    import highdicom as hd
    import pydicom
    from matplotlib.path import Path as PolygonPath

    from crossmod_lib.dicom import slice_uids
    from crossmod_lib.io import read_image

    row, source = dicom_prediction
    labels = sitk.GetArrayFromImage(read_image(row["labels"]))
    assert {1, 2} <= set(np.unique(labels))
    # SEG, read back by highdicom on the source slices
    seg_file = hd.seg.segread(row["seg"])
    assert [s.SegmentLabel for s in seg_file.SegmentSequence] == ["Parotid_L", "Parotid_R"]
    read_back = seg_file.get_pixels_by_source_instance(
        source_sop_instance_uids=slice_uids(source), segment_numbers=[1, 2], combine_segments=True)
    np.testing.assert_array_equal(read_back, labels)
    # RTSTRUCT, rasterised independently of crossmod's reader: pydicom's contour points,
    # matplotlib's point-in-polygon test on the pixel centres, even-odd across a slice's polygons
    ds = pydicom.dcmread(row["rtstruct"])
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    origin, spacing = np.array(source.GetOrigin()), np.array(source.GetSpacing())
    nz, ny, nx = labels.shape
    yy, xx = np.mgrid[:ny, :nx]
    centres = np.column_stack([xx.ravel(), yy.ravel()])
    for item in ds.ROIContourSequence:
        name = names[int(item.ReferencedROINumber)]
        raster = np.zeros(labels.shape, bool)
        for contour in item.ContourSequence:
            index = (np.array(contour.ContourData, float).reshape(-1, 3) - origin) / spacing
            k = int(round(index[0, 2]))
            raster[k] ^= PolygonPath(index[:, :2]).contains_points(centres).reshape(ny, nx)
        np.testing.assert_array_equal(raster, labels == (1 if name == "Parotid_L" else 2))


@pytest.mark.parametrize("kind", ["rtstruct", "seg"])
def test_dicom_outputs_pass_the_dicom_validator(dicom_prediction, kind):
    row, _ = dicom_prediction
    assert _dciodvfy_errors(row[kind]) == []


def test_output_types_are_checked(tmp_path):
    case, _ = mr_case(spacing=(0.8, 0.8, 3.5), origin=(0.0, 0.0, 0.0))
    write_image(case.image, tmp_path / "mr.nii.gz")
    with pytest.raises(CrossmodError, match="output types png"):
        seg.predict_path(stub_for(case), tmp_path / "mr.nii.gz", tmp_path / "out", settings(),
                         outputs=("png",))
    with pytest.raises(CrossmodError, match="seg output needs a DICOM image series"):
        seg.predict_path(stub_for(case), tmp_path / "mr.nii.gz", tmp_path / "out", settings(),
                         outputs=("nifti", "seg"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CrossmodError, match="is a file"):
        seg.predict_path(stub_for(case), tmp_path / "mr.nii.gz", tmp_path / "file", settings())


def test_augmentation_moves_image_and_labels_together_and_never_flips():
    """The U-Nets' jitter (segmentation.augment, on in the openkbp tier) warps image and labels by
    the same affine map within its stated ranges, keeps each gland on its own side, and is
    reproducible from the generator."""
    size = 64
    x = torch.zeros(16, 1, size, size)
    y = torch.zeros(16, size, size, dtype=torch.long)
    x[:, :, 24:40, 8:24], y[:, 24:40, 8:24] = 1.0, 1  # one side's gland, bright
    x[:, :, 24:40, 40:56], y[:, 24:40, 40:56] = 0.5, 2  # the other's, dimmer
    xa, ya = seg.augment_batch(x, y, np.random.default_rng(3))
    xb, yb = seg.augment_batch(x, y, np.random.default_rng(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, y)  # it moved something
    cols = torch.arange(size).float()
    for label, side in ((1, lambda c: c < size / 2), (2, lambda c: c > size / 2)):
        area = (ya == label).float().sum(dim=(1, 2))
        # scale +-7 % changes an area by at most ~15 %; nothing lost at the crop's edge here
        assert ((area > 0.8 * 256) & (area < 1.2 * 256)).all()
        centre = ((ya == label).float() * cols).sum(dim=(1, 2)) / area
        assert side(centre).all()  # never mirrored
        # the image moved with its labels: inside the warped gland, the gland's own intensity
        inside = xa[:, 0][ya == label]
        assert inside.mean() > (0.6 if label == 1 else 0.3)
    assert xa[:, 0][ya == 0].mean() < 0.1  # and outside, the background
    with pytest.raises(CrossmodError, match="segmentation.augment must be true or false"):
        seg.segmentation_config({"segmentation": {"augment": "yes"}})


def test_training_with_augmentation_differs_and_stays_reproducible(tmp_path):
    data = fake_slices()
    plain = seg.train_unet(data, tmp_path / "plain", settings(epochs=1), progress=False)
    jitter = seg.train_unet(data, tmp_path / "a", settings(epochs=1, augment=True), progress=False)
    again = seg.train_unet(data, tmp_path / "b", settings(epochs=1, augment=True), progress=False)
    weights = {name: seg.load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("plain", "a", "b")}
    assert state_equal(weights["a"], weights["b"])
    assert not state_equal(weights["plain"], weights["a"])
    assert plain["epochs_run"] == jitter["epochs_run"] == again["epochs_run"] == 1
