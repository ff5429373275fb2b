"""The scorer interface every baseline implements, its evaluation, and the two untrained
baselines of docs/model.md §5.1: Random and Popularity.

A *scorer* rates (top, bottom) pairs by id, higher = more compatible; unlike GECo it needs no
embedding space. `evaluate_scorer` turns its scores into exactly the metrics (and keys) of
`geco.evaluate.score_rows`, under the protocol of docs/model.md §4.1:

- sampled metrics: each row's positive against its `neg_*` columns (AUC-1vs1 on neg_1,
  AUC-1vs3 on neg_1..3, MRR-1vs9 on neg_1..9; `geco.metrics.sampled_metrics`);
- full ranking: each query against the pool of the split's unique positive bottoms in
  first-appearance order, scored as an [n_queries, n_pool] matrix (in row chunks, so memory
  stays O(chunk x pool)); the positive's rank counts the pool items scoring strictly above it
  (g) and tied with it (t), exactly as `geco.metrics.full_ranking_counts` does for embeddings.

Ties: AUC is strict everywhere (a tie is a loss, paper Eq. 14); ranks (MRR, Recall@k,
NDCG@k) follow the `ties` rule of `geco.metrics` ("expected" by default: the exact expected
value under a uniformly random order of the tied items).

**Random** (`RandomScorer`): i.i.d. Uniform[0, 1) float64 scores from a `torch.Generator`
seeded with `seed` (re-seeded by `fit`), drawn in a fixed order (sampled candidates first,
then the pool matrix chunk by chunk), so a seed gives the same numbers every time. Ties have
probability ~0 (53-bit draws). Expected values: AUC 0.5, MRR-1vsK H_{K+1}/(K+1) (0.2929 for
1-vs-9), full MRR H_U/U.

**Popularity** (`PopularityScorer`): docs/model.md §5.1 / the paper: "score = number of tops
associated with the bottom" (following Song et al.). Exactly: score(b) = the number of
*distinct* tops t such that (t, b) is a row of the training split; a pair listed twice
counts once (the paper's train files hold unique pairs, where this equals the number of
training rows whose positive is b). Bottoms never seen as a training positive score 0. The
score ignores the top, so ties are frequent (every unseen bottom ties with every other one):
ranks use the `ties` rule above (expected: random order among equals; a constant scorer gets
exactly the random MRR), AUC counts ties as losses — so Popularity scores AUC 0 on a split
whose positives and negatives are all unseen in training (the synthetic default).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from geco.data.splits import Split
from geco.errors import ConfigError
from geco.metrics import (
    TIE_RULES,
    ndcg_at_k,
    random_expectations,
    recall_at_k,
    reciprocal_rank,
    sampled_metrics,
)

KS = (1, 10)  # Recall@k / NDCG@k reported, as geco.metrics.full_ranking_metrics' default


@runtime_checkable
class Scorer(Protocol):
    """A compatibility model scored by item ids (docs/model.md §5 baselines).

    - `name`: the model's short name (the key in `geco.compare.MODELS`).
    - `score(tops, candidates)`: `candidates[r]` is row r's list of bottom ids, all rows of
      equal length K; returns a float tensor [len(tops), K], higher = more compatible.

    Optional fast path: `score_pool(tops, pool) -> [len(tops), len(pool)]`, the same scores
    as `score(tops, [pool] * len(tops))`; `pool_scores` uses it when present (an
    embedding-based scorer embeds the pool once there).

    Random and Popularity also `fit(train)` on the training split; the image baselines train
    as stages of geco.train.loop and hand out their scorer once trained (`stage.scorer`).
    """

    name: str

    def score(self, tops: list[str], candidates: list[list[str]]) -> Tensor: ...


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ConfigError(f"ties={ties!r}: must be one of {TIE_RULES}")


def _check_matrix(scores: Tensor, shape: tuple[int, int], who: str) -> Tensor:
    if not isinstance(scores, Tensor) or tuple(scores.shape) != shape:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"scorer {who!r} returned {got}, expected a tensor of shape {shape}")
    if not scores.is_floating_point():
        scores = scores.double()
    if not torch.isfinite(scores).all():
        raise ValueError(f"scorer {who!r} returned NaN or inf scores")
    return scores.cpu()


def pool_scores(scorer: Scorer, tops: list[str], pool: list[str]) -> Tensor:
    """[len(tops), len(pool)] scores of every query against the whole pool."""
    fast = getattr(scorer, "score_pool", None)
    if fast is not None:
        out = fast(tops, pool)
    else:
        out = scorer.score(tops, [pool] * len(tops))
    return _check_matrix(out, (len(tops), len(pool)), scorer.name)


def pool_counts(scores: Tensor, pos_index: Tensor) -> tuple[Tensor, Tensor]:
    """(g, t) per row of a [R, U] score matrix: pool items scoring strictly above / equal to
    the row's positive `scores[r, pos_index[r]]`, the positive itself excluded (int64)."""
    if scores.dim() != 2 or pos_index.shape != (scores.shape[0],):
        raise ValueError(f"expected scores [R, U] and pos_index [R], got "
                         f"{tuple(scores.shape)} and {tuple(pos_index.shape)}")
    pos_index = pos_index.long()
    if pos_index.numel() and (int(pos_index.min()) < 0 or int(pos_index.max()) >= scores.shape[1]):
        raise ValueError(f"pos_index out of range [0, {scores.shape[1]})")
    s_pos = scores.gather(1, pos_index[:, None])
    return (scores > s_pos).sum(1), (scores == s_pos).sum(1) - 1


