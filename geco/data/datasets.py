"""torch Datasets over splits. A bad image either raises DataError or, in "skip" mode, makes
`__getitem__` return None, which `collate_skip` drops and counts (never silently)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from geco.data.images import ImageFolder
from geco.data.splits import Split
from geco.errors import ConfigError, DataError

log = logging.getLogger("geco")
Transform = Callable[[Image.Image], Tensor]
ON_BAD_IMAGE = ("error", "skip")


def _check_mode(on_bad_image: str) -> str:
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    return on_bad_image


class _Base(Dataset):
    def __init__(self, images: ImageFolder, transform: Transform, on_bad_image: str) -> None:
        self.images = images
        self.transform = transform
        self.on_bad_image = _check_mode(on_bad_image)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            return self._item(index)
        except DataError as exc:
            if self.on_bad_image == "skip":
                log.warning("skipping sample %d: %s", index, exc)  # counted by collate_skip
                return None
            raise

    def _item(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def _img(self, item_id: str, context: str) -> Tensor:
        return self.transform(self.images.load(item_id, context=context))


class PairDataset(_Base):
    """Training pairs: {"top", "bottom", "index"}."""

    def __init__(
        self,
        split: Split,
        images: ImageFolder,
        transform: Transform,
        *,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(images, transform, on_bad_image)
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def _item(self, index: int) -> dict[str, Any]:
        s, where = self.split, self.split.where(index)
        return {
            "top": self._img(s.tops[index], where),
            "bottom": self._img(s.bottoms[index], where),
            "index": index,
        }


class EvalDataset(_Base):
    """Eval rows: {"top", "bottom", "negatives" (Kx3xSxS, first K of the row), "index"}."""

    def __init__(
        self,
        split: Split,
        images: ImageFolder,
        transform: Transform,
        *,
        n_negatives: int,
        on_bad_image: str = "error",
    ) -> None:
        super().__init__(images, transform, on_bad_image)
        if n_negatives < 1:
            raise ConfigError(f"n_negatives must be >= 1, got {n_negatives}")
        if split.n_negatives < n_negatives:
            raise DataError(
                f"{split.source}: split {split.name!r} has {split.n_negatives} negatives per row, "
                f"{n_negatives} requested"
            )
        self.split = split
        self.n_negatives = n_negatives

    def __len__(self) -> int:
        return len(self.split)

    def _item(self, index: int) -> dict[str, Any]:
        s, where = self.split, self.split.where(index)
        assert s.negatives is not None  # checked in __init__
        negs = s.negatives[index][: self.n_negatives]
        return {
            "top": self._img(s.tops[index], where),
            "bottom": self._img(s.bottoms[index], where),
            "negatives": torch.stack([self._img(n, where) for n in negs]),
            "index": index,
        }


class ItemDataset(_Base):
    """Single items (e.g. a catalog to embed): {"image", "index"}.

    `contexts` (optional, parallel to ids) says where each id came from, for error messages.
    """

    def __init__(
        self,
        ids: Sequence[str],
        images: ImageFolder,
        transform: Transform,
        *,
        on_bad_image: str = "error",
        contexts: Sequence[str] | None = None,
    ) -> None:
        super().__init__(images, transform, on_bad_image)
        if contexts is not None and len(contexts) != len(ids):
            raise ValueError(f"contexts has {len(contexts)} entries for {len(ids)} ids")
        self.ids = list(ids)
        self.contexts = list(contexts) if contexts is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def _item(self, index: int) -> dict[str, Any]:
        context = self.contexts[index] if self.contexts is not None else f"item #{index}"
        return {"image": self._img(self.ids[index], context), "index": index}


def collate_skip(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """default_collate of the good items plus "skipped" (how many were None).

    Returns None when every item was bad; the caller then knows the whole batch was skipped.
    """
    good = [b for b in batch if b is not None]
    if not good:
        return None
    out = default_collate(good)
    out["skipped"] = len(batch) - len(good)
    return out
