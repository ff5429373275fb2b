"""Baselines of REFERENCE §5, scored through the same split data and metrics as GECo.

Every baseline is a `Scorer` (rates (top, bottom) pairs by id; `fit` on the training split)
evaluated by `evaluate_scorer`, which yields exactly the metric keys of
`geco.evaluate.score_rows`. `geco.compare` puts them side by side with GECo.

- `simple`: Random and Popularity, the scorer protocol and its evaluation;
- `base`: what the image baselines share (embedding cache, rolled negatives, checkpoints);
- `bprdae` (+ `features`: frozen AlexNet fc7 / ResNet-18), `gancm` (MGCM, Pix2PixCM):
  imported on demand (they pull in torchvision models).
"""

from geco.baselines.simple import (
    PopularityScorer,
    RandomScorer,
    Scorer,
    evaluate_scorer,
    metrics_from_counts,
    pool_counts,
    pool_scores,
    score_metrics,
)

__all__ = [
    "PopularityScorer",
    "RandomScorer",
    "Scorer",
    "evaluate_scorer",
    "metrics_from_counts",
    "pool_counts",
    "pool_scores",
    "score_metrics",
]
