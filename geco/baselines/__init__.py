"""Baselines of docs/model.md §5, scored through the same split data and metrics as GECo.

Every baseline is a `Scorer` (rates (top, bottom) pairs by id) evaluated by `evaluate_scorer`,
which yields exactly the metric keys of `geco.evaluate.score_rows`. `geco.compare` puts them
side by side with GECo.

- `simple`: Random and Popularity, the scorer protocol and its evaluation;
- `base`: what the image baselines share (embedding cache, rolled negatives);
- `bprdae`, `gancm` (MGCM, Pix2PixCM): config section, training stage (run by
  geco.train.loop like CIGM and GECo) and scorer of each trainable baseline.
"""

from dataclasses import dataclass, field

from geco.baselines.bprdae import BPRDAEConfig
from geco.baselines.gancm import GanCMConfig
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


@dataclass
class BaselinesConfig:
    """The trainable baselines of `geco compare`."""

    bpr_dae: BPRDAEConfig = field(default_factory=BPRDAEConfig)
    mgcm: GanCMConfig = field(default_factory=GanCMConfig)
    pix2pixcm: GanCMConfig = field(default_factory=GanCMConfig)

    def validate(self, key: str) -> None:
        for name in ("bpr_dae", "mgcm", "pix2pixcm"):
            getattr(self, name).validate(f"{key}.{name}")


__all__ = [
    "BaselinesConfig",
    "PopularityScorer",
    "RandomScorer",
    "Scorer",
    "evaluate_scorer",
    "metrics_from_counts",
    "pool_counts",
    "pool_scores",
    "score_metrics",
]
