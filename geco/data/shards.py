"""WebDataset shards: write a dataset's splits as deterministic tar shards plus manifest.json.

Layout of an output folder (local, or uploaded as is to s3://bucket/prefix):

    train-000000.tar ...           one sample per positive pair: top.jpg, bottom.jpg, meta.json
    valid-000000.tar, test-...     one sample per eval row: top.jpg, bottom.jpg, neg.json, meta.json
    catalogue-valid-000000.tar ... every bottom a split mentions (positives and negatives), once:
                                   bottom.jpg, meta.json — evaluation embeds each bottom once
    manifest.json                  source, ShardSpec, per split: kind, samples, skipped, shards
                                   (name, bytes, sha256, n_samples); written last

Sample keys are zero-padded positions (row index, or catalogue position), never item ids: ids
may contain dots, which WebDataset would read as extension separators. Ids live in meta.json.

Same input gives byte-identical shards: fixed member order, fixed tar header fields (mtime 0,
uid/gid 0, no user/group names, mode 0644), JPEG at a fixed quality without `optimize`, JSON
with sorted keys. Each shard is written under a temporary name and renamed when complete, so
an interrupted run never leaves a half-written shard under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from geco.data.images import ON_BAD, ImageFolder, check_choice
from geco.data.splits import Split
from geco.errors import ConfigError, DataError

log = logging.getLogger("geco")

MANIFEST = "manifest.json"
FORMAT = "geco-shards/1"
KEY_DIGITS = 9  # zero-padded sample keys: up to a billion rows per split
_OUR_SHARD = re.compile(r"^(train|valid|test|catalogue-(valid|test|train))-\d{6}\.tar$")


@dataclass
class ShardSpec:
    image_size: int = 128  # square, bicubic (as geco.data.transforms)
    jpeg_quality: int = 90
    samples_per_shard: int = 1000  # train / eval rows per shard
    catalogue_per_shard: int = 2000  # catalogue items per shard

    def validate(self) -> ShardSpec:
        if self.image_size < 8:
            raise ConfigError(f"shard image_size={self.image_size}: must be >= 8")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"shard jpeg_quality={self.jpeg_quality}: must be in 1..100")
        for key in ("samples_per_shard", "catalogue_per_shard"):
            if getattr(self, key) < 1:
                raise ConfigError(f"shard {key}={getattr(self, key)}: must be >= 1")
        return self


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")


class _Encoder:
    """Load (strictly), resize and re-encode images; a small LRU avoids re-encoding a top that
    several consecutive rows share."""

    def __init__(self, images: ImageFolder, spec: ShardSpec, cache: int = 4096):
        self.images, self.spec, self.cache_size = images, spec, cache
        self.cache: OrderedDict[str, bytes] = OrderedDict()

    def __call__(self, item_id: str, context: str) -> bytes:
        if item_id in self.cache:
            self.cache.move_to_end(item_id)
            return self.cache[item_id]
        im = self.images.load(item_id, context=context)  # DataError naming image and CSV:line
        size = (self.spec.image_size, self.spec.image_size)
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=self.spec.jpeg_quality, optimize=False)
        data = buf.getvalue()
        self.cache[item_id] = data
        if len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return data


class _ShardWriter:
    """Sequential shards `<prefix>-%06d.tar` with deterministic tar headers."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int):
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._n = 0

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, io.BytesIO(data))
        self._n += 1
        if self._n >= self.per_shard:
            self._close()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        os.close(fd)
        self._tmp = Path(tmp)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._n = 0

    def _close(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        digest = hashlib.sha256()
        with open(self._tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"name": name, "bytes": (self.out_dir / name).stat().st_size,
                            "sha256": digest.hexdigest(), "n_samples": self._n})
        log.info("wrote %s (%d samples)", name, self._n)
        self._tar, self._tmp, self._n = None, None, 0

    def finish(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


def _bad(on_bad_image: str, exc: DataError, what: str) -> None:
    if on_bad_image == "error":
        raise exc
    log.warning("skipping %s: %s", what, exc)


def _key(i: int) -> str:
    return f"{i:0{KEY_DIGITS}d}"


def _train_samples(split: Split, enc: _Encoder, on_bad: str, counts: dict) -> Iterator:
    for row in range(len(split)):
        where = split.where(row)
        try:
            top, bottom = enc(split.tops[row], where), enc(split.bottoms[row], where)
        except DataError as exc:
            _bad(on_bad, exc, f"{split.name} row {where}")
            counts["skipped"] += 1
            continue
        meta = {"top": split.tops[row], "bottom": split.bottoms[row], "split": split.name,
                "row": row, "source": where}
        yield _key(row), [("top.jpg", top), ("bottom.jpg", bottom), ("meta.json", _json(meta))]


def _catalogue(split: Split) -> list[tuple[str, int]]:
    """Every bottom the split mentions (positive, then negatives, row by row), once, with the
    first row that mentions it — the same order geco.evaluate embeds them in."""
    first: dict[str, int] = {}
    negs = split.negatives or ((),) * len(split)
    for row, (b, ns) in enumerate(zip(split.bottoms, negs, strict=True)):
        for item in (b, *ns):
            first.setdefault(item, row)
    return list(first.items())


def write_shards(splits: dict[str, Split], images: ImageFolder, out_dir: Path, spec: ShardSpec,
                 *, source: str, on_bad_image: str = "error") -> dict[str, Any]:
    """Write every split's shards and manifest.json into out_dir; returns the manifest.

    `source` names the dataset (e.g. its root and kind) and is recorded in the manifest. An
    unreadable image raises DataError naming the image and the CSV file:line, or with
    on_bad_image="skip" leaves the sample out and counts it (manifest: "skipped" per split;
    an eval row is left out when its top, bottom or any negative is unreadable).
    """
    spec.validate()
    check_choice("on_bad_image", on_bad_image, ON_BAD)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enc = _Encoder(images, spec)
    entries: dict[str, dict[str, Any]] = {}

    for name in sorted(splits, key=lambda s: ("train", "valid", "test").index(s)
                       if s in ("train", "valid", "test") else 9):
        split = splits[name]
        counts = {"skipped": 0}
        if split.negatives is None:
            w = _ShardWriter(out_dir, name, spec.samples_per_shard)
            try:
                for key, members in _train_samples(split, enc, on_bad_image, counts):
                    w.write(key, members)
                shards = w.finish()
            finally:
                w.abort()
            entries[name] = _entry("train", shards, counts["skipped"])
            continue

        # Eval split: catalogue first, so rows that mention an unreadable bottom can be dropped.
        cat = _ShardWriter(out_dir, f"catalogue-{name}", spec.catalogue_per_shard)
        bad_ids: set[str] = set()
        try:
            for pos, (item, row) in enumerate(_catalogue(split)):
                try:
                    data = enc(item, split.where(row))
                except DataError as exc:
                    _bad(on_bad_image, exc, f"catalogue item {item!r}")
                    bad_ids.add(item)
                    continue
                meta = {"id": item, "split": name, "source": split.where(row)}
                cat.write(_key(pos), [("bottom.jpg", data), ("meta.json", _json(meta))])
            cat_shards = cat.finish()
        finally:
            cat.abort()
        entries[f"catalogue-{name}"] = _entry("catalogue", cat_shards, len(bad_ids))

        w = _ShardWriter(out_dir, name, spec.samples_per_shard)
        try:
            for row in range(len(split)):
                where = split.where(row)
                negs = list(split.negatives[row])
                try:
                    for item in (split.bottoms[row], *negs):
                        if item in bad_ids:
                            raise DataError(f"{where}: bottom {item!r} is unreadable")
                    top, bottom = enc(split.tops[row], where), enc(split.bottoms[row], where)
                except DataError as exc:
                    _bad(on_bad_image, exc, f"{name} row {where}")
                    counts["skipped"] += 1
                    continue
                meta = {"top": split.tops[row], "bottom": split.bottoms[row], "split": name,
                        "row": row, "source": where}
                w.write(_key(row), [("top.jpg", top), ("bottom.jpg", bottom),
                                    ("neg.json", _json(negs)), ("meta.json", _json(meta))])
            shards = w.finish()
        finally:
            w.abort()
        entries[name] = _entry("eval", shards, counts["skipped"])

    manifest = {"format": FORMAT, "source": source, "spec": asdict(spec), "splits": entries}
    _remove_stale(out_dir, {s["name"] for e in entries.values() for s in e["shards"]})
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_bytes(json.dumps(manifest, sort_keys=True, indent=1).encode() + b"\n")
    os.replace(tmp, out_dir / MANIFEST)
    return manifest


def _entry(kind: str, shards: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
    return {"kind": kind, "samples": sum(s["n_samples"] for s in shards),
            "n_shards": len(shards), "skipped": skipped, "shards": shards}


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Shards of an earlier, larger write into the same folder would otherwise linger (and be
    uploaded by a folder sync); only our own shard names are touched."""
    for p in out_dir.iterdir():
        if p.is_file() and _OUR_SHARD.match(p.name) and p.name not in keep:
            log.info("removing stale shard %s", p)
            p.unlink()


def verify_shards(out_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Names of shards whose size or sha256 differ from the manifest (empty list = all good)."""
    bad = []
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            p = Path(out_dir) / s["name"]
            if not p.is_file() or p.stat().st_size != s["bytes"] or \
                    hashlib.sha256(p.read_bytes()).hexdigest() != s["sha256"]:
                bad.append(s["name"])
    return bad


# --- command line: `geco data shard --out DIR_OR_S3_URL [--config FILE] [overrides]` ---------

def add_shard_command(subparsers) -> None:
    """Register `shard` under the `geco data` subcommands."""
    p = subparsers.add_parser("shard", help="write WebDataset shards + manifest.json")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    d = ShardSpec()
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help=f"stored image size in px (default {d.image_size})")
    p.add_argument("--quality", type=int, default=d.jpeg_quality, help="JPEG quality")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--catalogue-per-shard", type=int, default=d.catalogue_per_shard)
    p.add_argument("--work-dir", help="local staging folder for an s3:// --out "
                   "(default: a temporary folder, removed afterwards)")
    p.add_argument("--config", help="YAML config (see configs/); its data section is read")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.root=/data/FashionVC")


def cmd_shard(args, cfg) -> dict[str, Any]:
    """Read cfg.data as training does, write the shards, upload them if --out is s3://."""
    import dataclasses

    from geco.data.source import open_data

    spec = ShardSpec(image_size=args.image_size, jpeg_quality=args.quality,
                     samples_per_shard=args.samples_per_shard,
                     catalogue_per_shard=args.catalogue_per_shard).validate()
    # The dataset folder, whatever data.shards says: shards are written from it.
    splits, images = open_data(dataclasses.replace(cfg.data, shards="")).splits(
        ("train", "valid", "test"))
    source = f"{cfg.data.root} (kind {cfg.data.kind})"
    out = str(args.out)
    if not out.startswith("s3://"):
        manifest = write_shards(splits, images, Path(out), spec, source=source,
                                on_bad_image=cfg.data.on_bad_image)
        print(json.dumps(_summary(manifest, out), indent=2))
        return manifest
    try:
        from geco.data.storage import Storage
    except ImportError:
        raise ConfigError("s3:// output needs geco.data.storage, which is not installed") from None
    with tempfile.TemporaryDirectory(prefix="geco-shards-") as tmp:
        stage = Path(args.work_dir) if args.work_dir else Path(tmp) / "shards"
        manifest = write_shards(splits, images, stage, spec, source=source,
                                on_bad_image=cfg.data.on_bad_image)
        # Shards first, manifest last: a reader never finds a manifest naming absent shards.
        local_manifest = stage / "manifest.json"
        held = Path(tmp) / "manifest.json.hold"
        local_manifest.replace(held)
        storage = Storage(out)
        upload = storage.sync_dir(stage)
        upload["transferred" if storage.put_file(held, "manifest.json") else "skipped"] += 1
        held.replace(local_manifest)
    print(json.dumps({**_summary(manifest, out), "upload": upload}, indent=2))
    return manifest


def _summary(manifest: dict[str, Any], out: str) -> dict[str, Any]:
    return {"out": out, "splits": {k: {f: v[f] for f in ("samples", "n_shards", "skipped")}
                                   for k, v in manifest["splits"].items()}}
