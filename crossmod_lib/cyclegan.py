"""Paper section 2.C: the 2D CycleGAN that turns every CT slice into a synthetic MR slice.

Everything here needs only ``torch`` and ``numpy`` (the standard library aside), so the module can
be copied to a bare GPU machine together with the prepared ``.npz`` slices and run there with
``python -m crossmod_lib.cyclegan train ...`` (see :func:`main`).

Networks (paper Fig. 4, the reference implementation of Zhu et al.)
    :class:`Generator` is the reference ``ResnetGenerator``: a 7 x 7 convolution (``ngf``
    features), two stride-2 3 x 3 convolutions (2 ``ngf``, 4 ``ngf``), ``n_blocks`` residual blocks,
    two stride-2 3 x 3 transposed convolutions (2 ``ngf``, ``ngf``) and a 7 x 7 convolution to one
    channel followed by tanh; reflection padding, instance normalisation without affine parameters
    (so every convolution has a bias, as the reference's ``use_bias``) and ReLU. At the paper's
    size (``ngf`` 64, 9 blocks, one channel in and out) it has 11,365,633 parameters.
    :class:`Discriminator` is the reference 70 x 70 PatchGAN (``NLayerDiscriminator``, 3 layers):
    4 x 4 convolutions with 64 (stride 2, no normalisation), 128, 256 (stride 2), 512 (stride 1)
    and 1 (stride 1) features, LeakyReLU 0.2 and instance normalisation; 2,762,689 parameters at
    ``ndf`` 64; a 256 x 256 slice gives 30 x 30 patch scores. Weights start from N(0, 0.02), biases
    zero (the reference's ``init_type normal``).

Objective (section 2.C.1 and eq. 1)
    Least-squares GAN loss (targets 1 for real, 0 for fake; weight ``lambda_adv``), the cycle L1
    loss in both directions (``lambda_cycle``), the reference's identity loss
    ``lambda_cycle * lambda_identity * |G_MR(MR) - MR|_1`` (and the same for G_CT; the paper does
    not mention it but used the reference's defaults, where ``lambda_identity`` is 0.5) and the
    paper's geometric consistency loss (``lambda_geo``): the binary cross-entropy between the
    prepared binary head mask of the source slice and the differentiable head mask
    (:func:`soft_head_mask`) of the generated slice, for CT -> synthetic MR and for MR -> synthetic
    CT. Eq. (1) as printed has the roles of the two masks swapped and no minus sign; the only form
    that is finite with a binary source mask and differentiable in the generator is the usual one,
    ``BCE(prediction = M(G(I_source)), target = M(I_source))``, used here. Each discriminator is
    trained on the real slices and on a history pool of 50 generated ones (:class:`ImagePool`).

Training (section 2.C.2)
    Adam (lr 2e-4, beta1 0.5), the learning rate constant for ``epochs_constant`` epochs, then
    decaying linearly to zero over ``epochs_decay`` epochs (the reference's ``linear`` policy,
    :func:`lr_factor`). One epoch visits every CT slice once in a shuffled order; each CT slice is
    paired with an MR slice drawn at random (unpaired data). Intensities 0-255 are scaled to
    [-1, 1]. :func:`train` checkpoints every epoch (atomically) and continues a stopped run exactly
    (``resume=True``); it can use bf16 autocast, channels_last and torch.compile (CPU or GPU)
    and several GPUs through ``torchrun`` (DistributedDataParallel).

Then :func:`synthesise` writes a synthetic MR for every CT slice, :func:`example_grid` gives the
arrays of an example figure, :func:`architecture_table` the networks' sizes and FLOPs and
:func:`bench_cyclegan` the training throughput.

Command line (what a bare GPU machine needs: this package, torch, numpy, the two ``.npz`` files)::

    python -m crossmod_lib.cyclegan config --profile full --out cfg.json        # needs PyYAML
    python -m crossmod_lib.cyclegan train --ct ct_slices.npz --mr mr_slices.npz --out run \\
        --config cfg.json [--resume]
    torchrun --nproc-per-node 8 -m crossmod_lib.cyclegan train ...              # several GPUs
    python -m crossmod_lib.cyclegan synthesise --checkpoint run/checkpoint.pt \\
        --ct ct_slices.npz --out synthetic_mr.npz
    python -m crossmod_lib.cyclegan bench --config cfg.json --size 256

``cfg.json`` is the profile's ``cyclegan`` block with ``seed`` resolved and
``preprocessing.head_threshold`` added (:func:`settings_from_profile`).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .defaults import section_defaults
from .errors import CrossmodError
from .runs import TrainingFiles, write_json
from .training import progress_bar, read_checkpoint, save_checkpoint
from .slices import read_slices, write_slices

__all__ = [
    "DEFAULT_SETTINGS", "LOSS_TERMS", "CycleGAN", "Discriminator", "Generator", "ImagePool",
    "ablation_settings", "architecture_table", "bench_cyclegan", "branch", "check_settings",
    "count_parameters", "cpu_has_native_bf16", "speed_mode", "training_throughput", "example_grid", "flops_per_slice", "geometric_loss", "head_logits",
    "init_weights", "load_checkpoint", "load_generators", "lr_factor", "lsgan_loss", "main",
    "settings_from_profile", "soft_head_mask", "synthesise", "train", "training_flops_per_image",
]

# The paper's settings are the ``cyclegan`` block of ``crossmod_lib/profiles/full.yaml`` (with a
# comment on each), the one place they are written: ``DEFAULT_SETTINGS`` reads it on first use (None
# on a bare GPU machine without PyYAML, where the JSON config comes complete), so importing this
# module needs only torch and numpy. ``head_threshold`` comes from ``preprocessing.head_threshold``.


def __getattr__(name: str):
    if name == "DEFAULT_SETTINGS":
        return section_defaults("cyclegan")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


TRANSLATORS = ("cyclegan", "cut", "fastcut")
UPSAMPLING = ("transpose", "resize")
DISC_AUGMENTS = ("brightness", "contrast", "translation", "cutout")
DEFAULT_SEED = 2021
DEFAULT_HEAD_THRESHOLD = 20.0

# Settings a resumed run must share with its checkpoint (the others only change speed).
_TRAINING_KEYS = (
    "ngf", "ndf", "n_blocks", "epochs_constant", "epochs_decay", "max_iterations_per_epoch",
    "batch_size", "lr", "beta1", "beta2", "lambda_adv", "lambda_cycle", "lambda_identity",
    "lambda_geo", "geometric_loss", "mask_temperature", "pool_size", "init_gain", "seed",
    "head_threshold", "translator", "lambda_nce", "nce_patches", "nce_temperature", "nce_features",
    "random_crop_scale", "random_flip", "cycle_noise_sd", "upsampling", "disc_augment",
    "geo_mask_offset_px", "lambda_mind", "lambda_seg",
)


def _checkpoint_setting(settings: dict, key: str):
    """A checkpoint's setting; one added to full.yaml after the checkpoint was written takes its
    default there (a new setting's default keeps the behaviour from before it existed)."""
    if key in settings:
        return settings[key]
    return (section_defaults("cyclegan") or {}).get(key)


def _changed_settings(old: dict, s: dict, ignore=()) -> list[str]:
    """The training settings in which a checkpoint's ``old`` differ from ``s``."""
    return [key for key in _TRAINING_KEYS if key not in ignore and _checkpoint_setting(old, key) != s[key]]


# Columns of losses.csv besides epoch, iteration, lr and seconds. Unweighted values except
# ``G_total`` (the weighted generator objective that is minimised). ``geo_*`` is logged also when
# ``geometric_loss`` is false (then computed without gradient), for the ablation.
LOSS_TERMS = (
    "G_total", "G_adv_MR", "G_adv_CT", "cycle_CT", "cycle_MR", "identity_MR", "identity_CT",
    "geo_CT", "geo_MR", "D_MR", "D_CT", "mind_CT", "mind_MR", "seg_CT",
)

CHECKPOINT_NAME = TrainingFiles.CHECKPOINT
LOSSES_NAME = TrainingFiles.LOSSES
SUMMARY_NAME = TrainingFiles.SUMMARY
SETTINGS_NAME = TrainingFiles.SETTINGS
_LOG_EVERY = 20          # iterations between moving logged losses off the GPU (one sync)
_FILL_CHECK_EVERY = 8    # hole-filling iterations between convergence checks
_HEAD_CLIP = 10.0        # head logits are clipped here inside the hole fill (see soft_head_mask)

# Dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, SXM parts unless named otherwise.
# H200 has the H100's compute (more and faster memory), hence the same numbers.
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0},
    "H100": {"bf16": 989.0, "tf32": 494.0},
    "H200": {"bf16": 989.0, "tf32": 494.0},
    "A100": {"bf16": 312.0, "tf32": 156.0},
}


# ----------------------------------------------------------------------------------------------
# Settings


def _setting_error(source: str, key: str, problem: str) -> CrossmodError:
    return CrossmodError(f"{source}: setting 'cyclegan.{key}' {problem}")


def check_settings(settings: dict, source: str = "cyclegan settings") -> dict:
    """The settings completed with :data:`DEFAULT_SETTINGS` and checked; unknown keys refused.

    ``head_threshold`` may be included (it is in the JSON config of the command line); ``seed``
    ``None`` becomes 2021 (the full profile's seed). Problems are one-line
    :class:`~crossmod_lib.errors.CrossmodError` naming ``source`` and the setting.
    """
    if not isinstance(settings, dict):
        raise CrossmodError(f"{source}: the cyclegan settings must be a mapping")
    defaults = section_defaults("cyclegan")
    known = defaults if defaults is not None else settings  # no PyYAML: the config as given
    unknown = sorted(set(settings) - set(known) - {"head_threshold"})
    if unknown:
        raise _setting_error(source, unknown[0], "is unknown")
    if defaults is None:
        missing = [k for k in _TRAINING_KEYS if k not in settings and k != "head_threshold"]
        if missing:
            raise _setting_error(source, missing[0], "is missing, and without PyYAML there is no "
                                 "full.yaml default: write the config complete (settings_from_profile)")
    s = {**known, **settings}
    if s["seed"] is None:
        s["seed"] = DEFAULT_SEED

    def integer(key, low, allow_none=False):
        value = s[key]
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise _setting_error(source, key, f"must be an integer >= {low}, got {value!r}")

    def number(key, low, high=math.inf, low_open=False):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _setting_error(source, key, f"must be a number, got {value!r}")
        if value < low or (low_open and value == low) or value > high:
            bound = f"> {low}" if low_open else f">= {low}"
            if high < math.inf:
                bound += f" and <= {high}"
            raise _setting_error(source, key, f"must be {bound}, got {value!r}")

    for key in ("ngf", "ndf", "batch_size"):
        integer(key, 1)
    for key in ("n_blocks", "epochs_constant", "epochs_decay", "pool_size", "cpu_threads", "seed"):
        integer(key, 0)
    integer("max_iterations_per_epoch", 1, allow_none=True)
    integer("ablation_iterations_per_epoch", 1, allow_none=True)
    if s["epochs_constant"] + s["epochs_decay"] < 1:
        raise _setting_error(source, "epochs_decay", "and epochs_constant must add up to >= 1")
    number("lr", 0.0, low_open=True)
    number("beta1", 0.0, 0.999999)
    number("beta2", 0.0, 0.999999)
    for key in ("lambda_adv", "lambda_cycle", "lambda_identity", "lambda_geo", "init_gain"):
        number(key, 0.0)
    number("mask_temperature", 0.0, low_open=True)
    number("random_crop_scale", 1.0, 2.0)
    if "head_threshold" in s:
        number("head_threshold", 0.0, 255.0)
    for key in ("geometric_loss", "bf16", "channels_last", "compile", "deterministic", "random_flip"):
        if not isinstance(s[key], bool):
            raise _setting_error(source, key, f"must be true or false, got {s[key]!r}")
    if s["translator"] not in TRANSLATORS:
        raise _setting_error(source, "translator", f"must be one of {', '.join(TRANSLATORS)}, "
                                                   f"got {s['translator']!r}")
    number("cycle_noise_sd", 0.0, 2.0)
    # loss terms of the CycleGAN alone: weights >= 0, and refused for a translator without them
    for key, used_by in (("lambda_mind", "two generators"), ("lambda_seg", "CT -> MR generator")):
        number(key, 0.0)
        if s[key] > 0 and s["translator"] != "cyclegan":
            raise _setting_error(source, key, f"is for the CycleGAN's {used_by}; "
                                              f"translator {s['translator']!r} does not use it")
    offset = s["geo_mask_offset_px"]
    if isinstance(offset, bool) or not isinstance(offset, int) or abs(offset) > 8:
        raise _setting_error(source, "geo_mask_offset_px", f"must be an integer from -8 to 8, got {offset!r}")
    if s["upsampling"] not in UPSAMPLING:
        raise _setting_error(source, "upsampling", f"must be one of {', '.join(UPSAMPLING)}, "
                                                   f"got {s['upsampling']!r}")
    augments = s["disc_augment"]
    if (not isinstance(augments, (list, tuple)) or len(set(augments)) != len(augments)
            or any(a not in DISC_AUGMENTS for a in augments)):
        raise _setting_error(source, "disc_augment", f"must be a list of distinct names among "
                                                     f"{', '.join(DISC_AUGMENTS)}, got {augments!r}")
    if augments and s["translator"] != "cyclegan":
        raise _setting_error(source, "disc_augment", f"is for the CycleGAN's discriminators; "
                                                     f"translator {s['translator']!r} does not use it")
    s["disc_augment"] = list(augments)
    if s["cycle_noise_sd"] > 0 and s["translator"] != "cyclegan":
        raise _setting_error(source, "cycle_noise_sd", f"is for the CycleGAN's cycle passes; "
                                                       f"translator {s['translator']!r} has none")
    if s["lambda_nce"] is not None:
        number("lambda_nce", 0.0)
    integer("nce_patches", 1)
    integer("nce_features", 1)
    number("nce_temperature", 0.0, low_open=True)
    return s


