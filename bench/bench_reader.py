"""Shard reader throughput: pairs/s (decode + resize + ImageNet-normalise) per DataLoader worker.

By default draws a synthetic dataset at --store-size px into a temporary folder, writes it as
shards, and reads the train split with geco.data.stream.ShardStream at each --size, for 1 and
2 workers, with and without JPEG draft decoding; the baseline is geco.data.datasets.PairDataset
over the same images as loose files (the in-memory path training uses without shards).
`--url DIR_OR_S3_URL` reads existing shards instead (e.g. s3://bucket/prefix after
`geco data shard --out s3://...`; the endpoint comes from the usual AWS environment).

    .venv/bin/python bench/bench_reader.py
    .venv/bin/python bench/bench_reader.py --url s3://geco/shards/synthetic --size 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geco.data.datasets import PairDataset, collate_skip  # noqa: E402
from geco.data.images import ImageFolder  # noqa: E402
from geco.data.sampler import EpochBatchSampler  # noqa: E402
from geco.data.shards import ShardSpec, write_shards  # noqa: E402
from geco.data.splits import load_splits, resolve_layout  # noqa: E402
from geco.data.stream import ShardStream, load_manifest  # noqa: E402
from geco.data.synth import SynthSpec, generate  # noqa: E402
from geco.data.transforms import imagenet_transform  # noqa: E402


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _time(loader: DataLoader, repeats: int) -> float:
    """Best pairs/s over `repeats` epochs (a first, untimed pass warms caches and workers)."""
    best = 0.0
    for epoch in range(repeats + 1):
        ds = loader.dataset
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += len(batch["top"])
        rate = n / (time.perf_counter() - t0)
        if epoch:
            best = max(best, rate)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="existing shard root (folder or s3://); default: synthesise")
    p.add_argument("--pairs", type=int, default=2000, help="synthetic train pairs")
    p.add_argument("--store-size", type=int, default=128, help="synthetic image / shard size")
    p.add_argument("--size", type=int, nargs="+", default=[128, 64], help="decode sizes")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="geco-bench-") as tmp:
        images = split = None
        root = args.url
        if root is None:
            data = Path(tmp) / "data"
            generate(data, SynthSpec(n_train_tops=args.pairs // 2, pairs_per_top=2, n_valid=72,
                                     n_test=72, image_size=args.store_size))
            layout = resolve_layout(data)
            splits, images = load_splits(layout), ImageFolder(layout.img_dir)
            split = splits["train"]
            root = str(Path(tmp) / "shards")
            t0 = time.perf_counter()
            write_shards({"train": split}, images, Path(root),
                         ShardSpec(image_size=args.store_size), source="bench")
            print(f"wrote {len(split)} pairs as shards in {time.perf_counter() - t0:.1f} s")
        manifest = load_manifest(root)
        stored = manifest["spec"]["image_size"]
        print(f"{manifest['splits']['train']['samples']} pairs, stored at {stored} px, "
              f"{os.cpu_count()} CPUs, torch threads 1 per worker, best of {args.repeats}")
        print(f"{'reader':<28}{'size':>5}{'workers':>8}{'pairs/s':>10}{'per core':>10}")
        for size in args.size:
            tf = imagenet_transform(size)
            for workers in args.workers:
                rows = []
                if images is not None:
                    ds = PairDataset(split, images, tf)
                    loader = DataLoader(ds, batch_sampler=EpochBatchSampler(len(ds),
                                        args.batch_size), num_workers=workers,
                                        collate_fn=collate_skip, worker_init_fn=_one_thread,
                                        persistent_workers=True)
                    rows.append(("files (PairDataset)", loader))
                for draft in (False, True):
                    ds = ShardStream.from_manifest(root, "train", manifest, transform=tf,
                                                   batch_size=args.batch_size, draft=draft)
                    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                                        worker_init_fn=_one_thread, persistent_workers=True)
                    rows.append((f"shards, draft {'on' if draft else 'off'}", loader))
                for name, loader in rows:
                    rate = _time(loader, args.repeats)
                    print(f"{name:<28}{size:>5}{workers:>8}{rate:>10.0f}{rate / workers:>10.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
