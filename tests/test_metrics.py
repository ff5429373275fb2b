"""geco.metrics against brute-force pure-Python enumeration on integer scores (frequent ties)."""

from __future__ import annotations

import math
from functools import cache
from itertools import permutations

import pytest
import torch

from geco import metrics as M
from geco.errors import ConfigError

TIES = ("expected", "optimistic", "pessimistic")
SEEDS = (0, 1, 2, 3)


# --------------------------------------------------------------------------- brute force


def _rr(rank: int) -> float:
    return 1.0 / rank


def _recall(k: int):
    return lambda rank: float(rank <= k)


def _ndcg(k: int):
    return lambda rank: 1.0 / math.log2(rank + 1) if rank <= k else 0.0


@cache
def _tie_orders(n_greater: int, n_tied: int) -> tuple[int, ...]:
    """Rank of the positive in every ordering of the tied block (positive = item 0)."""
    return tuple(n_greater + perm.index(0) + 1 for perm in permutations(range(n_tied + 1)))


def brute_metric(p: float, negs: list[float], metric, ties: str) -> float:
    """Metric of the positive scored p among negs, enumerating all orders of the tied items."""
    ranks = _tie_orders(sum(x > p for x in negs), sum(x == p for x in negs))
    if ties == "optimistic":
        return metric(min(ranks))
    if ties == "pessimistic":
        return metric(max(ranks))
    return sum(metric(r) for r in ranks) / len(ranks)


def brute_auc(pos: list[float], neg: list[list[float]]) -> float:
    wins = sum(p > x for p, row in zip(pos, neg, strict=True) for x in row)
    return wins / sum(len(row) for row in neg)


def int_scores(seed: int, rows: int, k: int, hi: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, hi, (rows,), generator=gen).double()
    neg = torch.randint(0, hi, (rows, k), generator=gen).double()
    return pos, neg