def settings_from_profile(profile: dict) -> dict:
    """The JSON config of the command line: the profile's ``cyclegan`` block, its seed resolved
    (``null`` takes the profile's top-level ``seed``) and ``preprocessing.head_threshold``."""
    block = dict(profile.get("cyclegan") or {})
    if block.get("seed") is None:
        block["seed"] = int(profile.get("seed", DEFAULT_SEED))
    block["head_threshold"] = float(profile["preprocessing"]["head_threshold"])
    return check_settings(block, f"profile {profile.get('name', '?')}")


def ablation_settings(settings: dict, geometric_loss: bool) -> dict:
    """Settings of one arm of the ablation (with or without the geometric loss).

    Both arms use ``ablation_iterations_per_epoch`` (when set) as their iterations per epoch, so
    they are compared at the same budget; when it is null the ablation arms have the main run's
    budget and the main run itself can serve as the arm with the geometric loss.
    """
    s = check_settings(settings)
    s["geometric_loss"] = bool(geometric_loss)
    if s["ablation_iterations_per_epoch"] is not None:
        s["max_iterations_per_epoch"] = s["ablation_iterations_per_epoch"]
    return s


def lr_factor(epoch: int, epochs_constant: int, epochs_decay: int) -> float:
    """Multiplier of the initial learning rate during (0-based) ``epoch``.

    1 for the first ``epochs_constant`` epochs, then ``1 - (epoch + 1 - epochs_constant) /
    (epochs_decay + 1)``: the reference's ``linear`` policy, which falls by the same step every
    epoch and would reach zero one epoch after the last (100 + 100 epochs: 1, ..., 1, 100/101,
    ..., 1/101).
    """
    return 1.0 - max(0, epoch + 1 - epochs_constant) / float(epochs_decay + 1)


# ----------------------------------------------------------------------------------------------
# Networks (paper Fig. 4)


class InstanceNorm(nn.Module):
    """Instance normalisation without affine parameters (the reference's ``InstanceNorm2d``).

    fp32 input: ``F.instance_norm`` itself. Reduced-precision input (a convolution's output under
    bf16 autocast): statistics in fp32, the result back in the input's precision, so the
    following ReLU, padding and convolution stay in bf16; autocast would instead run the norm in
    fp32 and hand fp32 on, which on two CPU cores costs 12-18 % of a CycleGAN step in casts and
    memory traffic (measured at the demo size). No parameters or buffers: checkpoints of either
    are the same.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = int(channels), float(eps)

    def forward(self, x):
        if x.dtype == torch.float32:
            return F.instance_norm(x, eps=self.eps)
        xf = x.float()
        var, mean = torch.var_mean(xf, dim=(2, 3), unbiased=False, keepdim=True)
        return ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}"


class ResidualBlock(nn.Module):
    """Two reflection-padded 3 x 3 convolutions with instance norm, ReLU between, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), InstanceNorm(dim), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), InstanceNorm(dim),
        )

    def forward(self, x):
        return x + self.block(x)


class Generator(nn.Module):
    """The reference ResNet generator (paper Fig. 4, top): [N, C, H, W] in, tanh output.

    H and W must be multiples of 4 (two stride-2 levels). ``upsampling`` picks the two layers that
    return to full resolution: ``transpose``, the paper's and the reference's 3 x 3 transposed
    convolutions of stride 2, or ``resize`` (beyond the paper), a nearest-neighbour enlargement by
    2 followed by a 3 x 3 convolution. A stride-2 transposed 3 x 3 kernel covers every other output
    pixel twice as often as its neighbours, which leaves a checkerboard in the output unless the
    weights learn to cancel it; a resize then convolution weighs every output pixel alike
    (Odena et al. 2016, "Deconvolution and checkerboard artifacts").
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, ngf: int = 64,
                 n_blocks: int = 9, upsampling: str = "transpose"):
        super().__init__()
        if upsampling not in UPSAMPLING:
            raise CrossmodError(f"generator upsampling must be one of {', '.join(UPSAMPLING)}, "
                                f"got {upsampling!r}")
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, ngf, 7), InstanceNorm(ngf),
                  nn.ReLU(True)]
        width = ngf
        for _ in range(2):
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                       InstanceNorm(2 * width), nn.ReLU(True)]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(n_blocks)]
        for _ in range(2):
            if upsampling == "transpose":
                layers.append(nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1,
                                                 output_padding=1))
            else:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.ReflectionPad2d(1),
                           nn.Conv2d(width, width // 2, 3)]
            layers += [InstanceNorm(width // 2), nn.ReLU(True)]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class Discriminator(nn.Module):
    """The reference 70 x 70 PatchGAN (paper Fig. 4, bottom): one score per overlapping patch."""

    def __init__(self, in_channels: int = 1, ndf: int = 64):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, 2 * ndf, 4, stride=2, padding=1), InstanceNorm(2 * ndf),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * ndf, 4 * ndf, 4, stride=2, padding=1), InstanceNorm(4 * ndf),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * ndf, 8 * ndf, 4, stride=1, padding=1), InstanceNorm(8 * ndf),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(8 * ndf, 1, 4, stride=1, padding=1),
        )

    def forward(self, x):
        return self.model(x)


def init_weights(net: nn.Module, gain: float = 0.02) -> nn.Module:
    """The reference's ``normal`` initialisation: convolution weights N(0, gain), biases 0."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, gain)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def flops_per_slice(net: nn.Module, size: int, in_channels: int | None = None) -> int:
    """FLOPs of one forward pass of one ``size`` x ``size`` slice, as 2 x multiply-accumulates.

    Counted with forward hooks on every ``Conv2d`` and ``ConvTranspose2d`` while the network runs
    on the ``meta`` device (shapes only, no arithmetic, nothing allocated): a convolution does
    ``output pixels x out_channels x in_channels/groups x kH x kW`` MACs, a transposed convolution
    ``input pixels x in_channels x out_channels/groups x kH x kW``. Bias additions, normalisation
    and activations (well under 1 % here) are not counted.
    """
    net = getattr(net, "_orig_mod", net)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    if in_channels is None:
        in_channels = convs[0].in_channels if convs else 1
    macs = [0]

    def hook(module, inputs, output):
        k = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, nn.ConvTranspose2d):
            pixels = inputs[0].shape[0] * inputs[0].shape[2] * inputs[0].shape[3]
            macs[0] += pixels * module.in_channels * (module.out_channels // module.groups) * k
        else:
            pixels = output.shape[0] * output.shape[2] * output.shape[3]
            macs[0] += pixels * module.out_channels * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in convs]
    try:
        params = {name: torch.empty_like(p, device="meta") for name, p in net.named_parameters()}
        buffers = {name: torch.empty_like(b, device="meta") for name, b in net.named_buffers()}
        x = torch.empty(1, in_channels, size, size, device="meta")
        with torch.no_grad():
            torch.func.functional_call(net, {**params, **buffers}, (x,))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * macs[0]


def _meta_networks(settings: dict) -> tuple[Generator, Discriminator]:
    with torch.device("meta"):
        return (Generator(1, 1, settings["ngf"], settings["n_blocks"], settings["upsampling"]),
                Discriminator(1, settings["ndf"]))


def training_flops_per_image(settings: dict, size: int) -> dict:
    """FLOPs of one training iteration per CT image (both generators and discriminators updated).

    Per image the generators run 6 passes (CT -> MR, MR -> CT, the two cycle passes and the two
    identity passes; 4 without identity loss), each forward F plus backward 2F (weight and input
    gradients). The discriminators run 2 passes in the generator update (fake MR, fake CT; their
    weights frozen, so the backward computes input gradients only, about F) and 4 passes in their
    own update (real and pooled fake, for each; the inputs need no gradient, so the backward is
    the weight gradients only, about F). Total ``18 F_G + 12 F_D`` (``12 F_G`` without identity).
    """
    s = check_settings(settings)
    generator, discriminator = _meta_networks(s)
    f_g = flops_per_slice(generator, size)
    f_d = flops_per_slice(discriminator, size)
    generator_passes = 6 if s["lambda_identity"] > 0 else 4
    total = generator_passes * 3 * f_g + 2 * 2 * f_d + 4 * 2 * f_d
    return {"generator_forward": f_g, "discriminator_forward": f_d,
            "generator_passes": generator_passes, "total": total}


def architecture_table(profile: dict) -> list[dict]:
    """Rows (name, parameters, gflops_per_slice) of the four networks at the profile's crop size,
    and one row for a whole training iteration per slice (see :func:`training_flops_per_image`)."""
    s = check_settings(dict(profile.get("cyclegan") or {}), f"profile {profile.get('name', '?')}")
    size = int(profile["preprocessing"]["crop"])
    generator, discriminator = _meta_networks(s)
    n_g, n_d = count_parameters(generator), count_parameters(discriminator)
    f_g = flops_per_slice(generator, size) / 1e9
    f_d = flops_per_slice(discriminator, size) / 1e9
    rows = [
        {"name": "generator G_MR (CT -> MR)", "parameters": n_g, "gflops_per_slice": f_g},
        {"name": "generator G_CT (MR -> CT)", "parameters": n_g, "gflops_per_slice": f_g},
        {"name": "discriminator D_MR (70x70 PatchGAN)", "parameters": n_d, "gflops_per_slice": f_d},
        {"name": "discriminator D_CT (70x70 PatchGAN)", "parameters": n_d, "gflops_per_slice": f_d},
        {"name": "training iteration (forward + backward, all four)", "parameters": 2 * (n_g + n_d),
         "gflops_per_slice": training_flops_per_image(s, size)["total"] / 1e9},
    ]
    return rows


