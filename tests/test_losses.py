"""Losses against hand computations (explicit loops, float64) and setting validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from geco.errors import ConfigError
from geco.models.cigm import CIGMConfig, gan_d_loss, gan_g_loss
from geco.models.geco import (
    bpr_loss,
    geco_loss,
    info_nce,
    l2_regulariser,
    reference_regulariser,
    validate_geco_loss,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def _manual_info_nce(q: torch.Tensor, keys: torch.Tensor, tau: float, offset: int = 0) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        qi = q[i] / math.sqrt(_dot(q[i], q[i]))
        logits = [_dot(qi, k / math.sqrt(_dot(k, k))) / tau for k in keys]
        m = max(logits)
        lse = m + math.log(sum(math.exp(s - m) for s in logits))
        total += lse - logits[offset + i]
    return total / q.shape[0]


def _manual_bpr(pos: list[float], neg: list[float], eps: float = 1e-5) -> float:
    return sum(
        -math.log(eps + 1 / (1 + math.exp(-(a - b)))) for a, b in zip(pos, neg, strict=True)
    ) / len(pos)


def _manual_ref_reg(tensors: list[torch.Tensor]) -> float:
    total = 0.0
    for t in tensors:
        total += math.sqrt(sum(float(v) ** 2 for v in t.flatten())) / t.shape[0]
    return total


def test_bpr_matches_hand_computation() -> None:
    pos, neg = _rand(6, seed=1), _rand(6, seed=2)
    expected = _manual_bpr(pos.tolist(), neg.tolist())
    assert bpr_loss(pos, neg).item() == pytest.approx(expected, rel=1e-12)
    # eps bounds the loss when the negative wins by a mile: -log(1e-5)
    big = bpr_loss(torch.tensor([0.0]), torch.tensor([1e4])).item()
    assert big == pytest.approx(-math.log(1e-5), rel=1e-6)


def test_info_nce_matches_hand_computation() -> None:
    q, p = _rand(5, 4, seed=3), _rand(5, 4, seed=4)
    assert info_nce(q, p, 0.2).item() == pytest.approx(_manual_info_nce(q, p, 0.2), rel=1e-10)
    # Cosine normalised: rescaling rows changes nothing.
    scale = torch.arange(1, 6, dtype=torch.float64)[:, None]
    assert info_nce(q * scale, p * 3, 0.2).item() == pytest.approx(info_nce(q, p, 0.2).item())


def test_info_nce_global_positives() -> None:
    q, p = _rand(3, 4, seed=5), _rand(3, 4, seed=6)
    assert info_nce(q, p, 0.5, p_all=p, offset=0).item() == pytest.approx(
        info_nce(q, p, 0.5).item(), rel=1e-12
    )
    others = _rand(4, 4, seed=7)
    p_all = torch.cat([others[:2], p, others[2:]])
    got = info_nce(q, p, 0.5, p_all=p_all, offset=2).item()
    assert got == pytest.approx(_manual_info_nce(q, p_all, 0.5, offset=2), rel=1e-10)
    with pytest.raises(ValueError, match="offset"):
        info_nce(q, p, 0.5, p_all=p_all, offset=5)


def test_reference_regulariser_by_loops() -> None:
    embs = [_rand(4, 3, seed=8), _rand(4, 3, seed=9)]
    params = [_rand(5, 2, 3, 3, seed=10), _rand(7, seed=11), _rand(2, 6, seed=12)]
    got = reference_regulariser(embs, iter(params)).item()
    assert got == pytest.approx(_manual_ref_reg(embs + params), rel=1e-12)


def test_l2_regulariser_is_eq13() -> None:
    params = [_rand(3, 3, seed=13), _rand(4, seed=14)]
    expected = math.sqrt(sum(float(v) ** 2 for t in params for v in t.flatten()))
    assert l2_regulariser(params).item() == pytest.approx(expected, rel=1e-12)
    w = torch.zeros(3, requires_grad=True)
    l2_regulariser([w]).backward()
    assert torch.isfinite(w.grad).all()


def test_geco_loss_composition_and_rolled_negative() -> None:
    q, p = _rand(4, 3, seed=15), _rand(4, 3, seed=16)
    params = [_rand(3, 2, seed=17).requires_grad_(), _rand(5, seed=18).requires_grad_()]
    a, b, g, tau = 0.7, 0.3, 0.01, 0.1
    total, parts = geco_loss(q, p, params, alpha=a, beta=b, gamma=g, tau=tau)

    pos = [_dot(q[i], p[i]) for i in range(4)]
    neg = [_dot(q[i], p[(i - 1) % 4]) for i in range(4)]  # n_i = p_{i-1}
    bpr = _manual_bpr(pos, neg)
    nce = _manual_info_nce(q, p, tau)
    n = torch.stack([p[(i - 1) % 4] for i in range(4)])
    reg = _manual_ref_reg([q, p, n] + [t.detach() for t in params])
    assert parts["bpr"] == pytest.approx(bpr, rel=1e-10)
    assert parts["infonce"] == pytest.approx(nce, rel=1e-10)
    assert parts["reg"] == pytest.approx(reg, rel=1e-10)
    assert total.item() == pytest.approx(a * bpr + b * nce + g * reg, rel=1e-10)
    assert parts["loss"] == pytest.approx(total.item())
    assert set(parts) == {"loss", "bpr", "infonce", "reg", "acc"}
    assert 0.0 <= parts["acc"] <= 1.0

    _, paper = geco_loss(q, p, params, alpha=a, beta=b, gamma=g, tau=tau, reg="paper")
    assert paper["reg"] == pytest.approx(l2_regulariser(params).item())
    with pytest.raises(ConfigError, match="reg"):
        geco_loss(q, p, params, alpha=a, beta=b, gamma=g, tau=tau, reg="l1")


def test_geco_loss_skips_zero_weight_terms() -> None:
    q, p = _rand(4, 3, seed=19), _rand(4, 3, seed=20)

    def untouchable():  # gamma = 0 must not even iterate the parameters
        raise AssertionError("params consumed although gamma == 0")
        yield

    total, parts = geco_loss(q, p, untouchable(), alpha=0.0, beta=1.0, gamma=0.0, tau=0.5)
    assert parts["bpr"] == 0.0 and parts["reg"] == 0.0
    assert total.item() == pytest.approx(_manual_info_nce(q, p, 0.5), rel=1e-10)
    total, parts = geco_loss(q, p, untouchable(), alpha=1.0, beta=0.0, gamma=0.0, tau=0.5)
    assert parts["infonce"] == 0.0 and total.item() == pytest.approx(parts["bpr"])


def test_gan_losses_match_functional_formulas() -> None:
    real, fake_logits = _rand(2, 1, 8, 8, seed=21), _rand(2, 1, 8, 8, seed=22)
    d = gan_d_loss(real, fake_logits).item()
    expected_d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake_logits).mean()).item()
    assert d == pytest.approx(expected_d, rel=1e-12)

    fake, target = _rand(2, 3, 8, 8, seed=23), _rand(2, 3, 8, 8, seed=24)
    total, parts = gan_g_loss(fake_logits, fake, target, 100.0)
    adv = -torch.log(torch.sigmoid(fake_logits)).mean().item()
    l1 = (fake - target).abs().mean().item()
    assert parts["g_adv"] == pytest.approx(adv, rel=1e-10)
    assert parts["g_l1"] == pytest.approx(l1, rel=1e-12)
    assert total.item() == pytest.approx(adv + 100 * l1, rel=1e-10)
    assert parts["g_loss"] == pytest.approx(total.item())


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"alpha": 0.0, "beta": 0.0}, "nothing to learn"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"alpha": -1.0}, "alpha"),
        ({"beta": -1.0}, "beta"),
        ({"gamma": -1e-3}, "gamma"),
        ({"gamma": float("inf")}, "gamma"),
    ],
)
def test_validate_geco_loss_rejects(kwargs: dict[str, float], needle: str) -> None:
    settings = {"alpha": 1.0, "beta": 1.0, "gamma": 0.0, "tau": 0.1} | kwargs
    with pytest.raises(ConfigError, match=needle):
        validate_geco_loss(**settings)


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 1.0), (1.0, 0.0), (0.5, 0.5)])
def test_validate_geco_loss_accepts(alpha: float, beta: float) -> None:
    validate_geco_loss(alpha, beta, 0.0, 0.07)


def test_validate_gan_loss() -> None:
    CIGMConfig(lambda_l1=0.0).validate("cigm")
    CIGMConfig(lambda_l1=100.0).validate("cigm")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="lambda_l1"):
            CIGMConfig(lambda_l1=bad).validate("cigm")
