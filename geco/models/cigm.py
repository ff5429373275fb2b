"""CIGM (stage 1), all of it: its config, the pix2pix-style U-Net generator with bottleneck
noise and the PatchGAN critic (docs/model.md §2, exactly at 128 px / features=64 minus the
reference's unused `down6`), the adversarial + λ·L1 losses, the training stage run by
geco.train.loop, and the template grids.

Per step (docs/model.md §2.3): one generator draw; a discriminator step on (real, detached fake); then a
generator step with adversarial + λ·L1 against the just-updated discriminator. After every
epoch the templates are measured on the validation split (geco.models.template_quality) and
the epoch whose templates retrieve the true bottoms best, among those that have not
collapsed, is kept as `cigm/best.pt`, the generator GECo trains with
(`cigm.selection_metric: last` keeps the reference's choice: the last epoch).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geco.data.transforms import (
    denormalize_gan,
    denormalize_imagenet,
    gan_transform,
    imagenet_to_gan,
    save_rows,
)
from geco.errors import ConfigError, GecoError
from geco.settings import (
    adam_betas,
    at_least,
    check_max_steps,
    finite_nonnegative,
    learning_rate,
    resumable,
)
from geco.train.runtime import Runtime, load_checkpoint, unwrap

if TYPE_CHECKING:
    from geco.config import Config
    from geco.data.source import FolderData, ShardData
    from geco.models.template_quality import ValidationSet

log = logging.getLogger("geco")


@dataclass
class CIGMConfig:
    features: int = 64
    noise_dim: int = 1024
    lambda_l1: float = 100.0
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    epochs: int = resumable(200)
    # Per DDP rank. May change on resume: elastic training sets it from the world size.
    batch_size: int = resumable(64)
    init_discriminator: bool = True  # False reproduces the reference (only G is initialised)
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 caps steps (smoke runs)
    n_samples: int = resumable(8)  # validation tops in the per-epoch template grid
    # Which epoch's generator GECo uses: the best on this template-quality metric (validation
    # rows; a collapsed epoch scores 0), or "last" (the reference).
    selection_metric: Literal["template_feat_mrr_full", "template_l1_mrr_full",
                              "template_feat_auc_1vs1", "template_l1_auc_1vs1", "last"] = (
        "template_feat_mrr_full")
    quality_rows: int = resumable(512)  # validation rows the templates are measured on; 0 = all
    quality_noises: int = resumable(4)  # noise draws per top (diversity between noises)
    # Collapse: most templates blank, or their diversity between tops below this share of
    # the real bottoms'.
    collapse_ratio: float = resumable(0.1)

    def validate(self, key: str) -> None:
        for name in ("features", "noise_dim", "epochs", "batch_size", "n_samples"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        check_max_steps(f"{key}.max_steps_per_epoch", self.max_steps_per_epoch)
        learning_rate(f"{key}.lr", self.lr)
        adam_betas(f"{key}.betas", self.betas)
        finite_nonnegative(f"{key}.lambda_l1", self.lambda_l1)
        at_least(f"{key}.quality_rows", self.quality_rows, 0, "0 = every validation row")
        at_least(f"{key}.quality_noises", self.quality_noises, 1)
        finite_nonnegative(f"{key}.collapse_ratio", self.collapse_ratio)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 4, 2, 1, bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2),
    )


def _up(cin: int, cout: int, dropout: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """U-Net generator G(top, z) -> bottom template in [-1, 1].

    At image_size=128, features=f the encoder maps are d1..d6 with widths f, 2f, 4f, 8f, 8f, 8f
    (spatial 64 … 2), a bottleneck conv takes d6 to 8f×1×1, the noise z (noise_dim×1×1) is
    concatenated in front of it, and six up blocks (dropout on the first two) plus a final
    transposed conv mirror the encoder with U-Net skips. This is docs/model.md §2.1 without the
    never-called `down6`.

    Other sizes (a power of two >= 16): the encoder has log2(image_size) - 1 maps, halving down
    to 2×2, with widths min(f·2^k, 8f); only the number of 8f-wide middle blocks changes
    (64 px: one fewer than at 128, 256 px: one more). Each up block outputs the width of the skip
    it is concatenated with, and dropout stays on the first two up blocks. Below 32 px the
    encoder never reaches 8f, so the bottleneck widens its input to 8f.
    """

    def __init__(
        self, in_channels: int = 3, features: int = 64, noise_dim: int = 1024, image_size: int = 128
    ) -> None:
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ConfigError(f"image_size must be a power of two >= 16 (got {image_size})")
        if features < 1 or noise_dim < 1:
            raise ConfigError(
                f"features and noise_dim must be >= 1 (got features={features}, noise_dim={noise_dim})"
            )
        self.in_channels = in_channels
        self.noise_dim = noise_dim
        self.image_size = image_size
        widest = 8 * features
        enc = [min(features * 2**k, widest) for k in range(int(math.log2(image_size)) - 1)]

        self.initial_down = nn.Sequential(
            nn.Conv2d(in_channels, enc[0], 4, 2, 1, padding_mode="reflect"), nn.LeakyReLU(0.2)
        )
        self.downs = nn.ModuleList(_down(a, b) for a, b in zip(enc[:-1], enc[1:], strict=True))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(enc[-1], widest, 4, 2, 1, padding_mode="reflect"), nn.ReLU()
        )
        ups = [_up(noise_dim + widest, enc[-1], dropout=True)]
        # Up block j (j >= 1) sees cat(previous up, skip enc[-j]) and outputs the next skip's width.
        for j in range(1, len(enc)):
            ups.append(_up(2 * enc[-j], enc[-j - 1], dropout=j < 2))
        self.ups = nn.ModuleList(ups)
        self.final_up = nn.Sequential(
            nn.ConvTranspose2d(2 * enc[0], in_channels, 4, 2, 1), nn.Tanh()
        )

    def _noise(self, x: Tensor, noise: Tensor | None, rng: torch.Generator | None) -> Tensor:
        b = x.shape[0]
        if noise is None:
            if rng is not None:
                # Draw where the generator lives so a seeded CPU rng gives the same z on any device.
                z = torch.randn(b, self.noise_dim, 1, 1, generator=rng, device=rng.device)
            else:
                z = torch.randn(b, self.noise_dim, 1, 1, device=x.device)
        else:
            if noise.shape not in ((b, self.noise_dim), (b, self.noise_dim, 1, 1)):
                raise ValueError(
                    f"noise must have shape ({b}, {self.noise_dim}) or ({b}, {self.noise_dim}, 1, 1),"
                    f" got {tuple(noise.shape)}"
                )
            z = noise.reshape(b, self.noise_dim, 1, 1)
        return z.to(device=x.device, dtype=x.dtype)

    def forward(
        self, x: Tensor, noise: Tensor | None = None, *, rng: torch.Generator | None = None
    ) -> Tensor:
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (s, s):
            raise ValueError(
                f"Generator expects B×{self.in_channels}×{s}×{s} input, got {tuple(x.shape)}"
            )
        h = self.initial_down(x)
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[0](torch.cat([self._noise(x, noise, rng), self.bottleneck(h)], dim=1))
        for j, up in enumerate(self.ups[1:], start=1):
            h = up(torch.cat([h, skips[-j]], dim=1))
        return self.final_up(torch.cat([h, skips[0]], dim=1))


class PatchDiscriminator(nn.Module):
    """PatchGAN critic D(top, bottom) -> patch logits (docs/model.md §2.2; 8×8 for 128 px inputs).

    `padding=0` (the reference) needs inputs of at least 68 px; `build_cigm` switches to
    pix2pix's padding 1 below 128 px so the 64 px CPU config still gets a 6×6 patch.
    """

    def __init__(self, in_channels: int = 3, features: int = 64, *, padding: int = 0) -> None:
        super().__init__()
        f = features
        self.initial = nn.Sequential(
            nn.Conv2d(2 * in_channels, f, 4, 2, 1, padding_mode="reflect"), nn.LeakyReLU(0.2)
        )
        blocks: list[nn.Module] = []
        for cin, cout, stride in ((f, 2 * f, 2), (2 * f, 4 * f, 2), (4 * f, 8 * f, 1)):
            blocks += [
                nn.Conv2d(cin, cout, 4, stride, padding, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(8 * f, 1, 4, 1, padding))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(self.initial(torch.cat([x, y], dim=1)))


def init_pix2pix_weights(module: nn.Module) -> None:
    """pix2pix init over `module` and all its submodules (recursive: do not pass to `.apply`).

    Conv / transposed-conv weights ~ N(0, 0.02), their biases keep PyTorch's default (as in the
    reference); BatchNorm weight ~ N(1, 0.02), bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_cigm(
    features: int = 64,
    noise_dim: int = 1024,
    image_size: int = 128,
    *,
    init_discriminator: bool = True,
) -> tuple[Generator, PatchDiscriminator]:
    """Generator and discriminator for RGB images, pix2pix-initialised.

    The reference initialises only the generator; `init_discriminator=False` reproduces that.
    """
    if image_size < 32:
        raise ConfigError(
            f"image_size must be >= 32 for the PatchGAN discriminator (got {image_size})"
        )
    gen = Generator(3, features, noise_dim, image_size)
    disc = PatchDiscriminator(3, features, padding=0 if image_size >= 128 else 1)
    init_pix2pix_weights(gen)
    if init_discriminator:
        init_pix2pix_weights(disc)
    return gen, disc