def metrics_from_counts(pos: Tensor, neg: Tensor, g: Tensor, t: Tensor, n_candidates: int,
                        *, ties: str = "expected") -> dict[str, Any]:
    """The metric dict of `geco.evaluate.score_rows` (same keys, same order) from sampled
    scores (pos [R], neg [R, K]) and full-ranking counts (g, t per row, pool of n_candidates)."""
    _check_ties(ties)
    out: dict[str, Any] = sampled_metrics(pos, neg, ties=ties)
    out["mrr_full"] = reciprocal_rank(g, t, ties).mean().item()
    for k in KS:
        out[f"recall_at_{k}"] = recall_at_k(g, t, k, ties).mean().item()
    for k in KS:
        out[f"ndcg_at_{k}"] = ndcg_at_k(g, t, k, ties).mean().item()
    out["n_queries"], out["n_candidates"] = int(pos.shape[0]), int(n_candidates)
    rnd = random_expectations(n_candidates)
    out["random_mrr_full"] = rnd["mrr"]
    out["mrr_full_vs_random"] = out["mrr_full"] / rnd["mrr"]
    return out


def score_metrics(pos: Tensor, neg: Tensor, pool: Tensor, pos_index: Tensor, *,
                  ties: str = "expected") -> dict[str, Any]:
    """`score_rows` for precomputed scores: pos [R], neg [R, K], pool [R, U] (every query
    against the unique positives), pos_index [R] (column of row r's positive in `pool`)."""
    if pool.dim() != 2:
        raise ValueError(f"pool scores must be [R, U], got {tuple(pool.shape)}")
    pool = _check_matrix(pool, (pos.shape[0], pool.shape[1]), "score_metrics")
    g, t = pool_counts(pool, pos_index)
    return metrics_from_counts(pos, neg, g, t, pool.shape[1], ties=ties)


@torch.no_grad()
def evaluate_scorer(scorer: Scorer, split: Split, *, ties: str = "expected",
                    chunk_size: int = 512) -> dict[str, Any]:
    """Every metric of `geco.evaluate.evaluate` for a scorer on a valid/test split."""
    _check_ties(ties)
    if split.negatives is None:
        raise ValueError(f"{split.source}: evaluation needs neg_* columns")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1")
    t0 = time.perf_counter()
    tops, positives = list(split.tops), list(split.bottoms)
    rows = [[b, *negs] for b, negs in zip(positives, split.negatives, strict=True)]
    n_rows, k = len(rows), split.n_negatives
    sampled = _check_matrix(scorer.score(tops, rows), (n_rows, k + 1), scorer.name)

    pool = split.unique_bottoms()
    column = {b: i for i, b in enumerate(pool)}
    pos_index = torch.tensor([column[b] for b in positives])
    g, t = [], []
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        gg, tt = pool_counts(pool_scores(scorer, tops[start:stop], pool),
                             pos_index[start:stop])
        g.append(gg)
        t.append(tt)
    metrics = metrics_from_counts(sampled[:, 0], sampled[:, 1:], torch.cat(g), torch.cat(t),
                                  len(pool), ties=ties)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


# --------------------------------------------------------------------------- baselines


class RandomScorer:
    """i.i.d. Uniform[0, 1) float64 scores from a generator seeded with `seed`."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def fit(self, train: Split | None = None) -> None:
        """Nothing to learn; re-seeds, so fit + evaluate repeats exactly."""
        self._gen.manual_seed(self.seed)

    def score(self, tops: list[str], candidates: list[list[str]]) -> Tensor:
        width = len(candidates[0]) if candidates else 0
        if any(len(c) != width for c in candidates) or len(candidates) != len(tops):
            raise ValueError("candidates: one equally long list per top expected")
        return torch.rand(len(tops), width, generator=self._gen, dtype=torch.float64)

    def score_pool(self, tops: list[str], pool: list[str]) -> Tensor:
        return torch.rand(len(tops), len(pool), generator=self._gen, dtype=torch.float64)


def distinct_tops(pairs: Iterable[tuple[str, str]]) -> dict[str, int]:
    """Bottom id -> number of distinct tops paired with it in (top, bottom) pairs."""
    tops_of: dict[str, set[str]] = {}
    for top, bottom in pairs:
        tops_of.setdefault(bottom, set()).add(top)
    return {b: len(ts) for b, ts in tops_of.items()}


class PopularityScorer:
    """score(b) = number of distinct training tops paired with bottom b (0 if unseen)."""

    name = "popularity"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def fit(self, train: Split) -> None:
        self.counts = distinct_tops(zip(train.tops, train.bottoms, strict=True))

    def popularity(self, bottoms: Sequence[str]) -> Tensor:
        return torch.tensor([float(self.counts.get(b, 0)) for b in bottoms], dtype=torch.float64)

    def score(self, tops: list[str], candidates: list[list[str]]) -> Tensor:
        width = len(candidates[0]) if candidates else 0
        if any(len(c) != width for c in candidates) or len(candidates) != len(tops):
            raise ValueError("candidates: one equally long list per top expected")
        flat = self.popularity([b for c in candidates for b in c])
        return flat.reshape(len(tops), width)

    def score_pool(self, tops: list[str], pool: list[str]) -> Tensor:
        return self.popularity(pool).expand(len(tops), len(pool))
