"""BPR-DAE, visual only (REFERENCE §5.2): frozen CNN features + two tied autoencoders.

Model. A frozen extractor (`geco.baselines.features.frozen_extractor`: AlexNet fc7, 4096-d,
as the reference, or GECo's ResNet-18, 512-d) gives x for every image. Tops and bottoms each
have a tied autoencoder (the bottom one is shared by positives and negatives):
    h = hardsigmoid(x W + b),  x̂ = hardsigmoid(h Wᵀ + b′),   W ∈ R^{in×h},
W ~ U(±4·sqrt(6/(h+in))) (the sigmoid Glorot rule), biases 0. Score m(t, b) = ⟨h_t, h_b⟩.

Loss (minimised), over triplets (top, positive, negative):
    μ·(MSE(x̂_t, x_t) + MSE(x̂_p, x_p) + MSE(x̂_n, x_n))
    + λ·(mean W1² + mean W2² + mean b1² + mean b2² + mean b1′² + mean b2′²)
    − mean hardsigmoid(m_tp − m_tn)          (bpr_term="hardsigmoid", the reference)
    or + mean −logsigmoid(m_tp − m_tn)       (bpr_term="logsigmoid", the original BPR)
Deviations of the reference from the original BPR-DAE (REFERENCE §7 item 11) are kept by
default: hardsigmoid activations and the hardsigmoid "BPR" term.

Training, as the reference: SGD(lr, momentum), `epochs` epochs over the training pairs in
batches of `batch_size` tops, each top meeting `n_negatives` in-batch negatives (the
positives of rows i-1..i-K, `base.rolled_negatives`), the incomplete last batch dropped; the
last epoch is the model (no selection). Unlike the reference, the frozen features are
computed once per unique training image before training (the extractor gets no gradient),
and the AEs train on those feature tensors; evaluation embeds images through the same
transform and extractor. Rolled negatives are the batch's own positives, so their encodings
and reconstructions are rolled positive ones rather than recomputed (the same loss value,
3x less AE work per step).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geco.baselines.base import (
    BaselineContext,
    EmbeddingScorer,
    EpochCheckpoint,
    Transform,
    encode_ids,
    rolled_negatives,
)
from geco.baselines.features import frozen_extractor
from geco.data.splits import Split
from geco.data.transforms import imagenet_transform
from geco.errors import ConfigError, GecoError
from geco.train.loop import Progress

log = logging.getLogger("geco")

__all__ = ["BPRDAEScorer", "TiedAutoencoder", "bprdae_loss", "init_bound"]

BPR_TERMS = ("hardsigmoid", "logsigmoid")


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
    """The BPR-DAE loss of REFERENCE §5.2 on a batch of triplets, and its parts.

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


