"""Open the configured dataset: generate the synthetic default if asked, read splits, preflight."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geco.config import DataConfig
from geco.data.images import ImageFolder, preflight
from geco.data.splits import Split, load_splits, resolve_layout
from geco.data.synth import ensure

log = logging.getLogger("geco")


def ensure_synthetic(cfg: DataConfig) -> None:
    """Generate the synthetic dataset into cfg.root when configured and missing (idempotent)."""
    if cfg.synthetic:
        ensure(Path(cfg.root), cfg.synth)


@dataclass
class EvalData:
    """One evaluation split (valid or test): rows from the dataset folder (`split`, `images`)
    or from shards (`shards` root + its manifest). Both evaluate to the same metrics."""

    name: str
    split: Split | None = None
    images: ImageFolder | None = None
    shards: str = ""
    manifest: dict[str, Any] = field(default_factory=dict)
    on_bad: str = "error"

    @property
    def where(self) -> str:
        return f"{self.shards} [{self.name}]" if self.shards else str(self.split.source)

    def __len__(self) -> int:
        if self.shards:
            return int(self.manifest["splits"][self.name]["samples"])
        return len(self.split)

    def evaluate(self, retriever, *, rt, image_size: int, batch_size: int, seed: int,
                 ties: str, num_workers: int) -> dict[str, Any]:
        from geco.evaluate import evaluate_shards, evaluate_split

        kw = dict(rt=rt, image_size=image_size, batch_size=batch_size, seed=seed, ties=ties,
                  num_workers=num_workers)
        if self.shards:
            return evaluate_shards(retriever, self.shards, self.name, manifest=self.manifest,
                                   on_bad=self.on_bad, **kw)
        return evaluate_split(retriever, self.split, self.images, **kw)

    def sample_pairs(self, n: int, transform) -> list[dict[str, Any]]:
        """The first n rows' {"top", "bottom"} tensors (for template grids)."""
        if not self.shards:
            from geco.data.datasets import PairDataset

            ds = PairDataset(self.split.subset(range(min(n, len(self.split)))), self.images,
                             transform)
            return [ds[i] for i in range(len(ds))]
        from geco.data.stream import ShardStream

        stream = ShardStream.from_manifest(self.shards, self.name, self.manifest, kind="eval",
                                           transform=transform, batch_size=n, on_bad="skip")
        batch = next(iter(stream), None)
        if batch is None:
            return []
        return [{"top": t, "bottom": b} for t, b in zip(batch["top"], batch["bottom"],
                                                       strict=True)][:n]


def open_eval_data(cfg: DataConfig, split: str) -> EvalData:
    """The evaluation split from `cfg.shards` when set (nothing is read from `cfg.root`), else
    from the dataset folder."""
    if cfg.shards:
        from geco.data.stream import load_manifest

        manifest = load_manifest(cfg.shards)
        entry = manifest["splits"].get(split)
        if entry is None or entry.get("kind") != "eval":
            from geco.errors import DataError

            raise DataError(f"{cfg.shards}: the shards hold no eval split {split!r} "
                            f"(has: {', '.join(sorted(manifest['splits']))})")
        return EvalData(split, shards=cfg.shards, manifest=manifest, on_bad=cfg.on_bad_image)
    splits, images = open_dataset(cfg, (split,))
    return EvalData(split, split=splits[split], images=images)


def open_training_data(cfg: DataConfig, transform, *, rank: int, world_size: int, seed: int,
                       batch_size: int):
    """(training pairs, validation EvalData) for a training stage.

    With `cfg.shards` everything streams from the shards (local or s3://) and the dataset
    folder is never read: that is what cluster workers without the folder need.
    """
    if cfg.shards:
        from geco.data.stream import ShardStream

        valid = open_eval_data(cfg, "valid")
        train = ShardStream.from_manifest(
            cfg.shards, "train", valid.manifest, transform=transform, rank=rank,
            world_size=world_size, seed=seed, batch_size=batch_size, on_bad=cfg.on_bad_image,
        )
        return train, valid
    from geco.data.datasets import PairDataset

    splits, images = open_dataset(cfg, ("train", "valid"))
    train = PairDataset(splits["train"], images, transform, on_bad_image=cfg.on_bad_image)
    return train, EvalData("valid", split=splits["valid"], images=images)


def open_dataset(
    cfg: DataConfig, splits: tuple[str, ...] = ("train", "valid", "test")
) -> tuple[dict[str, Split], ImageFolder]:
    """Splits (rows with missing images removed or rejected per config) and the image folder."""
    layout = resolve_layout(Path(cfg.root), cfg.kind)
    loaded = load_splits(layout, n_negatives=cfg.n_negatives, splits=splits)
    images = ImageFolder(layout.img_dir)
    out: dict[str, Split] = {}
    for name, split in loaded.items():
        kept, dropped = preflight(split, images, on_missing=cfg.on_missing_image)
        if dropped:
            log.warning("%s: skipped %d rows with missing images", split.source, dropped)
        if len(kept) == 0:
            from geco.errors import DataError

            raise DataError(f"{split.source}: no usable rows left after the image check")
        out[name] = kept
    return out, images
