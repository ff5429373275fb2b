"""Stream WebDataset shards (local folders or s3://) into DDP ranks and DataLoader workers.

Every sample is seen exactly once per epoch over all ranks and workers, and every rank yields
the same number of batches, whatever the shard count:

1. The epoch's shard order is a permutation seeded by (seed, epoch) (manifest order for eval).
   Concatenated, the shards form one sequence of N samples (counts from the manifest).
2. Rank r takes the contiguous slice [N·r/W, N·(r+1)/W) of that sequence; shards are cut at
   sample granularity, so the slices differ by at most one sample.
3. Every rank yields the same number of batches `steps` (the rule of geco.data.sampler for
   training: global batches of batch_size × world, a short tail folded in; for eval
   ceil(n/batch_size)), its samples spread as evenly as possible over them.
4. Within a rank, batch i belongs to DataLoader worker i mod num_workers (the order in which
   the DataLoader collects them); each worker reads the contiguous sub-slice holding exactly
   the samples of its batches, shuffles them through a buffer seeded by
   (seed, epoch, rank, worker), and yields ready batches (use DataLoader(batch_size=None)).

A slot whose slice starts inside a shard reads and discards that shard's prefix; contiguous
slices keep that to one partial shard per slot, instead of every slot reading every shard.
The epoch lives in shared memory, so `set_epoch` reaches persistent workers too.

Bad input: an undecodable JPEG, an incomplete sample, a truncated or short shard give a
DataError naming the shard URL and the sample key, or in "skip" mode are left out and
counted in the batch's "skipped" (the batch count never changes); a missing shard gives a
DataError naming the URL (in "skip" mode its samples are counted as skipped).

Checksums: a shard read up to its last sample is read from its first byte to its last (a
slot that starts inside a shard reads and discards the prefix), so its bytes are hashed as
the tar reader consumes them and compared with the manifest's size and sha256 at the end —
no second pass. The plan deals every sample once, so in every full epoch exactly one slot
reads each shard to its end: every shard is checked once per epoch. (A slot that stops
before a shard's end would have to read on to check it; the slot holding the end does.)
A mismatch is a DataError naming the shard and the manifest; in "skip" mode a warning: the
shard's samples were already handed on, each checked as it decodes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from geco.data.images import ON_BAD, check_choice
from geco.data.jpeg import JPEG_MAGIC, JpegBatch
from geco.data.shards import MANIFEST, DigestReader, digest_problem, shard_checksum
from geco.errors import ConfigError, DataError

log = logging.getLogger("geco")

KINDS = ("train", "eval", "catalogue")
_S3_REGISTERED = False


# --- where the shards are ---------------------------------------------------------------------

def _join(root: str, name: str) -> str:
    root = str(root)
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return str(Path(root) / name)


def ensure_s3(urls: Sequence[str]) -> None:
    """Register the boto3-backed s3:// opener with WebDataset when any URL needs it."""
    global _S3_REGISTERED
    if _S3_REGISTERED or not any(str(u).startswith("s3://") for u in urls):
        return
    try:
        from geco.data.storage import register_webdataset_s3
    except ImportError:
        raise ConfigError("s3:// shard URLs need geco.data.storage (not installed)") from None
    register_webdataset_s3()
    _S3_REGISTERED = True


def load_manifest(root: str) -> dict[str, Any]:
    """manifest.json of a shard folder: a local path or s3://bucket/prefix."""
    root = str(root)
    url = _join(root, MANIFEST)
    if root.startswith("s3://"):
        try:
            from geco.data.storage import Storage
        except ImportError:
            raise ConfigError("s3:// shard roots need geco.data.storage (not installed)") from None
        raw = Storage(root).get_bytes(MANIFEST)
    else:
        try:
            raw = Path(url).read_bytes()
        except FileNotFoundError:
            raise DataError(f"shard manifest not found: {url}") from None
        except OSError as exc:
            raise DataError(f"cannot read shard manifest {url}: {exc}") from None
    try:
        manifest = json.loads(raw)
        manifest["splits"]  # noqa: B018 - checks the layout
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{url}: not a geco shard manifest ({exc})") from None
    return manifest


