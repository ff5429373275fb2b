"""GECo (stage 2), all of it: its config, the retriever network (docs/model.md §3), its loss
α·BPR + β·InfoNCE(τ) + γ·reg, the `Retriever` that serves it (frozen generator + network), and
the training stage run by geco.train.loop.

Per step: templates from the eval-mode generator (no gradient), q = query(top ⊕ template),
p = bottom embedding, loss α·BPR (rolled in-batch negative) + β·InfoNCE(τ) + γ·reg. After each
epoch: StepLR, validation on the valid split, best epoch by `geco.selection_metric`.
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from geco.data.transforms import gan_to_imagenet, imagenet_to_gan, imagenet_transform
from geco.errors import ConfigError, GecoError
from geco.models.backbone import BackboneConfig, resnet18_features
from geco.models.cigm import Generator, as_floats, load_generator, save_template_grid
from geco.settings import (
    adam_betas,
    at_least,
    check_max_steps,
    learning_rate,
    require,
    resumable,
)
from geco.train.runtime import Runtime, gather_rows, load_checkpoint, unwrap

if TYPE_CHECKING:
    from geco.config import Config
    from geco.data.source import FolderData, ShardData

Regulariser = Literal["reference", "paper"]  # docs/model.md §3.2: the code's term | Eq. 13
REGULARISERS: tuple[str, ...] = typing.get_args(Regulariser)
# Validation metrics that can pick the best epoch (all "higher is better").
# What the query sees besides the top (docs/model.md §3.1; Table 4's extension): the generated
# template (the paper), a constant grey template (same network, no information), or nothing.
TemplateMode = Literal["generated", "constant", "none"]
# How the backbone's BatchNorm treats templates in training (docs/model.md §3.8): "reference"
# normalises a template batch with its own statistics, which also move the running statistics
# used at evaluation; "exclude" does the same but keeps the running statistics to the real
# photos; "running" normalises templates with the running statistics of the real photos (and
# never updates them), in training as at evaluation.
TemplateNorm = Literal["reference", "exclude", "running"]
TEMPLATE_NORMS: tuple[str, ...] = typing.get_args(TemplateNorm)
SelectionMetric = Literal["auc_1vs3", "auc_1vs1", "mrr_1vs9", "mrr_full", "recall_at_1",
                          "recall_at_10", "ndcg_at_10"]


@dataclass
class GECoConfig:
    emb_dim: int = 128
    # Loss weights; defaults are the authors' README's (docs/model.md §6.4).
    alpha: float = 0.25
    beta: float = 0.75
    gamma: float = 0.01
    tau: float = 0.1
    reg: Regulariser = "reference"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.99])
    lr_step: int = 8
    lr_gamma: float = 0.1
    epochs: int = resumable(50)
    # Per DDP rank. May change on resume: elastic training sets it from the world size.
    batch_size: int = resumable(64)
    # Validation metric that picks the best epoch.
    selection_metric: SelectionMetric = "auc_1vs3"
    # True reproduces the reference's normalisation mismatch around the generator
    # (docs/model.md §7 item 1).
    faithful: bool = False
    # InfoNCE over all ranks' positives (global batch) instead of the local batch (paper).
    global_negatives: bool = False
    # Ablation: "constant" feeds a grey template, "none" a query of the top alone.
    template: TemplateMode = "generated"
    template_norm: TemplateNorm = "reference"
    # Popularity prior (docs/model.md §3.7): score = <q, e_b> + w·log(1 + n_b), n_b = distinct
    # training tops paired with bottom b. 0 = off: the paper's plain dot product.
    popularity_weight: float = 0.0
    # Weights to choose w from on validation (after every epoch, by selection_metric); the
    # chosen one is stored in the checkpoint. Empty = popularity_weight as given.
    popularity_search: list[float] = field(default_factory=list)
    # CIGM generator checkpoint; empty = <run-dir>/cigm/best.pt (else last.pt).
    cigm_checkpoint: str = resumable("")
    max_steps_per_epoch: int = 0
    backbone: BackboneConfig = field(default_factory=BackboneConfig)

    def validate(self, key: str) -> None:
        validate_geco_loss(self.alpha, self.beta, self.gamma, self.tau)
        for name in ("epochs", "batch_size", "emb_dim", "lr_step"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        learning_rate(f"{key}.lr", self.lr)
        adam_betas(f"{key}.betas", self.betas)
        require(0 < self.lr_gamma <= 1, f"{key}.lr_gamma", self.lr_gamma,
                "the learning rate's decay factor every lr_step epochs must be in (0, 1]")
        check_max_steps(f"{key}.max_steps_per_epoch", self.max_steps_per_epoch)
        require(math.isfinite(self.popularity_weight) and self.popularity_weight >= 0,
                f"{key}.popularity_weight", self.popularity_weight, "must be finite and >= 0")
        for w in self.popularity_search:
            require(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0,
                    f"{key}.popularity_search", self.popularity_search,
                    "must be a list of finite weights >= 0")
        require(self.template_norm in TEMPLATE_NORMS, f"{key}.template_norm", self.template_norm,
                f"must be one of {', '.join(TEMPLATE_NORMS)}")
        self.backbone.validate(f"{key}.backbone")


def validate_geco_loss(alpha: float, beta: float, gamma: float, tau: float) -> None:
    """Reject impossible GECo loss settings before any training starts."""
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("tau", tau)):
        require(math.isfinite(value), f"geco.{name}", value, "GECo loss settings must be finite")
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        require(value >= 0, f"geco.{name}", value, "GECo loss weights must be >= 0")
    if alpha == 0 and beta == 0:
        raise ConfigError(
            "GECo loss weights alpha and beta are both 0: nothing to learn "
            "(set alpha > 0 for BPR and/or beta > 0 for InfoNCE)"
        )
    require(tau > 0, "geco.tau", tau, "the InfoNCE temperature tau must be > 0")


# --------------------------------------------------------------------------- network


class GECo(nn.Module):
    """Shared backbone + one linear projection per branch; score = plain dot product."""

    def __init__(self, backbone: nn.Module, feat_dim: int = 512, emb_dim: int = 128,
                 template: TemplateMode = "generated", template_norm: TemplateNorm = "reference"
                 ) -> None:
        super().__init__()
        self.backbone = backbone
        self.template = template
        self.template_norm = template_norm
        self.query_proj = nn.Linear((1 if template == "none" else 2) * feat_dim, emb_dim)
        self.bottom_proj = nn.Linear(feat_dim, emb_dim)
        for lin in (self.query_proj, self.bottom_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def query(self, tops: Tensor, templates: Tensor | None) -> Tensor:
        if self.template == "none":
            return self.query_proj(self.features(tops))
        # Separate backbone calls: in train mode each set gets its own BN batch statistics,
        # as in the reference.
        # Tops first: in training each call moves BN's running statistics, so the order is part
        # of the reference behaviour.
        top_features = self.features(tops)
        if self.template_norm != "reference" and self.training:
            with batchnorm_for_templates(self.backbone, self.template_norm):
                template_features = self.features(templates)
        else:
            template_features = self.features(templates)
        return self.query_proj(torch.cat([top_features, template_features], dim=1))

    def embed_bottoms(self, bottoms: Tensor) -> Tensor:
        return self.bottom_proj(self.features(bottoms))

    def forward(self, tops: Tensor, templates: Tensor, bottoms: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: (query embeddings q, positive-bottom embeddings p)."""
        return self.query(tops, templates), self.embed_bottoms(bottoms)

    @staticmethod
    def score(q: Tensor, b: Tensor) -> Tensor:
        """Compatibility m(q, b) = <q, b> over the last dim (broadcasts)."""
        return (q * b).sum(dim=-1)


