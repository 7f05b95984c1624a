"""CUT and FastCUT (Park et al. 2020): one-sided contrastive translation, beside the CycleGAN.

Beyond the paper. The CycleGAN keeps the anatomy of a translated slice by translating it back
(cycle consistency), which needs a second generator and discriminator. *Contrastive unpaired
translation* keeps it instead by asking that a patch of the output be recognisable as coming from
the same place of the input: the encoder features of G(x) at a location must match, by a
contrastive (InfoNCE) loss, the features of x at that location better than those of other
locations of the same slice (PatchNCE). One generator (CT → MR), one discriminator, and small
per-layer projection heads: about half the CycleGAN's networks and memory.

- **CUT**: λ_NCE = 1 and the identity term PatchNCE(y, G(y)) on MR slices (the output of an MR
  slice must keep its own patches).
- **FastCUT**: λ_NCE = 10, no identity term (faster; the reference adds flip equivariance,
  which is not used here: flipping a head left-right also swaps the parotids' labels).

The geometric loss of the paper applies as to the CycleGAN: binary cross-entropy between the
differentiable head mask of G(x) and the CT's head mask (:func:`crossmod_lib.cyclegan.head_logits`).

:class:`CUT` has the interface :func:`crossmod_lib.cyclegan.train` drives (networks, optimisers,
schedules, pools, ``step``), so checkpoints, exact resume, logging, branching and synthesis are
the CycleGAN's; the setting ``cyclegan.translator`` (``cyclegan`` | ``cut`` | ``fastcut``) chooses.
Written from the paper's description; the peer implementation (``../shared/peers``) was read for
its choice of layers and defaults (encoder layers 0, 4, 8, 12, 16 of its 9-block generator,
256 patches, temperature 0.07, 256-wide two-layer projection heads), not copied.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import cyclegan as cg

#: Columns of losses.csv of a CUT run (besides epoch, iteration, lr, seconds).
LOSS_TERMS = ("G_total", "G_adv_MR", "nce_CT", "nce_idt_MR", "geo_CT", "D_MR")


def nce_layers(n_blocks: int) -> tuple[int, ...]:
    """Indices in :class:`~crossmod_lib.cyclegan.Generator`'s layer sequence whose outputs the
    PatchNCE loss compares: the padded input (pixel patches), the two stride-2 convolutions, and
    the first and middle residual blocks (the peer's 0, 4, 8, 12, 16 on its own layer order)."""
    first_block = 10
    if not n_blocks:
        return (0, 4, 7)
    return tuple(sorted({0, 4, 7, first_block, first_block + n_blocks // 2}))


def encode(generator: cg.Generator, x: torch.Tensor, layers) -> list[torch.Tensor]:
    """The outputs of ``generator.model`` at ``layers`` for input ``x`` (stops after the last)."""
    wanted, out, h = set(layers), [], x
    for index, layer in enumerate(generator.model):
        h = layer(h)
        if index in wanted:
            out.append(h)
        if index >= max(layers):
            break
    return out


class PatchProjection(nn.Module):
    """Per encoder layer a two-layer MLP (C → width → width) applied to sampled feature vectors,
    L2-normalised: the projection heads H_l of CUT."""

    def __init__(self, channels, width: int = 256):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(c, width), nn.ReLU(), nn.Linear(width, width))
                                   for c in channels)

    def forward(self, features, n_patches: int, positions=None):
        """Samples ``n_patches`` locations per layer (the same for every image of the batch;
        ``positions`` re-uses earlier ones) -> (list of [B, P, width] vectors, positions)."""
        projected, chosen = [], []
        for index, (feature, head) in enumerate(zip(features, self.heads)):
            b, c, h, w = feature.shape
            flat = feature.flatten(2).transpose(1, 2)               # [B, HW, C]
            if positions is None:
                where = torch.randperm(h * w, device=feature.device)[:min(n_patches, h * w)]
            else:
                where = positions[index]
            chosen.append(where)
            vectors = head(flat[:, where].float())
            projected.append(F.normalize(vectors, dim=-1))
        return projected, chosen


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """InfoNCE over patches of one image: ``query``, ``key`` [B, P, D] (normalised); for each
    query patch the key at the same location is the positive, the other P - 1 keys of the same
    image the negatives. Keys carry no gradient (as in CUT)."""
    key = key.detach()
    logits = torch.bmm(query, key.transpose(1, 2)) / temperature    # [B, P, P]; diagonal: positives
    b, p, _ = logits.shape
    target = torch.arange(p, device=logits.device).expand(b, p)
    return F.cross_entropy(logits.reshape(b * p, p), target.reshape(-1))


def translator_defaults(settings: dict) -> dict:
    """λ_NCE and the identity term of a translator (``lambda_nce`` null: CUT 1, FastCUT 10)."""
    kind = settings["translator"]
    lam = settings["lambda_nce"]
    if lam is None:
        lam = 10.0 if kind == "fastcut" else 1.0
    return {"lambda_nce": float(lam), "nce_identity": kind == "cut"}


class CUT:
    """G_MR (CT -> MR), D_MR, the projection heads, their optimisers and schedules; :meth:`step`.

    Same constructor and attributes as :class:`~crossmod_lib.cyclegan.CycleGAN` (``pool_ct`` and
    the pools are kept, empty, for the checkpoint format; CUT uses no history pool unless
    ``pool_size`` says so). ``compile`` is not used: the eager step is taken (one generator).
    """

    loss_terms = LOSS_TERMS

    def __init__(self, settings: dict, head_threshold: float, device="cpu", *, bf16=False,
                 channels_last=False, compile=False, compile_fill=None, distributed=False,
                 draw_generator=None):
        s = self.settings = cg.check_settings(settings)
        if distributed:
            raise cg.CrossmodError("cyclegan.translator cut/fastcut: one process only (no torchrun)")
        self.head_threshold = float(head_threshold)
        self.device = torch.device(device)
        self.bf16 = cg._uses_bf16(bf16, self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.draw_generator = draw_generator
        self.compile_fill = (self.device.type == "cuda" if compile_fill is None else bool(compile_fill))
        self.compiled = False
        self.options = translator_defaults(s)
        self.layers = nce_layers(s["n_blocks"])
        self.g_mr = cg.init_weights(cg.Generator(1, 1, s["ngf"], s["n_blocks"], s["upsampling"]), s["init_gain"])
        self.d_mr = cg.init_weights(cg.Discriminator(1, s["ndf"]), s["init_gain"])
        with torch.no_grad():
            probe = encode(self.g_mr, torch.zeros(1, 1, 16, 16), self.layers)
        self.f_mr = cg.init_weights(PatchProjection([f.shape[1] for f in probe], s["nce_features"]),
                                    s["init_gain"])
        for net in self.networks.values():
            net.to(self.device)
        self.g_mr.to(memory_format=self.memory_format)
        self.d_mr.to(memory_format=self.memory_format)
        betas = (s["beta1"], s["beta2"])
        self.opt_g = torch.optim.Adam(list(self.g_mr.parameters()) + list(self.f_mr.parameters()),
                                      lr=s["lr"], betas=betas)
        self.opt_d = torch.optim.Adam(self.d_mr.parameters(), lr=s["lr"], betas=betas)
        c, d = s["epochs_constant"], s["epochs_decay"]
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, lambda e: cg.lr_factor(e, c, d))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, lambda e: cg.lr_factor(e, c, d))
        self.pool_mr = cg.ImagePool(s["pool_size"])
        self.pool_ct = cg.ImagePool(0)

    @property
    def networks(self) -> dict[str, nn.Module]:
        return {"g_mr": self.g_mr, "d_mr": self.d_mr, "f_mr": self.f_mr}

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = cg._to_unit(images_uint8.to(self.device, non_blocking=True)).unsqueeze(1)
        return x.contiguous(memory_format=self.memory_format)

    def _nce(self, source: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        s = self.settings
        with self._autocast():
            keys_features = encode(self.g_mr, source, self.layers)
            query_features = encode(self.g_mr, output, self.layers)
        keys, positions = self.f_mr(keys_features, s["nce_patches"])
        queries, _ = self.f_mr(query_features, s["nce_patches"], positions)
        losses = [patch_nce_loss(q, k, s["nce_temperature"]) for q, k in zip(queries, keys)]
        return torch.stack(losses).mean()

    def step(self, ct: torch.Tensor, mr: torch.Tensor, ct_mask: torch.Tensor,
             mr_mask: torch.Tensor, ct_parotid: torch.Tensor | None = None) -> torch.Tensor:
        """One iteration: generator and heads, then the discriminator. Returns the detached
        values of :data:`LOSS_TERMS` (``mr_mask`` is not used: one direction only; nor is
        ``ct_parotid``, the CycleGAN's task-loss input, which the settings refuse for CUT)."""
        s, b = self.settings, ct.shape[0]
        zero = torch.zeros((), device=self.device)
        cg._set_requires_grad((self.d_mr,), False)
        identity = self.options["nce_identity"]
        with self._autocast():
            generated = self.g_mr(torch.cat((ct, mr)) if identity else ct)
        generated = generated.float()
        fake_mr = generated[:b]
        with self._autocast():
            score = self.d_mr(fake_mr.contiguous(memory_format=self.memory_format))
        adv = cg.lsgan_loss(score, True)
        nce = self._nce(ct, fake_mr)
        nce_idt = self._nce(mr, generated[b:]) if identity else zero
        with contextlib.nullcontext() if s["geometric_loss"] else torch.no_grad():
            logits = cg.head_logits(fake_mr, self.head_threshold, s["mask_temperature"],
                                    compiled=self.compile_fill)
            geo = F.binary_cross_entropy_with_logits(logits, ct_mask.float())
        nce_total = 0.5 * (nce + nce_idt) if identity else nce
        loss_g = s["lambda_adv"] * adv + self.options["lambda_nce"] * nce_total
        if s["geometric_loss"]:
            loss_g = loss_g + s["lambda_geo"] * geo
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()

        cg._set_requires_grad((self.d_mr,), True)
        pooled = self.pool_mr.query(fake_mr.detach(), self.draw_generator)
        with self._autocast():
            scores = self.d_mr(torch.cat((mr, pooled)).contiguous(memory_format=self.memory_format))
        d_mr = 0.5 * (cg.lsgan_loss(scores[:b], True) + cg.lsgan_loss(scores[b:], False))
        self.opt_d.zero_grad(set_to_none=True)
        d_mr.backward()
        self.opt_d.step()
        return torch.stack([loss_g, adv, nce, nce_idt, geo, d_mr]).detach()
