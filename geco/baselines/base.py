"""What the image-based baselines (BPR-DAE, MGCM, Pix2PixCM) share: encoding images by id,
an embedding-cached `Scorer`, and rolled in-batch negatives. They train as stages of
geco.train.loop (checkpoints, resume and progress live there).

Images come from any `geco.data.images.ImageSource` (a folder, or the images read from
shards): `load(item_id, context=...)` returns a decoded RGB PIL image or raises `DataError`
naming it. Baselines never skip images: a score is needed for every candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from geco.data.datasets import ItemDataset
from geco.data.images import ImageSource
from geco.errors import ConfigError

log = logging.getLogger("geco")

Transform = Callable[[Image.Image], Tensor]


class RowDataset(Dataset):
    """Row numbers 0..n-1 as {"row": i}: batches of training rows for a model that trains
    on precomputed features (BPR-DAE), shuffled by geco.data.source.batch_loader."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, int]:
        return {"row": index}


@torch.no_grad()
def encode_ids(ids: Sequence[str], images: ImageSource, transform: Transform,
               encode: Callable[[Tensor], Tensor], *, device: torch.device,
               batch_size: int = 128, num_workers: int = 0, context: str = "") -> Tensor:
    """encode(batch of transformed images on `device`) for every id, in order -> CPU tensor
    [len(ids), ...]. Bad or missing images raise DataError naming the file (and `context`)."""
    if not ids:
        raise ValueError("encode_ids: no ids given")
    items = ItemDataset(ids, images, transform, contexts=[context or "encode_ids"] * len(ids))
    loader = DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return torch.cat([encode(b["image"].to(device)).float().cpu() for b in loader])


class EmbeddingScorer:
    """A `geco.baselines.Scorer` whose score is a function of a top embedding and a bottom
    embedding, each computed once per id (cached) from its image.

    Subclasses implement `top_transform`/`bottom_transform` (PIL -> tensor), `embed_tops` /
    `embed_bottoms` (a batch of images on `self.device` -> [B, D] embeddings; the networks in
    eval mode) and `match(t [R, D], b [R, K, D]) -> [R, K]`; `match_pool(t [R, D], b [U, D])
    -> [R, U]` defaults to `match` against the expanded pool. `fit` must call `reset()` once
    the model changes, so no embedding of an older model is reused.
    """

    name = "embedding"

    def __init__(self, images: ImageSource, *, device: torch.device | str = "cpu",
                 batch_size: int = 128, num_workers: int = 0) -> None:
        self.images = images
        self.device = torch.device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self._tops: dict[str, Tensor] = {}
        self._bottoms: dict[str, Tensor] = {}

    # ---- subclass API
    def top_transform(self) -> Transform:
        raise NotImplementedError

    def bottom_transform(self) -> Transform:
        return self.top_transform()

    def embed_tops(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def embed_bottoms(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def match(self, t: Tensor, b: Tensor) -> Tensor:
        raise NotImplementedError

    def match_pool(self, t: Tensor, b: Tensor) -> Tensor:
        return self.match(t, b.unsqueeze(0).expand(t.shape[0], *b.shape))

    # ---- cache
    def reset(self) -> None:
        self._tops.clear()
        self._bottoms.clear()

    def _embedded(self, ids: Sequence[str], cache: dict[str, Tensor], transform: Transform,
                  encode: Callable[[Tensor], Tensor], what: str) -> Tensor:
        todo = [i for i in dict.fromkeys(ids) if i not in cache]
        if todo:
            out = encode_ids(todo, self.images, transform, encode, device=self.device,
                             batch_size=self.batch_size, num_workers=self.num_workers,
                             context=f"{self.name} {what}")
            cache.update(zip(todo, out, strict=True))
        return torch.stack([cache[i] for i in ids])

    def top_embeddings(self, ids: Sequence[str]) -> Tensor:
        return self._embedded(ids, self._tops, self.top_transform(), self.embed_tops, "top")

    def bottom_embeddings(self, ids: Sequence[str]) -> Tensor:
        return self._embedded(ids, self._bottoms, self.bottom_transform(), self.embed_bottoms,
                              "bottom")

    # ---- Scorer
    @torch.no_grad()
    def score(self, tops: list[str], candidates: list[list[str]]) -> Tensor:
        width = len(candidates[0]) if candidates else 0
        if len(candidates) != len(tops) or any(len(c) != width for c in candidates):
            raise ValueError("candidates: one equally long list per top expected")
        t = self.top_embeddings(tops)
        b = self.bottom_embeddings([x for c in candidates for x in c])
        return self.match(t, b.view(len(tops), width, *b.shape[1:])).double()

    @torch.no_grad()
    def score_pool(self, tops: list[str], pool: list[str]) -> Tensor:
        return self.match_pool(self.top_embeddings(tops), self.bottom_embeddings(pool)).double()


def rolled_negatives(bottoms: Tensor, k: int) -> Tensor:
    """[B, ...] -> [B, k, ...]: row i's negatives are the bottoms of rows i-1, ..., i-k (the
    reference's `roll` by 1..k within the batch). Needs B > k."""
    if bottoms.shape[0] <= k:
        raise ValueError(f"a batch of {bottoms.shape[0]} cannot give {k} rolled negatives")
    return torch.stack([bottoms.roll(j, dims=0) for j in range(1, k + 1)], dim=1)


def check_full_batch(n_rows: int, batch_size: int, key: str, source: str) -> None:
    """Rolled negatives need full batches: refuse a training split smaller than one."""
    if n_rows < batch_size:
        raise ConfigError(f"{source}: {n_rows} training pairs, fewer than one batch of "
                          f"{batch_size}; lower {key}")
