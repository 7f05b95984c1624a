"""Paper section 2.E: training the 2D U-Net that contours the parotids, the six models of the
comparison, and the run-level stage (train every model, then contour every test patient).

The network and its settings are in :mod:`crossmod_lib.unet`; predicting a volume in
:mod:`crossmod_lib.inference`.

The loss
    Soft (multi-class) Dice over the two parotid classes only: per class c,
    ``D_c = (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` with softmax probabilities p and
    one-hot labels g, the sums running over all pixels *of the whole batch* (most slices hold no
    parotid, so a per-slice Dice would be undefined or noisy); loss = 1 - mean_c D_c, s =
    ``dice_smooth`` (1, as in the Keras implementations of the paper's time). Background is left
    out by default (``dice_background: false``): it covers > 99 % of the pixels and its Dice is
    ~1 almost at once, so it mostly dilutes the gradient (on the demo phantom, including it gave
    a mean Dice of 0.81 where leaving it out gave 0.91 with the same budget).

    Foreground-only soft Dice has one trap, seen on the phantom: a class whose probability is
    spread over the whole image gets a gradient ~ G / P^2 (P: its predicted volume), nearly zero,
    and can stay there (Parotid_L stuck at Dice 0.01 for 20 epochs while Parotid_R reached 0.9).
    The output layer therefore starts at the class prior: its background bias is 4 (p = 0.96
    background everywhere), so each parotid class grows from small predicted volumes.

Training (section 2.E)
    Patients (never slices) are split 80/20 into training and validation with a seeded shuffle.
    Adam, learning rate 5e-5; the validation loss (the same soft Dice loss, accumulated over the
    whole validation set) is monitored by :class:`PlateauStopper`: an epoch *improves* when the
    validation loss is more than ``min_delta`` (1 %, relative) below the best improving value so
    far; after ``lr_patience`` epochs without improvement the learning rate is multiplied by
    ``lr_factor`` (never below ``min_lr`` = 1e-7; the paper gives neither factor nor patience);
    after ``patience`` (10) epochs without improvement training stops; at most ``epochs`` (100).
    The best checkpoint (lowest validation loss so far, any decrease) is kept as ``best.pt``.
    Beyond the paper, ``lr_schedule: cosine`` (:class:`CosineSchedule`) anneals the learning rate
    over all ``epochs`` instead and keeps the last epoch (no early stopping, no pick on the
    validation loss).
    ``loss: dice_ce`` (:func:`training_loss`) adds the pixel-wise cross-entropy to the soft Dice
    of the training batches, so no parotid class is left without a gradient.

    Every epoch the full state (weights, optimiser, stopper, history, torch RNG state as a tensor)
    is written atomically to ``last.pt`` (temporary file + ``os.replace``), and ``log.csv``
    (epoch, train loss, validation loss and Dice, learning rate, seconds) is rewritten. The batch
    order and every random augmentation of epoch e come from a generator seeded with (seed, e),
    so ``resume=True`` continues from ``last.pt`` and gives bit-identical weights on CPU.
    Checkpoints are read with ``torch.load(..., weights_only=True)`` only: they hold tensors and
    plain Python values. On a GPU the forward pass runs under bf16 autocast with channels-last
    tensors; the loss is computed in float32. On a CPU the same holds with ``cpu_bf16`` (beyond
    the paper; only where the CPU computes bf16 natively, :func:`crossmod_lib.unet.training_bf16`);
    predictions on a CPU stay fp32. ``crossmod bench unet`` measures what it gains.

    This part of the module imports only numpy and torch, so ``python -m
    crossmod_lib.segmentation train --slices X.npz --out DIR --config cfg.json`` runs on a bare
    GPU machine from ``.npz`` files. Inference on image volumes (SimpleITK, scipy) imports its
    libraries inside the functions.

Augmentation (``augment``, off as in the paper)
    Small intensity jitter (gamma 0.8-1.25, gain 0.9-1.1) and a small affine jitter (rotation
    +-7 deg, scale +-7 %, shift +-4 %). No flips: a left-right flip would turn a left parotid
    into a right one under a "left" label.

Baselines (:func:`model_recipes`, :func:`train_model`), all trained by :func:`train_unet`
    ``cross_modality``: the paper; registered synthetic MR (``cleaned/training_slices.npz``) with
    the CT labels, 80/20 patient split; tested on every real MR patient.
    ``ct_only``: the paper's benchmark; CT with CT labels; ``ct_test_fraction`` of the CT patients
    are held out (seeded, by patient) as its test set, the rest split 80/20.
    ``naive``: no training; the ct_only network applied to real MR as it is (so it saw the same
    CT patients as ct_only, not all of them).
    ``mr_oracle``: real MR with real MR labels (the phantom's MR is annotated), patient-level
    ``oracle_folds``-fold cross-validation: each fold's model is tested on that fold's patients
    and trained (80/20) on the others, so every MR patient gets one out-of-fold prediction.
    ``domain_random``: all CT with CT labels, every training batch through
    :func:`randomise_intensities` (validation slices randomised once, fixed seed); tested on MR.
    ``few_shot``: the cross-modality network fine-tuned (``few_shot_lr``, at most
    ``few_shot_epochs``) on the labels of k real MR patients, the first k of a seeded shuffle (so
    the sets are nested); with so few patients no one is held out for validation: the stopping
    rules watch the loss on the k patients' own slices. Tested on the other MR patients (compare
    the k values on the patients none of them used: all but the largest k's).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CrossmodError
# The network, its settings and checkpoints (crossmod_lib.unet) and inference on whole volumes
# (crossmod_lib.inference) are their own modules; their names are kept here too, so
# ``segmentation.X`` stays the one place a notebook or script reaches the U-Net from.
from .inference import (  # noqa: F401
    bench_inference, largest_components, masks_from_labels, predict_case,
    predict_label_maps, predict_labels, predict_path, predict_slices)
from .runs import PredictionFiles, RunFolder, TrainingFiles
from .unet import (  # noqa: F401
    CHECKPOINT_FORMAT, CLASSES, STRUCTURES, UNet, _atomic_text, _autocast, _plain, _to_input,
    architecture_table, build_model, count_parameters, flops_per_slice, load_checkpoint, load_model,
    resolve_device, save_checkpoint, segmentation_config, training_bf16, training_seed)
from .slices import annotated_patients, read_slices
from .training import progress_bar, write_log

if TYPE_CHECKING:  # pandas is imported where it is used: training needs torch + numpy only
    import pandas as pd

KINDS = ("cross_modality", "ct_only", "naive", "mr_oracle", "domain_random", "few_shot")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_dice_L", "val_dice_R", "lr",
               "seconds", "improved")

# ----------------------------------------------------------------------------------------------
# Loss and metrics


def dice_statistics(probs: torch.Tensor, target: torch.Tensor, classes: int | None = None):
    """Per class: (sum p*g, sum p, sum g) over batch and pixels; ``probs`` [B, C, H, W],
    ``target`` [B, H, W] integer labels."""
    classes = classes or probs.shape[1]
    onehot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)


def dice_from_statistics(intersection, prob_sum, target_sum, smooth: float = 1.0):
    return (2 * intersection + smooth) / (prob_sum + target_sum + smooth)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, include_background: bool = False,
                   smooth: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) with the one-hot target, the sums
    running over the whole batch; background left out unless ``include_background``."""
    probs = torch.softmax(logits.float(), dim=1)
    dice = dice_from_statistics(*dice_statistics(probs, target), smooth=smooth)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


def training_loss(logits: torch.Tensor, target: torch.Tensor, cfg: dict) -> torch.Tensor:
    """The loss a training batch minimises, ``segmentation.loss``: ``dice``, the paper's soft Dice
    (:func:`soft_dice_loss`), or ``dice_ce`` (beyond the paper, as nnU-Net trains): soft Dice plus
    the pixel-wise cross-entropy. Why: the soft Dice of a class the network has stopped
    predicting gives it almost no gradient, so a parotid can stay dead for a whole run (seen on
    the openkbp tier: validation Dice 0 for one side in every epoch); the cross-entropy keeps
    pulling every mislabelled pixel. Validation always uses the soft Dice loss, so model choice
    and plateaus mean the same under both."""
    loss = soft_dice_loss(logits, target, cfg["dice_background"], cfg["dice_smooth"])
    if cfg["loss"] == "dice_ce":
        loss = loss + F.cross_entropy(logits.float(), target)
    return loss