# --------------------------------------------------------------------------- losses


def as_floats(names: Sequence[str], values: Sequence[Tensor]) -> dict[str, float]:
    """Loss parts for logging, with one device sync for all of them."""
    return dict(zip(names, torch.stack([v.detach() for v in values]).tolist(), strict=True))


def gan_d_half(logits: Tensor, real: bool) -> Tensor:
    """One half of the discriminator loss: ½·BCE(logits, 1 if real else 0), patch-averaged.

    Training takes the halves separately (one backward per D call); gan_d_loss is their sum.
    """
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    return 0.5 * F.binary_cross_entropy_with_logits(logits, target)


def gan_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """½·[BCE(D(x,y), 1) + BCE(D(x,ŷ), 0)], averaged over every patch logit."""
    return gan_d_half(real_logits, True) + gan_d_half(fake_logits, False)


def gan_g_loss(
    fake_logits: Tensor, fake: Tensor, target: Tensor, lambda_l1: float
) -> tuple[Tensor, dict[str, float]]:
    """Non-saturating adversarial loss + λ·mean|ŷ - y|; parts hold the unweighted terms."""
    adv = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    l1 = F.l1_loss(fake, target)
    total = adv + lambda_l1 * l1
    return total, as_floats(("g_loss", "g_adv", "g_l1"), (total, adv, l1))