def shard_urls(root: str, split: str, manifest: dict[str, Any]) -> list[str]:
    """URLs of a split's shards ("train", "valid", "test", "catalogue-valid", ...)."""
    entry = manifest["splits"].get(split)
    if entry is None:
        raise DataError(f"shard manifest has no split {split!r} "
                        f"(has: {', '.join(sorted(manifest['splits']))})")
    return [_join(root, s["name"]) for s in entry["shards"]]


def shard_counts(split: str, manifest: dict[str, Any]) -> list[int]:
    return [int(s["n_samples"]) for s in manifest["splits"][split]["shards"]]


def shard_checksums(split: str, manifest: dict[str, Any]) -> list[tuple[int, str] | None]:
    """(bytes, sha256) of a split's shards, as the manifest records them (None: not recorded)."""
    return [shard_checksum(s) for s in manifest["splits"][split]["shards"]]


# --- the epoch plan (pure arithmetic, tested directly) -----------------------------------------

def steps_per_rank(n: int, batch_size: int, world_size: int, kind: str) -> int:
    """Batches every rank yields per epoch for n samples in total."""
    if kind == "train":
        if n < 2 * world_size:
            raise DataError(f"{n} samples cannot feed {world_size} ranks at >= 2 per batch")
        full, tail = divmod(n, batch_size * world_size)
        return full + (1 if tail >= 2 * world_size or full == 0 else 0)
    if n < world_size:
        raise DataError(f"{n} samples cannot give each of {world_size} ranks one")
    return max(1, math.ceil((n // world_size) / batch_size))


def plan_slot(counts: Sequence[int], *, rank: int, world_size: int, worker: int,
              num_workers: int, batch_size: int, kind: str, order: Sequence[int]
              ) -> tuple[list[tuple[int, int, int]], list[int]]:
    """(segments, batch sizes) of one (rank, worker) slot.

    segments: (shard index, first sample, end sample) in reading order; batch sizes: those of
    the rank's batches worker, worker + num_workers, ... — they sum to the segments' length.
    """
    n = sum(counts)
    steps = steps_per_rank(n, batch_size, world_size, kind)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    q, r = divmod(hi - lo, steps)
    sizes = [q + (1 if i < r else 0) for i in range(steps)]
    mine = sizes[worker::num_workers]
    start = lo + sum(sum(sizes[w::num_workers]) for w in range(worker))
    stop = start + sum(mine)
    segments = []
    offset = 0
    for shard in order:
        a, b = max(start, offset), min(stop, offset + counts[shard])
        if a < b:
            segments.append((shard, a - offset, b - offset))
        offset += counts[shard]
    return segments, mine


# --- decoding ---------------------------------------------------------------------------------

def _fast_normalise(transform: Any) -> tuple[int, Tensor, Tensor] | None:
    """(size, mean, std) when `transform` is exactly Resize((s, s), bicubic) -> ToTensor ->
    Normalize (geco.data.transforms' imagenet_transform and gan_transform). The stream then
    keeps uint8 images and converts and normalises a whole batch at once: the same
    element-wise operations as the per-image transform, so bit-identical, at a fraction of
    the per-image overhead."""
    from torchvision import transforms as T

    ts = getattr(transform, "transforms", None)
    if not (isinstance(transform, T.Compose) and len(ts) == 3
            and isinstance(ts[0], T.Resize) and isinstance(ts[1], T.ToTensor)
            and isinstance(ts[2], T.Normalize) and not ts[2].inplace
            and ts[0].interpolation == T.InterpolationMode.BICUBIC
            and isinstance(ts[0].size, list | tuple) and len(ts[0].size) == 2
            and ts[0].size[0] == ts[0].size[1]):
        return None
    mean = torch.as_tensor(ts[2].mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(ts[2].std, dtype=torch.float32).view(1, -1, 1, 1)
    return int(ts[0].size[0]), mean, std


def _resize_size(transform: Any) -> int | None:
    """The square size a torchvision Compose resizes to (for JPEG draft decoding), if any."""
    for t in getattr(transform, "transforms", ()):
        size = getattr(t, "size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, list | tuple) and len(size) == 2:
            return max(size)
    return None


def decode_jpeg(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Strictly decoded RGB image; with draft_size, libjpeg decodes at the smallest 1/2, 1/4
    or 1/8 scale that stays >= draft_size (much less work than decoding, then shrinking)."""
    with Image.open(io.BytesIO(data)) as im:
        if draft_size and im.format == "JPEG" and min(im.size) > draft_size:
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return im.convert("RGB")


# --- the stream -------------------------------------------------------------------------------

_END = object()

_NEED = {"train": ("top.jpg", "bottom.jpg", "meta.json"),  # the members a sample must have
         "eval": ("top.jpg", "bottom.jpg", "neg.json", "meta.json"),
         "catalogue": ("bottom.jpg", "meta.json")}


class _Bad:
    """A sample that could not be read (skip mode): occupies its place in the batch plan."""

    __slots__ = ("why",)

    def __init__(self, why: str):
        self.why = why


class ShardStream(IterableDataset):
    """Batches from shards, split over ranks and workers; see the module docstring.

    urls / n_samples / checksums: the shard URLs, their sample counts and (bytes, sha256)
    (`shard_urls`, `shard_counts`, `shard_checksums` from the manifest at manifest_url;
    `ShardStream.from_manifest` does all). Without checksums nothing is verified.
    transform: PIL image -> tensor (e.g. geco.data.transforms.imagenet_transform(size)).
    Use DataLoader(batch_size=None).
    """

    def __init__(self, urls: Sequence[str], *, kind: str, transform: Callable[[Image.Image], Tensor],
                 rank: int = 0, world_size: int = 1, seed: int = 0, batch_size: int,
                 n_samples: Sequence[int], on_bad: str = "error", shuffle: bool | None = None,
                 shuffle_buffer: int = 1000, draft: bool = True, fast: bool = True,
                 decode: str = "cpu", checksums: Sequence[tuple[int, str] | None] | None = None,
                 manifest_url: str = MANIFEST):
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")
        check_choice("on_bad", on_bad, ON_BAD)
        if len(urls) != len(n_samples):
            raise ValueError(f"{len(urls)} urls but {len(n_samples)} sample counts")
        checksums = list(checksums) if checksums is not None else [None] * len(urls)
        if len(checksums) != len(urls):
            raise ValueError(f"{len(urls)} urls but {len(checksums)} checksums")
        if not urls:
            raise DataError("no shards to read")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world size {world_size}")
        if batch_size < (2 if kind == "train" else 1):
            raise ConfigError(f"batch_size={batch_size} too small for {kind} batches")
        self.urls, self.counts = [str(u) for u in urls], [int(c) for c in n_samples]
        self.checksums, self.manifest_url = checksums, str(manifest_url)
        self.kind, self.transform, self.on_bad = kind, transform, on_bad
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        self.shuffle = (kind == "train") if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer
        self.draft_size = _resize_size(transform) if draft else None
        self.fast = _fast_normalise(transform) if fast else None
        check_choice("decode", decode, ("cpu", "device"))
        if decode == "device" and (kind != "train" or self.fast is None):
            raise ConfigError("data.decode=device applies to training batches with the "
                              "standard resize+normalise transform only")
        self.on_device = decode == "device"
        self.steps = steps_per_rank(sum(self.counts), batch_size, world_size, kind)
        # Shared memory: persistent DataLoader workers see set_epoch from the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @classmethod
    def from_manifest(cls, root: str, split: str, manifest: dict[str, Any] | None = None,
                      **kw: Any) -> ShardStream:
        manifest = manifest if manifest is not None else load_manifest(root)
        kind = manifest["splits"].get(split, {}).get("kind")
        kw.setdefault("kind", kind)
        return cls(shard_urls(root, split, manifest), n_samples=shard_counts(split, manifest),
                   checksums=shard_checksums(split, manifest),
                   manifest_url=_join(root, MANIFEST), **kw)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.steps

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.urls)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.urls), generator=g).tolist()

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        ensure_s3(self.urls)
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = int(self._epoch)
        segments, sizes = plan_slot(self.counts, rank=self.rank, world_size=self.world_size,
                                    worker=worker, num_workers=num_workers,
                                    batch_size=self.batch_size, kind=self.kind,
                                    order=self.epoch_order(epoch))
        items = self._read(segments)
        if self.shuffle:
            rng = random.Random(f"geco-stream/{self.seed}/{epoch}/{self.rank}/{worker}")
            items = _buffer_shuffle(items, self.shuffle_buffer, rng)
        for size in sizes:
            batch = [next(items, _END) for _ in range(size)]
            if _END in batch:  # cannot happen: _read yields exactly the planned samples
                raise DataError(f"shards {self.urls[:3]}...: fewer samples than planned")
            yield self._collate([self._decode(it) for it in batch])
        for _ in items:  # runs the reader to its end, which closes the last shard
            raise DataError("shards hold more samples than planned (manifest out of date?)")

    def raw_samples(self) -> Iterator[dict[str, Any] | None]:
        """Every sample of every shard once, in shard order, undecoded (the tar members as
        bytes plus __key__/__url__); None for a sample that could not be read in skip mode."""
        ensure_s3(self.urls)
        for sample in self._read([(i, 0, n) for i, n in enumerate(self.counts)]):
            yield None if isinstance(sample, _Bad) else sample

    # reading raw samples
    def _read(self, segments: list[tuple[int, int, int]]) -> Iterator[Any]:
        for shard, first, end in segments:
            # Only a segment reaching the shard's end reads all its bytes (see the docstring).
            expect = self.checksums[shard] if end == self.counts[shard] else None
            yield from self._read_shard(self.urls[shard], first, end, expect)

    def _read_shard(self, url: str, first: int, end: int, expect: tuple[int, str] | None
                    ) -> Iterator[Any]:
        from webdataset.gopen import gopen
        from webdataset.tariterators import group_by_keys, tar_file_expander

        try:
            stream = gopen(url)
        except Exception as exc:  # noqa: BLE001 - local OSError or the S3 opener's errors
            err = DataError(f"cannot open shard {url}: {type(exc).__name__}: {exc}")
            if self.on_bad == "error":
                raise err from None
            log.warning("skipping %d samples: %s", end - first, err)
            yield from (_Bad(str(err)) for _ in range(end - first))
            return
        pos, key, problem = 0, None, None
        reader = DigestReader(stream) if expect else stream
        try:
            samples = group_by_keys(tar_file_expander([{"url": url, "stream": reader}]))
            for sample in samples:
                if pos >= end:
                    break
                key = sample.get("__key__")
                if pos >= first:
                    yield self._check(sample, url)
                pos += 1
            else:
                if pos < end:
                    raise DataError(f"shard {url} ended after {pos} samples (after key {key!r}); "
                                    f"the manifest says at least {end}: truncated shard?")
            if expect:
                reader.drain()
                problem = digest_problem(expect, reader)
        except DataError as exc:
            err = exc
        except Exception as exc:  # noqa: BLE001 - tarfile.ReadError, EOFError, OSError, ...
            err = DataError(f"shard {url}: unreadable after sample key {key!r} "
                            f"(truncated or corrupt tar?): {type(exc).__name__}: "
                            f"{exc.args[0] if exc.args else exc}")
        else:
            if problem:
                self._mismatch(url, problem)
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if self.on_bad == "error":
            raise err
        lost = end - max(pos, first)
        log.warning("skipping %d samples: %s", lost, err)
        yield from (_Bad(str(err)) for _ in range(lost))

    def _mismatch(self, url: str, problem: str) -> None:
        """A shard that read cleanly but differs from the manifest: DataError, or a warning in
        skip mode (its samples were handed on already, each checked as it decoded)."""
        root = self.manifest_url.rpartition("/")[0] or "."
        msg = (f"shard {url} does not match {self.manifest_url}: {problem} — its bytes changed "
               f"after `geco data shard` wrote it: re-run `geco data shard` (`geco data verify "
               f"{root}` lists every bad shard)")
        if self.on_bad != "error":
            log.warning("%s; on_bad=skip: its samples are used as read", msg)
            return
        raise DataError(msg)

    def _check(self, sample: dict[str, Any], url: str) -> Any:
        need = _NEED[self.kind]
        missing = [k for k in need if k not in sample]
        if missing:
            err = DataError(f"shard {url}: sample {sample.get('__key__')!r} lacks "
                            f"{', '.join(missing)} (truncated shard or wrong kind {self.kind!r}?)")
            if self.on_bad == "error":
                raise err
            log.warning("skipping sample: %s", err)
            return _Bad(str(err))
        return sample

    # decoding and batching
    def _img(self, sample: dict[str, Any], field: str) -> Any:
        if self.on_device and sample[field][:2] == JPEG_MAGIC:
            # Left undecoded for geco.data.jpeg (bytearray: a writable buffer to wrap).
            name = f"shard {sample['__url__']}: sample {sample['__key__']!r}: {field}"
            return torch.frombuffer(bytearray(sample[field]), dtype=torch.uint8), name
        try:
            im = decode_jpeg(sample[field], self.draft_size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"shard {sample['__url__']}: sample {sample['__key__']!r}: cannot "
                            f"decode {field}: {type(exc).__name__}: {exc}") from None
        if self.fast is None:
            return self.transform(im)
        size = self.fast[0]
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())  # HxWxC, see _stack
        return (x, "") if self.on_device else x

    def _stack(self, images: list[Any]) -> Any:
        if self.on_device:
            size, mean, std = self.fast
            return JpegBatch([d for d, _ in images], [n for _, n in images], size,
                             tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()),
                             self.on_bad)
        x = torch.stack(images)
        if self.fast is None:
            return x
        _, mean, std = self.fast
        # ToTensor then Normalize, element-wise as torchvision does them, on the whole batch.
        x = x.permute(0, 3, 1, 2).contiguous()
        return x.to(torch.float32).div_(255).sub_(mean).div_(std)

    def _decode(self, sample: Any) -> dict[str, Any] | None:
        if isinstance(sample, _Bad):
            return None
        try:
            meta = json.loads(sample["meta.json"])
            if self.kind == "catalogue":
                return {"image": self._img(sample, "bottom.jpg"), "id": meta["id"]}
            out = {"top": self._img(sample, "top.jpg"), "bottom": self._img(sample, "bottom.jpg"),
                   "index": int(meta["row"])}
            if self.kind == "eval":
                out["negatives"] = [str(n) for n in json.loads(sample["neg.json"])]
                out["top_id"], out["bottom_id"] = str(meta["top"]), str(meta["bottom"])
            return out
        except (ValueError, KeyError, TypeError) as exc:
            err = DataError(f"shard {sample['__url__']}: sample {sample['__key__']!r}: bad "
                            f"metadata: {type(exc).__name__}: {exc}")
        except DataError as exc:
            err = exc
        if self.on_bad == "error":
            raise err
        log.warning("skipping sample: %s", err)
        return None

    def _collate(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        """Like geco.data.datasets.collate_skip: None when every item was bad."""
        good = [it for it in items if it is not None]
        if not good:
            return None
        out: dict[str, Any] = {"skipped": len(items) - len(good)}
        if self.kind == "catalogue":
            out["image"] = self._stack([g["image"] for g in good])
            out["id"] = [g["id"] for g in good]
            return out
        out["top"] = self._stack([g["top"] for g in good])
        out["bottom"] = self._stack([g["bottom"] for g in good])
        out["index"] = torch.tensor([g["index"] for g in good], dtype=torch.int64)
        if self.kind == "eval":
            for key in ("negatives", "top_id", "bottom_id"):
                out[key] = [g[key] for g in good]
        return out


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buf: list[Any] = []
    for it in items:
        if len(buf) < size:
            buf.append(it)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = it
    rng.shuffle(buf)
    yield from buf
