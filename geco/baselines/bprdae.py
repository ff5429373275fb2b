"""BPR-DAE, visual only (docs/model.md §5.2): frozen CNN features + two tied autoencoders.

Model. A frozen extractor (`frozen_extractor`: AlexNet fc7, 4096-d, as the reference, or
GECo's ResNet-18, 512-d; geco.models.backbone) gives x for every image. Tops and bottoms each
have a tied autoencoder (the bottom one is shared by positives and negatives):
    h = hardsigmoid(x W + b),  x̂ = hardsigmoid(h Wᵀ + b′),   W ∈ R^{in×h},
W ~ U(±4·sqrt(6/(h+in))) (the sigmoid Glorot rule), biases 0. Score m(t, b) = ⟨h_t, h_b⟩.

Loss (minimised), over triplets (top, positive, negative):
    μ·(MSE(x̂_t, x_t) + MSE(x̂_p, x_p) + MSE(x̂_n, x_n))
    + λ·(mean W1² + mean W2² + mean b1² + mean b2² + mean b1′² + mean b2′²)
    − mean hardsigmoid(m_tp − m_tn)          (bpr_term="hardsigmoid", the reference)
    or + mean −logsigmoid(m_tp − m_tn)       (bpr_term="logsigmoid", the original BPR)
Deviations of the reference from the original BPR-DAE (docs/model.md §7 item 13) are kept by
default: hardsigmoid activations and the hardsigmoid "BPR" term.

Training, as the reference: SGD(lr, momentum), `epochs` epochs over the training pairs in
batches of `batch_size` tops, each top meeting `n_negatives` in-batch negatives (the
positives of rows i-1..i-K, `base.rolled_negatives`), the incomplete last batch dropped; the
last epoch is the model (no selection). Unlike the reference, the frozen features are
computed once per unique training image before the first step (the extractor gets no
gradient), and the AEs train on those feature tensors, as a stage of geco.train.loop over
batches of training rows; evaluation embeds images through the same transform and extractor. Rolled negatives are the batch's own positives, so their encodings
and reconstructions are rolled positive ones rather than recomputed (the same loss value,
3x less AE work per step).
"""

from __future__ import annotations

import copy
import logging
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco.baselines.base import (
    EmbeddingScorer,
    RowDataset,
    Transform,
    check_full_batch,
    encode_ids,
    rolled_negatives,
)
from geco.data.images import ImageSource
from geco.data.source import batch_loader
from geco.data.transforms import imagenet_transform
from geco.errors import ConfigError, WeightsError
from geco.models.backbone import (
    ALEXNET_IMAGENET_FILE,
    AlexNetFC7,
    alexnet_fc7,
    imagenet_weights_path,
    resnet18_features,
)
from geco.settings import at_least, check_seed, finite_nonnegative, learning_rate, resumable
from geco.train.runtime import Runtime

if TYPE_CHECKING:
    from geco.config import Config
    from geco.data.source import FolderData, ShardData

log = logging.getLogger("geco")

BPRTerm = Literal["hardsigmoid", "logsigmoid"]
BPR_TERMS: tuple[str, ...] = typing.get_args(BPRTerm)