class BPRDAEScorer(EmbeddingScorer):
    """BPR-DAE as a `geco.baselines.Scorer`: embeddings are the AEs' hidden codes of the
    frozen features (tops through the top AE, bottoms through the bottom AE), score = dot.

    `fit(train)` trains (or resumes from / reuses `<out_dir>/last.pt`), then exposes
    `checkpoint` (Path of last.pt), `history` (one dict per epoch: epoch, loss, bpr, rec,
    reg, train_auc, active, samples_per_s (tops/s), seconds) and `info` (features
    description, feature_dim, hidden, epochs trained, train seconds, feature extraction
    seconds and images/s when features were extracted, resumed_after_epoch)."""

    name = "bpr-dae"

    def __init__(self, ctx: BaselineContext) -> None:
        cfg = ctx.cfg
        super().__init__(ctx.images, device=ctx.rt.device, batch_size=cfg.eval.batch_size,
                         num_workers=cfg.data.num_workers)
        self.ctx, self.cfg = ctx, cfg.baselines.bpr_dae
        extractor, self.feature_dim, self.description = frozen_extractor(cfg)
        extractor = extractor.to(self.device)
        if ctx.rt.channels_last:
            extractor = extractor.to(memory_format=torch.channels_last)
        self.extractor = extractor
        g = torch.Generator().manual_seed(int(self.cfg.seed))
        self.top_ae = TiedAutoencoder(self.feature_dim, self.cfg.hidden, generator=g)
        self.bottom_ae = TiedAutoencoder(self.feature_dim, self.cfg.hidden, generator=g)
        self.top_ae.to(self.device).eval()
        self.bottom_ae.to(self.device).eval()
        self._transform = imagenet_transform(self.cfg.image_size)
        self.ckpt = EpochCheckpoint(ctx.out_dir, self.name, {
            "baseline": asdict(self.cfg), "data": ctx.data_key, "features": self.description},
            on_save=ctx.on_checkpoint)
        self.checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}

    # ---- EmbeddingScorer API
    def top_transform(self) -> Transform:
        return self._transform

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Frozen features [B, feature_dim] (fp32) of a batch of transformed images."""
        with self.ctx.rt.autocast():
            return self.extractor(self.ctx.rt.to_device(x)).float()

    def embed_tops(self, x: Tensor) -> Tensor:
        return self.top_ae.encode(self.features(x))

    def embed_bottoms(self, x: Tensor) -> Tensor:
        return self.bottom_ae.encode(self.features(x))

    def match(self, t: Tensor, b: Tensor) -> Tensor:
        return torch.einsum("rd,rkd->rk", t, b)

    def match_pool(self, t: Tensor, b: Tensor) -> Tensor:
        return t @ b.t()

    # ---- training
    def _state(self, opt: torch.optim.Optimizer) -> dict[str, Any]:
        return {"top_ae": self.top_ae.state_dict(), "bottom_ae": self.bottom_ae.state_dict(),
                "optimizer": opt.state_dict()}

    def extract(self, ids: list[str]) -> Tensor:
        """Frozen features of `ids` ([len(ids), feature_dim] on the device), logged with the
        images/s of the extraction."""
        t0 = time.perf_counter()
        feats = encode_ids(ids, self.images, self._transform, self.features,
                           device=self.device, batch_size=self.batch_size,
                           num_workers=self.num_workers, context="bpr-dae features")
        seconds = time.perf_counter() - t0
        self.info["feature_seconds"] = seconds
        self.info["feature_images_per_s"] = len(ids) / max(seconds, 1e-9)
        log.info("[bpr-dae] frozen features of %d images in %.1fs (%.1f images/s)",
                 len(ids), seconds, len(ids) / max(seconds, 1e-9))
        return feats.to(self.device)

    def fit(self, train: Split) -> None:
        c, rt = self.cfg, self.ctx.rt
        bs, k = c.batch_size, c.n_negatives
        if len(train) < bs:
            raise ConfigError(f"{train.source}: {len(train)} training pairs, fewer than one "
                              f"batch of {bs}; lower baselines.bpr_dae.batch_size")
        params = [*self.top_ae.parameters(), *self.bottom_ae.parameters()]
        opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum)
        self.info = {"features": self.description, "feature_dim": self.feature_dim,
                     "hidden": c.hidden, "resumed_after_epoch": None}
        self.history, start = [], 0
        saved = self.ckpt.resume()
        if saved is not None:
            self.top_ae.load_state_dict(saved["state"]["top_ae"])
            self.bottom_ae.load_state_dict(saved["state"]["bottom_ae"])
            opt.load_state_dict(saved["state"]["optimizer"])
            self.history = list(saved["history"])
            start = int(saved["epoch"]) + 1
            self.info["resumed_after_epoch"] = start
            if start >= c.epochs:
                if start > c.epochs:
                    log.warning("[bpr-dae] %s holds %d epochs, more than epochs=%d: using it "
                                "as is", self.ckpt.path, start, c.epochs)
                log.info("[bpr-dae] %s is complete (%d epochs): not training",
                         self.ckpt.path, start)
            else:
                log.info("[bpr-dae] resuming from %s after epoch %d", self.ckpt.path, start)

        if start < c.epochs:
            ids = list(dict.fromkeys([*train.tops, *train.bottoms]))
            row = {i: n for n, i in enumerate(ids)}
            feats = self.extract(ids)
            top_rows = torch.tensor([row[i] for i in train.tops], device=self.device)
            bot_rows = torch.tensor([row[i] for i in train.bottoms], device=self.device)
            n, steps = len(train), len(train) // bs
            self.top_ae.train()
            self.bottom_ae.train()
            for epoch in range(start, c.epochs):
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(int(c.seed) * 1_000_003 + epoch)
                order = torch.randperm(n, generator=g).to(self.device)
                prog = Progress(self.name, epoch, c.epochs, steps, rt,
                                self.ctx.cfg.runtime.log_every)
                for step in range(1, steps + 1):
                    rows = order[(step - 1) * bs: step * bs]
                    parts = bprdae_loss(self.top_ae, self.bottom_ae, feats[top_rows[rows]],
                                        feats[bot_rows[rows]], k, mu=c.mu, lam=c.lam,
                                        bpr_term=c.bpr_term)
                    opt.zero_grad(set_to_none=True)
                    parts["loss"].backward()
                    opt.step()
                    prog.update(step, bs, 0.0, {key: float(v.detach())
                                                for key, v in parts.items()})
                means = prog.means()
                if not math.isfinite(means["loss"]):
                    raise GecoError(f"[bpr-dae] loss is {means['loss']} in epoch {epoch + 1}: "
                                    "lower baselines.bpr_dae.lr")
                record = {"epoch": epoch + 1, "loss": means["loss"], "bpr": means["bpr"],
                          "rec": means["rec"], "reg": means["reg"],
                          "train_auc": means["auc"], "active": means["active"],
                          "samples_per_s": prog.rate(), "seconds": time.perf_counter() - t0}
                self.history.append(record)
                self.ckpt.save(epoch, self._state(opt), self.history)
                log.info("[bpr-dae] epoch %d/%d done: loss=%.4f bpr=%.4f rec=%.4f reg=%.4f "
                         "train_auc=%.4f active=%.3f | %.1f samples/s | %.1fs", epoch + 1,
                         c.epochs, record["loss"], record["bpr"], record["rec"], record["reg"],
                         record["train_auc"], record["active"], record["samples_per_s"],
                         record["seconds"])
                if record["active"] < 0.01:
                    log.warning("[bpr-dae] epoch %d: %.1f%% of the hidden units are outside "
                                "hardsigmoid's linear range, so almost no gradient flows; "
                                "lower baselines.bpr_dae.lr", epoch + 1,
                                100 * (1 - record["active"]))
            del feats
        self.top_ae.eval()
        self.bottom_ae.eval()
        self.checkpoint = self.ckpt.path
        self.info["epochs"] = len(self.history)
        self.info["train_seconds"] = sum(h["seconds"] for h in self.history)
        self.reset()