# ----------------------------------------------------------------------------------------------
# Head mask and losses


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    """0-255 intensities (uint8) to the networks' [-1, 1] as float32."""
    return images.float().div_(127.5).sub_(1.0)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def _ray_start(outside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A lower bound of the reconstruction: the best of the four straight paths from the border
    (running minima along rows and columns), with the index of each path's bottleneck pixel."""
    n, h, w = outside.shape
    rows = torch.arange(h, device=outside.device).view(1, h, 1)
    cols = torch.arange(w, device=outside.device).view(1, 1, w)
    value, at = torch.cummin(outside, dim=2)
    candidates = [(value, rows * w + at)]
    value, at = torch.cummin(outside.flip(2), dim=2)
    candidates.append((value.flip(2), rows * w + (w - 1 - at.flip(2))))
    value, at = torch.cummin(outside, dim=1)
    candidates.append((value, at * w + cols))
    value, at = torch.cummin(outside.flip(1), dim=1)
    candidates.append((value.flip(1), (h - 1 - at.flip(1)) * w + cols))
    best, which = torch.stack([c[0] for c in candidates]).max(dim=0)
    index = torch.stack([c[1].expand(n, h, w) for c in candidates])
    return best, index.gather(0, which.unsqueeze(0)).squeeze(0)


def _fill_step(value, index, outside, own):
    """One step of the reconstruction: best 4-neighbour (the border counts as fully outside),
    capped by the pixel's own value; carries the index of the pixel each value comes from."""
    vpad = F.pad(value, (1, 1, 1, 1), value=math.inf)
    ipad = F.pad(index, (1, 1, 1, 1), value=-1)
    neighbours = torch.stack((vpad[:, :-2, 1:-1], vpad[:, 2:, 1:-1],
                              vpad[:, 1:-1, :-2], vpad[:, 1:-1, 2:]))
    best, which = neighbours.max(dim=0)
    best_index = torch.stack((ipad[:, :-2, 1:-1], ipad[:, 2:, 1:-1],
                              ipad[:, 1:-1, :-2], ipad[:, 1:-1, 2:])
                             ).gather(0, which.unsqueeze(0)).squeeze(0)
    keep_own = outside <= best
    return torch.where(keep_own, outside, best), torch.where(keep_own, own, best_index)


def _fill_chunk(value, index, outside, own):
    """``_FILL_CHECK_EVERY`` reconstruction steps; returns the values before the last step too."""
    before = value
    for _ in range(_FILL_CHECK_EVERY):
        before = value
        value, index = _fill_step(value, index, outside, own)
    return before, value, index


_compiled_fill = None      # torch.compile'd _fill_chunk; False once compiling has failed


def _fill_function(compiled: bool):
    global _compiled_fill
    if not compiled or _compiled_fill is False:
        return _fill_chunk
    if _compiled_fill is None:
        _compiled_fill = torch.compile(_fill_chunk, dynamic=True)
    return _compiled_fill


_CROSS_3D = np.zeros((3, 3, 3), bool)   # 4-connectivity within each slice of an [N, H, W] stack
_CROSS_3D[1, 1, :] = _CROSS_3D[1, :, 1] = True


def _fill_sources_reconstruction(outside: torch.Tensor) -> torch.Tensor:
    """:func:`_fill_sources` on the CPU by one grayscale reconstruction (scikit-image), not iterated.

    ``skimage.morphology.reconstruction`` (by dilation, the image border as the marker, 4-connected
    within each slice) gives every pixel its best escape value directly. A pixel whose value is
    below its own is enclosed; the enclosed pixels form 4-connected lakes (``scipy.ndimage.label``)
    of one level each (two enclosed neighbours share their escape), and each lake's source is a
    pixel on its shore whose own value is that level: the weakest point of the wall, the same
    bottleneck the iterated reconstruction finds (the lowest such index where several pixels tie,
    where the iteration keeps the first it met). Values are exactly those of the iteration; at
    96 x 96 about 4x faster on two CPU cores, the difference between the fill costing a fifth of a
    CycleGAN step and a twentieth.
    """
    from scipy import ndimage
    from skimage.morphology import reconstruction

    out = outside.numpy()
    n, h, w = out.shape
    marker = np.full_like(out, out.min())
    for border in (np.s_[:, 0, :], np.s_[:, -1, :], np.s_[:, :, 0], np.s_[:, :, -1]):
        marker[border] = out[border]
    escape = reconstruction(marker, out, method="dilation", footprint=_CROSS_3D)
    enclosed = escape < out
    own = np.broadcast_to(np.arange(h * w).reshape(1, h, w), out.shape)
    sources = own.copy()
    if enclosed.any():
        lakes, count = ndimage.label(enclosed, structure=_CROSS_3D)
        first_source = np.full(count + 1, h * w, np.int64)
        pad = ((0, 0), (1, 1), (1, 1))
        lake_pad = np.pad(lakes, pad)
        escape_pad = np.pad(escape, pad, constant_values=np.inf)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            window = np.s_[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            neighbour_lake = lake_pad[window]
            # a shore pixel (not enclosed, next to a lake) at the lake's level: a bottleneck
            shore = ~enclosed & (neighbour_lake > 0) & (out == escape_pad[window])
            np.minimum.at(first_source, neighbour_lake[shore], own[shore])
        sources[enclosed] = first_source[lakes[enclosed]]
    return torch.from_numpy(sources)


@functools.cache
def _reconstruction_available() -> bool:
    try:
        import scipy.ndimage  # noqa: F401
        import skimage.morphology  # noqa: F401
    except ImportError:       # a bare GPU machine (torch and numpy only): the iterated fill
        return False
    return True


@torch.no_grad()
def _fill_sources(outside: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """For every pixel, the index of the pixel whose value its hole-filled mask takes.

    ``outside`` [N, H, W] is the negated head logit, clipped below at -``_HEAD_CLIP``. Grayscale
    reconstruction by dilation of the image border under ``outside`` (4-connected, the background
    connectivity of ``scipy.ndimage.binary_fill_holes``) gives every pixel its best escape to the
    border: the largest, over the paths from the border to the pixel, of the smallest ``outside``
    value along the path. Iterated to convergence without autograd from :func:`_ray_start`,
    carrying the index of the pixel the value comes from (the bottleneck), so the caller gathers
    the logits with gradient: the gradient of the unrolled reconstruction, at no memory cost. A
    pixel that is not enclosed keeps its own index (ties go to the pixel itself).

    The iterations needed follow the longest escape path: about 50-90 at 96 x 96, 120-440 at
    256 x 256 (they creep along the partial-volume rim of the head). ``compiled`` runs the steps
    through torch.compile (pure selections, so bit-identical to eager): about one fused kernel
    per step instead of ten, which on a GPU is the difference between launch-bound and
    negligible. If compiling fails (no Triton or C compiler), a warning is given and the steps
    run eagerly. On the CPU, unless ``compiled``, the same sources come from one scikit-image
    reconstruction instead (:func:`_fill_sources_reconstruction`; the iterated steps where
    scikit-image is not installed, as on a bare GPU machine).
    """
    if outside.device.type == "cpu" and not compiled and _reconstruction_available():
        return _fill_sources_reconstruction(outside)
    return _fill_sources_iterated(outside, compiled)


@torch.no_grad()
def _fill_sources_iterated(outside: torch.Tensor, compiled: bool = False) -> torch.Tensor:
    """:func:`_fill_sources` by iterated 4-neighbour steps from :func:`_ray_start` (any device)."""
    global _compiled_fill
    n, h, w = outside.shape
    own = torch.arange(h * w, device=outside.device).view(1, h, w).expand(n, h, w)
    value, index = _ray_start(outside)
    chunk = _fill_function(compiled)
    for _ in range(h * w // _FILL_CHECK_EVERY + 1):
        try:
            before, value_next, index_next = chunk(value, index, outside, own)
        except Exception as exc:  # only a failing compilation lands here
            if chunk is _fill_chunk:
                raise
            import warnings

            reason = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn("torch.compile of the head-mask fill failed, running it eagerly "
                          f"({type(exc).__name__}: {reason})", RuntimeWarning, stacklevel=2)
            _compiled_fill = False
            chunk = _fill_chunk
            before, value_next, index_next = chunk(value, index, outside, own)
        value, index = value_next, index_next
        if torch.equal(before, value):
            break
    return index


def head_logits(x: torch.Tensor, threshold: float = DEFAULT_HEAD_THRESHOLD,
                temperature: float = 5.0, value_range: tuple = (-1.0, 1.0),
                compiled: bool = False) -> torch.Tensor:
    """Logits of the differentiable head mask of images ``x`` [..., H, W].

    See :func:`soft_head_mask`, which is ``sigmoid`` of this; the geometric loss uses the logits.
    """
    lo, hi = value_range
    intensity = (x.float() - lo) * (255.0 / (hi - lo))
    logits = (intensity - threshold) / temperature
    shape = logits.shape
    flat = logits.reshape(-1, shape[-2], shape[-1])
    sources = _fill_sources((-flat.detach()).clamp_min(-_HEAD_CLIP), compiled)
    filled = flat.flatten(1).gather(1, sources.flatten(1))
    return filled.view(shape)


def soft_head_mask(x: torch.Tensor, threshold: float = DEFAULT_HEAD_THRESHOLD,
                   temperature: float = 5.0, value_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """Differentiable head mask (values in (0, 1)) of images ``x`` [..., H, W].

    The soft counterpart of :func:`crossmod_lib.preparation.head_mask` (intensity above
    ``preprocessing.head_threshold`` on the 0-255 scale, largest component, holes filled), used by
    the geometric loss and by the cleaning step:

    1. ``x`` (in ``value_range``, the networks' [-1, 1] by default) is mapped to 0-255 and turned
       into a soft foreground ``sigmoid((intensity - threshold) / temperature)``: the same
       threshold, with a transition about ``temperature`` grey levels wide.
    2. Holes are filled differentiably by grayscale reconstruction: a pixel's filled value is the
       height of the lowest "wall" of soft foreground that separates it from the image border (the
       best 4-connected escape path's weakest point; exactly the soft value itself for pixels not
       enclosed). Dark structures inside the head (airway, cortical bone on MR) therefore count as
       head, weighted by how closed the outline around them is; the gradient of a filled pixel goes
       to the bottleneck pixel of that wall. Inside the fill the logits are clipped at 10 (mask
       0.99995), which spares iterating over the head interior; where the clip matters the mask is
       within 5e-5 of the unclipped result.

    Grayscale reconstruction commutes with thresholding, so ``soft_head_mask(x) > 0.5`` is exactly
    the threshold-and-fill-holes mask; it differs from the hard mask only where the hard one drops
    bright pixels outside the largest connected component. No largest-component step here: bright
    islands outside the source's outline are exactly what the geometric loss should penalise.
    """
    return torch.sigmoid(head_logits(x, threshold, temperature, value_range))


def geometric_loss(generated: torch.Tensor, source_mask: torch.Tensor,
                   threshold: float = DEFAULT_HEAD_THRESHOLD,
                   temperature: float = 5.0) -> torch.Tensor:
    """Paper eq. (1): BCE between the generated slices' soft head mask and the source's binary mask.

    ``generated`` in [-1, 1] and ``source_mask`` (0/1) have the same shape [..., H, W]; the mean
    over pixels and slices, computed from logits (numerically exact for saturated pixels).
    """
    logits = head_logits(generated, threshold, temperature)
    return F.binary_cross_entropy_with_logits(logits, source_mask.to(logits.dtype))


def geometric_targets(ct_masks: np.ndarray, mr_masks: np.ndarray,
                      offset_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The head masks the geometric loss holds each translation to (``cyclegan.geo_mask_offset_px``).

    ``ct_masks``, ``mr_masks`` [N, H, W] bool: the prepared slices' head masks, each thresholded
    on its own modality. Over the same anatomy the two thresholds need not find the same edge: on
    an MR whose skin edge is blurred (partial volume, point-spread function) the threshold lies
    further out than on the windowed CT. The loss then asks the synthetic MR for an MR outline
    that matches the CT's threshold outline, and a generator meets both it and the discriminator
    by drawing the anatomy smaller than the CT's. ``offset_px`` > 0 says that MR masks extend this
    many pixels beyond the CT's: the synthetic MR is held to the CT mask grown by it, the
    synthetic CT to the MR mask shrunk by it (4-connected steps); < 0 the other way; 0: the masks
    as they are (the paper)."""
    ct_masks, mr_masks = np.asarray(ct_masks, bool), np.asarray(mr_masks, bool)
    k = int(offset_px)
    if k == 0:
        return ct_masks, mr_masks
    from scipy import ndimage  # only here: the paper's path runs where torch and numpy are all there is

    step = np.zeros((3, 3, 3), dtype=bool)
    step[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only: slices stay apart

    def grow(masks, n):
        return ndimage.binary_dilation(masks, step, iterations=n)

    def shrink(masks, n):  # the edge of the crop is no head edge: outside counts as head
        return ndimage.binary_erosion(masks, step, iterations=n, border_value=1)

    if k > 0:
        return grow(ct_masks, k), shrink(mr_masks, k)
    return shrink(ct_masks, -k), grow(mr_masks, -k)



# The MIND descriptor's patch: Gaussian weights of this SD (pixels) over squared differences, and
# the 8 neighbours one pixel away whose patches each pixel's patch is compared with.
MIND_SIGMA_PX = 1.5
_MIND_OFFSETS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


@functools.lru_cache(maxsize=8)
def _gaussian_taps(sigma: float) -> tuple[float, ...]:
    radius = int(math.ceil(2.0 * sigma))
    taps = [math.exp(-(i * i) / (2.0 * sigma * sigma)) for i in range(-radius, radius + 1)]
    return tuple(t / sum(taps) for t in taps)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter of ``x`` [B, C, H, W], channels apart, edges replicated."""
    taps = torch.tensor(_gaussian_taps(sigma), dtype=x.dtype, device=x.device)
    r, c = len(taps) // 2, x.shape[1]
    rows = taps.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    cols = taps.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), rows, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), cols, groups=c)


def mind_descriptor(x: torch.Tensor, sigma: float = MIND_SIGMA_PX) -> torch.Tensor:
    """The modality independent neighbourhood descriptor (MIND; Heinrich et al. 2012) of ``x``.

    ``x`` [B, 1, H, W] -> [B, 8, H, W]: for each of the 8 neighbours one pixel away, how alike the
    pixel's Gaussian-weighted patch and the neighbour's are, ``exp(-D / V)`` with ``D`` the patch
    distance and ``V`` the mean of the 8 distances (the local noise or contrast level), scaled so
    each pixel's largest value is 1. Any monotone-or-inverted intensity change that keeps local
    contrast ratios leaves it alone (``a x + b`` for any ``a != 0``, so CT's bright bone and MR's
    dark bone describe alike), a moved edge does not: a structure loss across modalities. ``V``
    is kept within 1e-3 and 1e3 times its image mean, so flat regions stay finite.
    """
    x = x.float()
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    shifted = torch.cat([padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in _MIND_OFFSETS], 1)
    distance = _gaussian_blur((shifted - x) ** 2, sigma)
    variance = distance.mean(1, keepdim=True)
    level = variance.mean((2, 3), keepdim=True)
    variance = torch.maximum(torch.minimum(variance, 1e3 * level), 1e-3 * level) + 1e-8
    similarity = torch.exp(-distance / variance)
    return similarity / similarity.amax(1, keepdim=True)


def mind_loss(generated: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Structure consistency of a translation (Yang et al. 2018): the mean absolute difference of
    the MIND descriptors of ``generated`` and its ``source`` [B, 1, H, W], over the pixels of
    ``mask`` (the source's head; same shape). Unlike the cycle loss it asks every edge of the
    source to stay where it is in the translation itself, whatever its contrast there."""
    difference = (mind_descriptor(generated) - mind_descriptor(source)).abs().mean(1, keepdim=True)
    weight = mask.to(difference.dtype)
    return (difference * weight).sum() / weight.sum().clamp_min(1.0)


def lsgan_loss(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean squared distance of the patch scores to 1 (real) or 0 (fake)."""
    prediction = prediction.float()
    target = torch.ones_like(prediction) if real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


class ImagePool:
    """History of generated images shown to a discriminator (reference ``ImagePool`` semantics).

    Until ``size`` images are stored, each new image is stored and returned. Then each new image is,
    with probability 1/2, returned as is, or else swapped with a random stored image, which is
    returned instead. ``size`` 0 returns the images unchanged. Random numbers come from the given
    ``torch.Generator`` (CPU), so the pool is reproducible and can be checkpointed.
    """

    def __init__(self, size: int):
        self.size = int(size)
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=generator).item() > 0.5:
                j = int(torch.randint(0, self.size, (), generator=generator).item())
                out.append(self.images[j].clone())
                self.images[j] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state(self) -> torch.Tensor:
        """The stored images as one CPU tensor [n, ...] (n may be 0)."""
        if not self.images:
            return torch.empty(0)
        return torch.stack(self.images).cpu()

    def load(self, stored: torch.Tensor, device=None) -> None:
        self.images = [image.to(device) for image in stored] if stored.numel() else []


# ----------------------------------------------------------------------------------------------
# The model and one training iteration


# The task network of ``lambda_seg``: a small U-Net (parotid vs background) on the synthetic MR.
SEGMENTER_ARCH = {"base_features": 8, "levels": 4, "in_channels": 1, "classes": 2, "norm": "instance"}


def build_segmenter() -> nn.Module:
    """The CycleGAN's task network (``cyclegan.lambda_seg``): :data:`SEGMENTER_ARCH`."""
    from .unet import UNet  # here: unet reaches back into this module for the CPU's bf16 check

    return UNet(**SEGMENTER_ARCH)


def task_loss(logits: torch.Tensor, parotid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss of the parotid class: ``logits`` [B, 2, H, W] of the
    segmenter, ``parotid`` [B, 1, H, W] (0/1, either gland). The Dice term keeps the small glands
    (a few per cent of a slice) from drowning in the background's cross-entropy."""
    logits = logits.float()
    target = parotid[:, 0].long()
    probability = torch.softmax(logits, 1)[:, 1]
    hit = (probability * target).sum()
    dice = (2.0 * hit + 1.0) / (probability.sum() + target.sum() + 1.0)
    return F.cross_entropy(logits, target) + (1.0 - dice)


class _GeneratorPair(nn.Module):
    """Both generators' passes of one iteration in one forward call (one DDP-synchronised unit).

    Passes that do not depend on each other share a call: ``G_MR`` maps the CT and (identity) the
    MR batch together; instance normalisation is per slice, so this is the same mathematics as
    separate calls.
    """

    def __init__(self, g_mr, g_ct, identity: bool, segmenter=None):
        super().__init__()
        self.g_mr, self.g_ct, self.identity = g_mr, g_ct, identity
        self.segmenter = segmenter

    def forward(self, ct, mr, noise_mr=None, noise_ct=None):
        b = ct.shape[0]
        if self.identity:
            fake_mr, idt_mr = self.g_mr(torch.cat((ct, mr))).split(b)
            fake_ct, idt_ct = self.g_ct(torch.cat((mr, ct))).split(b)
        else:
            fake_mr, fake_ct = self.g_mr(ct), self.g_ct(mr)
            idt_mr = idt_ct = None
        # The cycle passes see the translations through noise when ``cycle_noise_sd`` > 0 (drawn
        # by the caller, outside any compiled graph, so eager and compiled runs draw the same).
        rec_ct = self.g_ct(fake_mr if noise_mr is None else fake_mr + noise_mr)
        rec_mr = self.g_mr(fake_ct if noise_ct is None else fake_ct + noise_ct)
        segmented = self.segmenter(fake_mr) if self.segmenter is not None else None
        return fake_mr, rec_ct, fake_ct, rec_mr, idt_mr, idt_ct, segmented


class _DiscriminatorPair(nn.Module):
    """Both discriminators on real and (pooled) fake slices, in one forward call."""

    def __init__(self, d_mr, d_ct):
        super().__init__()
        self.d_mr, self.d_ct = d_mr, d_ct

    def forward(self, real_mr, fake_mr, real_ct, fake_ct):
        return self.d_mr(torch.cat((real_mr, fake_mr))), self.d_ct(torch.cat((real_ct, fake_ct)))


def _set_requires_grad(nets, flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


class CycleGAN:
    """The four networks (G_MR: CT -> MR, G_CT: MR -> CT, D_MR, D_CT), both Adam optimisers with
    their learning-rate schedules, both history pools, and :meth:`step`, one training iteration.

    Networks are initialised from the global torch RNG (seed it first). ``bf16`` (autocast),
    ``channels_last`` and ``compile`` (the generator pair and the discriminators) are speed
    options on any device (all off: exact fp32);
    ``compile_fill`` compiles the head mask's hole fill (default: on a GPU; on the CPU it is one
    scikit-image reconstruction, see :func:`_fill_sources`); ``distributed`` wraps the generator
    pair and the discriminator pair in
    DistributedDataParallel (process group set up). ``draw_generator`` supplies the pools'
    random numbers.
    """

    def __init__(self, settings: dict, head_threshold: float, device="cpu", *, bf16=False,
                 channels_last=False, compile=False, compile_fill=None, distributed=False,
                 draw_generator=None):
        s = self.settings = check_settings(settings)
        self.head_threshold = float(head_threshold)
        self.device = torch.device(device)
        self.bf16 = _uses_bf16(bf16, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.draw_generator = draw_generator
        # On the CPU the hole fill is one scikit-image reconstruction, faster than compiled steps.
        self.compile_fill = (self.device.type == "cuda"
                             if compile_fill is None else bool(compile_fill))
        self.g_mr = init_weights(Generator(1, 1, s["ngf"], s["n_blocks"], s["upsampling"]), s["init_gain"])
        self.g_ct = init_weights(Generator(1, 1, s["ngf"], s["n_blocks"], s["upsampling"]), s["init_gain"])
        self.d_mr = init_weights(Discriminator(1, s["ndf"]), s["init_gain"])
        self.d_ct = init_weights(Discriminator(1, s["ndf"]), s["init_gain"])
        self.segmenter = build_segmenter() if s["lambda_seg"] > 0 else None
        for net in self.networks.values():
            net.to(self.device, memory_format=self.memory_format)
        betas = (s["beta1"], s["beta2"])
        # the task network learns with the generators (one optimiser, one schedule)
        task = list(self.segmenter.parameters()) if self.segmenter is not None else []
        self.opt_g = torch.optim.Adam(list(self.g_mr.parameters()) + list(self.g_ct.parameters()) + task,
                                      lr=s["lr"], betas=betas)
        self.opt_d = torch.optim.Adam(list(self.d_mr.parameters()) + list(self.d_ct.parameters()),
                                      lr=s["lr"], betas=betas)
        c, d = s["epochs_constant"], s["epochs_decay"]
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda e: lr_factor(e, c, d))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda e: lr_factor(e, c, d))
        self.pool_mr = ImagePool(s["pool_size"])
        self.pool_ct = ImagePool(s["pool_size"])
        self._generators = _GeneratorPair(self.g_mr, self.g_ct, s["lambda_identity"] > 0, self.segmenter)
        self._discriminators = _DiscriminatorPair(self.d_mr, self.d_ct)
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._generators = DistributedDataParallel(self._generators, device_ids=ids,
                                                       broadcast_buffers=False)
            self._discriminators = DistributedDataParallel(self._discriminators, device_ids=ids,
                                                           broadcast_buffers=False)
        self._d_mr_run, self._d_ct_run = self.d_mr, self.d_ct
        self.compiled = bool(compile)
        if compile:
            # One graph per pair (all four generator passes of an iteration, both discriminators'
            # scoring) rather than one per network: fewer graph boundaries, on two CPU cores about
            # 7 % more images/s than compiling the four networks one by one.
            # Static shapes (dynamic=False): a new batch or crop size compiles anew, instead of
            # the symbolic-shape graphs that inductor's CPU backend fails on (torch 2.13).
            compiled = lambda module: torch.compile(module, dynamic=False)  # noqa: E731
            self._generators = compiled(self._generators)
            self._discriminators = compiled(self._discriminators)
            self._d_mr_run, self._d_ct_run = compiled(self.d_mr), compiled(self.d_ct)

    @property
    def networks(self) -> dict[str, nn.Module]:
        nets = {"g_mr": self.g_mr, "g_ct": self.g_ct, "d_mr": self.d_mr, "d_ct": self.d_ct}
        if self.segmenter is not None:
            nets["segmenter"] = self.segmenter
        return nets

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 slices [B, H, W] (any device) as the networks' input [B, 1, H, W] in [-1, 1]."""
        x = _to_unit(images_uint8.to(self.device, non_blocking=True)).unsqueeze(1)
        return x.contiguous(memory_format=self.memory_format)

    def step(self, ct: torch.Tensor, mr: torch.Tensor, ct_mask: torch.Tensor,
             mr_mask: torch.Tensor, ct_parotid: torch.Tensor | None = None) -> torch.Tensor:
        """One iteration: update both generators, then both discriminators.

        ``ct``, ``mr`` [B, 1, H, W] in [-1, 1]; ``ct_mask``, ``mr_mask`` their binary head masks
        (same shape); ``ct_parotid`` the CT slices' parotid masks (0/1, same shape; needed with
        ``lambda_seg``). Returns the detached loss values in :data:`LOSS_TERMS` order (no GPU sync).
        With ``compile``, a graph that fails to compile (no C compiler, say) runs eagerly instead,
        with torch's warning: the same mathematics, only slower.
        """
        if self.segmenter is not None and ct_parotid is None:
            raise CrossmodError("cyclegan.lambda_seg: the training step needs the CT slices' parotid masks")
        if not self.compiled:
            return self._step(ct, mr, ct_mask, mr_mask, ct_parotid)
        import torch._dynamo

        with torch._dynamo.config.patch(suppress_errors=True):
            return self._step(ct, mr, ct_mask, mr_mask, ct_parotid)

    def _seen(self, images: torch.Tensor, augments) -> torch.Tensor:
        """What a discriminator sees of ``images``: as they are, or augmented (``disc_augment``)."""
        if not augments:
            return images
        return disc_augment(images, augments).contiguous(memory_format=self.memory_format)

    def _step(self, ct, mr, ct_mask, mr_mask, ct_parotid=None) -> torch.Tensor:
        s, b = self.settings, ct.shape[0]
        zero = torch.zeros((), device=self.device)
        _set_requires_grad((self.d_mr, self.d_ct), False)
        noise = ()
        if s["cycle_noise_sd"] > 0:
            # Gaussian noise on each translation before it is mapped back (Bashkirova et al.
            # 2019): the cycle loss can no longer be met by hiding the source image in faint
            # high-frequency patterns of the translation (CycleGAN "steganography", Chu et al. 2017).
            # From the global RNG, whose state every checkpoint keeps (resume stays exact).
            noise = tuple(torch.randn(x.shape, device=self.device).contiguous(
                memory_format=self.memory_format) * s["cycle_noise_sd"] for x in (ct, mr))
        with self._autocast():
            fake_mr, rec_ct, fake_ct, rec_mr, idt_mr, idt_ct, segmented = self._generators(ct, mr, *noise)
        fake_mr, rec_ct, fake_ct, rec_mr = (t.float() for t in (fake_mr, rec_ct, fake_ct, rec_mr))
        augments = s["disc_augment"]
        with self._autocast():
            score_mr = self._d_mr_run(self._seen(fake_mr, augments))
            score_ct = self._d_ct_run(self._seen(fake_ct, augments))
        adv_mr, adv_ct = lsgan_loss(score_mr, True), lsgan_loss(score_ct, True)
        cycle_ct, cycle_mr = F.l1_loss(rec_ct, ct), F.l1_loss(rec_mr, mr)
        if idt_mr is not None:
            identity_mr = F.l1_loss(idt_mr.float(), mr)
            identity_ct = F.l1_loss(idt_ct.float(), ct)
        else:
            identity_mr = identity_ct = zero
        # The geometric terms of both directions in one batched hole fill; computed without
        # gradient (only logged) when the geometric loss is switched off.
        with contextlib.nullcontext() if s["geometric_loss"] else torch.no_grad():
            logits = head_logits(torch.cat((fake_mr, fake_ct)), self.head_threshold,
                                 s["mask_temperature"], compiled=self.compile_fill)
            geo_ct = F.binary_cross_entropy_with_logits(logits[:b], ct_mask.float())
            geo_mr = F.binary_cross_entropy_with_logits(logits[b:], mr_mask.float())
        loss_g = (s["lambda_adv"] * (adv_mr + adv_ct)
                  + s["lambda_cycle"] * (cycle_ct + cycle_mr)
                  + s["lambda_cycle"] * s["lambda_identity"] * (identity_mr + identity_ct))
        if s["geometric_loss"]:
            loss_g = loss_g + s["lambda_geo"] * (geo_ct + geo_mr)
        if s["lambda_mind"] > 0:  # beyond the paper: each translation keeps its source's edges
            mind_ct, mind_mr = mind_loss(fake_mr, ct, ct_mask), mind_loss(fake_ct, mr, mr_mask)
            loss_g = loss_g + s["lambda_mind"] * (mind_ct + mind_mr)
        else:
            mind_ct = mind_mr = zero
        if segmented is not None:  # beyond the paper: the CT's parotids must be findable in its synthetic MR
            seg_ct = task_loss(segmented, ct_parotid)
            loss_g = loss_g + s["lambda_seg"] * seg_ct
        else:
            seg_ct = zero
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        _set_requires_grad((self.d_mr, self.d_ct), True)
        pooled_mr = self.pool_mr.query(fake_mr.detach(), self.draw_generator)
        pooled_ct = self.pool_ct.query(fake_ct.detach(), self.draw_generator)
        pooled_mr = pooled_mr.contiguous(memory_format=self.memory_format)
        pooled_ct = pooled_ct.contiguous(memory_format=self.memory_format)
        if augments:  # real and pooled fake alike (DiffAugment)
            mr, pooled_mr, ct, pooled_ct = (self._seen(x, augments) for x in (mr, pooled_mr, ct, pooled_ct))
        with self._autocast():
            scores_mr, scores_ct = self._discriminators(mr, pooled_mr, ct, pooled_ct)
        d_mr = 0.5 * (lsgan_loss(scores_mr[:b], True) + lsgan_loss(scores_mr[b:], False))
        d_ct = 0.5 * (lsgan_loss(scores_ct[:b], True) + lsgan_loss(scores_ct[b:], False))
        self.opt_d.zero_grad(set_to_none=True)
        (d_mr + d_ct).backward()
        self.opt_d.step()
        return torch.stack([loss_g, adv_mr, adv_ct, cycle_ct, cycle_mr, identity_mr, identity_ct,
                            geo_ct, geo_mr, d_mr, d_ct, mind_ct, mind_mr, seg_ct]).detach()


# ----------------------------------------------------------------------------------------------
# Data, checkpoints, random states


def _load_slices(path, role: str, keys=("image", "head_mask")) -> dict[str, np.ndarray]:
    """Arrays of a prepared-slices ``.npz`` (numpy only), checked; one-line errors."""
    path = Path(path)
    arrays = read_slices(path, f"{role} slices", tuple(keys))
    image = arrays["image"]
    if image.dtype != np.uint8 or image.ndim != 3 or len(image) == 0:
        raise CrossmodError(f"{path}: 'image' must be non-empty uint8 [N, H, W], got "
                            f"{image.dtype} {list(image.shape)}")
    if image.shape[1] % 4 or image.shape[2] % 4:
        raise CrossmodError(f"{path}: slice size {image.shape[1]} x {image.shape[2]} must be a "
                            "multiple of 4 (the generator halves it twice)")
    for key in keys:
        if key != "image" and arrays[key].shape[:1] != image.shape[:1]:
            raise CrossmodError(f"{path}: '{key}' has {arrays[key].shape[0]} slices, 'image' "
                                f"{image.shape[0]}")
    if "head_mask" in arrays and arrays["head_mask"].shape != image.shape:
        raise CrossmodError(f"{path}: 'head_mask' shape {list(arrays['head_mask'].shape)} differs "
                            f"from 'image' {list(image.shape)}")
    return arrays


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`train`, loaded with ``weights_only=True`` onto the CPU."""
    return read_checkpoint(path)


def _global_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached": float(cached),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"],
                     tuple(int(v) for v in state["python_internal"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], state["numpy_has_gauss"], state["numpy_cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _weights_digest(model: CycleGAN) -> str:
    """SHA-256 of every parameter of the four networks (bitwise identity check)."""
    digest = hashlib.sha256()
    for name, net in model.networks.items():
        for key, tensor in sorted(net.state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _determinism(enabled: bool, device: torch.device):
    """Deterministic algorithms (CPU: strict; CUDA: warn only, as the reflection-pad backward has
    no deterministic CUDA kernel) and no cuDNN autotuning; restores the previous global state."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = previous[2:]


@contextlib.contextmanager
def _cpu_threads(count: int):
    previous = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pick_device(device, local_rank: int = 0) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device("cpu")


def disc_augment(images: torch.Tensor, augments) -> torch.Tensor:
    """Differentiable augmentation of what a discriminator sees (DiffAugment, Zhao et al. 2020):
    ``images`` [B, 1, H, W] in [-1, 1], each slice drawn on its own, from the global RNG (whose
    state every checkpoint keeps, so a resumed run stays exact). Applied alike to real and
    generated slices, in the generators' update too (gradients flow through it), the
    discriminator cannot learn the few real MR slices by heart while the generator is still asked
    for the un-augmented distribution. ``brightness``: + U(-0.5, 0.5); ``contrast``: about the
    slice mean x U(0.5, 1.5); ``translation``: shifted by up to 1/8 of the size, the uncovered
    border background (-1); ``cutout``: a square of half the size set to 0."""
    if not augments:
        return images
    b, _, h, w = images.shape
    x = images
    if "brightness" in augments:
        x = x + (torch.rand(b, 1, 1, 1, device=x.device) - 0.5).to(x.dtype)
    if "contrast" in augments:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(b, 1, 1, 1, device=x.device) + 0.5).to(x.dtype) + mean
    if "translation" in augments:
        ph, pw = h // 8, w // 8
        dy = torch.randint(-ph, ph + 1, (b,), device=x.device)
        dx = torch.randint(-pw, pw + 1, (b,), device=x.device)
        padded = F.pad(x, (pw, pw, ph, ph), value=-1.0)
        rows = (torch.arange(h, device=x.device).view(1, h, 1) + ph - dy.view(b, 1, 1)).expand(b, h, w)
        cols = (torch.arange(w, device=x.device).view(1, 1, w) + pw - dx.view(b, 1, 1)).expand(b, h, w)
        flat = (rows * (w + 2 * pw) + cols).view(b, 1, h * w)
        x = padded.flatten(2).gather(2, flat).view(b, 1, h, w)
    if "cutout" in augments:
        ch, cw = h // 2, w // 2
        top = torch.randint(0, h - ch + 1, (b, 1, 1, 1), device=x.device)
        left = torch.randint(0, w - cw + 1, (b, 1, 1, 1), device=x.device)
        ys = torch.arange(h, device=x.device).view(1, 1, h, 1)
        xs = torch.arange(w, device=x.device).view(1, 1, 1, w)
        hole = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
        x = x.masked_fill(hole, 0.0)
    return x


def jitter_batch(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator,
                 crop_scale: float = 1.0, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's load/crop augmentation: each slice (``images`` [B, 1, H, W], ``masks`` its
    head masks, same shape) enlarged by ``crop_scale`` (bilinear; nearest for the mask), cut back
    to H x W at a random offset, and mirrored left-right with probability 1/2 when ``flip``. The
    CycleGAN never sees the labels, so a mirror is harmless here (the U-Net gets none)."""
    b, _, h, w = images.shape
    mask_dtype = masks.dtype
    masks = masks.to(images.dtype)
    big_h, big_w = round(h * crop_scale), round(w * crop_scale)
    if big_h > h or big_w > w:
        images = F.interpolate(images, size=(big_h, big_w), mode="bilinear", align_corners=False)
        masks = F.interpolate(masks, size=(big_h, big_w), mode="nearest")
        tops = torch.randint(0, big_h - h + 1, (b,), generator=generator).tolist()
        lefts = torch.randint(0, big_w - w + 1, (b,), generator=generator).tolist()
        both = torch.cat([images, masks], dim=1)  # one crop per slice for image and mask
        both = torch.stack([both[k, :, t:t + h, x:x + w] for k, (t, x) in enumerate(zip(tops, lefts))])
        images, masks = both[:, :1], both[:, 1:]
    if flip:
        mirrored = (torch.rand(b, generator=generator) < 0.5).view(b, 1, 1, 1).to(images.device)
        images = torch.where(mirrored, images.flip(-1), images)
        masks = torch.where(mirrored, masks.flip(-1), masks)
    return images, masks.to(mask_dtype)


def _epoch_order(generator: torch.Generator, n: int, world: int, rank: int) -> torch.Tensor:
    """This rank's share of a shuffled order of all ``n`` CT slices (DistributedSampler-like: the
    permutation is padded by repeating its start to a multiple of ``world``, rank r takes every
    world-th entry from r). The same generator state on every rank gives the same permutation."""
    perm = torch.randperm(n, generator=generator)
    total = math.ceil(n / world) * world
    if total > n:
        perm = torch.cat([perm] * math.ceil(total / n))[:total]
    return perm[rank::world].clone()


# ----------------------------------------------------------------------------------------------
# Training


class _LossLog:
    """Buffers per-iteration losses on the device, writes them to ``losses.csv`` in chunks."""

    def __init__(self, path: Path | None, world: int, terms=LOSS_TERMS):
        self.path, self.world, self.terms = path, world, tuple(terms)
        self.pending: list[tuple] = []
        self.last: dict | None = None

    def header(self) -> list[str]:
        return ["epoch", "iteration", *self.terms, "lr", "seconds"]

    def start(self, keep_until: int | None) -> None:
        """Fresh file with a header, or (resume) keep the rows up to iteration ``keep_until``."""
        if self.path is None:
            return
        rows = []
        if keep_until is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                for row in list(csv.reader(handle))[1:]:
                    try:
                        complete = len(row) == len(self.header()) and int(row[1]) <= keep_until
                    except ValueError:
                        complete = False
                    if complete:
                        rows.append(row)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.header())
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def add(self, epoch: int, iteration: int, losses: torch.Tensor, lr: float, seconds: float):
        self.pending.append((epoch, iteration, losses, lr, seconds))

    def flush(self) -> None:
        if not self.pending:
            return
        values = torch.stack([p[2] for p in self.pending])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(values)
            values /= self.world
        values = values.cpu().tolist()
        rows = [[e, i, *(f"{v:.6g}" for v in vals), f"{lr:.6g}", f"{sec:.3f}"]
                for (e, i, _, lr, sec), vals in zip(self.pending, values)]
        self.pending = []
        self.last = dict(zip(self.terms, values[-1]))
        if self.path is not None:
            with open(self.path, "a", newline="") as handle:
                csv.writer(handle).writerows(rows)


def train(ct_npz, mr_npz, out_dir, settings: dict, head_threshold: float, resume: bool = False,
          progress: bool = True, max_iterations: int | None = None, device=None) -> dict:
    """Train the CycleGAN on prepared CT and MR slices; returns a summary (also ``summary.json``).

    ``out_dir`` receives ``checkpoint.pt`` (rewritten atomically after every epoch, and when the
    run stops early), ``losses.csv`` (epoch, iteration, every term of :data:`LOSS_TERMS`, learning
    rate, seconds since the run started), ``settings.json`` and ``summary.json``. ``resume=True``
    continues from the checkpoint, if any, with the optimisers, schedules, history pools and every
    random state (torch, numpy, python and the run's own generators), so the result is
    bit-identical to an uninterrupted run on the same machine and thread count; without
    ``resume`` an existing run in ``out_dir`` is replaced. ``max_iterations`` stops the run after
    that many iterations in total (counting those before a resume) and checkpoints there, even in
    the middle of an epoch: a later ``resume=True`` carries on exactly. The global torch, numpy and
    python random generators are seeded from ``settings['seed']``.

    ``bf16`` (autocast), ``channels_last`` and ``compile`` apply on any device (on the CPU with
    AVX-512 bf16 they are the fast mode; all three off is the exact fp32 mode); on a GPU the head
    mask's hole fill is compiled and the slices are moved to the GPU once.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains on its share of each epoch's CT
    order (:func:`_epoch_order`) with its own MR draws and pools, gradients averaged by
    DistributedDataParallel; the per-process batch is ``batch_size``; only rank 0 writes the
    checkpoint and the log (losses averaged over ranks), the other ranks their random states and
    pools under ``ranks/``.
    """
    s = check_settings({**settings, "head_threshold": float(head_threshold)})
    out_dir = Path(out_dir)
    # the task loss (lambda_seg) needs the CT's contours; the CycleGAN itself never does
    ct = _load_slices(ct_npz, "CT", ("image", "head_mask", "labels") if s["lambda_seg"] > 0 else ("image", "head_mask"))
    mr = _load_slices(mr_npz, "MR")
    if ct["image"].shape[1:] != mr["image"].shape[1:]:
        raise CrossmodError(f"{mr_npz}: MR slices are {list(mr['image'].shape[1:])}, CT slices "
                            f"{list(ct['image'].shape[1:])}; both cohorts need the same crop")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device, local_rank)
    own_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    try:
        with _determinism(s["deterministic"], device), _cpu_threads(s["cpu_threads"]):
            return _train(ct, mr, out_dir, s, resume, progress, max_iterations, device, world,
                          rank, (str(ct_npz), str(mr_npz)))
    finally:
        if own_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(ct, mr, out_dir, s, resume, progress, max_iterations, device, world, rank, sources):
    cuda = device.type == "cuda"
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / CHECKPOINT_NAME
    ranks_dir = out_dir / "ranks"
    n_ct, n_mr = len(ct["image"]), len(mr["image"])
    size = list(ct["image"].shape[1:])
    batch = s["batch_size"]
    per_rank = math.ceil(n_ct / world)
    iterations_per_epoch = math.ceil(per_rank / batch)
    if s["max_iterations_per_epoch"] is not None:
        iterations_per_epoch = min(iterations_per_epoch, s["max_iterations_per_epoch"])
    total_epochs = s["epochs_constant"] + s["epochs_decay"]

    torch.manual_seed(s["seed"])
    np.random.seed(s["seed"])
    random.seed(s["seed"])
    order_gen = torch.Generator().manual_seed(s["seed"])
    draw_gen = torch.Generator().manual_seed(s["seed"] * 1000 + 7919 * (rank + 1))
    if s["translator"] == "cyclegan":
        model_class = CycleGAN
    else:
        from .cut import CUT as model_class
    model = model_class(s, s["head_threshold"], device, bf16=s["bf16"],
                        channels_last=s["channels_last"], compile=s["compile"],
                        distributed=world > 1, draw_generator=draw_gen)

    state = {"epoch": 0, "iteration_in_epoch": 0, "iteration": 0, "elapsed": 0.0}
    order = None
    found = resume and checkpoint_path.is_file()
    if found:
        checkpoint = load_checkpoint(checkpoint_path)
        for key in _changed_settings(checkpoint["settings"], s)[:1]:
            raise CrossmodError(
                f"{checkpoint_path}: setting 'cyclegan.{key}' is {s[key]!r} but the run was "
                f"started with {_checkpoint_setting(checkpoint['settings'], key)!r}; use the same settings or "
                "train without resume")
        if checkpoint["data"] != {"n_ct": n_ct, "n_mr": n_mr, "size": size}:
            raise CrossmodError(f"{checkpoint_path}: the run was started on other slices "
                                f"({checkpoint['data']}); train without resume")
        if checkpoint["world_size"] != world:
            raise CrossmodError(f"{checkpoint_path}: the run was started with "
                                f"{checkpoint['world_size']} processes, now {world}")
        for name, net in model.networks.items():
            net.load_state_dict(checkpoint["networks"][name])
        model.opt_g.load_state_dict(checkpoint["opt_g"])
        model.opt_d.load_state_dict(checkpoint["opt_d"])
        model.sched_g.load_state_dict(checkpoint["sched_g"])
        model.sched_d.load_state_dict(checkpoint["sched_d"])
        state = dict(checkpoint["state"])
        if rank == 0:
            local = checkpoint["local"]
        else:
            local = load_checkpoint(ranks_dir / f"rank{rank}-it{state['iteration']}.pt")
        order_gen.set_state(local["order_gen"])
        draw_gen.set_state(local["draw_gen"])
        order = local["order"] if local["order"].numel() else None
        model.pool_mr.load(local["pool_mr"], device)
        model.pool_ct.load(local["pool_ct"], device)
        _set_global_rng_state(local["rng"])
    elif rank == 0:
        for stale in (checkpoint_path, out_dir / LOSSES_NAME, out_dir / SUMMARY_NAME):
            stale.unlink(missing_ok=True)
    if rank > 0 and not found and ranks_dir.is_dir():
        for stale in ranks_dir.glob(f"rank{rank}-it*.pt"):
            stale.unlink()
    if rank == 0:
        settings_tmp = out_dir / f".{SETTINGS_NAME}.tmp"
        settings_tmp.write_text(json.dumps(s, indent=2))
        os.replace(settings_tmp, out_dir / SETTINGS_NAME)
    log = _LossLog(out_dir / LOSSES_NAME if rank == 0 else None, world,
                   getattr(model, "loss_terms", LOSS_TERMS))
    log.start(state["iteration"] if found else None)

    ct_images = torch.from_numpy(ct["image"])
    mr_images = torch.from_numpy(mr["image"])
    ct_target, mr_target = geometric_targets(ct["head_mask"], mr["head_mask"], s["geo_mask_offset_px"])
    ct_masks, mr_masks = torch.from_numpy(ct_target), torch.from_numpy(mr_target)
    # either gland is "parotid" for the task network, so a mirrored slice keeps its meaning
    ct_parotids = torch.from_numpy(ct["labels"] > 0) if "labels" in ct else None
    if cuda:   # uint8 slices and boolean masks: about 1.3 GB for the paper's ~10,000 CT slices
        ct_images, ct_masks, mr_images, mr_masks = (
            t.to(device) for t in (ct_images, ct_masks, mr_images, mr_masks))
        ct_parotids = ct_parotids.to(device) if ct_parotids is not None else None

    def checkpoint_now():
        state["elapsed"] = base_elapsed + time.perf_counter() - started
        local = {"order_gen": order_gen.get_state(), "draw_gen": draw_gen.get_state(),
                 "order": order if order is not None else torch.empty(0, dtype=torch.int64),
                 "pool_mr": model.pool_mr.state(), "pool_ct": model.pool_ct.state(),
                 "rng": _global_rng_state()}
        if world > 1:
            import torch.distributed as dist

            if rank > 0:
                save_checkpoint(local, ranks_dir / f"rank{rank}-it{state['iteration']}.pt")
            dist.barrier()
        if rank == 0:
            save_checkpoint({
                "format": 1, "settings": dict(s), "world_size": world,
                "data": {"n_ct": n_ct, "n_mr": n_mr, "size": size},
                "state": dict(state),
                "networks": {name: net.state_dict() for name, net in model.networks.items()},
                "opt_g": model.opt_g.state_dict(), "opt_d": model.opt_d.state_dict(),
                "sched_g": model.sched_g.state_dict(), "sched_d": model.sched_d.state_dict(),
                "local": local,
            }, checkpoint_path)
        if world > 1:
            dist.barrier()
            if rank > 0:
                for old in ranks_dir.glob(f"rank{rank}-it*.pt"):
                    if old.name != f"rank{rank}-it{state['iteration']}.pt":
                        old.unlink(missing_ok=True)

    bar = progress_bar(total_epochs * iterations_per_epoch, state["iteration"], "CycleGAN", "it",
                       enabled=progress and rank == 0)

    def flush():
        log.flush()
        if bar is not None and log.last is not None:
            last = log.last
            bar.set_postfix(G=f"{last['G_total']:.3f}", D_MR=f"{last['D_MR']:.3f}",
                            D_CT=f"{last.get('D_CT', 0.0):.3f}",
                            geo=f"{last['geo_CT'] + last.get('geo_MR', 0.0):.3f}", refresh=False)

    jitter = s["random_crop_scale"] > 1.0 or s["random_flip"]
    base_elapsed = float(state["elapsed"])
    started = time.perf_counter()
    start_iteration = state["iteration"]
    stopped = False
    try:
        while state["epoch"] < total_epochs:
            if order is None:
                if max_iterations is not None and state["iteration"] >= max_iterations:
                    stopped = True
                    break
                order = _epoch_order(order_gen, n_ct, world, rank)
                state["iteration_in_epoch"] = 0
            lr = model.opt_g.param_groups[0]["lr"]
            while state["iteration_in_epoch"] < iterations_per_epoch:
                if max_iterations is not None and state["iteration"] >= max_iterations:
                    stopped = True
                    break
                i = state["iteration_in_epoch"]
                index = order[i * batch:(i + 1) * batch]
                mr_index = torch.randint(0, n_mr, (len(index),), generator=draw_gen)
                if cuda:
                    index, mr_index = index.to(device), mr_index.to(device)
                ct, mr = model.prepare(ct_images[index]), model.prepare(mr_images[mr_index])
                ct_mask, mr_mask = ct_masks[index].unsqueeze(1), mr_masks[mr_index].unsqueeze(1)
                ct_parotid = ct_parotids[index].unsqueeze(1) if ct_parotids is not None else None
                if jitter:
                    # Seeded by the iteration itself, so a resumed run draws the same crops.
                    crops = torch.Generator().manual_seed(s["seed"] * 1_000_003 + state["iteration"] * 64 + rank)
                    if ct_parotid is None:
                        ct, ct_mask = jitter_batch(ct, ct_mask, crops, s["random_crop_scale"], s["random_flip"])
                    else:  # the parotid masks cropped and mirrored with their slices
                        ct, both = jitter_batch(ct, torch.cat((ct_mask, ct_parotid), 1), crops,
                                                s["random_crop_scale"], s["random_flip"])
                        ct_mask, ct_parotid = both[:, :1], both[:, 1:]
                    mr, mr_mask = jitter_batch(mr, mr_mask, crops, s["random_crop_scale"], s["random_flip"])
                    ct = ct.contiguous(memory_format=model.memory_format)
                    mr = mr.contiguous(memory_format=model.memory_format)
                losses = model.step(ct, mr, ct_mask, mr_mask, ct_parotid)
                state["iteration_in_epoch"] += 1
                state["iteration"] += 1
                log.add(state["epoch"] + 1, state["iteration"], losses, lr,
                        base_elapsed + time.perf_counter() - started)
                if len(log.pending) >= _LOG_EVERY:
                    flush()
                if bar is not None:
                    bar.update(1)
            if stopped:
                break
            state["epoch"] += 1
            state["iteration_in_epoch"] = 0
            order = None
            model.sched_g.step()
            model.sched_d.step()
            flush()
            checkpoint_now()
        if stopped:
            flush()
            if order is not None:      # stopped inside an epoch: checkpoint here
                checkpoint_now()
    finally:
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - started
    done = state["iteration"] - start_iteration
    summary = {
        "completed": state["epoch"] >= total_epochs,
        "epochs_done": state["epoch"], "epochs_total": total_epochs,
        "iteration": state["iteration"], "iterations_per_epoch": iterations_per_epoch,
        "iterations_this_call": done, "seconds_this_call": seconds,
        "images_per_second": done * batch * world / seconds if done and seconds > 0 else None,
        "seconds_total": base_elapsed + seconds,
        "ct_slices": n_ct, "mr_slices": n_mr, "size": size, "batch_size": batch,
        "world_size": world, "device": str(device), "speed_mode": speed_mode(s, device),
        "weights_digest": _weights_digest(model),
        "checkpoint": str(checkpoint_path), "losses_csv": str(out_dir / LOSSES_NAME),
        "ct_npz": sources[0], "mr_npz": sources[1],
    }
    if world > 1:
        import torch.distributed as dist

        digests = [None] * world
        dist.all_gather_object(digests, summary["weights_digest"])
        summary["rank_digests"] = digests
        summary["ranks_identical"] = len(set(digests)) == 1
    if rank == 0:
        tmp = out_dir / f".{SUMMARY_NAME}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out_dir / SUMMARY_NAME)
    return summary


# ----------------------------------------------------------------------------------------------
# Synthesis


def branch(source_dir, out_dir, settings: dict, head_threshold: float) -> dict:
    """Start a run of another length from a shorter run's checkpoint, as if trained from scratch.

    A run's first epochs depend on its length only through the learning rate; while both
    schedules are still constant (:func:`lr_factor`), a run of ``epochs_constant`` =
    ``epochs_decay`` = k and a longer one of the same seed share their first k epochs bit for bit.
    The convergence study (:mod:`crossmod_lib.convergence`) trains one *trunk* at a constant rate
    and branches every budget off it where its decay begins, so each budget costs only its decay.

    ``source_dir``'s checkpoint must stand at an epoch boundary, every setting of
    :data:`_TRAINING_KEYS` but the two epoch counts must equal ``settings``, and the learning-rate
    factor of every epoch done must be the same under both schedules; otherwise a one-line
    :class:`~crossmod_lib.errors.CrossmodError`. Writes ``out_dir/checkpoint.pt`` (the settings and
    the optimisers' rate set to the new schedule) and the losses so far; then
    ``train(..., resume=True)`` with ``settings`` carries on. Returns the new checkpoint's state.
    """
    s = check_settings({**settings, "head_threshold": float(head_threshold)})
    source = Path(source_dir) / CHECKPOINT_NAME
    checkpoint = load_checkpoint(source)
    old = checkpoint["settings"]
    for key in _changed_settings(old, s, ignore=("epochs_constant", "epochs_decay"))[:1]:
        raise CrossmodError(f"{source}: setting 'cyclegan.{key}' is {_checkpoint_setting(old, key)!r} there, "
                            f"{s[key]!r} in the branch; a branch changes only the epochs")
    if checkpoint["world_size"] != 1:
        raise CrossmodError(f"{source}: a run of {checkpoint['world_size']} processes cannot be branched")
    state = dict(checkpoint["state"])
    if state["iteration_in_epoch"] != 0:
        raise CrossmodError(f"{source}: stopped inside epoch {state['epoch'] + 1}; branch at an "
                            "epoch boundary (max_iterations a multiple of the epoch's iterations)")
    done = int(state["epoch"])
    c, d = s["epochs_constant"], s["epochs_decay"]
    if done > c + d:
        raise CrossmodError(f"{source}: {done} epochs done, more than the branch's {c + d}")
    for epoch in range(done):
        if lr_factor(epoch, old["epochs_constant"], old["epochs_decay"]) != lr_factor(epoch, c, d):
            raise CrossmodError(f"{source}: epoch {epoch + 1} ran at another learning rate than "
                                f"a run of {c} + {d} epochs would; branch before the decay")
    lr = s["lr"] * lr_factor(done, c, d)
    for opt, sched in (("opt_g", "sched_g"), ("opt_d", "sched_d")):
        for group in checkpoint[opt]["param_groups"]:
            group["lr"] = lr
        checkpoint[sched]["_last_lr"] = [lr] * len(checkpoint[sched].get("_last_lr", [lr]))
    checkpoint["settings"] = {**old, "epochs_constant": c, "epochs_decay": d}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    losses = Path(source_dir) / LOSSES_NAME
    if losses.is_file():
        tmp = out_dir / f".{LOSSES_NAME}.tmp"
        shutil.copyfile(losses, tmp)
        os.replace(tmp, out_dir / LOSSES_NAME)
    (out_dir / SUMMARY_NAME).unlink(missing_ok=True)
    save_checkpoint(checkpoint, out_dir / CHECKPOINT_NAME)
    return state


def _generators_from(data: dict, checkpoint, settings: dict | None, device):
    s = check_settings(dict(settings) if settings is not None else dict(data["settings"]))
    device = _pick_device(device)
    nets = []
    names = ("g_mr", "g_ct") if s["translator"] == "cyclegan" else ("g_mr",)
    for name in names:
        net = Generator(1, 1, s["ngf"], s["n_blocks"], s["upsampling"])
        try:
            net.load_state_dict(data["networks"][name])
        except (RuntimeError, KeyError) as exc:
            reason = str(exc).splitlines()[0]
            raise CrossmodError(f"{checkpoint}: generator {name} does not match cyclegan.ngf="
                                f"{s['ngf']}, n_blocks={s['n_blocks']}, upsampling={s['upsampling']} ({reason})") from None
        nets.append(net.to(device).eval())
    # CUT / FastCUT are one-sided: no MR -> CT generator (None)
    return nets[0], (nets[1] if len(nets) > 1 else None), s


def load_generators(checkpoint, settings: dict | None = None,
                    device=None) -> tuple[Generator, Generator]:
    """(G_MR, G_CT) of a checkpoint, in eval mode on ``device`` (default: GPU if any).

    The architecture comes from ``settings`` or, when None, from the settings stored in the
    checkpoint.
    """
    g_mr, g_ct, _ = _generators_from(load_checkpoint(checkpoint), checkpoint, settings, device)
    return g_mr, g_ct


@torch.no_grad()
def _translate_chain(first: Generator, second: Generator, images: np.ndarray,
                     batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 slices through ``first`` and then ``second``: (first(x), second(first(x))) as uint8
    (``second`` None: (first(x), None), a one-sided translator)."""
    device = next(first.parameters()).device
    outputs, returns = [], []
    for start in range(0, len(images), batch_size):
        x = _to_unit(torch.from_numpy(images[start:start + batch_size]).to(device)).unsqueeze(1)
        y = first(x)
        outputs.append(_to_uint8(y[:, 0]).cpu())
        if second is not None:
            returns.append(_to_uint8(second(y)[:, 0]).cpu())
    return torch.cat(outputs).numpy(), (torch.cat(returns).numpy() if returns else None)


def synthesise(checkpoint, ct_npz, out_npz, settings: dict | None = None, batch_size: int = 16,
               device=None) -> dict:
    """A synthetic MR for every prepared CT slice, written (atomically) to ``out_npz``.

    The output has the layout of the prepared slices (:func:`crossmod_lib.preparation.save_slices`,
    same row order as ``ct_npz``): ``image`` the synthetic MR (uint8 0-255 [N, H, W]),
    ``reconstructed_ct`` ``G_CT(G_MR(CT))`` (uint8), and the CT's ``labels``, ``head_mask``,
    ``patient``, ``slice_index`` and ``z_mm`` copied. Returns a short summary.
    """
    started = time.perf_counter()
    ct = _load_slices(ct_npz, "CT", keys=("image", "head_mask", "labels", "patient",
                                          "slice_index", "z_mm"))
    if batch_size < 1:
        raise CrossmodError(f"synthesise: batch_size must be >= 1, got {batch_size}")
    g_mr, g_ct, s = _generators_from(load_checkpoint(checkpoint), checkpoint, settings, device)
    with _cpu_threads(s["cpu_threads"]):
        synthetic, reconstructed = _translate_chain(g_mr, g_ct, ct["image"], batch_size)
    arrays = {"image": synthetic}
    if reconstructed is not None:   # the CycleGAN's G_CT(G_MR(CT)); CUT has no way back
        arrays["reconstructed_ct"] = reconstructed
    for key in ("labels", "head_mask", "patient", "slice_index", "z_mm"):
        arrays[key] = ct[key]
    out_npz = write_slices(arrays, out_npz)
    return {"out": str(out_npz), "slices": len(synthetic),
            "seconds": time.perf_counter() - started,
            "device": str(next(g_mr.parameters()).device)}


def parotid_contrast(synthetic_npz, mr_npz) -> list[dict]:
    """Does the synthetic MR give the parotids their MR brightness? Rows (synthetic MR with the CT
    labels, real MR with its own labels) of the mean +- SD intensity (0-255) inside the parotids
    and in the rest of the head, and their ratio. On T2w MR the parotid is brighter than muscle;
    in CT it is a little darker than muscle. A segmentation network trained on synthetic MR can
    only transfer to real MR if the generator learned that inversion, whatever the outline Dice
    says (numpy only). Real MR without any manual contours (a user's cohort) gives a row of NaN:
    there is no real ratio to compare with."""
    rows = []
    for name, path in (("synthetic MR (CT labels)", synthetic_npz), ("real MR (MR labels)", mr_npz)):
        arrays = read_slices(path, f"{name} slices", ("image", "labels", "head_mask"))
        image = arrays["image"].astype(np.float64)
        parotid = arrays["labels"] > 0
        rest = arrays["head_mask"].astype(bool) & ~parotid
        unannotated = "annotated" in arrays and not np.asarray(arrays["annotated"], bool).any()
        if path == mr_npz and unannotated:
            rows.append({"images": name, **dict.fromkeys(
                ("parotid mean", "parotid SD", "rest of head mean", "rest of head SD",
                 "parotid / rest of head"), float("nan"))})
            continue
        if not parotid.any() or not rest.any():
            raise CrossmodError(f"{path}: no parotid or no head pixels to compare")
        rows.append({"images": name, "parotid mean": image[parotid].mean(),
                     "parotid SD": image[parotid].std(), "rest of head mean": image[rest].mean(),
                     "rest of head SD": image[rest].std(),
                     "parotid / rest of head": image[parotid].mean() / image[rest].mean()})
    return rows


def example_grid(checkpoint, ct_npz, mr_npz, ct_indices, mr_indices=None,
                 settings: dict | None = None, device=None) -> dict[str, np.ndarray]:
    """Arrays for an example figure: CT -> synthetic MR -> reconstructed CT for the CT slices
    ``ct_indices`` and MR -> synthetic CT -> reconstructed MR for ``mr_indices`` (default: as many
    MR slices, evenly spaced). Keys ``ct``, ``synthetic_mr``, ``reconstructed_ct``, ``mr``,
    ``synthetic_ct``, ``reconstructed_mr`` (uint8 [k, H, W]), ``ct_indices``, ``mr_indices``; a
    one-sided translator (CUT) has no ``reconstructed_ct``, ``synthetic_ct``, ``reconstructed_mr``."""
    ct = _load_slices(ct_npz, "CT")
    mr = _load_slices(mr_npz, "MR")
    ct_indices = np.asarray(ct_indices, dtype=np.int64).reshape(-1)
    if mr_indices is None:
        mr_indices = np.linspace(0, len(mr["image"]) - 1, len(ct_indices)).round()
    mr_indices = np.asarray(mr_indices, dtype=np.int64).reshape(-1)
    for name, index, n in (("ct_indices", ct_indices, len(ct["image"])),
                           ("mr_indices", mr_indices, len(mr["image"]))):
        if index.size and (index.min() < 0 or index.max() >= n):
            raise CrossmodError(f"example_grid: {name} must lie in [0, {n})")
    g_mr, g_ct, s = _generators_from(load_checkpoint(checkpoint), checkpoint, settings, device)
    ct_images, mr_images = ct["image"][ct_indices], mr["image"][mr_indices]
    with _cpu_threads(s["cpu_threads"]):
        synthetic_mr, reconstructed_ct = _translate_chain(g_mr, g_ct, ct_images, 16)
        if g_ct is not None:
            synthetic_ct, reconstructed_mr = _translate_chain(g_ct, g_mr, mr_images, 16)
        else:  # one-sided (CUT / FastCUT): no MR -> CT direction to show
            synthetic_ct = reconstructed_mr = None
    grid = {"ct": ct_images, "synthetic_mr": synthetic_mr, "reconstructed_ct": reconstructed_ct,
            "mr": mr_images, "synthetic_ct": synthetic_ct, "reconstructed_mr": reconstructed_mr,
            "ct_indices": ct_indices, "mr_indices": mr_indices}
    return {k: v for k, v in grid.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# The stage (needs the whole library; the functions above need only torch and numpy)


ABLATION_ARMS = (("with geometric loss", True, "ablation_geo_dir"),
                 ("without geometric loss", False, "ablation_nogeo_dir"))


def run(run, progress: bool = False) -> dict:
    """Stage 2 (section 2.C) over a run folder: train the translator on ``prepared/`` (resuming a
    stopped run), synthesise an MR for every CT slice, measure the parotid contrast and the
    geometric-loss ablation (two shorter runs, with and without it).

    Writes ``synthetic/`` (the training folders, ``synthetic_mr.npz``, ``synthesis.json``) and
    ``metrics/cyclegan_parotid_contrast.csv``, ``metrics/cyclegan_ablation.csv``. Returns
    ``summary`` (the main training), ``synthesis``, ``contrast`` and ``ablation`` (tables) and
    ``outline_dice`` (arm -> each CT slice's outline Dice, the main run's last).
    """
    import pandas as pd

    from .cleaning import outline_dice

    settings = settings_from_profile(run.profile)
    head_threshold = run.profile["preprocessing"]["head_threshold"]
    ct_npz, mr_npz = run.inputs("ct_slices", "mr_slices")
    summary = train(ct_npz, mr_npz, run.output("cyclegan_dir"), settings, head_threshold, resume=True,
                    progress=progress)
    synthesis = synthesise(run.cyclegan_dir / CHECKPOINT_NAME, ct_npz, run.output("synthetic_mr"),
                           settings)
    write_json(synthesis, run.output("synthesis"))  # chapter 7 reads the synthesis time
    contrast = pd.DataFrame(parotid_contrast(run.synthetic_mr, mr_npz)).set_index("images")
    contrast.to_csv(run.output("parotid_contrast"))

    ct_masks = read_slices(ct_npz, "prepared CT slices", ("head_mask",))["head_mask"]
    dice = {}
    for name, use_geo, folder_name in ABLATION_ARMS:
        arm = ablation_settings(settings, geometric_loss=use_geo)
        folder = run.output(folder_name)
        train(ct_npz, mr_npz, folder, arm, head_threshold, resume=True, progress=progress)
        synthesise(folder / CHECKPOINT_NAME, ct_npz, folder / TrainingFiles.SYNTHETIC, arm)
        arm_images = read_slices(folder / TrainingFiles.SYNTHETIC, f"{name} synthetic MR", ("image",))
        dice[name] = outline_dice(arm_images["image"], ct_masks, head_threshold)
    main_images = read_slices(run.synthetic_mr, "synthetic MR", ("image",))["image"]
    dice["main run"] = outline_dice(main_images, ct_masks, head_threshold)
    threshold = run.profile["cleaning"]["outline_dice_threshold"]
    ablation = pd.DataFrame({name: {"median outline Dice": np.median(d), "mean": np.mean(d),
                                    f"share ≥ {threshold}": np.mean(d >= threshold), "slices": len(d)}
                             for name, d in dice.items()}).T
    ablation.to_csv(run.output("ablation"))
    return {"summary": summary, "synthesis": synthesis, "contrast": contrast, "ablation": ablation,
            "outline_dice": dice}


# ----------------------------------------------------------------------------------------------
# Benchmark


def _synthetic_heads(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` head-like uint8 slices (a noisy bright ellipse with a dark airway) and head masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    images = []
    for _ in range(n):
        a, b = 0.6 + 0.2 * torch.rand((), generator=g), 0.7 + 0.2 * torch.rand((), generator=g)
        head = (xx / a) ** 2 + (yy / b) ** 2 <= 1
        airway = (xx / 0.08) ** 2 + ((yy - 0.1) / 0.12) ** 2 <= 1
        image = torch.where(head, 90 + 60 * torch.rand(size, size, generator=g),
                            4 * torch.rand(size, size, generator=g))
        images.append(torch.where(airway, torch.zeros(()), image))
    images = torch.stack(images).round().to(torch.uint8)
    masks = soft_head_mask(images.float(), value_range=(0.0, 255.0)) > 0.5
    return images, masks


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX): elsewhere bf16 autocast is
    emulated and slower than fp32, so :class:`CycleGAN` keeps fp32 there."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported",
                                                    "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def _uses_bf16(requested: bool, device: torch.device) -> bool:
    """bf16 autocast as requested, except on a CPU without native bf16 (emulated there, slower
    than fp32): the one rule :class:`CycleGAN` and :func:`speed_mode` share."""
    return bool(requested) and (device.type != "cpu" or cpu_has_native_bf16())


def speed_mode(settings: dict, device, batch_size: int | None = None) -> str:
    """The speed options a run with ``settings`` uses on ``device``, in words (for logs and
    benchmarks), e.g. ``"bf16 + channels_last + compile, batch 4"``; ``"fp32 exact"`` when off."""
    device = torch.device(device)
    parts = [name for name, on in (
        ("bf16", _uses_bf16(settings["bf16"], device)),
        ("channels_last", settings["channels_last"]),
        # CUT / FastCUT train eagerly (crossmod_lib.cut): compile applies to the CycleGAN only
        ("compile", settings["compile"] and settings.get("translator", "cyclegan") == "cyclegan")) if on]
    if device.type == "cuda":
        parts.append("compiled fill")
    mode = " + ".join(parts) if parts else "fp32 exact"
    return mode + (f", batch {batch_size}" if batch_size else "")


def training_throughput(settings: dict, size: int, device, batch: int, *, bf16: bool = False,
                        channels_last: bool = False, compile: bool = False, iterations: int = 10,
                        warmup: int = 3, head_threshold: float = DEFAULT_HEAD_THRESHOLD,
                        compile_fill=None) -> float:
    """Image-iterations per second of :meth:`CycleGAN.step` at ``size`` x ``size`` and ``batch``,
    on synthetic head-like slices, after ``warmup`` untimed iterations (which include compiling)."""
    device = torch.device(device)
    torch.manual_seed(0)
    model = CycleGAN(settings, head_threshold, device, bf16=bf16, channels_last=channels_last,
                     compile=compile, compile_fill=compile_fill,
                     draw_generator=torch.Generator().manual_seed(0))
    images, masks = _synthetic_heads(max(2 * batch, 4), size, seed=1)
    ct = model.prepare(images[:batch])
    mr = model.prepare(images[-batch:])
    ct_mask = masks[:batch].to(device).unsqueeze(1)
    mr_mask = masks[-batch:].to(device).unsqueeze(1)
    # with lambda_seg: a parotid-sized square on each CT slice for the task network
    parotid = None
    if model.segmenter is not None:
        parotid = torch.zeros_like(ct_mask)
        parotid[..., size // 2:size // 2 + size // 8, size // 4:size // 4 + size // 8] = True

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        model.step(ct, mr, ct_mask, mr_mask, parotid)
    sync()
    started = time.perf_counter()
    for _ in range(iterations):
        model.step(ct, mr, ct_mask, mr_mask, parotid)
    sync()
    return iterations * batch / (time.perf_counter() - started)


def _peak_tflops(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():       # "H100 PCIe" is checked before "H100"
        if all(part in name for part in key.split()):
            return {"device_key": key, **peaks}
    return None


def bench_cyclegan(settings: dict, size: int, device=None, iterations: int = 10, warmup: int = 3,
                   batch_size: int | None = None,
                   head_threshold: float = DEFAULT_HEAD_THRESHOLD) -> dict:
    """Training throughput (image-iterations per second) of a reference and a fast mode.

    One iteration is a full :meth:`CycleGAN.step` (both generators and both discriminators,
    forward, backward and Adam step, geometric loss included when enabled) on synthetic head-like
    slices of ``size`` x ``size``. Reference mode: fp32, batch 1, eager, default memory layout (the
    paper's setting; the head mask's hole fill eager too). Fast mode: the settings' speed options
    on any device (``bf16`` autocast, ``channels_last``, torch.compile when ``compile``; bf16 only
    where the CPU computes it natively) with the profile's ``batch_size`` (or ``batch_size``; on a
    CPU at least 4), and on a GPU the compiled hole fill. Both on the same device in this call,
    after ``warmup`` untimed iterations (which include compilation). FLOPs per image-iteration
    from :func:`training_flops_per_image`; on a GPU the achieved TFLOP/s is compared with the dense
    bf16 peak of :data:`PEAK_TFLOPS` (H100 SXM and H200: 989).
    """
    s = check_settings(settings)
    device = _pick_device(device)
    cuda = device.type == "cuda"
    if batch_size is None:
        batch_size = s["batch_size"] if cuda else max(4, s["batch_size"])
    flops = training_flops_per_image(s, size)["total"]
    with _determinism(False, device):
        reference = training_throughput(s, size, device, 1, iterations=iterations, warmup=warmup,
                                        head_threshold=head_threshold, compile_fill=False)
        fast = training_throughput(s, size, device, batch_size, bf16=s["bf16"],
                                   channels_last=s["channels_last"], compile=s["compile"],
                                   iterations=iterations, warmup=warmup,
                                   head_threshold=head_threshold)
    fast_mode = speed_mode(s, device, batch_size)
    peak = _peak_tflops(device)
    result = {
        "name": "cyclegan",
        "device": (torch.cuda.get_device_name(device) if cuda
                   else f"cpu ({torch.get_num_threads()} threads)"),
        "size": size, "ngf": s["ngf"], "ndf": s["ndf"], "n_blocks": s["n_blocks"],
        "geometric_loss": s["geometric_loss"],
        "reference_mode": "fp32, batch 1, eager",
        "reference_images_per_s": reference,
        "fast_mode": fast_mode,
        "fast_images_per_s": fast,
        "speedup": fast / reference,
        "gflop_per_image_iteration": flops / 1e9,
        "reference_tflops": reference * flops / 1e12,
        "fast_tflops": fast * flops / 1e12,
        "peak_bf16_tflops": peak["bf16"] if peak else None,
        "fast_fraction_of_bf16_peak": fast * flops / 1e12 / peak["bf16"] if peak else None,
    }
    return result


# ----------------------------------------------------------------------------------------------
# Command line (for a bare GPU machine: numpy + torch only)


def _read_config(path) -> tuple[dict, float]:
    path = Path(path)
    if not path.is_file():
        raise CrossmodError(f"{path}: config not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0]
        raise CrossmodError(f"{path}: not a valid JSON config ({reason})") from None
    if not isinstance(config, dict):
        raise CrossmodError(f"{path}: the config must be a JSON object of cyclegan settings")
    threshold = config.pop("head_threshold", None)
    if threshold is None:
        raise CrossmodError(f"{path}: setting 'head_threshold' missing "
                            "(the profile's preprocessing.head_threshold)")
    settings = check_settings({**config, "head_threshold": threshold}, str(path))
    return settings, float(threshold)


def main(argv=None) -> int:
    """``python -m crossmod_lib.cyclegan {train,synthesise,bench,config} ...``."""
    # cuBLAS reads this when it starts: needed for deterministic matrix products on CUDA.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    parser = argparse.ArgumentParser(prog="python -m crossmod_lib.cyclegan",
                                     description="CycleGAN of Kieselmann et al. 2021 (section 2.C)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train on prepared CT and MR slices (.npz)")
    p.add_argument("--ct", required=True, help="prepared CT slices (ct_slices.npz)")
    p.add_argument("--mr", required=True, help="prepared MR slices (mr_slices.npz)")
    p.add_argument("--out", required=True, help="output folder (checkpoint, losses.csv)")
    p.add_argument("--config", required=True,
                   help="JSON: the profile's cyclegan block plus head_threshold")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--max-iterations", type=int, default=None,
                   help="stop after this many iterations in total (checkpointed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None, help="torch device (default: GPU if any)")
    p = sub.add_parser("synthesise", help="a synthetic MR for every prepared CT slice")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ct", required=True)
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--config", default=None, help="JSON config (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p = sub.add_parser("bench", help="training throughput, reference vs fast mode")
    p.add_argument("--config", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p = sub.add_parser("config", help="write the JSON config of a profile (needs PyYAML)")
    p.add_argument("--profile", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            settings, threshold = _read_config(args.config)
            if args.max_iterations is not None and args.max_iterations < 0:
                raise CrossmodError("--max-iterations must be >= 0")
            summary = train(args.ct, args.mr, args.out, settings, threshold, resume=args.resume,
                            progress=not args.no_progress, max_iterations=args.max_iterations,
                            device=args.device)
        elif args.command == "synthesise":
            settings = _read_config(args.config)[0] if args.config else None
            summary = synthesise(args.checkpoint, args.ct, args.out, settings,
                                 batch_size=args.batch_size, device=args.device)
        elif args.command == "bench":
            settings, threshold = _read_config(args.config)
            summary = bench_cyclegan(settings, args.size, device=args.device,
                                     iterations=args.iterations, warmup=args.warmup,
                                     batch_size=args.batch_size, head_threshold=threshold)
        else:
            from .config import load_profile

            summary = settings_from_profile(load_profile(args.profile))
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2))
    except CrossmodError as exc:
        print(f"crossmod cyclegan: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