@dataclass
class BPRDAEConfig:
    """BPR-DAE, visual only (section baselines.bpr_dae)."""

    # Frozen feature extractor: "alexnet" (AlexNet fc7, 4096-d, the paper; weights from
    # alexnet_weights), "backbone" (GECo's ResNet-18, 512-d, under geco.backbone's weights
    # policy), or "auto": alexnet when its ImageNet file is in the torch cache, else backbone.
    features: Literal["auto", "alexnet", "backbone"] = "auto"
    alexnet_weights: str = "imagenet"  # imagenet (torch hub cache only) | local path | s3://
    image_size: int = 224
    hidden: int = 512
    mu: float = 0.01  # reconstruction weight
    lam: float = 0.01  # L2 weight on the AE parameters
    # hardsigmoid (the reference: -mean hardsigmoid(m_tp - m_tn)) | logsigmoid (original BPR)
    bpr_term: BPRTerm = "hardsigmoid"
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = resumable(30)
    batch_size: int = 128  # tops per step; each meets n_negatives rolled in-batch bottoms
    n_negatives: int = 3
    seed: int = 0

    def validate(self, key: str) -> None:
        at_least(f"{key}.image_size", self.image_size, 16)
        for name in ("hidden", "epochs", "n_negatives"):
            at_least(f"{key}.{name}", getattr(self, name), 1)
        at_least(f"{key}.batch_size", self.batch_size, self.n_negatives + 1,
                 "rolled negatives need n_negatives + 1 tops per batch")
        for name in ("mu", "lam", "momentum"):
            finite_nonnegative(f"{key}.{name}", getattr(self, name))
        learning_rate(f"{key}.lr", self.lr)
        check_seed(f"{key}.seed", self.seed)


def init_bound(in_dim: int, hidden: int) -> float:
    """Half-width of the uniform init of W: 4·sqrt(6 / (hidden + in_dim))."""
    return 4.0 * math.sqrt(6.0 / (hidden + in_dim))


