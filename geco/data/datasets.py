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

from geco.data.images import ON_BAD, ImageSource, OnBad, check_choice
from geco.data.splits import Split
from geco.errors import ConfigError, DataError

log = logging.getLogger("geco")
Transform = Callable[[Image.Image], Tensor]


def _check_mode(on_bad_image: OnBad) -> OnBad:
    check_choice("on_bad_image", on_bad_image, ON_BAD)
    return on_bad_image


class _Base(Dataset):
    def __init__(self, images: ImageSource, transform: Transform, on_bad_image: OnBad) -> None:
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
        images: ImageSource,
        transform: Transform,
        *,
        on_bad_image: OnBad = "error",
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


class QueryDataset(_Base):
    """The query side of eval rows: {"top", "index", "bottom_id", "negatives"} (ids only for
    the bottoms: every candidate is embedded once, by `ItemDataset`). Batch with
    `collate_rows`."""

    def __init__(self, split: Split, images: ImageSource, transform: Transform) -> None:
        super().__init__(images, transform, "error")
        if split.negatives is None:
            raise DataError(f"{split.source}: evaluation needs neg_* columns")
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def _item(self, index: int) -> dict[str, Any]:
        s = self.split
        return {"top": self._img(s.tops[index], s.where(index)), "index": index,
                "bottom_id": s.bottoms[index], "negatives": list(s.negatives[index])}


class ItemDataset(_Base):
    """Single items (e.g. a catalog to embed): {"image", "index", "id"}.

    `contexts` (optional, parallel to ids) says where each id came from, for error messages.
    """

    def __init__(
        self,
        ids: Sequence[str],
        images: ImageSource,
        transform: Transform,
        *,
        on_bad_image: OnBad = "error",
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
        return {"image": self._img(self.ids[index], context), "index": index,
                "id": self.ids[index]}


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


def collate_rows(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensors stacked, numbers as a tensor, everything else (ids, id lists) kept as lists:
    default_collate would transpose the per-row lists of negatives."""
    out: dict[str, Any] = {}
    for key, value in batch[0].items():
        values = [b[key] for b in batch]
        if torch.is_tensor(value):
            out[key] = torch.stack(values)
        elif isinstance(value, int):
            out[key] = torch.tensor(values, dtype=torch.int64)
        else:
            out[key] = values
    return out