# ----------------------------------------------------------------------------------------------
# Early stopping and learning-rate plateau


class PlateauStopper:
    """ReduceLROnPlateau and early stopping on the validation loss, in one small state machine.

    ``step(loss)`` after each epoch returns ``{"lr", "improved", "best", "stop"}``: ``improved``
    when the loss is more than ``min_delta`` (relative) below the best improving loss so far
    (this resets both patience counters); ``best`` when it is the lowest loss so far (the best
    checkpoint is saved then); after ``lr_patience`` epochs without improvement the learning rate
    is multiplied by ``factor`` (not below ``min_lr``) and that counter restarts; after
    ``patience`` epochs without improvement ``stop`` is true.
    """

    def __init__(self, lr: float, min_lr: float = 1e-7, factor: float = 0.5, lr_patience: int = 5,
                 patience: int = 10, min_delta: float = 0.01):
        self.lr = float(lr)
        self.min_lr = float(min_lr)
        self.factor = float(factor)
        self.lr_patience = int(lr_patience)
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.reference = math.inf   # loss of the last improving epoch
        self.best = math.inf        # lowest loss seen
        self.wait_lr = 0
        self.wait_stop = 0
        self.stopped = False

    def step(self, loss: float) -> dict:
        loss = float(loss)
        is_best = loss < self.best
        if is_best:
            self.best = loss
        improved = math.isinf(self.reference) or loss < self.reference * (1.0 - self.min_delta)
        if not math.isfinite(loss):
            improved = is_best = False
        if improved:
            self.reference = loss
            self.wait_lr = self.wait_stop = 0
        else:
            self.wait_lr += 1
            self.wait_stop += 1
            if self.wait_lr >= self.lr_patience:
                self.lr = max(self.lr * self.factor, self.min_lr)
                self.wait_lr = 0
            if self.wait_stop >= self.patience:
                self.stopped = True
        return {"lr": self.lr, "improved": improved, "best": is_best, "stop": self.stopped}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "lr", "min_lr", "factor", "lr_patience", "patience", "min_delta", "reference", "best",
            "wait_lr", "wait_stop", "stopped")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class CosineSchedule:
    """A cosine learning-rate schedule over a fixed number of epochs, with the interface of
    :class:`PlateauStopper` (``segmentation.lr_schedule: cosine``; beyond the paper).

    Epoch e (0-based) trains at ``min_lr + (lr - min_lr) (1 + cos(pi e / epochs)) / 2``; training
    never stops early and every epoch is ``best``, so ``best.pt`` is the last epoch's weights.
    Why: a U-Net trained for a few hundred steps and picked by a validation loss that swings from
    epoch to epoch (on synthetic MR, for the cross-modality network) carries that choice's noise
    into its test result; annealing to the end and taking the end removes the choice.
    ``improved`` still reports a validation improvement (as the plateau rule defines it) for the log.
    """

    def __init__(self, lr: float, epochs: int, min_lr: float = 1e-7, min_delta: float = 0.01):
        self.lr0 = float(lr)
        self.epochs = int(epochs)
        self.min_lr = float(min_lr)
        self.min_delta = float(min_delta)
        self.epoch = 0
        self.reference = math.inf
        self.lr = self._at(0)
        self.stopped = False

    def _at(self, epoch: int) -> float:
        fraction = min(epoch, self.epochs) / max(self.epochs, 1)
        return self.min_lr + 0.5 * (self.lr0 - self.min_lr) * (1.0 + math.cos(math.pi * fraction))

    def step(self, loss: float) -> dict:
        loss = float(loss)
        improved = math.isfinite(loss) and (math.isinf(self.reference)
                                            or loss < self.reference * (1.0 - self.min_delta))
        if improved:
            self.reference = loss
        self.epoch += 1
        self.lr = self._at(self.epoch)
        return {"lr": self.lr, "improved": improved, "best": True, "stop": False}

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in (
            "lr0", "epochs", "min_lr", "min_delta", "epoch", "reference", "lr", "stopped")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def learning_rate_schedule(cfg: dict, lr0: float, epochs: int):
    """The schedule ``segmentation.lr_schedule`` names: :class:`PlateauStopper` (``plateau``, the
    paper's) or :class:`CosineSchedule` (``cosine``)."""
    if cfg["lr_schedule"] == "cosine":
        return CosineSchedule(lr0, epochs, cfg["min_lr"], cfg["min_delta"])
    return PlateauStopper(lr0, cfg["min_lr"], cfg["lr_factor"], cfg["lr_patience"],
                          cfg["patience"], cfg["min_delta"])


# ----------------------------------------------------------------------------------------------
# Patient-level splits


def _unique(patients) -> list[str]:
    return sorted({str(p) for p in np.asarray(patients).ravel()})