# --------------------------------------------------------------------------- training stage


class CIGMStage:
    """CIGM as a stage of geco.train.loop: one GAN step per batch, a template grid per epoch."""

    name = "cigm"
    # What makes a CIGM checkpoint another model (GECo's settings do not).
    depends_on = ("data", "cigm")

    def __init__(self, cfg: Config, rt: Runtime, data: FolderData | ShardData):
        self.cfg, self.rt = cfg, rt
        # Noise and dropout draw from a stream per (epoch, rank): a run resumed after a lost
        # node trains exactly like an uninterrupted one.
        self.rng_seed = cfg.runtime.seed
        c = cfg.cigm
        self.epochs, self.max_steps_per_epoch = c.epochs, c.max_steps_per_epoch
        data.check(("train", "valid"))
        tf = gan_transform(cfg.data.image_size)
        self.loader = data.train_loader(tf, rt=rt, batch_size=c.batch_size,
                                        seed=cfg.runtime.seed, num_workers=cfg.data.loader_workers)
        # Template quality (rank 0 measures, every rank gets the numbers to select on). Under
        # its own RNG state: reading the split through DataLoaders draws from the global RNG,
        # which would change the networks' initialisation below on rank 0 only.
        self.quality_set = self.features = None
        if rt.is_main:
            from geco.models.template_quality import ValidationSet, feature_space

            with torch.random.fork_rng(devices=[]):
                self.quality_set = ValidationSet(data, "valid", cfg.data.image_size,
                                                 c.quality_rows, batch_size=cfg.eval.batch_size)
                self.features, self.feature_name = feature_space(cfg.geco.backbone, rt.device,
                                                                 seed=cfg.eval.seed)

        g, d = build_cigm(c.features, c.noise_dim, cfg.data.image_size,
                          init_discriminator=c.init_discriminator)
        g, d = g.to(rt.device), d.to(rt.device)
        if rt.channels_last:
            g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            g, d = DDP(g, device_ids=ids), DDP(d, device_ids=ids)
        self.g, self.d = g, d
        self.opt_g = torch.optim.Adam(g.parameters(), lr=c.lr, betas=tuple(c.betas))
        self.opt_d = torch.optim.Adam(d.parameters(), lr=c.lr, betas=tuple(c.betas))

    @property
    def modules(self) -> list[nn.Module]:
        """The trained networks (their parameters are what DDP keeps equal across ranks)."""
        return [self.g, self.d]

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        rt = self.rt
        x, y = rt.to_device(batch["top"]), rt.to_device(batch["bottom"])
        self.g.train()
        self.d.train()
        with rt.autocast():
            fake = self.g(x)
        # Discriminator, L_D = ½·[BCE(D(x,y),1) + BCE(D(x,ŷ),0)] (gan_d_loss). Real and fake
        # are scored in separate calls, each with its own BatchNorm batch statistics as in the
        # reference, so each half gets its own backward; under DDP the first half accumulates
        # locally (no_sync) and the second all-reduces the sum once.
        self.opt_d.zero_grad(set_to_none=True)
        sync_later = self.d.no_sync() if isinstance(self.d, DDP) else contextlib.nullcontext()
        with sync_later:
            with rt.autocast():
                d_real = self.d(x, y).float()
            loss_real = gan_d_half(d_real, real=True)
            loss_real.backward()
        with rt.autocast():
            d_fake = self.d(x, fake.detach()).float()
        loss_fake = gan_d_half(d_fake, real=False)
        loss_fake.backward()
        self.opt_d.step()
        loss_d = loss_real.detach() + loss_fake.detach()

        # Generator: the just-updated D scores the same fake. Call D's plain module so D's
        # gradients from this pass stay local (they are discarded by the next D step anyway).
        self.opt_g.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = unwrap(self.d)(x, fake).float()
        loss_g, parts = gan_g_loss(logits, fake.float(), y, self.cfg.cigm.lambda_l1)
        loss_g.backward()
        self.opt_g.step()
        return {"d_loss": float(loss_d), **parts}

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        from geco.models.template_quality import describe, measure

        c, metrics = self.cfg.cigm, None
        if self.rt.is_main:
            g = unwrap(self.g)
            metrics, _ = measure(g, self.quality_set, rt=self.rt, seed=self.cfg.eval.seed,
                                 noises=c.quality_noises, collapse_ratio=c.collapse_ratio,
                                 features=self.features, batch_size=self.cfg.eval.batch_size)
            chosen = metrics.get(c.selection_metric, metrics["template_l1_mrr_full"])
            metrics["template_score"] = 0.0 if metrics["template_collapsed"] else chosen
            log.info("[cigm] epoch %d templates on %d valid rows (features: %s): %s",
                     epoch + 1, len(self.quality_set), self.feature_name, describe(metrics))
            if metrics["template_collapsed"]:
                log.warning("[cigm] epoch %d: TEMPLATES COLLAPSED (%.0f%% blank; diversity "
                            "between tops %.3f of the real bottoms', threshold %.2f): GECo "
                            "would learn nothing from them; this epoch will not be selected",
                            epoch + 1, 100 * metrics["template_blank"],
                            metrics.get("template_div_ratio", float("nan")), c.collapse_ratio)
            save_template_grid(
                g, self.quality_set, out_dir / "samples" / f"epoch_{epoch + 1:03d}.png",
                rt=self.rt, seed=self.cfg.eval.seed, n=c.n_samples,
            )
        return self.rt.broadcast_object(metrics)

    def selection(self) -> tuple[str, str] | None:
        if self.cfg.cigm.selection_metric == "last":
            return None
        return "template_score", "max"

    def report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The fit summary's template section (logged on rank 0): which epoch GECo gets, its
        template metrics, and every epoch whose templates collapsed."""
        history = summary["history"]
        collapsed = [r["epoch"] for r in history if r.get("template_collapsed")]
        epoch = summary["best"]["epoch"] or (history[-1]["epoch"] if history else None)
        chosen = next((r for r in history if r["epoch"] == epoch), {})
        out = {"generator_epoch": epoch, "collapsed_epochs": collapsed,
               "generator_collapsed": bool(chosen.get("template_collapsed")),
               "generator_templates": {k: v for k, v in chosen.items()
                                       if k.startswith("template_")}}
        if self.rt.is_main and history:
            from geco.models.template_quality import describe

            log.info("[cigm] GECo gets the generator of epoch %s (%s): %s", epoch,
                     "selected on " + self.cfg.cigm.selection_metric
                     if summary["best"]["epoch"] else "the last epoch", describe(chosen))
            if out["generator_collapsed"]:
                log.warning("[cigm] THE GENERATOR GECo GETS HAS COLLAPSED TEMPLATES (epochs "
                            "collapsed: %s): GECo will be a top-only retriever; see "
                            "docs/model.md §2.5", collapsed)
            elif collapsed:
                log.warning("[cigm] templates collapsed in epochs %s (not selected)", collapsed)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": unwrap(self.g).state_dict(),
            "discriminator": unwrap(self.d).state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.g).load_state_dict(state["generator"])
        unwrap(self.d).load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def load_generator(path: str | Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """The frozen, eval-mode generator from a CIGM checkpoint, with the config it was trained with."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("stage") != "cigm":
        raise GecoError(f"{path} is not a CIGM checkpoint (stage={ckpt.get('stage')!r})")
    c = ckpt["config"]
    g = Generator(features=c["cigm"]["features"], noise_dim=c["cigm"]["noise_dim"],
                  image_size=c["data"]["image_size"])
    g.load_state_dict(ckpt["state"]["generator"])
    g.eval().requires_grad_(False)
    return g.to(device), c


