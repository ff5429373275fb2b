"""MGCM and Pix2PixCM (docs/model.md §5.3): a template generator trained by GAN + L1, and a
compatibility model (pants encoder E + BPRNet) trained by BPR on top of the generator's frozen
features. The two share everything but the generator and discriminator (`geco.models.gancm`),
so one config, one stage of geco.train.loop and one scorer serve both.

Score of a (top t, bottom b) pair, used in training (BPR) and in the scorer:

    m = α·⟨s_t, s_b⟩ + sign·β·Σ|d1(t) − E(b)|

s_t = BPRNet.top(generator top embedding of t: MGCM `enc`, Pix2PixCM `e5`), s_b =
BPRNet.bottom(E(b)), d1(t) the generator's template embedding. sign = +1 with
`faithful=True` (the reference, docs/model.md §7 item 12: a farther template scores higher), −1
otherwise.

Per training iteration (B tops, each with `n_negatives` rolled in-batch negatives):

1. D step on Ĝ = G(t) (generator in train mode):
   default: ν·½·(MSE(D(t, Ĝ.detach()), 0) + MSE(D(t, b), 1));
   faithful (docs/model.md §7 item 11, the reference's misplaced parenthesis):
   ν·½·MSE(D(t, Ĝ).detach(), 0 + ½·MSE(D(t, b), 1)) — no gradient through the fake
   prediction; D is only asked to make ½·MSE(D(real), 1) match its fake predictions.
2. G step, a new forward Ĝ = G(t): μ·½·MSE(D(t, Ĝ), 1) + λ_L1·mean|Ĝ − b|.
3. Compatibility step: the generator in eval mode and under no_grad (the reference computes
   the generator's gradients here but never applies them: the same training), BPR
   −mean log(σ(m_pos − m_neg) + 1e-12) over the B×n_negatives pairs; steps E + BPRNet only;
   the generator goes back to train mode.

Three Adams (D; G; E + BPRNet), coupled weight decay, as the reference. The model is the one
after the last epoch (the reference evaluates its epoch-58 checkpoint of 60). Batches are
full (an incomplete last one sits out), shuffled by (seed, epoch), and every epoch runs under
its own RNG stream seeded from (seed, epoch), so a resumed run trains exactly like an
uninterrupted one on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco.baselines.base import EmbeddingScorer, Transform, check_full_batch, rolled_negatives
from geco.data.datasets import PairDataset
from geco.data.images import ImageSource
from geco.data.source import batch_loader
from geco.data.transforms import denormalize_gan, gan_transform, save_rows
from geco.models.gancm import build_gancm, compat_score
from geco.settings import (
    adam_betas,
    at_least,
    check_max_steps,
    check_seed,
    finite_nonnegative,
    learning_rate,
    require,
    resumable,
)
from geco.train.runtime import Runtime

if TYPE_CHECKING:
    from geco.config import Config
    from geco.data.source import FolderData, ShardData

log = logging.getLogger("geco")

N_GRID = 8  # training pairs in the per-epoch template grid


@dataclass
class GanCMConfig:
    """MGCM and Pix2PixCM (sections baselines.mgcm, baselines.pix2pixcm), at 64 px."""

    image_size: int = 64  # the networks are defined for 64 px (docs/model.md §5.3)
    features: int = 64  # first conv width; filters f,2f,4f,8f,8f,8f (the reference: 64)
    emb_dim: int = 128
    alpha: float = 1.0  # weight of the dot-product term of the score
    beta: float = 0.01  # weight of the template term of the score
    mu: float = 0.1  # generator adversarial weight
    nu: float = 0.01  # discriminator loss weight
    lambda_l1: float = 10000.0
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 0.01  # coupled L2 in Adam, as the reference
    epochs: int = resumable(60)
    batch_size: int = 420
    n_negatives: int = 3  # rolled in-batch negatives per top
    # True reproduces the reference's discriminator loss (its misplaced parenthesis) and
    # template term +beta·L1 (a larger distance scores higher; docs/model.md §7 items 11-12). False (the
    # default) trains D on real -> 1, fake -> 0 and scores -beta·L1 (closer = better).
    faithful: bool = False
    max_steps_per_epoch: int = resumable(0)  # 0 = full epoch; >0 caps steps (smoke runs)
    seed: int = 0

    def validate(self, key: str) -> None:
        require(self.image_size == 64, f"{key}.image_size", self.image_size,
                "the MGCM / Pix2PixCM networks are defined for 64 px inputs (docs/model.md §5.3)")
        for name in ("features", "emb_dim", "epochs", "n_negatives"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        at_least(f"{key}.batch_size", self.batch_size, self.n_negatives + 1,
                 "rolled negatives need n_negatives + 1 tops per batch")
        for name in ("alpha", "beta", "mu", "nu", "lambda_l1", "weight_decay"):
            finite_nonnegative(f"{key}.{name}", getattr(self, name))
        learning_rate(f"{key}.lr", self.lr)
        adam_betas(f"{key}.betas", self.betas)
        check_max_steps(f"{key}.max_steps_per_epoch", self.max_steps_per_epoch)
        check_seed(f"{key}.seed", self.seed)
        require(self.alpha > 0 or self.beta > 0, f"{key}.alpha", self.alpha,
                "alpha and beta are both 0: the score would be constant")


# --------------------------------------------------------------------------- losses


def _mse_to(pred: Tensor, value: float | Tensor) -> Tensor:
    target = torch.as_tensor(value, dtype=pred.dtype, device=pred.device).expand_as(pred)
    return F.mse_loss(pred, target)


def discriminator_loss(d_fake: Tensor, d_real: Tensor, *, nu: float, faithful: bool) -> Tensor:
    """The D loss from D's (sigmoid) predictions on (top, generated) and (top, true bottom).

    default: ν·½·(MSE(d_fake, 0) + MSE(d_real, 1)) — pass d_fake computed on a detached
    template so no gradient reaches the generator.
    faithful: ν·½·MSE(d_fake.detach(), target) with target = 0 + ½·MSE(d_real, 1) (a scalar
    that carries d_real's gradient, broadcast to d_fake's shape) — the reference's bug."""
    if faithful:
        target = 0 + 0.5 * _mse_to(d_real, 1.0)
        return nu * 0.5 * F.mse_loss(d_fake.detach(), target.expand_as(d_fake))
    return nu * 0.5 * (_mse_to(d_fake, 0.0) + _mse_to(d_real, 1.0))