@contextlib.contextmanager
def batchnorm_for_templates(module: nn.Module, mode: TemplateNorm):
    """For the block, the BatchNorm layers of a train-mode `module` leave their running
    statistics as they were: "exclude" keeps normalising with batch statistics (momentum 0:
    running = 1·running + 0·batch), "running" normalises with the running ones (eval mode).
    Gradients flow either way."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        if mode == "running":
            m.eval()
        else:
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)


def build_model(cfg: Config) -> GECo:
    b = cfg.geco.backbone
    backbone = resnet18_features(b.weights, allow_random_init=b.allow_random_init)
    return GECo(backbone, emb_dim=cfg.geco.emb_dim, template=cfg.geco.template,
                template_norm=cfg.geco.template_norm)


@dataclass
class Retriever:
    """A frozen generator plus a GECo model: the inference half of the system."""

    generator: Generator
    model: GECo
    faithful: bool = False
    # Popularity prior: log(1 + n_b) per bottom id seen in training, and its weight (0 = off).
    prior: dict[str, float] = field(default_factory=dict)
    prior_weight: float = 0.0

    def with_prior_bottoms(self, ids: Sequence[str], embeddings: Tensor,
                           weight: float | None = None) -> Tensor:
        """Bottom embeddings as scored: [e_b, log(1 + n_b)] with the prior (a bottom never
        seen in training has n_b = 0), e_b as is without. `weight`: instead of prior_weight."""
        if not (self.prior_weight if weight is None else weight):
            return embeddings
        col = torch.tensor([self.prior.get(b, 0.0) for b in ids], dtype=embeddings.dtype,
                           device=embeddings.device)
        return torch.cat([embeddings, col[:, None]], dim=1)

    def with_prior_queries(self, queries: Tensor, weight: float | None = None) -> Tensor:
        """Queries as scored: [q, w], so <q', e'_b> = <q, e_b> + w·log(1 + n_b)."""
        w = self.prior_weight if weight is None else weight
        if not w:
            return queries
        return torch.cat([queries, queries.new_full((len(queries), 1), w)], 1)

    @torch.no_grad()
    def templates(self, tops: Tensor, noise: Tensor) -> Tensor | None:
        """Tops in ImageNet space -> templates in ImageNet space (or raw, if faithful); for
        the ablations a grey image ("constant") or None ("none")."""
        mode = self.model.template
        if mode == "none":
            return None
        if mode == "constant":
            return gan_to_imagenet(torch.zeros_like(tops), faithful=self.faithful)
        fake = self.generator(imagenet_to_gan(tops, faithful=self.faithful), noise)
        return gan_to_imagenet(fake.float(), faithful=self.faithful)

    @torch.no_grad()
    def queries(self, tops: Tensor, noise: Tensor) -> Tensor:
        return self.model.query(tops, self.templates(tops, noise))

    @torch.no_grad()
    def bottoms(self, images: Tensor) -> Tensor:
        return self.model.embed_bottoms(images)


# --------------------------------------------------------------------------- loss


def bpr_loss(pos: Tensor, neg: Tensor, eps: float = 1e-5) -> Tensor:
    """mean(-log(eps + sigmoid(pos - neg))); the eps is the reference's (literal 10e-6)."""
    return -torch.log(eps + torch.sigmoid(pos - neg)).mean()