class TiedAutoencoder(nn.Module):
    """x [.., in] -> h = hardsigmoid(x W + b) [.., hidden]; h -> x̂ = hardsigmoid(h Wᵀ + b′).

    One weight matrix `weight` (in×hidden) serves encoder and decoder, so it gets gradient
    from both paths; `enc_bias` (b, hidden) and `dec_bias` (b′, in) start at zero."""

    def __init__(self, in_dim: int, hidden: int, *,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_dim, self.hidden = int(in_dim), int(hidden)
        bound = init_bound(self.in_dim, self.hidden)
        w = torch.empty(self.in_dim, self.hidden).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(w)
        self.enc_bias = nn.Parameter(torch.zeros(self.hidden))
        self.dec_bias = nn.Parameter(torch.zeros(self.in_dim))

    def encode(self, x: Tensor) -> Tensor:
        return F.hardsigmoid(x @ self.weight + self.enc_bias)

    def decode(self, h: Tensor) -> Tensor:
        return F.hardsigmoid(h @ self.weight.t() + self.dec_bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encode(x)
        return h, self.decode(h)

    def l2(self) -> Tensor:
        """mean W² + mean b² + mean b′² (this AE's share of the λ term)."""
        return (self.weight.pow(2).mean() + self.enc_bias.pow(2).mean()
                + self.dec_bias.pow(2).mean())


def bprdae_loss(top_ae: TiedAutoencoder, bottom_ae: TiedAutoencoder, x_t: Tensor, x_p: Tensor,
                x_n: Tensor | int, *, mu: float, lam: float,
                bpr_term: str = "hardsigmoid") -> dict[str, Tensor]:
    """The BPR-DAE loss of docs/model.md §5.2 on a batch of triplets, and its parts.

    x_t, x_p: [B, D] features of tops and their positive bottoms. x_n: [B, K, D] features of
    K negatives per top, or an int K for the rolled in-batch negatives (row i meets the
    positives of rows i-1..i-K), whose encodings/reconstructions are then the positives'
    rolled (the same value as passing `rolled_negatives(x_p, K)`, without re-encoding).

    Returns {"loss": μ·rec + λ·reg + bpr (with grad), "bpr": the ranking term as it enters
    the loss (−mean hardsigmoid(m_tp − m_tn), or mean −logsigmoid(·)), "rec": MSE_t + MSE_p +
    MSE_n (unweighted; each MSE the mean over its elements, so over triplets a top or bottom
    repeated K times weighs as once), "reg": the six means of squares (unweighted), "auc":
    fraction of (top, negative) pairs with m_tp > m_tn, "active": the smaller of the tops' and
    the positives' fraction of hidden units strictly inside (0, 1), where hardsigmoid passes
    gradient; 0 means one side's codes are saturated and nothing learns any more}; all but
    "loss" detached.
    """
    if bpr_term not in BPR_TERMS:
        raise ConfigError(f"bpr_term={bpr_term!r}: must be one of {BPR_TERMS}")
    h_t, r_t = top_ae(x_t)
    h_p, r_p = bottom_ae(x_p)
    rec_t, rec_p = F.mse_loss(r_t, x_t), F.mse_loss(r_p, x_p)
    if isinstance(x_n, int):
        h_n = rolled_negatives(h_p, x_n)  # [B, K, h]
        rec_n = rec_p  # every positive is the negative of exactly K rows: the same mean
    else:
        if x_n.dim() != 3 or x_n.shape[0] != x_t.shape[0]:
            raise ValueError(f"x_n must be [B, K, D] with B={x_t.shape[0]}, "
                             f"got {tuple(x_n.shape)}")
        h_n, r_n = bottom_ae(x_n)
        rec_n = F.mse_loss(r_n, x_n)
    m_tp = (h_t * h_p).sum(-1)  # [B]
    m_tn = torch.einsum("bd,bkd->bk", h_t, h_n)  # [B, K]
    diff = m_tp[:, None] - m_tn
    if bpr_term == "hardsigmoid":
        bpr = -F.hardsigmoid(diff).mean()
    else:
        bpr = -F.logsigmoid(diff).mean()
    rec = rec_t + rec_p + rec_n
    reg = top_ae.l2() + bottom_ae.l2()
    loss = mu * rec + lam * reg + bpr
    with torch.no_grad():  # per AE, the smaller share: one collapsed side stops learning
        active = torch.stack([((h > 0) & (h < 1)).float().mean() for h in (h_t, h_p)]).min()
    return {"loss": loss, "bpr": bpr.detach(), "rec": rec.detach(), "reg": reg.detach(),
            "auc": (diff > 0).float().mean().detach(), "active": active}


# --------------------------------------------------------------------------- features


def alexnet_available(weights: str) -> bool:
    """Whether `features: auto` would use AlexNet with these `alexnet_weights`: the ImageNet
    file is in the torch hub cache, or an explicit path / s3 URI is given (an explicit file
    that turns out to be missing is an error then, not a silent fallback)."""
    if weights == "imagenet":
        return imagenet_weights_path(ALEXNET_IMAGENET_FILE).is_file()
    return bool(weights)


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_extractor(cfg: Config) -> tuple[nn.Module, int, str]:
    """(extractor, out_dim, description) for `cfg.baselines.bpr_dae.features`, and the choice
    resolved in `cfg`: "auto" becomes "alexnet" when its weights are available, else
    "backbone"; a backbone whose ImageNet weights are missing (allowed to start at random)
    is recorded as geco.backbone.weights=random. Pass a copy of the run's config: it is what
    the checkpoints record.

    The extractor is in eval mode with every parameter's requires_grad False; it maps
    ImageNet-normalised B×3×S×S images to B×out_dim features. The description names the
    network and its weights (and why "auto" chose it)."""
    b = cfg.baselines.bpr_dae
    choice, why = b.features, ""
    if choice == "auto":
        if alexnet_available(b.alexnet_weights):
            choice, why = "alexnet", "auto: AlexNet weights available"
        else:
            choice = "backbone"
            why = (f"auto fallback: AlexNet ImageNet weights {ALEXNET_IMAGENET_FILE} not in the "
                   "torch hub cache")
            log.info("bpr-dae: AlexNet ImageNet weights not found at %s; using GECo's "
                     "ResNet-18 backbone as the frozen feature extractor",
                     imagenet_weights_path(ALEXNET_IMAGENET_FILE))
    b.features = choice
    # A frozen extractor is not saved with the model: a randomly initialised one must be the
    # same network every time (training, resuming, evaluating), so it is drawn from its own
    # CPU generator seeded by baselines.bpr_dae.seed, leaving the global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(b.seed))
        if choice == "alexnet":
            model, label = alexnet_fc7(b.alexnet_weights)
            module: nn.Module = model
            out_dim, name = AlexNetFC7.out_dim, "alexnet fc7"
        else:
            bb = cfg.geco.backbone
            try:
                module = resnet18_features(bb.weights, allow_random_init=bb.allow_random_init)
            except WeightsError as e:
                if not why:
                    raise
                raise WeightsError(
                    f"bpr-dae features=auto: no AlexNet ImageNet weights at "
                    f"{imagenet_weights_path(ALEXNET_IMAGENET_FILE)}, and the fallback (GECo's "
                    f"backbone) has none either: {e}") from e
            out_dim, name = 512, "resnet18 backbone"
            if bb.weights == "imagenet" and not imagenet_weights_path().is_file():
                bb.weights = "random"  # what it really is (allow_random_init let it start)
                label = f"imagenet requested, not in the torch cache: random init, seed {b.seed}"
            elif bb.weights == "random":
                label = f"random init, seed {b.seed}"
            else:
                label = bb.weights
    description = f"{name} ({out_dim}-d, weights {label})" + (f"; {why}" if why else "")
    log.info("bpr-dae: frozen features: %s", description)
    return _freeze(module), out_dim, description


# --------------------------------------------------------------------------- training stage


class BPRDAEStage:
    """BPR-DAE as a stage of geco.train.loop: batches of training rows, the frozen features
    of every training image computed before the first step; `scorer(images)` scores pairs
    with the trained autoencoders."""

    name = "bpr-dae"
    rng_seed = None  # nothing random in a step (no dropout; rows are shuffled by seed)

    def __init__(self, cfg: Config, rt: Runtime, data: FolderData | ShardData) -> None:
        # A copy: its features choice is resolved, and that is what its checkpoints record.
        self.cfg, self.rt = copy.deepcopy(cfg), rt
        c = self.section = self.cfg.baselines.bpr_dae
        self.device = rt.device
        extractor, self.feature_dim, self.description = frozen_extractor(self.cfg)
        self.depends_on = ("data", "baselines.bpr_dae") + (
            ("geco.backbone",) if c.features == "backbone" else ())
        extractor = extractor.to(self.device)
        if rt.channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        self.extractor = extractor
        g = torch.Generator().manual_seed(int(c.seed))
        self.top_ae = TiedAutoencoder(self.feature_dim, c.hidden, generator=g).to(self.device)
        self.bottom_ae = TiedAutoencoder(self.feature_dim, c.hidden, generator=g).to(self.device)
        self.transform = imagenet_transform(c.image_size)
        self.epochs, self.max_steps_per_epoch = c.epochs, 0

        splits, self.images = data.splits(("train",))
        self.train_split = train = splits["train"]
        check_full_batch(len(train), c.batch_size, "baselines.bpr_dae.batch_size", train.source)
        self.loader = batch_loader(RowDataset(len(train)), batch_size=c.batch_size,
                                   seed=c.seed, drop_last=True)
        self.opt = torch.optim.SGD([*self.top_ae.parameters(), *self.bottom_ae.parameters()],
                                   lr=c.lr, momentum=c.momentum)
        self.info_: dict[str, Any] = {"features": self.description,
                                      "feature_dim": self.feature_dim, "hidden": c.hidden}
        self._feats: Tensor | None = None  # [unique training ids, feature_dim]
        self._active: list[float] = []

    @property
    def modules(self) -> list[nn.Module]:
        return [self.top_ae, self.bottom_ae]

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Frozen features [B, feature_dim] (fp32) of a batch of transformed images."""
        with self.rt.autocast():
            return self.extractor(self.rt.to_device(x)).float()

    def extract(self, ids: list[str]) -> Tensor:
        """Frozen features of `ids` ([len(ids), feature_dim] on the device), logged with the
        images/s of the extraction."""
        t0 = time.perf_counter()
        feats = encode_ids(ids, self.images, self.transform, self.features,
                           device=self.device, batch_size=self.cfg.eval.batch_size,
                           num_workers=self.cfg.data.loader_workers, context="bpr-dae features")
        seconds = time.perf_counter() - t0
        self.info_["feature_seconds"] = seconds
        self.info_["feature_images_per_s"] = len(ids) / max(seconds, 1e-9)
        log.info("[bpr-dae] frozen features of %d images in %.1fs (%.1f images/s)",
                 len(ids), seconds, len(ids) / max(seconds, 1e-9))
        return feats.to(self.device)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        c, train = self.section, self.train_split
        if self._feats is None:  # once, on the first step trained (not when loading a model)
            ids = list(dict.fromkeys([*train.tops, *train.bottoms]))
            row = {i: n for n, i in enumerate(ids)}
            self._feats = self.extract(ids)
            self._top_rows = torch.tensor([row[i] for i in train.tops], device=self.device)
            self._bot_rows = torch.tensor([row[i] for i in train.bottoms], device=self.device)
        self.top_ae.train()
        self.bottom_ae.train()
        rows = batch["row"].to(self.device)
        parts = bprdae_loss(self.top_ae, self.bottom_ae, self._feats[self._top_rows[rows]],
                            self._feats[self._bot_rows[rows]], c.n_negatives, mu=c.mu,
                            lam=c.lam, bpr_term=c.bpr_term)
        self.opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.opt.step()
        out = {key: float(v.detach()) for key, v in parts.items()}
        self._active.append(out["active"])
        return out

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        active = sum(self._active) / max(len(self._active), 1)
        self._active = []
        if active < 0.01:
            log.warning("[bpr-dae] epoch %d: %.1f%% of the hidden units are outside "
                        "hardsigmoid's linear range, so almost no gradient flows; "
                        "lower baselines.bpr_dae.lr", epoch + 1, 100 * (1 - active))
        return {}

    def selection(self) -> None:
        return None  # the model after the last epoch, as the reference

    def state_dict(self) -> dict[str, Any]:
        return {"top_ae": self.top_ae.state_dict(), "bottom_ae": self.bottom_ae.state_dict(),
                "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.top_ae.load_state_dict(state["top_ae"])
        self.bottom_ae.load_state_dict(state["bottom_ae"])
        self.opt.load_state_dict(state["optimizer"])

    def info(self) -> dict[str, Any]:
        return dict(self.info_)

    def scorer(self, images: ImageSource) -> BPRDAEScorer:
        self._feats = None  # training is over: the feature table is not needed any more
        self.top_ae.eval()
        self.bottom_ae.eval()
        return BPRDAEScorer(self, images)


class BPRDAEScorer(EmbeddingScorer):
    """BPR-DAE as a `geco.baselines.Scorer`: embeddings are the AEs' hidden codes of the
    frozen features (tops through the top AE, bottoms through the bottom AE), score = dot."""

    name = "bpr-dae"

    def __init__(self, stage: BPRDAEStage, images: ImageSource) -> None:
        super().__init__(images, device=stage.device, batch_size=stage.cfg.eval.batch_size,
                         num_workers=stage.cfg.data.loader_workers)
        self.stage = stage

    def top_transform(self) -> Transform:
        return self.stage.transform

    def embed_tops(self, x: Tensor) -> Tensor:
        return self.stage.top_ae.encode(self.stage.features(x))

    def embed_bottoms(self, x: Tensor) -> Tensor:
        return self.stage.bottom_ae.encode(self.stage.features(x))

    def match(self, t: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("rd,rkd->rk", t, b)

    def match_pool(self, t: Tensor, b: Tensor) -> Tensor:
        return t @ b.t()