def generator_loss(d_fake: Tensor, fake: Tensor, bottom: Tensor, *, mu: float,
                   lambda_l1: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, adversarial term ½·MSE(d_fake, 1), L1 term mean|fake − bottom|); loss =
    μ·adv + λ_L1·L1."""
    adv = 0.5 * _mse_to(d_fake, 1.0)
    l1 = F.l1_loss(fake, bottom)
    return mu * adv + lambda_l1 * l1, adv, l1


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """−mean log(σ(pos − neg) + 1e-12) over pos [B] against neg [B, K]."""
    return -torch.log(torch.sigmoid(pos[:, None] - neg) + 1e-12).mean()


# --------------------------------------------------------------------------- model


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class GanCMModel:
    """The four networks of one GAN baseline on `device`, their three Adams and the training
    step. `kind` is "mgcm" or "pix2pixcm"; `section` its config section."""

    def __init__(self, kind: str, section: GanCMConfig, device: torch.device | str = "cpu", *,
                 rt: Runtime | None = None) -> None:
        self.kind, self.cfg = kind, section
        self.rt = rt
        self.device = torch.device(rt.device if rt is not None else device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(section.seed)
            g, d, e, b = build_gancm(kind, section.features, section.emb_dim)
        fmt = (torch.channels_last if rt is not None and rt.channels_last
               else torch.contiguous_format)
        self.generator = g.to(self.device, memory_format=fmt)
        self.discriminator = d.to(self.device, memory_format=fmt)
        self.encoder = e.to(self.device, memory_format=fmt)
        self.bprnet = b.to(self.device)
        adam = dict(lr=section.lr, betas=tuple(section.betas), weight_decay=section.weight_decay)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), **adam)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), **adam)
        self.opt_c = torch.optim.Adam([*self.encoder.parameters(), *self.bprnet.parameters()],
                                      **adam)

    # ---- bookkeeping
    def _autocast(self, enabled: bool = True):
        if enabled and self.rt is not None:
            return self.rt.autocast()
        return contextlib.nullcontext()

    def params(self) -> dict[str, int]:
        return {"generator": _count(self.generator), "discriminator": _count(self.discriminator),
                "encoder": _count(self.encoder), "bprnet": _count(self.bprnet)}

    def train(self) -> None:
        for m in (self.generator, self.discriminator, self.encoder, self.bprnet):
            m.train()

    def eval(self) -> None:
        for m in (self.generator, self.discriminator, self.encoder, self.bprnet):
            m.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.state_dict(),
                "discriminator": self.discriminator.state_dict(),
                "encoder": self.encoder.state_dict(), "bprnet": self.bprnet.state_dict(),
                "opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(),
                "opt_c": self.opt_c.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.encoder.load_state_dict(state["encoder"])
        self.bprnet.load_state_dict(state["bprnet"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_c.load_state_dict(state["opt_c"])

    # ---- score pieces
    def score(self, s_t: Tensor, s_b: Tensor, d1: Tensor, e_b: Tensor) -> Tensor:
        c = self.cfg
        return compat_score(s_t.float(), s_b.float(), d1.float(), e_b.float(), alpha=c.alpha,
                            beta=c.beta, faithful=c.faithful)

    def top_parts(self, top: Tensor, *, amp: bool = True) -> tuple[Tensor, Tensor]:
        """(s_t [B, emb_dim], d1 [B, 8f·4]) with the networks in their current mode; `amp`
        False runs in fp32 even where the runtime autocasts."""
        with self._autocast(amp):
            emb, d1, _ = self.generator(top)
            s_t = self.bprnet.top(emb)
        return s_t.float(), d1.float().flatten(1)

    def bottom_parts(self, bottom: Tensor, *, amp: bool = True) -> tuple[Tensor, Tensor]:
        """(s_b [B, emb_dim], E(b) [B, 8f·4]) with the networks in their current mode."""
        with self._autocast(amp):
            e_b = self.encoder(bottom)
            s_b = self.bprnet.bottom(e_b)
        return s_b.float(), e_b.float().flatten(1)

    # ---- training
    def gan_step(self, top: Tensor, bottom: Tensor) -> dict[str, Tensor]:
        """One D step and one G step (docs/model.md §5.3, training step parts 1-2). Returns the loss terms
        unweighted (before ν, μ, λ_L1): d_loss, g_adv (½·MSE(D(t, Ĝ), 1)), g_l1."""
        c = self.cfg
        g, d = self.generator, self.discriminator
        with self._autocast():
            fake = g(top)[2]
            d_fake = d(top, fake.detach())[0].float()
            d_real = d(top, bottom)[0].float()
        d_loss = discriminator_loss(d_fake, d_real, nu=1.0, faithful=c.faithful)
        self.opt_d.zero_grad(set_to_none=True)
        (c.nu * d_loss).backward()
        self.opt_d.step()

        with self._autocast():
            fake = g(top)[2]
            d_fake = d(top, fake)[0].float()
        g_loss, adv, l1 = generator_loss(d_fake, fake.float(), bottom.float(), mu=c.mu,
                                         lambda_l1=c.lambda_l1)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        return {"d_loss": d_loss.detach(), "g_adv": adv.detach(), "g_l1": l1.detach()}

    def compat_step(self, top: Tensor, bottom: Tensor) -> Tensor:
        """One BPR step of E + BPRNet on fixed generator features (docs/model.md §5.3, training step part 3)."""
        self.generator.eval()
        try:
            with torch.no_grad(), self._autocast():
                emb, d1, _ = self.generator(top)
        finally:
            self.generator.train()
        with self._autocast():
            s_t = self.bprnet.top(emb)
            e_b = self.encoder(bottom)
            s_b = self.bprnet.bottom(e_b)
        s_t, s_b = s_t.float(), s_b.float()
        d1, e_b = d1.float().flatten(1), e_b.float().flatten(1)
        k = self.cfg.n_negatives
        pos = self.score(s_t, s_b, d1, e_b)
        neg = self.score(s_t[:, None], rolled_negatives(s_b, k), d1[:, None],
                         rolled_negatives(e_b, k))
        loss = bpr_loss(pos, neg)
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_c.step()
        return loss.detach()

    def train_step(self, top: Tensor, bottom: Tensor) -> dict[str, Tensor]:
        parts = self.gan_step(top, bottom)
        parts["bpr"] = self.compat_step(top, bottom)
        return parts


# --------------------------------------------------------------------------- samples


@torch.no_grad()
def save_gancm_grid(model: GanCMModel, tops: Tensor, bottoms: Tensor, path: Path) -> Path:
    """PNG, one row per pair: top | generated template | true bottom (generator in eval)."""
    g = model.generator
    was_training = g.training
    g.eval()
    try:
        with model._autocast():
            fake = g(tops.to(model.device))[2].float().cpu()
    finally:
        g.train(was_training)
    return save_rows([denormalize_gan(tops.cpu()), denormalize_gan(fake),
                      denormalize_gan(bottoms.cpu())], path,
                     labels=["top", "template", "true bottom"])


# --------------------------------------------------------------------------- training stage


class GanCMStage:
    """MGCM or Pix2PixCM as a stage of geco.train.loop, on the training split of the data;
    `scorer(images)` scores pairs with the trained networks."""

    kind = ""  # "mgcm" | "pix2pixcm": the model, its run-dir folder and config section

    def __init__(self, cfg: Config, rt: Runtime, data: FolderData | ShardData) -> None:
        self.cfg, self.rt, self.name = cfg, rt, self.kind
        self.section: GanCMConfig = getattr(cfg.baselines, self.kind)
        c = self.section
        self.depends_on = ("data", f"baselines.{self.kind}")
        self.epochs, self.max_steps_per_epoch, self.rng_seed = (c.epochs, c.max_steps_per_epoch,
                                                                 c.seed)
        splits, self.images = data.splits(("train",))
        self.train_split = splits["train"]
        check_full_batch(len(self.train_split), c.batch_size, f"baselines.{self.kind}.batch_size",
                         self.train_split.source)
        self.transform = gan_transform(c.image_size)
        self.loader = batch_loader(PairDataset(self.train_split, self.images, self.transform),
                                   batch_size=c.batch_size, seed=c.seed, drop_last=True,
                                   num_workers=cfg.data.loader_workers)
        self.model = GanCMModel(self.kind, c, rt=rt)
        self._grid: tuple[Tensor, Tensor] | None = None

    @property
    def modules(self) -> list[nn.Module]:
        m = self.model
        return [m.generator, m.discriminator, m.encoder, m.bprnet]

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        self.model.train()
        top, bottom = self.rt.to_device(batch["top"]), self.rt.to_device(batch["bottom"])
        return {k: float(v) for k, v in self.model.train_step(top, bottom).items()}

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        if self._grid is None:  # the first training pairs, the same every epoch
            s = self.train_split
            rows = range(min(N_GRID, len(s)))
            self._grid = tuple(torch.stack([self.transform(self.images.load(ids[i],
                                                                            context=s.where(i)))
                                            for i in rows]) for ids in (s.tops, s.bottoms))
        self.model.eval()
        save_gancm_grid(self.model, *self._grid, out_dir / "samples" / f"epoch_{epoch + 1:03d}.png")
        return {}

    def selection(self) -> None:
        return None  # the model after the last epoch, as the reference

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def info(self) -> dict[str, Any]:
        return {"generator": type(self.model.generator).__name__,
                "discriminator": type(self.model.discriminator).__name__,
                "params": self.model.params(), "faithful": self.section.faithful}

    def scorer(self, images: ImageSource) -> GanCMScorer:
        self.model.eval()
        return GanCMScorer(self.model, images, batch_size=self.cfg.eval.batch_size,
                           num_workers=self.cfg.data.loader_workers)


class MGCMStage(GanCMStage):
    kind = "mgcm"


class Pix2PixCMStage(GanCMStage):
    kind = "pix2pixcm"


# --------------------------------------------------------------------------- scorers


class GanCMScorer(EmbeddingScorer):
    """A trained GAN baseline as a `geco.baselines.Scorer`.

    Top embedding = cat(s_t, d1(t).flatten()), bottom embedding = cat(s_b, E(b).flatten()),
    both [emb_dim + 8f·4], computed in fp32 with every network in eval mode; `match` /
    `match_pool` split them back and compute the score of the module docstring (pool: a
    matrix product plus torch.cdist(p=1), in row chunks)."""

    pool_chunk = 1024  # query rows per cdist call in match_pool

    def __init__(self, model: GanCMModel, images: ImageSource, *, batch_size: int = 128,
                 num_workers: int = 0) -> None:
        super().__init__(images, device=model.device, batch_size=batch_size,
                         num_workers=num_workers)
        self.name = model.kind
        self.model, self.section = model, model.cfg
        self.emb_dim = self.section.emb_dim

    # ---- EmbeddingScorer API
    def top_transform(self) -> Transform:
        return gan_transform(self.section.image_size)

    def embed_tops(self, x: Tensor) -> Tensor:
        self.model.eval()
        s_t, d1 = self.model.top_parts(x, amp=False)
        return torch.cat([s_t, d1], dim=1)

    def embed_bottoms(self, x: Tensor) -> Tensor:
        self.model.eval()
        s_b, e_b = self.model.bottom_parts(x, amp=False)
        return torch.cat([s_b, e_b], dim=1)

    def match(self, t: Tensor, b: Tensor) -> Tensor:
        e, out = self.emb_dim, []
        for i in range(0, t.shape[0], self.pool_chunk):
            tt, bb = t[i:i + self.pool_chunk, None], b[i:i + self.pool_chunk]
            out.append(self.model.score(tt[..., :e], bb[..., :e], tt[..., e:], bb[..., e:]))
        return torch.cat(out) if out else t.new_zeros(0, b.shape[1])

    def match_pool(self, t: Tensor, b: Tensor) -> Tensor:
        c, e = self.section, self.emb_dim
        sign = 1.0 if c.faithful else -1.0
        t, b = t.float(), b.float()
        b_s, b_d = b[:, :e], b[:, e:].contiguous()
        out = []
        for i in range(0, t.shape[0], self.pool_chunk):
            tt = t[i:i + self.pool_chunk]
            dist = torch.cdist(tt[:, e:].contiguous(), b_d, p=1)
            out.append(c.alpha * (tt[:, :e] @ b_s.T) + sign * c.beta * dist)
        return torch.cat(out) if out else t.new_zeros(0, b.shape[0])