def info_nce(
    q: Tensor, p: Tensor, tau: float, *, p_all: Tensor | None = None, offset: int = 0
) -> Tensor:
    """Cosine InfoNCE with in-batch negatives; the own positive stays in the denominator.

    p_all (optional): positives of every rank concatenated, with this rank's `p` at rows
    offset … offset+B-1, so DDP can use global negatives. Default: local batch only (the paper).
    """
    keys = p if p_all is None else p_all
    if offset < 0 or offset + q.shape[0] > keys.shape[0]:
        raise ValueError(
            f"info_nce: offset {offset} + batch {q.shape[0]} exceeds {keys.shape[0]} positives"
        )
    logits = F.normalize(q, dim=-1) @ F.normalize(keys, dim=-1).T / tau
    target = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, target)


def _frob_over_rows(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t) / (t.shape[0] if t.dim() else 1)


def reference_regulariser(embeddings: Sequence[Tensor], params: Iterable[Tensor]) -> Tensor:
    """The reference's term (docs/model.md §3.2): Σ_E ||E||_F / B + Σ_W ||W||_F / W.shape[0]
    (not squared; no γ)."""
    terms = [_frob_over_rows(t) for t in embeddings] + [_frob_over_rows(w) for w in params]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def l2_regulariser(params: Iterable[Tensor]) -> Tensor:
    """Paper Eq. 13: ||θ||_2 = sqrt(Σ ||W||²), via a norm of norms (finite gradient at 0)."""
    norms = [torch.linalg.vector_norm(w) for w in params]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def geco_loss(
    q: Tensor,
    p: Tensor,
    params: Iterable[Tensor],
    *,
    alpha: float,
    beta: float,
    gamma: float,
    tau: float,
    reg: str = "reference",
    p_all: Tensor | None = None,
    offset: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """α·BPR(rolled negative) + β·InfoNCE(τ) + γ·REG; terms with weight 0 are skipped (logged 0).

    The negative of row i is the positive of row i-1 (docs/model.md §3.3).
    """
    validate_geco_loss(alpha, beta, gamma, tau)  # a few float checks; guards direct callers
    if reg not in REGULARISERS:
        raise ConfigError(f"GECo regulariser reg must be one of {REGULARISERS} (got {reg!r})")
    n = p.roll(1, dims=0)
    pos, neg = (q * p).sum(-1), (q * n).sum(-1)
    zero = q.new_zeros(())
    bpr = nce = r = zero
    if alpha > 0:
        bpr = bpr_loss(pos, neg)
    if beta > 0:
        nce = info_nce(q, p, tau, p_all=p_all, offset=offset)
    if gamma > 0:
        if reg == "reference":
            r = reference_regulariser([q, p, n], params)
        else:
            r = l2_regulariser(params).to(q.device)  # empty params give a CPU scalar
    total = alpha * bpr + beta * nce + gamma * r
    # Share of rows whose positive outscores the rolled negative: a cheap training-side AUC.
    acc = (pos > neg).float().mean()
    return total, as_floats(("loss", "bpr", "infonce", "reg", "acc"), (total, bpr, nce, r, acc))


# --------------------------------------------------------------------------- training stage


def popularity_prior(pairs: Iterable[tuple[str, str]]) -> dict[str, float]:
    """log(1 + n_b), n_b = distinct tops paired with bottom b (the Popularity baseline's count,
    damped so that a few very popular bottoms do not swamp the content score)."""
    from geco.baselines.simple import distinct_tops

    return {b: math.log1p(n) for b, n in distinct_tops(pairs).items()}


def selected_generator(folder: Path) -> Path:
    """The CIGM checkpoint a stage folder offers GECo: best.pt (the epoch chosen on template
    quality) when CIGM selected one, else last.pt (cigm.selection_metric=last)."""
    best = Path(folder) / "best.pt"
    return best if best.is_file() else Path(folder) / "last.pt"


def cigm_path(cfg: Config, run_dir: Path) -> Path:
    """The generator GECo trains with: geco.cigm_checkpoint, else <run-dir>/cigm's selected
    checkpoint (selected_generator)."""
    if cfg.geco.cigm_checkpoint:
        return Path(cfg.geco.cigm_checkpoint)
    return selected_generator(run_dir / "cigm")


class GECoStage:
    """GECo as a stage of geco.train.loop, with the frozen generator at `generator_path`."""

    name = "geco"
    # The generator's settings are part of what a GECo checkpoint was trained with.
    depends_on = ("data", "cigm", "geco")

    def __init__(self, cfg: Config, rt: Runtime, data: FolderData | ShardData,
                 generator_path: Path):
        self.cfg, self.rt, self.data = cfg, rt, data
        # The template noise draws from a stream per (epoch, rank): a run resumed after a lost
        # node trains exactly like an uninterrupted one.
        self.rng_seed = cfg.runtime.seed
        g = cfg.geco
        self.epochs, self.max_steps_per_epoch = g.epochs, g.max_steps_per_epoch
        size = cfg.data.image_size
        tf = imagenet_transform(size)
        data.check(("train", "valid"))
        self.loader = data.train_loader(tf, rt=rt, batch_size=g.batch_size,
                                        seed=cfg.runtime.seed, num_workers=cfg.data.loader_workers)
        self.sample_set = data.sample_pairs("valid", 8, tf) if rt.is_main else []

        self.generator, gen_cfg = load_generator(generator_path, rt.device)
        if gen_cfg["data"]["image_size"] != size:
            raise ConfigError(
                f"CIGM {generator_path} was trained at {gen_cfg['data']['image_size']} px but "
                f"data.image_size={size}"
            )
        model = build_model(cfg).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.model = model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids)
        prior = (popularity_prior(data.pair_ids("train"))
                 if g.popularity_weight or g.popularity_search else {})
        self.retriever = Retriever(self.generator, model, faithful=g.faithful, prior=prior,
                                   prior_weight=g.popularity_weight)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=g.lr, betas=tuple(g.betas))
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=g.lr_step,
                                                     gamma=g.lr_gamma)

    @property
    def modules(self) -> list[nn.Module]:
        return [self.model]

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        rt, g = self.rt, self.cfg.geco
        tops, bottoms = rt.to_device(batch["top"]), rt.to_device(batch["bottom"])
        self.model.train()
        with rt.autocast():
            noise = torch.randn(len(tops), self.generator.noise_dim, device=rt.device)
            templates = self.retriever.templates(tops, noise)
            q, p = self.model(tops, templates, bottoms)
        q, p = q.float(), p.float()
        p_all, offset = None, 0
        if g.global_negatives and rt.distributed:
            # Every rank's positives become InfoNCE negatives for every query.
            p_all, offset = gather_rows(p, rt)
        loss, parts = geco_loss(q, p, unwrap(self.model).parameters(), alpha=g.alpha,
                                beta=g.beta, gamma=g.gamma, tau=g.tau, reg=g.reg,
                                p_all=p_all, offset=offset)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return parts

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        from geco.evaluate import evaluate

        self.sched.step()
        metrics: dict[str, float] = {}
        if self.rt.is_main:
            g = self.cfg.geco
            m = evaluate(self.retriever, self.data, "valid", rt=self.rt,
                         image_size=self.cfg.data.image_size, cfg=self.cfg.eval,
                         num_workers=self.cfg.data.loader_workers,
                         prior_weights=g.popularity_search, select=g.selection_metric,
                         min_coverage=0.0)  # warns: a validation skip must not end training
            if g.popularity_search:  # this epoch's checkpoint scores with the chosen weight
                self.retriever.prior_weight = m["popularity_weight"]
            metrics = {f"valid_{k}": float(v) for k, v in m.items()
                       if isinstance(v, float) and k != "eval_seconds"}
            metrics["lr"] = self.sched.get_last_lr()[0]
            save_template_grid(self.generator, self.sample_set,
                               out_dir / "samples" / f"epoch_{epoch + 1:03d}.png", rt=self.rt,
                               seed=self.cfg.eval.seed, space="imagenet",
                               faithful=self.cfg.geco.faithful)
        return self.rt.broadcast_object(metrics)

    def selection(self) -> tuple[str, str]:
        return f"valid_{self.cfg.geco.selection_metric}", "max"

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "prior": self.retriever.prior,
                "prior_weight": self.retriever.prior_weight,
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def model_from_checkpoint(ckpt: dict) -> GECo:
    """The GECo network of a loaded GECo checkpoint, in eval mode on the CPU."""
    from geco.config import config_from_dict

    cfg = config_from_dict(ckpt["config"])
    # The weights come from the checkpoint: the backbone's initial weights are irrelevant.
    cfg.geco.backbone.weights, cfg.geco.backbone.allow_random_init = "random", True
    model = build_model(cfg)
    model.load_state_dict(ckpt["state"]["model"])
    return model.eval()


def load_retriever(checkpoint: str | Path, device: torch.device,
                   generator_path: str | Path | None = None) -> tuple[Retriever, dict]:
    """Rebuild the retriever from a GECo checkpoint (its config names the CIGM it used, unless
    `generator_path` gives the generator's file, e.g. one fetched from a Ray checkpoint)."""
    from geco.config import config_from_dict

    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("stage") != "geco":
        raise GecoError(f"{checkpoint} is not a GECo checkpoint (stage={ckpt.get('stage')!r})")
    cfg = config_from_dict(ckpt["config"])
    model = model_from_checkpoint(ckpt).to(device)
    generator, _ = load_generator(generator_path or cfg.geco.cigm_checkpoint, device)
    prior = ckpt["state"].get("prior") or {}
    # The weight this checkpoint was selected with (chosen on validation with
    # geco.popularity_search), else the configured one.
    weight = float(ckpt["state"].get("prior_weight", cfg.geco.popularity_weight))
    if weight and not prior:
        raise GecoError(f"{checkpoint}: popularity weight {weight} but the checkpoint holds no "
                        "popularity counts")
    return Retriever(generator, model, faithful=cfg.geco.faithful, prior=dict(prior),
                     prior_weight=weight), ckpt