def split_patients(patients, fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split patient ids (not slices) into (kept, held out), ``fraction`` of them held out after a
    seeded shuffle: at least one of each when there are two or more patients, none held out when
    there is one (or ``fraction`` is 0). Both lists are sorted."""
    ids = _unique(patients)
    n = len(ids)
    if n < 2 or fraction <= 0:
        return ids, []
    n_held = min(max(round(fraction * n), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    held = sorted(ids[i] for i in order[:n_held])
    return sorted(set(ids) - set(held)), held


def oracle_folds(patients, folds: int, seed: int) -> list[list[str]]:
    """Patient-level cross-validation folds (seeded), as lists of test patients."""
    ids = _unique(patients)
    if folds > len(ids):
        raise CrossmodError(f"segmentation.oracle_folds: {folds} folds for {len(ids)} MR patients")
    order = np.random.default_rng([seed, 2]).permutation(len(ids))
    return [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]


def few_shot_patients(patients, k: int, seed: int) -> list[str]:
    """The k real-MR patients whose labels fine-tune the network: the first k of a seeded shuffle,
    so the sets are nested (the patients of k=1 are among those of k=3, ...)."""
    ids = _unique(patients)
    if k > len(ids):
        raise CrossmodError(f"segmentation.few_shot_k: k={k} but only {len(ids)} MR patients")
    order = np.random.default_rng([seed, 3]).permutation(len(ids))
    return sorted(ids[i] for i in order[:k])


def ct_test_patients(patients, fraction: float, seed: int) -> list[str]:
    """CT patients held out to test the CT-only network (seeded, patient level)."""
    return split_patients(patients, fraction, int(seed) + 1)[1]


# ----------------------------------------------------------------------------------------------
# Intensity transforms


def _gaussian_blur(plane: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.1:
        return plane
    radius = max(1, math.ceil(3 * sigma))
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    out = plane
    for axis in (0, 1):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)],
                        mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for w, t in zip(kernel, range(2 * radius + 1)):
            acc += w * (padded[t:t + n] if axis == 0 else padded[:, t:t + n])
        out = acc
    return out


def randomise_intensities(image: np.ndarray, rng: np.random.Generator, labels: np.ndarray | None = None,
                          *, bands=(8, 70, 125, 200), monotone_prob: float = 0.5,
                          class_sd=(0.0, 12.0), blur_sigma=(0.0, 1.0), noise_sd=(0.0, 8.0),
                          bias_strength: float = 0.3, air_max: float = 30.0,
                          upper_percentile: float = 99.0) -> np.ndarray:
    """Domain randomisation of windowed CT slices (0-255, [H, W] or [N, H, W]), the SynthSeg idea.

    Tissue classes are intensity bands of the windowed CT (``bands``: edges on 0-255; the first
    band is air and stays dark, mean below ``air_max``), plus, when ``labels`` are given, the
    parotids (labels > 0) as a class of their own. Per slice, one of two remappings:

    * monotone (probability ``monotone_prob``): a random piecewise-linear transfer function with
      knots at the band edges, increasing or decreasing (half of the time each), applied to the
      CT intensity itself, so the texture inside a class is kept;
    * non-monotone: each class gets a random mean (uniform on 0-255) and a random spread
      (Gaussian, sd uniform in ``class_sd``), as in SynthSeg's Gaussian mixture.

    Then a Gaussian blur (sigma uniform in ``blur_sigma`` pixels), a smooth multiplicative bias
    field (quadratic, amplitude ``bias_strength``), Gaussian noise (sd uniform in ``noise_sd``),
    and the MR-like standardisation of the preprocessing: the ``upper_percentile`` of non-air
    pixels maps to 255. Returns uint8 of the input's shape; labels and geometry are unchanged.
    """
    image = np.asarray(image)
    single = image.ndim == 2
    stack = image[None] if single else image
    lab = None if labels is None else (np.asarray(labels)[None] if single else np.asarray(labels))
    edges = [0.0] + [float(b) for b in bands] + [256.0]
    out = np.empty(stack.shape, dtype=np.uint8)
    h, w = stack.shape[-2:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    for k, plane in enumerate(stack.astype(np.float32)):
        cls = np.digitize(plane, edges[1:-1])  # 0 = air, 1.. = tissue bands
        n_bands = len(edges) - 1
        if lab is not None:
            cls = np.where(lab[k] > 0, n_bands, cls)
        air = cls == 0
        result = np.empty_like(plane)
        if rng.random() < monotone_prob:
            knots_x = np.array(edges[1:], dtype=np.float32)
            knots_x[-1] = 255.0
            knots_y = np.sort(rng.uniform(0.0, 255.0, len(knots_x)))
            if rng.random() < 0.5:
                knots_y = knots_y[::-1]
            result = np.interp(plane, knots_x, knots_y).astype(np.float32)
        else:
            n_classes = n_bands + (1 if lab is not None else 0)
            means = rng.uniform(0.0, 255.0, n_classes)
            sds = rng.uniform(class_sd[0], class_sd[1], n_classes)
            result = (means[cls] + sds[cls] * rng.standard_normal(plane.shape)).astype(np.float32)
        air_mean = rng.uniform(0.0, air_max)
        result[air] = air_mean + rng.uniform(0, 3.0) * rng.standard_normal(int(air.sum()))
        out[k] = _scanner_effects(result, air, rng, (xx, yy), blur_sigma, bias_strength, noise_sd,
                                  upper_percentile)
    return out[0] if single else out


def _scanner_effects(plane: np.ndarray, air: np.ndarray, rng: np.random.Generator, grid,
                     blur_sigma, bias_strength: float, noise_sd, upper_percentile: float) -> np.ndarray:
    """Blur, a smooth multiplicative bias field and noise on one float plane, then the MR-like
    standardisation (the ``upper_percentile`` of non-air pixels maps to 255); uint8 back."""
    xx, yy = grid
    result = _gaussian_blur(plane, float(rng.uniform(*blur_sigma)))
    if bias_strength > 0:
        c = rng.uniform(-bias_strength, bias_strength, 5)
        result = result * np.exp(c[0] * xx + c[1] * yy + c[2] * xx * yy + c[3] * xx**2
                                 + c[4] * yy**2).astype(np.float32)
    sd = float(rng.uniform(*noise_sd))
    if sd > 0:
        result = result + sd * rng.standard_normal(plane.shape).astype(np.float32)
    result = np.clip(result, 0.0, None)
    head = result[~air]
    upper = float(np.percentile(head, upper_percentile)) if head.size else float(result.max())
    scale = 255.0 / upper if upper > 1e-3 else 1.0
    return np.round(np.clip(result * scale, 0.0, 255.0)).astype(np.uint8)


def vary_appearance(image: np.ndarray, rng: np.random.Generator, *, gamma=(0.7, 1.4),
                    blur_sigma=(0.0, 1.5), noise_sd=(0.0, 8.0), bias_strength: float = 0.3,
                    air_level: float = 10.0, upper_percentile: float = 99.0) -> np.ndarray:
    """Random scanner appearance of MR-like slices (uint8 0-255, [H, W] or [N, H, W]).

    Beyond the paper: the synthetic MR of a CycleGAN trained for minutes is speckled where real
    MR is smooth, and its contrast drifts with the budget; a U-Net trained on it alone learns that
    texture. Per slice a gamma curve (exponent uniform in ``gamma``), then the blur, bias field,
    noise and standardisation of :func:`randomise_intensities`, which keep anatomy and labels.
    Pixels at or below ``air_level`` are air (kept out of the standardisation). Returns uint8 of
    the input's shape.
    """
    image = np.asarray(image)
    single = image.ndim == 2
    stack = image[None] if single else image
    out = np.empty(stack.shape, dtype=np.uint8)
    h, w = stack.shape[-2:]
    grid = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    for k, plane in enumerate(stack.astype(np.float32)):
        air = plane <= air_level
        curved = 255.0 * (plane / 255.0) ** float(rng.uniform(*gamma))
        out[k] = _scanner_effects(curved.astype(np.float32), air, rng, grid, blur_sigma,
                                  bias_strength, noise_sd, upper_percentile)
    return out[0] if single else out


def augment_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                  max_rotation_deg: float = 7.0, max_scale: float = 0.07, max_shift: float = 0.04,
                  gamma=(0.8, 1.25), gain=(0.9, 1.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Small intensity and affine jitter of a batch (x [B,1,H,W] in 0-1, y [B,H,W] labels).

    No flips: left and right parotids have their own labels.
    """
    b = x.shape[0]
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, b))
    scale = rng.uniform(1 - max_scale, 1 + max_scale, b)
    shift = rng.uniform(-max_shift, max_shift, (b, 2)) * 2  # normalised coordinates span 2
    theta = np.zeros((b, 2, 3), dtype=np.float32)
    theta[:, 0, 0] = np.cos(angle) / scale
    theta[:, 0, 1] = -np.sin(angle) / scale
    theta[:, 1, 0] = np.sin(angle) / scale
    theta[:, 1, 1] = np.cos(angle) / scale
    theta[:, :, 2] = shift
    theta_t = torch.from_numpy(theta).to(x.device)
    grid = F.affine_grid(theta_t, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False)[:, 0].round().long()
    g = torch.from_numpy(rng.uniform(*gamma, b).astype(np.float32)).to(x.device).view(b, 1, 1, 1)
    a = torch.from_numpy(rng.uniform(*gain, b).astype(np.float32)).to(x.device).view(b, 1, 1, 1)
    x = (x.clamp(0, 1) ** g * a).clamp(0, 1)
    return x, y


def _write_log(history: list[dict], path: Path) -> None:
    write_log(history, LOG_COLUMNS, path)


# ----------------------------------------------------------------------------------------------
# Training


def load_training_slices(path: str | Path) -> dict[str, np.ndarray]:
    """A slices ``.npz`` (image uint8 [N,H,W], labels, patient, ...), numpy only."""
    arrays = read_slices(path, "training slices", ("image", "labels", "patient"))
    _check_arrays(arrays, str(path))
    return arrays


def _check_arrays(arrays: dict, where: str) -> None:
    missing = [k for k in ("image", "labels", "patient") if k not in arrays]
    if missing:
        raise CrossmodError(f"{where}: missing array(s) {', '.join(missing)}")
    image, labels = arrays["image"], arrays["labels"]
    if image.ndim != 3 or labels.shape != image.shape or len(arrays["patient"]) != len(image):
        raise CrossmodError(f"{where}: image [N,H,W], labels of the same shape and one patient per "
                            f"slice expected, got {image.shape}, {labels.shape}, "
                            f"{np.shape(arrays['patient'])}")
    if len(image) == 0:
        raise CrossmodError(f"{where}: no slices")
    if labels.size and labels.max() >= len(CLASSES):
        raise CrossmodError(f"{where}: labels must be 0 (background), 1 (Parotid_L), 2 (Parotid_R)")


def _as_arrays(data) -> tuple[dict, str]:
    if isinstance(data, (str, Path)):
        return load_training_slices(data), str(data)
    if isinstance(data, dict):
        _check_arrays(data, "slices")
        return data, "arrays"
    raise CrossmodError(f"slices: expected a .npz path or a dict of arrays, got {type(data).__name__}")


def _select(arrays: dict, patients) -> np.ndarray:
    wanted = {str(p) for p in patients}
    return np.flatnonzero(np.isin(np.asarray(arrays["patient"]).astype(str), list(wanted)))


