"""What the image-based baselines (BPR-DAE, MGCM, Pix2PixCM) share: encoding images by id,
an embedding-cached `Scorer`, the training-pair loader, and a resumable per-epoch checkpoint.

Images come from any `ImageSource` (`geco.data.images.ImageFolder`, or the in-memory images
read from shards): `load(item_id, context=...)` returns a decoded RGB PIL image or raises
`DataError` naming it. Baselines never skip images: a score is needed for every candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from geco.data.datasets import ItemDataset, PairDataset
from geco.data.splits import Split
from geco.errors import ConfigError, GecoError
from geco.train.loop import config_drift
from geco.train.runtime import Runtime, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from geco.config import Config

log = logging.getLogger("geco")

Transform = Callable[[Image.Image], Tensor]


class ImageSource(Protocol):
    def load(self, item_id: str, *, context: str = "") -> Image.Image: ...


@dataclass
class BaselineContext:
    """What a baseline gets from `geco compare`: the comparison's config (its own section is
    `cfg.baselines.<name>`), the dataset's images and training split, its own output folder
    (checkpoints, sample grids), the runtime (device), and `data_key`: what identifies the
    training data, saved into its checkpoint config so a checkpoint is never reused on other
    data."""

    cfg: Config
    images: ImageSource
    train: Split
    out_dir: Path
    rt: Runtime
    data_key: dict[str, Any] = field(default_factory=dict)
    # Called with the checkpoint path after every save (the Ray job uploads the folder).
    on_checkpoint: Callable[[Path], None] | None = None


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


def pair_loader(train: Split, images: ImageSource, transform: Transform, *, batch_size: int,
                seed: int, epoch: int, num_workers: int = 0) -> DataLoader:
    """Training pairs {"top", "bottom"} shuffled by (seed, epoch), full batches only (rolled
    negatives need equal batches; at most batch_size - 1 pairs sit out an epoch)."""
    if len(train) < batch_size:
        raise ConfigError(f"{train.source}: {len(train)} training pairs, fewer than one batch "
                          f"of {batch_size}; lower the baseline's batch_size")
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return DataLoader(PairDataset(train, images, transform), batch_size=batch_size, shuffle=True,
                      generator=g, drop_last=True, num_workers=num_workers,
                      persistent_workers=False)


_RESUMABLE = ("baseline.epochs:", "baseline.max_steps_per_epoch:")


class EpochCheckpoint:
    """`<dir>/last.pt`: a baseline's state after its latest finished epoch, with its config
    ({"baseline": its own config section as a dict, "data": `BaselineContext.data_key`}) and
    per-epoch history.

    `resume()` returns the saved payload when its config matches (training continues after its
    epoch, or is skipped when complete), None when there is none, and raises naming the keys
    when the config differs: retraining silently over a different model is lost work.
    """

    def __init__(self, out_dir: Path, model: str, config: dict[str, Any],
                 on_save: Callable[[Path], None] | None = None) -> None:
        self.path = Path(out_dir) / "last.pt"
        self.model, self.config, self.on_save = model, config, on_save

    def resume(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        ckpt = load_checkpoint(self.path)
        if ckpt.get("model") != self.model:
            raise GecoError(f"{self.path} holds a {ckpt.get('model')!r} model, not {self.model!r}")
        # More epochs continue a finished run; other changes mean another model.
        drift = [d for d in config_drift(ckpt.get("config", {}), self.config)
                 if not d.startswith(_RESUMABLE)]
        if drift:
            raise ConfigError(f"{self.path} was trained with a different config ("
                              + "; ".join(drift[:5]) + "): delete the folder to retrain, or "
                              "use another run dir")
        return ckpt

    def save(self, epoch: int, state: dict[str, Any], history: list[dict[str, Any]]) -> None:
        save_checkpoint(self.path, {"model": self.model, "epoch": epoch, "state": state,
                                    "config": self.config, "history": history})
        if self.on_save is not None:
            self.on_save(self.path)

