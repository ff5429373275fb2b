"""Open the configured dataset: generate the synthetic default if asked, read splits, preflight."""

from __future__ import annotations

import logging
from pathlib import Path

from geco.config import DataConfig
from geco.data.images import ImageFolder, preflight
from geco.data.splits import Split, load_splits, resolve_layout
from geco.data.synth import ensure

log = logging.getLogger("geco")


def ensure_synthetic(cfg: DataConfig) -> None:
    """Generate the synthetic dataset into cfg.root when configured and missing (idempotent)."""
    if cfg.synthetic:
        ensure(Path(cfg.root), cfg.synth)


def open_training_data(cfg: DataConfig, transform, *, rank: int, world_size: int, seed: int,
                       batch_size: int):
    """(training pairs, validation split, image folder) for a training stage.

    With `cfg.shards` the pairs stream from the shards (local or s3://) and the folder's train
    CSV and images are never read; validation still reads the folder.
    """
    splits, images = open_dataset(cfg, ("valid",) if cfg.shards else ("train", "valid"))
    if cfg.shards:
        from geco.data.stream import ShardStream

        train = ShardStream.from_manifest(
            cfg.shards, "train", transform=transform, rank=rank, world_size=world_size,
            seed=seed, batch_size=batch_size, on_bad=cfg.on_bad_image,
        )
    else:
        from geco.data.datasets import PairDataset

        train = PairDataset(splits["train"], images, transform, on_bad_image=cfg.on_bad_image)
    return train, splits["valid"], images


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
