"""The one way into a dataset: `open_data(cfg.data)` decides once where the data come from and
returns an object that serves every consumer the same way, whatever the source (open_clip's
`get_data` habit):

- `FolderData`: a dataset folder (`files/*.csv` + `img/<id>.jpg`; the synthetic default is
  generated into it on first use);
- `ShardData`: WebDataset shards written by `geco data shard` (a folder or s3://bucket/prefix
  holding manifest.json); the dataset folder is never read, which is what cluster workers
  without the folder need.

Both give:
- `train_loader(...)`: the training pairs {"top", "bottom"} as a `Loader` (every pair once per
  epoch across DDP ranks and loader workers, equal batches per rank; `batch_loader` makes one
  for any map-style dataset, e.g. a baseline's);
- `queries(split, ...)` / `candidates(split, ...)`: batches of an evaluation split's rows (top
  image, row index, positive id, negative ids) and of its candidate bottoms (each once), which
  `geco.evaluate.evaluate` and the registry's catalogue embed;
- `splits(names)`: whole splits by id plus their images (`ImageFolder`, or the shards' JPEG
  bytes in memory), for models that look images up by id (the baselines);
- `sample_pairs(split, n, ...)` (template grids), `n_rows(split)`, `check(names)` and `lineage`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch.utils.data import DataLoader, Dataset

from geco.data.check import Policy, check_loaded
from geco.data.datasets import (
    ItemDataset,
    PairDataset,
    QueryDataset,
    Transform,
    collate_rows,
    collate_skip,
)
from geco.data.images import ImageFolder, OnBad, ShardImages, preflight
from geco.data.sampler import EpochBatchSampler
from geco.data.splits import Split, load_splits, resolve_layout
from geco.data.synth import SynthSpec, ensure
from geco.errors import DataError
from geco.settings import at_least, require, resumable

if TYPE_CHECKING:
    from geco.train.runtime import Runtime

log = logging.getLogger("geco")

DatasetKind = Literal["auto", "fashionvc", "expreduced", "fashiontaobaotb", "standard", "pairs"]


@dataclass
class DataConfig:
    # Dataset folder: files/*.csv + img/<id>.jpg (paper layouts, "standard", or pairs.csv).
    root: str = "data/synthetic"
    kind: DatasetKind = "auto"
    image_size: int = 128  # GECo and CIGM input size (docs/model.md §1.4)
    n_negatives: int = 9
    on_missing_image: OnBad = "error"  # rows whose image files are absent (preflight)
    on_bad_image: OnBad = "error"  # images that fail to decode during training
    # Duplicate rows, self-pairs, negatives equal to the positive (geco.data.check): "error"
    # refuses them in valid/test splits; "warn" loads them. Train anomalies, duplicate
    # negatives and tops shared with train are only warned about, with counts.
    anomalies: Policy = resumable("error")
    # DataLoader worker processes per rank; -1 = sized from the CPUs this process may use
    # (loader_workers).
    num_workers: int = resumable(2)
    # Batches each loader worker keeps ready; 0 = sized by `loader_prefetch`.
    prefetch_factor: int = resumable(0)
    # Where training images are decoded: "cpu" (loader workers, PIL) or "device" (the
    # training device: nvJPEG on a GPU, for nodes whose CPUs cannot keep up; shards only;
    # geco.data.jpeg).
    decode: Literal["cpu", "device"] = resumable("cpu")
    # Training pairs streamed from WebDataset shards (`geco data shard`): a folder or an
    # s3://bucket/prefix holding manifest.json; validation and test then read the shards'
    # eval and catalogue sets too, and `root` is not read. Empty = read `root` directly.
    shards: str = ""
    # Generate the synthetic dataset into `root` when it is missing (embedded default).
    synthetic: bool = False
    synth: SynthSpec = field(default_factory=SynthSpec)

    @property
    def location(self) -> str:
        """Where the data are read from: the shards when set, else the dataset folder."""
        return self.shards or self.root

    def validate(self, key: str) -> None:
        size = self.image_size
        require(size >= 16 and not size & (size - 1), f"{key}.image_size", size,
                "must be a power of two >= 16 (U-Net depth)")
        at_least(f"{key}.n_negatives", self.n_negatives, 3, "AUC-1vs3 needs 3 negatives")
        at_least(f"{key}.num_workers", self.num_workers, -1, "-1 = auto")
        at_least(f"{key}.prefetch_factor", self.prefetch_factor, 0, "0 = auto")
        self.synth.validate(f"{key}.synth")
        require(self.decode == "cpu" or bool(self.shards), f"{key}.decode", self.decode,
                "decoding on the device reads JPEG bytes from shards: set data.shards too")

    @property
    def loader_workers(self) -> int:
        """num_workers, or for -1 the CPUs this process may use minus the one that trains,
        at most 16: a GPU node's DataLoader workers follow its size."""
        if self.num_workers >= 0:
            return self.num_workers
        return max(0, min(16, available_cpus() - 1))


    def loader_prefetch(self, workers: int) -> int | None:
        """prefetch_factor for a DataLoader with `workers` workers (None without workers).
        Auto: 2 batches per worker of decoded images; with decode=device a batch is a few
        hundred KiB of JPEG bytes, so 4 batches per worker and at least 8 per rank in flight,
        which hides S3 latency when a GPU eats batches faster than one worker reads them."""
        if workers == 0:
            return None
        if self.prefetch_factor:
            return self.prefetch_factor
        if self.decode == "cpu":
            return 2
        return max(4, -(-8 // workers))


def available_cpus() -> int:
    """CPUs of this process: what Ray assigned to it inside a Ray worker or task, else its
    CPU affinity shared among the local ranks (torchrun's LOCAL_WORLD_SIZE)."""
    ray = sys.modules.get("ray")  # never imported here: only asked when already running
    if ray is not None and ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return max(1, int(cpus))
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (n or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


class Loader:
    """Batches of one split for one rank, reshuffled by `set_epoch` (open_clip's DataInfo):
    what the training loop iterates, whichever source made it."""

    def __init__(self, loader: DataLoader, shuffler: Any) -> None:
        self.loader, self._shuffler = loader, shuffler

    def set_epoch(self, epoch: int) -> None:
        self._shuffler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def batch_loader(dataset: Dataset, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False) -> Loader:
    """Shuffled batches of a map-style dataset: the same global batches for any world size,
    each rank taking its share (geco.data.sampler); bad items counted by `collate_skip`."""
    sampler = EpochBatchSampler(len(dataset), batch_size, rank=rank, world_size=world_size,
                                seed=seed, drop_last=drop_last)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        collate_fn=collate_skip, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0)
    return Loader(loader, sampler)


def open_data(cfg: DataConfig, rt: Runtime | None = None) -> FolderData | ShardData:
    """The configured dataset: shards when `cfg.shards` is set (then nothing is read from
    `cfg.root`), else the folder, generated first when `cfg.synthetic` (by rank 0 only)."""
    if cfg.shards:
        return ShardData(cfg)
    if cfg.synthetic and (rt is None or rt.is_main):
        ensure(Path(cfg.root), cfg.synth)
    if rt is not None:
        rt.barrier()
    return FolderData(cfg)


def _loader(ds, *, batch_size: int | None, num_workers: int, rt: Runtime | None,
            collate=None) -> DataLoader:
    cuda = rt is not None and rt.device.type == "cuda"
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=cuda, collate_fn=collate)


class FolderData:
    """A dataset folder; splits are read (and their images checked) once, on first use."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.where = str(cfg.root)
        self.lineage = {"geco.shards": cfg.root, "geco.manifest_sha256": ""}
        self._layout = None
        self._splits: dict[str, Split] = {}
        self._dropped: dict[str, int] = {}  # rows removed by the image check, per split
        self._images: ImageFolder | None = None

    def splits(self, names: tuple[str, ...]) -> tuple[dict[str, Split], ImageFolder]:
        """The named splits (rows with missing images removed or refused per
        `on_missing_image`) and the image folder."""
        todo = tuple(n for n in names if n not in self._splits)
        if todo:
            if self._layout is None:
                self._layout = resolve_layout(Path(self.cfg.root), self.cfg.kind)
                self._images = ImageFolder(self._layout.img_dir)
            loaded = load_splits(self._layout, n_negatives=self.cfg.n_negatives, splits=todo,
                                 strict=False)
            check_loaded(self._layout, loaded, self._splits, n_negatives=self.cfg.n_negatives,
                         policy=self.cfg.anomalies)
            for name, split in loaded.items():
                if split.negatives and split.n_negatives != self.cfg.n_negatives:
                    # Split files carry their own negatives: said once, not silently ignored.
                    log.warning("data.n_negatives=%d does not apply to %s: its rows carry %d "
                                "negatives, used as written (n_negatives sets how many are "
                                "sampled for pairs.csv datasets)", self.cfg.n_negatives,
                                split.source, split.n_negatives)
                kept, dropped = preflight(split, self._images,
                                          on_missing=self.cfg.on_missing_image)
                if dropped:
                    log.warning("%s: skipped %d rows with missing images", split.source, dropped)
                if len(kept) == 0:
                    raise DataError(f"{split.source}: no usable rows left after the image check")
                self._splits[name], self._dropped[name] = kept, dropped
        return {n: self._splits[n] for n in names}, self._images

    def split(self, name: str) -> Split:
        return self.splits((name,))[0][name]

    def check(self, names: tuple[str, ...]) -> None:
        self.splits(names)

    def describe(self, split: str) -> str:
        return str(self.split(split).source)

    def n_rows(self, split: str) -> int:
        """The rows of an evaluation split (one with negatives)."""
        s = self.split(split)
        if s.negatives is None:
            raise DataError(f"{s.source}: evaluation needs neg_* columns")
        return len(s)

    def dropped_rows(self, split: str) -> int:
        """Rows of the split file left out by the image check (on_missing_image=skip): not in
        n_rows, still part of the split an evaluation reports on."""
        self.split(split)
        return self._dropped[split]

    def train_loader(self, transform: Transform, *, rt: Runtime, batch_size: int, seed: int,
                     num_workers: int) -> Loader:
        splits, images = self.splits(("train",))
        pairs = PairDataset(splits["train"], images, transform,
                            on_bad_image=self.cfg.on_bad_image)
        return batch_loader(pairs, batch_size=batch_size, rank=rt.rank,
                            world_size=rt.world_size, seed=seed, num_workers=num_workers,
                            pin_memory=rt.device.type == "cuda")

    def queries(self, split: str, transform: Transform, *, batch_size: int, num_workers: int,
                rt: Runtime | None = None):
        splits, images = self.splits((split,))
        rows = QueryDataset(splits[split], images, transform)
        return _loader(rows, batch_size=batch_size, num_workers=num_workers, rt=rt,
                       collate=collate_rows)

    def candidates(self, split: str, transform: Transform, *, batch_size: int,
                   num_workers: int, rt: Runtime | None = None):
        """Every bottom the split's rows mention (positive and negatives), once, in order of
        first appearance."""
        splits, images = self.splits((split,))
        s = splits[split]
        ids: dict[str, str] = {}
        for r, (b, negs) in enumerate(zip(s.bottoms, s.negatives, strict=True)):
            for item in (b, *negs):
                ids.setdefault(item, s.where(r))
        items = ItemDataset(list(ids), images, transform, contexts=list(ids.values()))
        return _loader(items, batch_size=batch_size, num_workers=num_workers, rt=rt)

    def pair_ids(self, split: str) -> list[tuple[str, str]]:
        """(top id, bottom id) of every row of a split, no image read (popularity counts)."""
        s = self.split(split)
        return list(zip(s.tops, s.bottoms, strict=True))

    def sample_pairs(self, split: str, n: int, transform: Transform) -> list[dict[str, Any]]:
        """The first n rows' {"top", "bottom"} tensors (template grids)."""
        splits, images = self.splits((split,))
        s = splits[split]
        ds = PairDataset(s.subset(range(min(n, len(s)))), images, transform)
        return [ds[i] for i in range(len(ds))]


class ShardData:
    """Shards written by `geco data shard` (local or s3://): the manifest is read once."""

    def __init__(self, cfg: DataConfig) -> None:
        from geco.data.stream import load_manifest

        self.cfg = cfg
        self.root = self.where = cfg.shards
        self.manifest = load_manifest(cfg.shards)  # names the URL; wrong credentials too
        digest = hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()
        self.lineage = {"geco.shards": cfg.shards, "geco.manifest_sha256": digest}
        self._splits: dict[str, Split] = {}
        self._images = ShardImages(cfg.shards)

    def _entry(self, split: str, kind: str | None = None) -> dict[str, Any]:
        entry = self.manifest["splits"].get(split)
        if entry is None or (kind and entry.get("kind") != kind):
            what = f"{kind} split" if kind else "split"
            raise DataError(f"{self.root}: the shards hold no {what} {split!r} "
                            f"(has: {', '.join(sorted(self.manifest['splits']))})")
        return entry

    def _stream(self, split: str, transform, **kw):
        from geco.data.stream import ShardStream

        return ShardStream.from_manifest(self.root, split, self.manifest, transform=transform,
                                         **kw)

    def check(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._entry(name)

    def describe(self, split: str) -> str:
        return f"{self.root} [{split}]"

    def n_rows(self, split: str) -> int:
        entry = self._entry(split, "eval")
        return int(entry["samples"]) + int(entry.get("skipped", 0))

    def dropped_rows(self, split: str) -> int:
        return 0  # rows skipped when the shards were written are in n_rows already

    def train_loader(self, transform: Transform, *, rt: Runtime, batch_size: int, seed: int,
                     num_workers: int) -> Loader:
        # A shard stream batches itself, per rank and worker, with equal steps per rank.
        stream = self._stream("train", transform, rank=rt.rank, world_size=rt.world_size,
                              seed=seed, batch_size=batch_size, on_bad=self.cfg.on_bad_image,
                              decode=self.cfg.decode)
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                            pin_memory=rt.device.type == "cuda",
                            prefetch_factor=self.cfg.loader_prefetch(num_workers),
                            persistent_workers=num_workers > 0)
        return Loader(loader, stream)

    def queries(self, split: str, transform: Transform, *, batch_size: int, num_workers: int,
                rt: Runtime | None = None):
        self._entry(split, "eval")
        stream = self._stream(split, transform, kind="eval", batch_size=batch_size,
                              on_bad=self.cfg.on_bad_image)
        return _loader(stream, batch_size=None, num_workers=num_workers, rt=rt)

    def candidates(self, split: str, transform: Transform, *, batch_size: int,
                   num_workers: int, rt: Runtime | None = None):
        stream = self._stream(f"catalogue-{split}", transform, kind="catalogue",
                              batch_size=batch_size, on_bad=self.cfg.on_bad_image)
        return _loader(stream, batch_size=None, num_workers=num_workers, rt=rt)

    def pair_ids(self, split: str) -> list[tuple[str, str]]:
        """(top id, bottom id) of every sample of a split's shards, from their metadata (the
        shards are read, the images are not kept); unreadable samples are left out."""
        self._entry(split)
        stream = self._stream(split, lambda im: im, batch_size=2, on_bad="skip", shuffle=False)
        out = []
        for sample in stream.raw_samples():
            if sample is not None:
                try:
                    meta = json.loads(sample["meta.json"])
                    out.append((str(meta["top"]), str(meta["bottom"])))
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def sample_pairs(self, split: str, n: int, transform: Transform) -> list[dict[str, Any]]:
        stream = self._stream(split, transform, kind="eval", batch_size=n, on_bad="skip")
        batch = next(iter(stream), None)
        if batch is None:
            return []
        return [{"top": t, "bottom": b}
                for t, b in zip(batch["top"], batch["bottom"], strict=True)][:n]

    def splits(self, names: tuple[str, ...]) -> tuple[dict[str, Split], ShardImages]:
        """The named splits as Splits in source-row order, and the JPEG bytes of every id
        they mention (eval splits: their catalogue shards too), read into memory once.
        Unreadable samples raise DataError, or are counted and left out in skip mode."""
        for name in names:
            if name not in self._splits:
                self._splits[name] = self._read_split(name)
        log.info("read %s from the shards at %s: %d images",
                 ", ".join(f"{n} ({len(self._splits[n])} rows)" for n in names), self.root,
                 len(self._images))
        return {n: self._splits[n] for n in names}, self._images

    def _read_split(self, name: str) -> Split:
        kind = self._entry(name).get("kind")
        on_bad = self.cfg.on_bad_image
        rows: list[tuple[int, str, str, tuple[str, ...] | None, int]] = []
        skipped = 0
        parts = [name] + ([f"catalogue-{name}"] if kind == "eval" else [])
        for part in parts:
            stream = self._stream(part, lambda im: im, batch_size=2, on_bad=on_bad,
                                  shuffle=False)
            for sample in stream.raw_samples():
                if sample is None:
                    skipped += 1
                    continue
                try:
                    meta = json.loads(sample["meta.json"])
                    if part.startswith("catalogue-"):
                        self._images.add(str(meta["id"]), sample["bottom.jpg"])
                        continue
                    top, bottom, row = str(meta["top"]), str(meta["bottom"]), int(meta["row"])
                    negs = (tuple(str(n) for n in json.loads(sample["neg.json"]))
                            if kind == "eval" else None)
                except (ValueError, KeyError, TypeError) as exc:
                    err = DataError(f"shard {sample.get('__url__')}: sample "
                                    f"{sample.get('__key__')!r}: bad metadata: {exc}")
                    if on_bad == "error":
                        raise err from None
                    log.warning("skipping sample: %s", err)
                    skipped += 1
                    continue
                self._images.add(top, sample["top.jpg"])
                self._images.add(bottom, sample["bottom.jpg"])
                rows.append((row, top, bottom, negs, _line(meta.get("source", ""), row)))
        if not rows:
            raise DataError(f"{self.root}: no readable {name} samples in the shards")
        if skipped:
            log.warning("%s [%s]: skipped %d unreadable samples", self.root, name, skipped)
        rows.sort(key=lambda r: r[0])
        return Split(name=name, source=f"{self.root} [{name}]",
                     tops=tuple(r[1] for r in rows), bottoms=tuple(r[2] for r in rows),
                     negatives=(tuple(r[3] for r in rows) if kind == "eval" else None),
                     lines=tuple(r[4] for r in rows))


def _line(source: str, row: int) -> int:
    tail = str(source).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else row + 2