# --------------------------------------------------------------------------- pictures


@torch.no_grad()
def save_template_grid(
    generator: Generator, pairs: ValidationSet | list[dict[str, Tensor]], path: Path, *,
    rt: Runtime, seed: int, n: int = 8, noises: int = 3, space: str = "gan",
    faithful: bool = False,
) -> Path:
    """One row per validation pair: top | its templates under `noises` seeded noise draws |
    true bottom, cells of at least 128 px with labelled columns. `pairs` is a ValidationSet
    (GAN space) or {"top", "bottom"} dicts in `space` ("gan" = [-1,1], "imagenet" = GECo's
    input, which the generator is given converted, or as is when `faithful`)."""
    if isinstance(pairs, list):
        items = [it for it in pairs if it is not None][:n]
        tops = torch.stack([it["top"] for it in items])
        bottoms = torch.stack([it["bottom"] for it in items])
    else:
        tops, bottoms = pairs.tops[:n], pairs.pos_bottoms[:n]
    tops, bottoms = tops.to(rt.device), bottoms.to(rt.device)
    gen_in = tops if space == "gan" else imagenet_to_gan(tops, faithful=faithful)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(noises, len(tops), generator.noise_dim, generator=rng)
    was_training = generator.training
    generator.eval()
    with rt.autocast():
        templates = [generator(gen_in, z.to(rt.device)).float() for z in noise]
    generator.train(was_training)
    to01 = denormalize_gan if space == "gan" else denormalize_imagenet
    labels = ["top", *(f"template z{k + 1}" for k in range(noises)), "true bottom"]
    return save_rows([to01(tops), *(denormalize_gan(t) for t in templates), to01(bottoms)],
                     path, labels=labels)
