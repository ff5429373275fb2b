"""GECo retriever (stage 2): composed query (top ⊕ template) vs bottom embedding (REFERENCE §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GECo(nn.Module):
    """Shared backbone + one linear projection per branch; score = plain dot product."""

    def __init__(self, backbone: nn.Module, feat_dim: int = 512, emb_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.query_proj = nn.Linear(2 * feat_dim, emb_dim)
        self.bottom_proj = nn.Linear(feat_dim, emb_dim)
        for lin in (self.query_proj, self.bottom_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def features(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def query(self, tops: Tensor, templates: Tensor) -> Tensor:
        # Separate backbone calls: in train mode each set gets its own BN batch statistics,
        # as in the reference.
        return self.query_proj(torch.cat([self.features(tops), self.features(templates)], dim=1))

    def embed_bottoms(self, bottoms: Tensor) -> Tensor:
        return self.bottom_proj(self.features(bottoms))

    def forward(self, tops: Tensor, templates: Tensor, bottoms: Tensor) -> tuple[Tensor, Tensor]:
        """Training pass: (query embeddings q, positive-bottom embeddings p)."""
        return self.query(tops, templates), self.embed_bottoms(bottoms)

    @staticmethod
    def score(q: Tensor, b: Tensor) -> Tensor:
        """Compatibility m(q, b) = <q, b> over the last dim (broadcasts)."""
        return (q * b).sum(dim=-1)