@torch.no_grad()
def evaluate(model: UNet, images: np.ndarray, labels: np.ndarray, batch_size: int = 32,
             include_background: bool = False, smooth: float = 1.0, device=None,
             amp: bool | None = None) -> dict:
    """Soft Dice loss and hard Dice per parotid over a whole slice set (sums over all slices).
    ``amp``: bf16 autocast (with channels_last); None: on a GPU only, as predictions."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    model.eval()
    n_classes = len(CLASSES)
    soft = torch.zeros(3, n_classes, dtype=torch.float64)
    hard = torch.zeros(3, n_classes, dtype=torch.float64)
    amp = device.type == "cuda" if amp is None else bool(amp)
    channels_last = device.type == "cuda" or amp
    for start in range(0, len(images), batch_size):
        x = _to_input(images[start:start + batch_size], device, channels_last)
        y = torch.from_numpy(labels[start:start + batch_size].astype(np.int64)).to(device)
        with _autocast(device, amp):
            logits = model(x)
        probs = torch.softmax(logits.float(), dim=1)
        soft += torch.stack([s.double().cpu() for s in dice_statistics(probs, y, n_classes)])
        pred = F.one_hot(probs.argmax(1), n_classes).permute(0, 3, 1, 2).float()
        hard += torch.stack([s.double().cpu() for s in dice_statistics(pred, y, n_classes)])
    soft_dice = dice_from_statistics(*soft, smooth=smooth)
    loss = 1.0 - (soft_dice if include_background else soft_dice[1:]).mean()
    inter, psum, tsum = hard
    hard_dice = torch.where(psum + tsum > 0, 2 * inter / (psum + tsum).clamp_min(1e-12),
                            torch.ones_like(inter))
    return {"loss": float(loss), "dice": float(hard_dice[1:].mean()),
            "dice_L": float(hard_dice[1]), "dice_R": float(hard_dice[2])}


def _arch_state(cfg: dict) -> dict:
    return {"base_features": int(cfg["base_features"]), "levels": int(cfg["levels"]),
            "in_channels": 1, "classes": len(CLASSES), "norm": str(cfg["norm"])}


def _training_step(model, optimiser, x: torch.Tensor, y: torch.Tensor, cfg: dict,
                   device: torch.device, bf16: bool) -> torch.Tensor:
    """One optimiser step of :func:`train_unet` (forward under ``bf16`` autocast, the training
    loss in fp32, backward, Adam); :func:`training_throughput` times this very step."""
    with _autocast(device, bf16):
        logits = model(x)
    loss = training_loss(logits, y, cfg)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss


def training_throughput(settings, size: int, *, bf16: bool = False, iterations: int = 10,
                        warmup: int = 3, batch_size: int | None = None, device="cpu") -> float:
    """Training slices per second of the settings' U-Net at ``size`` x ``size``: forward,
    the training loss, backward and an Adam step on random slices with two square "parotids",
    after ``warmup`` untimed steps. ``bf16``: autocast and channels_last, as :func:`train_unet`
    with ``cpu_bf16`` (or ``amp`` on a GPU); else exact fp32."""
    cfg = segmentation_config(settings)
    device = resolve_device(device)
    batch = int(batch_size or cfg["batch_size"])
    torch.manual_seed(0)
    model = UNet(**_arch_state(cfg)).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=float(cfg["learning_rate"]))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size), dtype=np.uint8)
    labels = np.zeros((batch, size, size), np.int64)
    labels[:, size // 3:size // 2, size // 5:size // 3] = 1
    labels[:, size // 3:size // 2, 2 * size // 3:4 * size // 5] = 2
    x = _to_input(images, device, bf16)
    y = torch.from_numpy(labels).to(device)
    model.train()

    def step():
        _training_step(model, optimiser, x, y, cfg, device, bf16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(iterations):
        step()
    sync()
    return iterations * batch / (time.perf_counter() - started)


def train_unet(data, out_dir: str | Path, settings=None, *, seed: int | None = None, init=None,
               resume: bool = False, split: dict | None = None, transform: str | None = None,
               learning_rate: float | None = None, epochs: int | None = None,
               meta: dict | None = None, device=None, progress: bool = True,
               stop_after_epochs: int | None = None) -> dict:
    """Train the U-Net on a slice set (section 2.E); returns a summary dict.

    ``data``: a slices ``.npz`` path or a dict of arrays (image uint8 [N,H,W], labels 0/1/2,
    patient). ``settings``: a profile or its ``segmentation`` block (defaults: the paper's).
    ``split``: ``{"train": [...], "val": [...]}`` patient ids; by default a seeded 80/20 patient
    split of every patient in ``data`` (one patient only: validation on the training slices).
    ``init``: a checkpoint whose weights start the training (fine-tuning). ``transform``:
    ``"randomise"`` applies :func:`randomise_intensities` to every training batch (the validation
    slices are randomised once, with a fixed generator). ``resume``: continue from
    ``<out>/last.pt`` when it exists (a finished run is returned as it is).
    ``stop_after_epochs``: return after this many epochs of this call (as if interrupted).

    Writes ``<out>/last.pt`` (every epoch), ``best.pt``, ``log.csv`` and ``summary.json``.
    """
    started = time.perf_counter()
    arrays, source = _as_arrays(data)
    cfg = segmentation_config(settings)
    if seed is None:
        seed = training_seed(settings)
    lr0 = float(learning_rate if learning_rate is not None else cfg["learning_rate"])
    max_epochs = int(epochs if epochs is not None else cfg["epochs"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device if device is not None else cfg["device"])
    use_amp = training_bf16(cfg, device)
    channels_last = device.type == "cuda" or use_amp

    if split is None:
        train_ids, val_ids = split_patients(arrays["patient"], cfg["val_fraction"], seed)
    else:
        train_ids, val_ids = _unique(split["train"]), _unique(split.get("val", []))
        overlap = set(train_ids) & set(val_ids)
        if overlap:
            raise CrossmodError(f"split: patients in both training and validation: {sorted(overlap)}")
    val_is_train = not val_ids
    if val_is_train:
        val_ids = list(train_ids)
    train_idx = _select(arrays, train_ids)
    val_idx = _select(arrays, val_ids)
    if len(train_idx) == 0:
        raise CrossmodError(f"{source}: no training slices for patients {train_ids}")
    if not np.any(arrays["labels"][train_idx]):
        raise CrossmodError(f"{source}: the training slices hold no parotid label (an unannotated "
                            "cohort cannot train this model)")

    images = arrays["image"]
    labels = arrays["labels"]  # uint8; each batch is converted to int64 on its own
    val_images = images[val_idx]
    val_labels = labels[val_idx]
    if transform == "randomise":
        val_images = randomise_intensities(val_images, np.random.default_rng([seed, 99]),
                                           labels=val_labels, bands=cfg["dr_bands"],
                                           monotone_prob=cfg["dr_monotone_prob"])
    elif transform not in (None, "appearance"):  # appearance: training batches only
        raise CrossmodError(f"transform must be None, 'randomise' or 'appearance', got {transform!r}")

    arch = _arch_state(cfg)
    torch.manual_seed(seed)
    model = UNet(**arch)
    if init is not None:
        init_ckpt = load_checkpoint(init)
        if init_ckpt["arch"] != arch:
            raise CrossmodError(f"{init}: architecture {init_ckpt['arch']} differs from the "
                                f"settings' {arch}")
        model.load_state_dict(init_ckpt["model"])
    model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr0)
    stopper = learning_rate_schedule(cfg, lr0, max_epochs)
    run_meta = _plain({
        **(meta or {}),
        "data": source,
        "train_patients": train_ids,
        "val_patients": [] if val_is_train else val_ids,
        "validation": "training slices" if val_is_train else "held-out patients",
        "transform": transform,
        "init": str(init) if init is not None else None,
        "seed": seed,
        "slices": {"train": len(train_idx), "val": len(val_idx)},
        "classes": list(CLASSES),
    })
    if isinstance(settings, dict) and "preprocessing" in settings:
        run_meta.setdefault("preprocessing", _plain(settings["preprocessing"]))
    plain_cfg = _plain(cfg)
    history: list[dict] = []
    epoch = 0
    best_epoch, best_val = None, math.inf
    done = False
    last_path, best_path = out_dir / TrainingFiles.LAST, out_dir / TrainingFiles.BEST

    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        for key, mine in (("arch", arch), ("split", {"train": train_ids, "val": val_ids}),
                          ("seed", seed)):
            if state[key] != mine:
                raise CrossmodError(f"{last_path}: cannot resume: {key} differs from this call's "
                                    f"({state[key]} vs {mine})")
        for key, before in (("lr_schedule", "plateau"), ("loss", "dice")):  # older checkpoints: before
            theirs = state.get("config", {}).get(key, before)
            if theirs != cfg[key]:
                raise CrossmodError(f"{last_path}: cannot resume: {key} {theirs} there, "
                                    f"{cfg[key]} in this call's settings")
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimizer"])
        stopper.load_state_dict(state["stopper"])
        torch.set_rng_state(state["torch_rng"])
        history = list(state["history"])
        epoch = int(state["epoch"])
        best_epoch, best_val = state["best_epoch"], float(state["best_val_loss"])
        done = bool(state["done"])

    def checkpoint_state() -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                "optimizer": optimiser.state_dict(), "stopper": stopper.state_dict(),
                "torch_rng": torch.get_rng_state(), "epoch": epoch, "history": history,
                "best_epoch": best_epoch, "best_val_loss": best_val, "done": done,
                "arch": arch, "config": plain_cfg, "split": {"train": train_ids, "val": val_ids},
                "seed": seed, "meta": run_meta}

    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg["cpu_threads"]:
        torch.set_num_threads(int(cfg["cpu_threads"]))
    try:
        bar = progress_bar(max_epochs, epoch, f"train {run_meta.get('name', 'U-Net')}", "epoch",
                           enabled=progress and not done, leave=False)
        batch_size = int(cfg["batch_size"])
        epochs_this_call = 0
        while not done and epoch < max_epochs:
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                break
            t0 = time.perf_counter()
            rng = np.random.default_rng([seed, epoch])
            order = train_idx[rng.permutation(len(train_idx))]
            steps = math.ceil(len(order) / batch_size)
            if cfg["max_steps_per_epoch"]:
                steps = min(steps, int(cfg["max_steps_per_epoch"]))
            for group in optimiser.param_groups:
                group["lr"] = stopper.lr
            model.train()
            losses = []
            for step in range(steps):
                idx = np.sort(order[step * batch_size:(step + 1) * batch_size])
                batch = images[idx]
                if transform == "randomise":
                    batch = randomise_intensities(batch, rng, labels=labels[idx], bands=cfg["dr_bands"],
                                                  monotone_prob=cfg["dr_monotone_prob"])
                elif transform == "appearance":
                    batch = vary_appearance(batch, rng)
                x = _to_input(batch, device, channels_last)
                y = torch.from_numpy(labels[idx].astype(np.int64)).to(device)
                if cfg["augment"]:
                    x, y = augment_batch(x, y, rng)
                loss = _training_step(model, optimiser, x, y, cfg, device, use_amp)
                losses.append(float(loss.detach()))
            val = evaluate(model, val_images, val_labels, int(cfg["inference_batch"]),
                           cfg["dice_background"], cfg["dice_smooth"], device, use_amp)
            lr_used = stopper.lr
            decision = stopper.step(val["loss"])
            epoch += 1
            epochs_this_call += 1
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val["loss"],
                   "val_dice": val["dice"], "val_dice_L": val["dice_L"], "val_dice_R": val["dice_R"],
                   "lr": lr_used, "seconds": round(time.perf_counter() - t0, 3),
                   "improved": bool(decision["improved"])}
            history.append(row)
            if decision["best"]:
                best_epoch, best_val = epoch, float(val["loss"])
                save_checkpoint({"format": CHECKPOINT_FORMAT, "model": model.state_dict(),
                                 "arch": arch, "config": plain_cfg,
                                 "meta": {**run_meta, "epoch": epoch, "val_loss": val["loss"],
                                          "val_dice": val["dice"]}}, best_path)
            done = decision["stop"] or epoch >= max_epochs
            save_checkpoint(checkpoint_state(), last_path)
            _write_log(history, out_dir / TrainingFiles.LOG)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{val['loss']:.3f}",
                                dice=f"{val['dice']:.3f}", lr=f"{lr_used:.1e}")
        if bar is not None:
            bar.close()
    finally:
        torch.set_num_threads(threads)
    summary = {
        "out_dir": str(out_dir), "best": str(best_path) if best_path.is_file() else None,
        "last": str(last_path), "epochs_run": epoch, "finished": done,
        "stopped_early": bool(done and epoch < max_epochs), "best_epoch": best_epoch,
        "best_val_loss": best_val,
        "best_val_dice": next((r["val_dice"] for r in history if r["epoch"] == best_epoch), None),
        "seconds": round(time.perf_counter() - started, 2),
        "seconds_training": round(sum(r["seconds"] for r in history), 2),
        "device": str(device), **run_meta,
    }
    _atomic_text(json.dumps(_plain(summary), indent=2), out_dir / TrainingFiles.SUMMARY)
    return summary


# ----------------------------------------------------------------------------------------------
# The six models


def model_recipes(profile: dict) -> list[dict]:
    """What each model of the comparison is trained on, in an order where every ``init_from``
    comes first. ``data`` names the :class:`RunFolder` artefact trained on (None: not trained);
    ``options`` go to :func:`train_model`.

    ``test``: the cohort a model is evaluated on (``MR`` or ``CT``); the test patients are in
    the training summary (``test_patients``; None: the whole cohort).
    """
    cfg = segmentation_config(profile)
    recipes = [
        {"name": "cross_modality", "kind": "cross_modality", "data": "training_slices",
         "init_from": None, "options": {}, "test": "MR",
         "title": "Cross-modality (synthetic MR, CT labels)",
         "description": "the paper: registered synthetic MR from the CycleGAN with the CT labels, "
                        "80/20 patient split; tested on every real MR patient"},
        {"name": "ct_only", "kind": "ct_only", "data": "ct_slices", "init_from": None,
         "options": {}, "test": "CT", "title": "CT only (CT → CT)",
         "description": f"the paper's benchmark: CT with CT labels, {cfg['ct_test_fraction']:.0%} "
                        "of the CT patients held out for testing, the rest split 80/20"},
        {"name": "naive", "kind": "naive", "data": None, "init_from": "ct_only", "options": {},
         "test": "MR", "title": "Naive (CT network on MR)",
         "description": "the CT-only network applied to real MR as it is (no training)"},
    ]
    for fold in range(cfg["oracle_folds"]):
        recipes.append(
            {"name": f"mr_oracle_fold{fold}", "kind": "mr_oracle", "data": "mr_slices",
             "init_from": None, "options": {"fold": fold}, "test": "MR",
             "title": f"MR oracle (fold {fold + 1}/{cfg['oracle_folds']})",
             "description": "real MR with real MR labels, patient-level "
                            f"{cfg['oracle_folds']}-fold cross-validation: tested on the fold's "
                            "patients, trained (80/20) on the others"})
    recipes.append(
        {"name": "domain_random", "kind": "domain_random", "data": "ct_slices",
         "init_from": None, "options": {}, "test": "MR", "title": "Domain randomisation (CT)",
         "description": "CT with CT labels, random monotone and non-monotone intensities per "
                        "tissue class, blur, bias and noise (SynthSeg idea); tested on every real "
                        "MR patient"})
    for k in cfg["few_shot_k"]:
        recipes.append(
            {"name": f"few_shot_k{k}", "kind": "few_shot", "data": "mr_slices",
             "init_from": "cross_modality", "options": {"k": int(k)}, "test": "MR",
             "title": f"Few-shot (cross-modality + {k} MR patient{'s' if k > 1 else ''})",
             "description": f"the cross-modality network fine-tuned on {k} real MR patients' "
                            "labels; tested on the other MR patients"})
    return recipes


#: The models that train (and test) on manual MR contours.
MR_LABEL_KINDS = ("mr_oracle", "few_shot")


def mr_label_shortfall(recipe: dict, annotated: int, profile: dict) -> str | None:
    """Why ``recipe`` cannot be trained with ``annotated`` MR patients having manual contours
    (None: it can). The MR oracle's cross-validation needs a patient per fold and two to train;
    few-shot with k patients needs one more to test on. The paper's method itself needs none."""
    if recipe["kind"] not in MR_LABEL_KINDS:
        return None
    cfg = segmentation_config(profile)
    if recipe["kind"] == "mr_oracle":
        needed = max(cfg["oracle_folds"], 2)
    else:
        needed = int(recipe["options"]["k"]) + 1
    if annotated >= needed:
        return None
    return (f"{annotated} MR patient{'s' if annotated != 1 else ''} with manual contours; "
            f"{recipe['title']} needs {needed}")


def usable_recipes(run, recipes=None) -> tuple[list[dict], dict[str, str]]:
    """The recipes of a run (:func:`model_recipes`, or ``recipes``) that its MR cohort can train,
    and the others with the reason (:func:`mr_label_shortfall`); counts the annotated MR patients
    of ``prepared/mr_slices.npz`` only when a recipe needs MR labels."""
    recipes = model_recipes(run.profile) if recipes is None else list(recipes)
    if not any(r["kind"] in MR_LABEL_KINDS for r in recipes):
        return recipes, {}
    path = run.mr_slices
    if not path.is_file():  # nothing prepared yet: the caller's own checks say what is missing
        return recipes, {}
    arrays = read_slices(path, "prepared MR slices", ("image", "patient"))
    annotated = len(annotated_patients(arrays))
    skipped = {}
    for recipe in recipes:
        reason = mr_label_shortfall(recipe, annotated, run.profile)
        if reason:
            skipped[recipe["name"]] = reason
    # a model that starts from a skipped one is skipped too
    for recipe in recipes:
        if recipe["init_from"] in skipped and recipe["name"] not in skipped:
            skipped[recipe["name"]] = f"starts from {recipe['init_from']}, not trained"
    return [r for r in recipes if r["name"] not in skipped], skipped


def _transform(kind: str, cfg: dict) -> str | None:
    """The intensity transform of a model's training batches (see :func:`train_unet`)."""
    if kind == "domain_random":
        return "randomise"
    if kind == "cross_modality" and cfg["cross_modality_appearance"]:
        return "appearance"
    return None


def train_model(kind: str, data, out_dir: str | Path, settings: dict, init=None, *,
                fold: int | None = None, k: int | None = None, resume: bool = False,
                device=None, progress: bool = True, name: str | None = None,
                stop_after_epochs: int | None = None) -> dict:
    """Train one model of the comparison (see :func:`model_recipes`); returns its summary.

    ``kind``: cross_modality (``data``: the cleaned synthetic-MR slices), ct_only (CT slices;
    tested on held-out CT patients), naive (no training: ``init`` is the ct_only checkpoint,
    copied with kind naive), mr_oracle (MR slices, ``fold`` of the cross-validation), domain_random
    (CT slices, randomised intensities), few_shot (MR slices, ``k`` patients, ``init``: the
    cross-modality checkpoint). ``data``: a ``.npz`` path or a dict of arrays. ``settings``: the
    profile. The summary's ``test_patients`` lists who the model may be tested on (None: the
    whole ``test_modality`` cohort).
    """
    if kind not in KINDS:
        raise CrossmodError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    cfg = segmentation_config(settings)
    seed = training_seed(settings)
    out_dir = Path(out_dir)
    name = name or {"mr_oracle": f"mr_oracle_fold{fold}", "few_shot": f"few_shot_k{k}"}.get(kind, kind)
    meta = {"kind": kind, "name": name, "profile": settings.get("name") if isinstance(settings, dict) else None}

    if kind == "naive":
        if init is None:
            raise CrossmodError("naive: give init, the ct_only checkpoint (naive is not trained)")
        ckpt = load_checkpoint(init)
        ckpt["meta"] = {**ckpt.get("meta", {}), **meta, "model_from": str(init),
                        "test_modality": "MR", "test_patients": None}
        save_checkpoint(ckpt, out_dir / TrainingFiles.BEST)
        summary = {"out_dir": str(out_dir), "best": str(out_dir / TrainingFiles.BEST), "trained": False,
                   "epochs_run": 0, "seconds": 0.0, **_plain(ckpt["meta"])}
        _atomic_text(json.dumps(_plain(summary), indent=2), out_dir / TrainingFiles.SUMMARY)
        return summary

    arrays, _ = _as_arrays(data)
    ids = _unique(arrays["patient"])
    options = {}
    if kind in ("cross_modality", "domain_random"):
        test_modality, test_patients = "MR", None
        pool = ids
    elif kind == "ct_only":
        held = ct_test_patients(ids, cfg["ct_test_fraction"], seed)
        pool = sorted(set(ids) - set(held))
        test_modality, test_patients = "CT", held
    elif kind == "mr_oracle":
        ids = _unique(annotated_patients(arrays))  # only manual MR contours can train or test it
        folds = oracle_folds(ids, cfg["oracle_folds"], seed)
        if fold is None or not 0 <= fold < len(folds):
            raise CrossmodError(f"mr_oracle: fold must be in 0..{len(folds) - 1}, got {fold!r}")
        test_patients = folds[fold]
        pool = sorted(set(ids) - set(test_patients))
        test_modality = "MR"
    else:  # few_shot
        if k is None:
            raise CrossmodError("few_shot: give k, the number of MR patients to fine-tune with")
        if init is None:
            raise CrossmodError("few_shot: give init, the cross-modality checkpoint to fine-tune")
        every = ids  # unannotated MR patients are not fine-tuned on, but are predicted
        ids = _unique(annotated_patients(arrays))
        pool = few_shot_patients(ids, int(k), seed)
        test_modality, test_patients = "MR", sorted(set(every) - set(pool))
        largest = max([int(k)] + [v for v in cfg["few_shot_k"] if v <= len(ids)])
        meta["common_test_patients"] = sorted(set(every) - set(few_shot_patients(ids, largest, seed)))
        options = {"learning_rate": cfg["few_shot_lr"], "epochs": cfg["few_shot_epochs"]}

    if kind == "few_shot":
        split = {"train": pool, "val": []}  # k patients: all train, validation on their slices
    else:
        train_ids, val_ids = split_patients(pool, cfg["val_fraction"], seed)
        split = {"train": train_ids, "val": val_ids}
    meta.update({"test_modality": test_modality, "test_patients": test_patients,
                 "fold": fold, "k": k})
    return train_unet(arrays, out_dir, settings, seed=seed, init=init, resume=resume, split=split,
                      transform=_transform(kind, cfg), meta=meta,
                      device=device, progress=progress, stop_after_epochs=stop_after_epochs,
                      **options)


def train_recipe(recipe: dict, run_root: str | Path, settings: dict, **kwargs) -> dict:
    """:func:`train_model` for one entry of :func:`model_recipes` inside a run folder
    (``<run>/model/<name>/``; ``init_from`` is ``<run>/model/<init_from>/best.pt``)."""
    run_root = Path(run_root)
    model_root = RunFolder.model_root.at(run_root)
    init = model_root / recipe["init_from"] / TrainingFiles.BEST if recipe["init_from"] else None
    data = RunFolder.artefacts()[recipe["data"]].at(run_root) if recipe["data"] else None
    return train_model(recipe["kind"], data, model_root / recipe["name"], settings,
                       init=init, name=recipe["name"], **recipe["options"], **kwargs)


# ----------------------------------------------------------------------------------------------
# A whole run: train every model of the comparison, then contour every test patient


def train_run(run, *, kinds=None, progress: bool = False, resume: bool = True, device=None,
              log=None) -> pd.DataFrame:
    """Train the models of :func:`model_recipes` for a run folder (``<run>/model/<name>/``).

    ``kinds``: only these kinds (and whatever they start from); default all. A model whose
    ``summary.json`` exists and records the same settings is not trained again (``resume``:
    an interrupted one continues from its ``last.pt``). Returns one row per model: name, kind,
    title, epochs run, best epoch, best validation loss and Dice, seconds, test cohort.
    """
    import pandas as pd

    profile = run.profile
    recipes = model_recipes(profile)
    if kinds is not None:
        wanted = {r["name"] for r in recipes if r["kind"] in set(kinds)}
        for recipe in reversed(recipes):  # pull in what a wanted model starts from
            if recipe["name"] in wanted and recipe["init_from"]:
                wanted.add(recipe["init_from"])
        recipes = [r for r in recipes if r["name"] in wanted]
    run.inputs(*sorted({r["data"] for r in recipes if r["data"]}))
    recipes, skipped = usable_recipes(run, recipes)
    settings_text = json.dumps(_plain(segmentation_config(profile)), sort_keys=True)
    rows = []
    for name, reason in skipped.items():
        if log:
            log(f"not training {name}: {reason}")
        shutil.rmtree(run.model_dir(name), ignore_errors=True)  # a stale model would be predicted
    for recipe in recipes:
        out_dir = run.model_dir(recipe["name"])
        summary_path, stamp_path = out_dir / TrainingFiles.SUMMARY, out_dir / TrainingFiles.INPUTS
        # What the model is a function of: settings, training data and starting checkpoint. A
        # re-run of an earlier stage changes the data, so the model is trained again from scratch.
        inputs = {"settings": settings_text,
                  "data": _file_digest(run.inputs(recipe["data"])) if recipe["data"] else None,
                  "init": _file_digest(run.model_dir(recipe["init_from"]) / TrainingFiles.BEST)
                  if recipe["init_from"] else None}
        stamp = json.loads(stamp_path.read_text()) if stamp_path.is_file() else None
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if stamp != inputs or summary is None or not (out_dir / TrainingFiles.BEST).is_file():
            if log:
                log(f"training {recipe['name']} ...")
            continuing = resume and stamp == inputs  # an interrupted run of the same inputs
            if not continuing:
                for stale in (TrainingFiles.LAST, TrainingFiles.BEST, TrainingFiles.SUMMARY, TrainingFiles.LOG):
                    (out_dir / stale).unlink(missing_ok=True)
            _atomic_text(json.dumps(inputs), stamp_path)
            summary = train_recipe(recipe, run.root, profile, resume=continuing, device=device,
                                   progress=progress)
        rows.append({"name": recipe["name"], "kind": recipe["kind"], "title": recipe["title"],
                     "trained": summary.get("trained", True),
                     "epochs_run": summary.get("epochs_run"), "best_epoch": summary.get("best_epoch"),
                     "best_val_loss": summary.get("best_val_loss"),
                     "best_val_dice": summary.get("best_val_dice"),
                     "seconds": summary.get("seconds"), "test": recipe["test"],
                     "test_patients": summary.get("test_patients"), "skipped": ""})
    for recipe in model_recipes(profile):
        if recipe["name"] in skipped:
            rows.append({"name": recipe["name"], "kind": recipe["kind"], "title": recipe["title"],
                         "trained": False, "test": recipe["test"], "skipped": skipped[recipe["name"]]})
    return pd.DataFrame(rows)


def _file_digest(path: Path) -> str:
    import hashlib

    if not path.is_file():
        raise CrossmodError(f"{path}: missing; run the earlier notebook first")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _method_name(recipe: dict) -> str:
    """The name a model's predictions go under: the oracle's folds merge into one method."""
    return "mr_oracle" if recipe["kind"] == "mr_oracle" else recipe["name"]


PREDICTION_COLUMNS = ("model", "title", "patient", "modality", "labels", "labels_lcc", "reference",
                      "seconds", "predict_seconds", "device", "common")

#: The paired control (beyond the paper): the CT-only network on the CT that each simulated MR
#: patient was made from. CT only is otherwise tested on other patients (held-out CT) than the MR
#: methods, so its gap to them mixes the change of modality with the change of patients; on the
#: same patients only the modality differs. Only where the MR cohort is simulated from CT.
PAIRED_CT = "ct_only_paired"
PAIRED_CT_TITLE = "CT only on the MR patients' own CT (paired control)"


def paired_ct_source(sources: dict):
    """``(CohortSource of CT, {MR patient: its source CT folder})`` when the MR cohort was
    simulated from CT patients (:class:`~crossmod_lib.preparation.CohortSource` ``origins``),
    else None: a real MR cohort has no CT of its own patients."""
    from .preparation import CohortSource

    mr = sources.get("MR")
    if mr is None or mr.origins is None or not mr.simulated_from:
        return None
    by_name = {Path(origin).name: Path(origin) for origin in mr.origins}
    table = {patient: by_name[patient] for patient in mr.patient_ids() if patient in by_name}
    if not table:
        return None
    return CohortSource("CT", mr.simulated_from, list(table.values())), table


def predict_run(run, *, progress: bool = False, device=None, models=None) -> pd.DataFrame:
    """Contour every test patient of every trained model of a run; the stage ``predictions/``.

    For each model of :func:`model_recipes` (its ``model/<name>/best.pt`` and ``summary.json``
    must exist): the patients it may be tested on (``test_patients`` of its summary, or its whole
    test cohort), each read from the run's raw cohort, preprocessed as its training data,
    predicted and written on the native grid, raw and with the largest-component
    post-processing: ``predictions/<method>/<patient>_labels.nii.gz`` and ``..._labels_lcc.nii.gz``
    (0 background, 1 Parotid_L, 2 Parotid_R). ``models``: only these model names (e.g. the
    convergence study's ``cross_modality``, ``domain_random``, ``ct_only``). The manual contours of the same patients go to
    ``predictions/reference/<modality>/<patient>_labels.nii.gz``, on the same grid. The oracle's
    folds are one method, ``mr_oracle`` (each patient predicted by the fold that did not see it).
    Where the MR cohort is simulated from CT patients, the CT-only network also contours each MR
    patient's own CT (method :data:`PAIRED_CT`, modality CT, a paired control: the same patients
    as the MR methods, only the modality differs).

    Writes ``predictions/index.csv`` (columns :data:`PREDICTION_COLUMNS`; paths relative to the
    run folder; ``seconds``: preprocess + predict + post-process + write of that patient, plus its
    read time; ``predict_seconds``: the network alone; ``device``: where it ran; ``common``: the
    MR patients every MR method was tested on, for paired comparisons)
    and returns it as a DataFrame.
    """
    import pandas as pd
    import SimpleITK as sitk

    from .io import write_image, write_label_map
    from .preparation import cohort_sources
    from .runs import write_json

    profile = run.profile
    recipes = model_recipes(profile)
    if models is not None:
        unknown = sorted(set(models) - {r["name"] for r in recipes})
        if unknown:
            raise CrossmodError(f"predict_run: no model recipe named {', '.join(unknown)}")
        recipes = [r for r in recipes if r["name"] in set(models)]
    recipes, skipped = usable_recipes(run, recipes)  # too few manual MR contours to train them
    missing = [r["name"] for r in recipes if not (run.model_dir(r["name"]) / TrainingFiles.BEST).is_file()]
    if missing:
        raise CrossmodError(f"{run.model_root}: no trained model for {', '.join(missing)}; "
                            "run chapter 4 (train_run) first")
    sources = cohort_sources(run, progress=False)
    # cohort key -> (source, {patient: item}); PAIRED_CT: the simulated MR patients' own CT
    cohorts = {modality: (source, dict(zip(source.patient_ids(), source.items)))
               for modality, source in sources.items()}
    paired = paired_ct_source(sources) if any(r["name"] == "ct_only" for r in recipes) else None
    if paired is not None:
        cohorts[PAIRED_CT] = paired
    out_root = run.stage("predictions")
    cache: dict = {}

    def case_of(cohort: str, patient: str):
        key = (cohort, patient)
        source, items = cohorts[cohort]
        modality = source.modality
        if key not in cache:
            if patient not in items:
                raise CrossmodError(f"{modality} cohort: test patient {patient!r} not found "
                                    f"(cohort: {source.root})")
            t0 = time.perf_counter()
            case = source.read(items[patient])
            read_s = time.perf_counter() - t0
            reference = run.prediction_references / modality / PredictionFiles.labels(patient)
            if case.structures:
                write_label_map(case.structures, case.image, reference)
            else:  # an unannotated patient: predicted, not evaluated
                reference.unlink(missing_ok=True)
                reference = None
            cache.clear()  # one patient in memory at a time (patients are visited model by model)
            cache[key] = (case, read_s, reference)
        return cache[key]

    rows = []
    tasks = []  # (recipe, patient, cohort, method, title)
    for recipe in recipes:
        summary = json.loads((run.model_dir(recipe["name"]) / TrainingFiles.SUMMARY).read_text())
        patients = summary.get("test_patients") or list(cohorts[recipe["test"]][1])
        method = _method_name(recipe)
        title = "MR oracle (cross-validated)" if method == "mr_oracle" else recipe["title"]
        tasks += [(recipe, patient, recipe["test"], method, title) for patient in patients]
        if recipe["name"] == "ct_only" and paired is not None:
            tasks += [(recipe, patient, PAIRED_CT, PAIRED_CT, PAIRED_CT_TITLE) for patient in paired[1]]
    # Visit patients in order so that each is read once and all its models run together.
    tasks.sort(key=lambda t: (t[2], t[1]))
    iterator = tasks
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(tasks, desc="predict", unit="case")
    models: dict = {}
    for recipe, patient, cohort, method, title in iterator:
        case, read_s, reference = case_of(cohort, patient)
        if recipe["name"] not in models:
            models[recipe["name"]] = load_model(run.model_dir(recipe["name"]) / TrainingFiles.BEST,
                                                resolve_device(device) if device else "cpu")
        t0 = time.perf_counter()
        steps: dict = {}
        maps = predict_label_maps(models[recipe["name"]], case, profile,
                                  modality=cohorts[cohort][0].modality, device=device, timings=steps)
        paths = {}
        for key in ("raw", "lcc"):
            path = out_root / method / PredictionFiles.labels(patient, key)
            write_image(sitk.Cast(maps[key], sitk.sitkUInt8), path)
            paths[key] = path
        seconds = read_s + time.perf_counter() - t0
        rows.append({"model": method, "title": title,
                     "patient": patient, "modality": cohorts[cohort][0].modality,
                     "labels": str(paths["raw"].relative_to(run.root)),
                     "labels_lcc": str(paths["lcc"].relative_to(run.root)),
                     "reference": str(reference.relative_to(run.root)) if reference else "",
                     "seconds": seconds,
                     "predict_seconds": steps.get("predict"),
                     "device": str(next(models[recipe["name"]].parameters()).device)})
    index = pd.DataFrame(rows, columns=[c for c in PREDICTION_COLUMNS if c != "common"])
    mr = index[index["modality"] == "MR"]
    common = set(mr["patient"])
    for _, group in mr.groupby("model"):
        common &= set(group["patient"])
    index["common"] = (index["modality"] == "MR") & index["patient"].isin(common)
    index = index.sort_values(["modality", "model", "patient"]).reset_index(drop=True)
    tmp = run.prediction_index.with_name(f".{run.prediction_index.name}.tmp")
    index.to_csv(tmp, index=False)
    tmp.replace(run.prediction_index)
    mr_patients = mr.drop_duplicates("patient")
    write_json({"models": sorted(index["model"].unique()), "common_mr_patients": sorted(common),
                "postprocess_lcc": bool(segmentation_config(profile)["postprocess_lcc"]),
                "mr_patients": int(len(mr_patients)),
                "mr_patients_annotated": int((mr_patients["reference"] != "").sum()),
                "skipped_models": skipped},
               run.prediction_summary)
    return index


def run(run, *, progress: bool = False, device=None, log=None) -> dict:
    """Stage 4 (sections 2.E and 2.G's inference) over a run folder: train every model of
    :func:`model_recipes` that is not trained on the same inputs yet (:func:`train_run`), then
    contour every test patient with each (:func:`predict_run`). Writes ``model/`` and
    ``predictions/``; returns ``trained`` (one row per model) and ``index`` (one per prediction).
    """
    trained = train_run(run, progress=progress, device=device, log=log)
    index = predict_run(run, progress=progress, device=device)
    return {"trained": trained, "index": index}


def training_logs(run) -> pd.DataFrame:
    """The per-epoch logs of a run's trained models, stacked (column ``model`` + :data:`LOG_COLUMNS`)."""
    import pandas as pd

    frames = []
    for recipe in model_recipes(run.profile):
        path = run.model_dir(recipe["name"]) / TrainingFiles.LOG
        if path.is_file() and path.stat().st_size:
            frame = pd.read_csv(path)
            frame.insert(0, "model", recipe["name"])
            frames.append(frame)
    if not frames:
        raise CrossmodError(f"{run.root / 'model'}: no training logs; run train_run first")
    return pd.concat(frames, ignore_index=True)


def prediction_examples(run, patient: str | None = None, models=None) -> dict:
    """One axial MR slice with the manual and predicted contours of each method, for a figure.

    ``patient``: default the first MR patient with manual contours every MR method was tested
    on (else the first with manual contours, else the first). The slice is the one with the
    largest manual parotid area (no manual contours: the largest predicted area of the first
    method). Returns ``{"patient", "slice", "image" (2D float), "spacing" (row, col mm),
    "reference" (2D labels; zeros when unannotated), "annotated", "predictions": {method: 2D
    labels}, "titles": {method: title}, "box": (y0, y1, x0, x1) around every contour}``, all on
    the native MR grid.
    """
    import SimpleITK as sitk

    from .evaluation import read_prediction_index
    from .preparation import cohort_sources

    index_path = run.inputs("prediction_index")
    index = read_prediction_index(index_path)
    mr = index[index["modality"] == "MR"]
    if mr.empty:
        raise CrossmodError(f"{index_path}: no MR predictions")
    if patient is None:
        annotated = mr[mr["reference"] != ""]
        common = annotated[annotated["common"]]
        patient = min((common if len(common) else annotated if len(annotated) else mr)["patient"])
    rows = mr[mr["patient"] == patient]
    if rows.empty:
        raise CrossmodError(f"{index_path}: no MR predictions for patient {patient!r}")
    if models is not None:
        rows = rows[rows["model"].isin(models)]
    order = list(dict.fromkeys(_method_name(r) for r in model_recipes(run.profile)))
    rows = rows.assign(_order=rows["model"].map({m: i for i, m in enumerate(order)})).sort_values("_order")
    source = cohort_sources(run, progress=False)["MR"]
    item = dict(zip(source.patient_ids(), source.items))[patient]
    mr_image = source.read(item).image
    image = sitk.GetArrayFromImage(mr_image).astype(np.float32)
    volumes = {row["model"]: sitk.GetArrayFromImage(sitk.ReadImage(str(run.root / row["labels"])))
               for _, row in rows.iterrows()}
    reference_path = rows.iloc[0]["reference"]
    annotated = bool(reference_path)
    if annotated:
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(run.root / reference_path)))
    else:
        reference = np.zeros(image.shape, dtype=np.uint8)
    area_of = reference if annotated else next(iter(volumes.values()))
    z = int(np.argmax((area_of > 0).sum(axis=(1, 2))))
    predictions = {model: volume[z] for model, volume in volumes.items()}
    titles = dict(zip(rows["model"], rows["title"]))
    union = (reference[z] > 0) | np.any([p > 0 for p in predictions.values()], axis=0)
    spacing = mr_image.GetSpacing()
    pad = int(60 / spacing[1])  # the parotid region: 6 cm around the contours
    if union.any():
        ys, xs = np.nonzero(union)
        box = (max(ys.min() - pad, 0), min(ys.max() + pad, image.shape[1]),
               max(xs.min() - pad, 0), min(xs.max() + pad, image.shape[2]))
    else:
        box = (0, image.shape[1], 0, image.shape[2])
    return {"patient": patient, "slice": z, "image": image[z], "spacing": (spacing[1], spacing[0]),
            "reference": reference[z], "annotated": annotated, "predictions": predictions,
            "titles": titles, "box": tuple(int(v) for v in box)}