def edge_cases(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All tied, positive strictly best, positive strictly worst, R = 1."""
    return [
        (torch.zeros(3), torch.zeros(3, k)),
        (torch.full((2,), 5.0), torch.arange(2 * k, dtype=torch.float32).reshape(2, k) % 5),
        (torch.full((2,), -1.0), torch.arange(2 * k, dtype=torch.float32).reshape(2, k) % 5),
        (torch.tensor([2.0]), torch.tensor([[2.0, 3.0, 1.0, 2.0, 0.0, 2.0][:k]])),
    ]


def all_cases(k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [int_scores(s, 25, k) for s in SEEDS] + edge_cases(k)


# --------------------------------------------------------------------------- counts and AUC


@pytest.mark.parametrize("k", [1, 3, 6])
def test_rank_counts_and_auc_match_brute_force(k: int) -> None:
    for pos, neg in all_cases(k):
        g, t = M.rank_counts(pos, neg)
        assert g.dtype == t.dtype == torch.int64
        for r, (p, row) in enumerate(zip(pos.tolist(), neg.tolist(), strict=True)):
            assert g[r] == sum(x > p for x in row) and t[r] == sum(x == p for x in row)
        assert M.auc(pos, neg) == pytest.approx(brute_auc(pos.tolist(), neg.tolist()), abs=1e-15)


@pytest.mark.parametrize("ties", TIES)
@pytest.mark.parametrize("k", [1, 5])
def test_per_row_metrics_match_enumeration(ties: str, k: int) -> None:
    for pos, neg in all_cases(k):
        g, t = M.rank_counts(pos, neg)
        got = {
            "rr": M.reciprocal_rank(g, t, ties),
            **{f"recall{c}": M.recall_at_k(g, t, c, ties) for c in (1, 2, 3, 10)},
            **{f"ndcg{c}": M.ndcg_at_k(g, t, c, ties) for c in (1, 2, 3, 10)},
        }
        fns = {"rr": _rr, **{f"recall{c}": _recall(c) for c in (1, 2, 3, 10)}}
        fns |= {f"ndcg{c}": _ndcg(c) for c in (1, 2, 3, 10)}
        for r, (p, row) in enumerate(zip(pos.tolist(), neg.tolist(), strict=True)):
            for name, fn in fns.items():
                assert got[name][r].item() == pytest.approx(
                    brute_metric(p, row, fn, ties), abs=1e-12
                ), name


@pytest.mark.parametrize("ties", TIES)
def test_sampled_metrics_match_brute_force(ties: str) -> None:
    for seed in SEEDS:
        pos, neg = int_scores(seed, 30, 9, hi=8)
        pl, nl = pos.tolist(), neg.tolist()
        out = M.sampled_metrics(pos.float(), neg.float(), ties)
        assert set(out) == {"auc_1vs1", "auc_1vs3", "mrr_1vs9"}
        assert out["auc_1vs1"] == pytest.approx(brute_auc(pl, [r[:1] for r in nl]), abs=1e-12)
        assert out["auc_1vs3"] == pytest.approx(brute_auc(pl, [r[:3] for r in nl]), abs=1e-12)
        mrr = sum(brute_metric(p, r, _rr, ties) for p, r in zip(pl, nl, strict=True)) / len(pl)
        assert out["mrr_1vs9"] == pytest.approx(mrr, abs=1e-12)


def test_sampled_metrics_uses_only_first_columns_and_omits_missing() -> None:
    pos, neg = int_scores(7, 20, 12)
    assert M.sampled_metrics(pos, neg) == M.sampled_metrics(pos, neg[:, :9])
    assert set(M.sampled_metrics(pos, neg[:, :3])) == {"auc_1vs1", "auc_1vs3"}
    assert set(M.sampled_metrics(pos, neg[:, :1])) == {"auc_1vs1"}


# --------------------------------------------------------------------------- full ranking


def brute_full_counts(q: torch.Tensor, c: torch.Tensor, idx: torch.Tensor) -> tuple[list, list]:
    ql, cl, il = q.tolist(), c.tolist(), idx.tolist()
    gs, ts = [], []
    for qr, i in zip(ql, il, strict=True):
        scores = [sum(a * b for a, b in zip(qr, cr, strict=True)) for cr in cl]
        others = scores[:i] + scores[i + 1 :]
        gs.append(sum(s > scores[i] for s in others))
        ts.append(sum(s == scores[i] for s in others))
    return gs, ts


def int_embeddings(seed: int, rows: int, cands: int, dim: int = 3):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (rows, dim), generator=gen).float()
    c = torch.randint(-2, 3, (cands, dim), generator=gen).float()
    idx = torch.randint(0, cands, (rows,), generator=gen)
    return q, c, idx


@pytest.mark.parametrize("seed", SEEDS)
def test_full_ranking_counts_match_brute_force_for_any_chunk(seed: int) -> None:
    q, c, idx = int_embeddings(seed, 23, 17)
    want_g, want_t = brute_full_counts(q, c, idx)
    assert sum(want_t) > 0  # the case is meant to have ties
    for chunk in (1, 4, 7, 23, 2048):
        g, t = M.full_ranking_counts(q, c, idx, chunk_size=chunk)
        assert g.tolist() == want_g and t.tolist() == want_t, chunk
    g64, t64 = M.full_ranking_counts(q.double(), c.double(), idx, chunk_size=5)
    assert g64.tolist() == want_g and t64.tolist() == want_t


@pytest.mark.parametrize("ties", TIES)
def test_full_ranking_metrics_match_enumeration(ties: str) -> None:
    q, c, idx = int_embeddings(11, 19, 8)
    out = M.full_ranking_metrics(q, c, idx, ks=(1, 3, 10), ties=ties, chunk_size=6)
    sl = (q @ c.t()).tolist()
    rows = [(s[i], s[:i] + s[i + 1 :]) for s, i in zip(sl, idx.tolist(), strict=True)]

    def mean(fn) -> float:
        return sum(brute_metric(p, negs, fn, ties) for p, negs in rows) / len(rows)

    assert out["mrr_full"] == pytest.approx(mean(_rr), abs=1e-12)
    for k in (1, 3, 10):
        assert out[f"recall_at_{k}"] == pytest.approx(mean(_recall(k)), abs=1e-12)
        assert out[f"ndcg_at_{k}"] == pytest.approx(mean(_ndcg(k)), abs=1e-12)
    assert out["n_queries"] == 19.0 and out["n_candidates"] == 8.0


def test_full_ranking_single_candidate_and_single_query() -> None:
    out = M.full_ranking_metrics(
        torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1, dtype=torch.long)
    )
    assert out["mrr_full"] == 1.0 and out["recall_at_1"] == 1.0 and out["ndcg_at_10"] == 1.0


# --------------------------------------------------------------------------- known values


def test_random_expectations_reference_values() -> None:
    assert M.random_expectations(977)["mrr"] == pytest.approx(0.00764, abs=5e-6)
    assert M.random_expectations(5622)["mrr"] == pytest.approx(0.00164, abs=5e-6)
    assert M.random_expectations(10)["mrr"] == pytest.approx(7381 / 2520 / 10, abs=1e-15)  # H10/10
    r = M.random_expectations(20, ks=(1, 10))
    assert r["recall_at_1"] == pytest.approx(0.05) and r["recall_at_10"] == pytest.approx(0.5)
    assert r["ndcg_at_10"] == pytest.approx(sum(1 / math.log2(i + 1) for i in range(1, 11)) / 20)


def test_random_scorer_mrr_over_10_candidates() -> None:
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(200_000, generator=gen), torch.randn(200_000, 9, generator=gen)
    out = M.sampled_metrics(pos, neg)
    assert out["mrr_1vs9"] == pytest.approx(0.2929, abs=3e-3)  # std of the mean ~7e-4
    assert out["auc_1vs1"] == pytest.approx(0.5, abs=5e-3)


def test_constant_scorer_is_not_perfect() -> None:
    out = M.sampled_metrics(torch.zeros(50), torch.zeros(50, 9))
    assert out["auc_1vs1"] == 0.0 and out["auc_1vs3"] == 0.0
    assert out["mrr_1vs9"] == pytest.approx(M.random_expectations(10)["mrr"], abs=1e-14)
    full = M.full_ranking_metrics(torch.zeros(13, 4), torch.zeros(977, 4), torch.arange(13) * 70)
    rand = M.random_expectations(977)
    assert full["mrr_full"] == pytest.approx(rand["mrr"], abs=1e-14)
    for key in ("recall_at_1", "recall_at_10", "ndcg_at_10"):
        assert full[key] == pytest.approx(rand[key], abs=1e-14)
    opt = M.full_ranking_metrics(
        torch.zeros(3, 4), torch.zeros(9, 4), torch.arange(3), ties="optimistic"
    )
    assert opt["mrr_full"] == 1.0  # what a strict-count implementation would report


# --------------------------------------------------------------------------- input checks


def test_bad_inputs_raise() -> None:
    pos, neg = int_scores(0, 4, 3)
    g, t = M.rank_counts(pos, neg)
    with pytest.raises(ConfigError):
        M.reciprocal_rank(g, t, ties="random")
    with pytest.raises(ConfigError):
        M.recall_at_k(g, t, 0)
    with pytest.raises(ValueError):
        M.auc(pos, neg[:2])
    with pytest.raises(ValueError):
        M.auc(torch.tensor([float("nan")]), torch.zeros(1, 3))
    q, c, idx = int_embeddings(0, 5, 4)
    with pytest.raises(ValueError):
        M.full_ranking_counts(q, c, idx + 4)
    with pytest.raises(ValueError):
        M.full_ranking_counts(q, c[:, :2], idx)


def test_full_ranking_float_scores_exclude_positive_exactly() -> None:
    # Continuous scores: no real ties, so t must be 0 everywhere (the positive never counts itself).
    gen = torch.Generator().manual_seed(5)
    q, c = torch.randn(300, 16, generator=gen), torch.randn(200, 16, generator=gen)
    idx = torch.randint(0, 200, (300,), generator=gen)
    g, t = M.full_ranking_counts(q, c, idx, chunk_size=64)
    assert t.eq(0).all() and g.le(199).all() and g.ge(0).all()
