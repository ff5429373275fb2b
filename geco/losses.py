"""Losses for CIGM (REFERENCE §2.3) and GECo (REFERENCE §3.2-3.3), plus up-front validation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from geco.errors import ConfigError

REGULARISERS = ("reference", "paper")


def validate_geco_loss(alpha: float, beta: float, gamma: float, tau: float) -> None:
    """Reject impossible GECo loss settings before any training starts."""
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("tau", tau)):
        if not math.isfinite(value):
            raise ConfigError(f"GECo loss setting {name} must be finite (got {value})")
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if value < 0:
            raise ConfigError(f"GECo loss weight {name} must be >= 0 (got {value})")
    if alpha == 0 and beta == 0:
        raise ConfigError(
            "GECo loss weights alpha and beta are both 0: nothing to learn "
            "(set alpha > 0 for BPR and/or beta > 0 for InfoNCE)"
        )
    if tau <= 0:
        raise ConfigError(f"GECo InfoNCE temperature tau must be > 0 (got {tau})")


def validate_gan_loss(lambda_l1: float) -> None:
    if not math.isfinite(lambda_l1) or lambda_l1 < 0:
        raise ConfigError(f"CIGM L1 weight lambda_l1 must be finite and >= 0 (got {lambda_l1})")


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
    """REFERENCE §3.2: Σ_E ||E||_F / B + Σ_W ||W||_F / W.shape[0] (not squared; no γ)."""
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

    The negative of row i is the positive of row i-1 (REFERENCE §3.3).
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
    return total, _floats(("loss", "bpr", "infonce", "reg", "acc"), (total, bpr, nce, r, acc))


def _floats(names: Sequence[str], values: Sequence[Tensor]) -> dict[str, float]:
    # One device sync for all logged parts instead of one .item() per part.
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
    return total, _floats(("g_loss", "g_adv", "g_l1"), (total, adv, l1))