# ----------------------------------------------------------------------------------------------
# Command line: python -m crossmod_lib.segmentation train|predict ...


def _read_config(path: str | None) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CrossmodError(f"{p}: config file not found")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(p.read_text())
        else:
            data = json.loads(p.read_text())
    except Exception as exc:  # noqa: BLE001
        raise CrossmodError(f"{p}: cannot read config ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(data, dict):
        raise CrossmodError(f"{p}: the config must be a mapping (a profile or its segmentation block)")
    return data if "segmentation" in data else {"segmentation": data}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m crossmod_lib.segmentation",
        description="Train the parotid U-Net from .npz slices, or contour MR volumes.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a slices .npz (numpy + torch only)")
    p.add_argument("--slices", required=True, help=".npz with image, labels, patient")
    p.add_argument("--out", required=True, help="output folder (checkpoints, log.csv)")
    p.add_argument("--config", help="JSON/YAML: a resolved profile or its segmentation block")
    p.add_argument("--kind", default="cross_modality", choices=[k for k in KINDS if k != "naive"])
    p.add_argument("--init", help="checkpoint to start from (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    p.add_argument("--fold", type=int, help="mr_oracle: cross-validation fold")
    p.add_argument("--k", type=int, help="few_shot: number of MR patients")
    p.add_argument("--device", help="auto, cpu or cuda (default: the config's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    q = sub.add_parser("predict", help="contour MR volume(s) with a trained model")
    q.add_argument("--model", required=True)
    q.add_argument("--input", required=True)
    q.add_argument("--output", required=True)
    q.add_argument("--config", help="JSON/YAML profile (preprocessing when the model has none)")
    q.add_argument("--rtstruct", action="store_true")
    args = parser.parse_args(argv)
    try:
        settings = _read_config(args.config)
        if args.command == "train":
            summary = train_model(args.kind, args.slices, args.out, settings, init=args.init,
                                  fold=args.fold, k=args.k, resume=args.resume,
                                  device=args.device, progress=not args.quiet)
            print(json.dumps({k: summary.get(k) for k in (
                "best", "epochs_run", "best_epoch", "best_val_loss", "best_val_dice", "seconds")}))
        else:
            rows = predict_path(args.model, args.input, args.output, settings, args.rtstruct)
            for row in rows:
                print(row["labels"] + (f"  {row['rtstruct']}" if row["rtstruct"] else ""))
    except CrossmodError as exc:
        print(f"crossmod: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
