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

Same input gives byte-identical shards: webdataset's `TarWriter` with fixed tar header fields
(mtime 0, uid/gid 0, no user/group names, mode 0644) and a fixed member order (samples in row
order, a sample's members sorted by extension), JPEG at a fixed quality without `optimize`,
JSON with sorted keys. Each shard is written under a temporary name and renamed when complete,
so an interrupted run never leaves a half-written shard under a final name.

Integrity: readers hash a shard's bytes as they stream them (`DigestReader`) and compare size
and sha256 with the manifest (geco.data.stream); `geco data verify URL` checks every shard of
a folder or prefix. Writers take a lease (`ShardLease`: a lock object in the output) so two
`geco data shard` runs never write one prefix at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from geco.data.images import ON_BAD, ImageFolder, check_choice
from geco.data.splits import Split
from geco.data.storage import sha256_file
from geco.errors import ConfigError, DataError, GecoError

log = logging.getLogger("geco")

MANIFEST = "manifest.json"
FORMAT = "geco-shards/1"
KEY_DIGITS = 9  # zero-padded sample keys: up to a billion rows per split
_OUR_SHARD = re.compile(r"^(train|valid|test|catalogue-(valid|test|train))-\d{6}\.tar$")
LOCK = "_geco_shard.lock"  # the writers' lease object, next to the manifest
LEASE_TTL = 15 * 60.0  # seconds; renewed every third of it while the writer lives


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


# --- checksums --------------------------------------------------------------------------------

class DigestReader:
    """A read-only file wrapper that hashes every byte read through it: wrapped around the
    stream a tar reader consumes, it checks a shard in the one pass that reads it."""

    def __init__(self, raw: Any):
        self.raw, self.size, self._sha = raw, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self._sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) what is left: a tar reader stops at the end-of-archive marker,
        before the zero padding that completes the last record."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return f"DigestReader({self.raw!r})"


def shard_checksum(entry: dict[str, Any]) -> tuple[int, str] | None:
    """(bytes, sha256) of a manifest shard entry, or None if it records none."""
    if "bytes" not in entry or not entry.get("sha256"):
        return None
    return int(entry["bytes"]), str(entry["sha256"])


def digest_problem(expect: tuple[int, str], reader: DigestReader) -> str | None:
    """How a fully read shard differs from its manifest entry, or None if it matches."""
    size, sha = expect
    got = reader.hexdigest()
    problems = []
    if reader.size != size:
        problems.append(f"{reader.size} bytes, the manifest says {size}")
    if got != sha:
        problems.append(f"sha256 {got[:12]}…, the manifest says {sha[:12]}…")
    return "; ".join(problems) or None


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
    """Sequential shards `<prefix>-%06d.tar` written by webdataset's TarWriter, each under a
    temporary name until complete; `shards` records every finished one's bytes and sha256."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int):
        self.out_dir, self.prefix, self.per_shard = out_dir, prefix, per_shard
        self.shards: list[dict[str, Any]] = []
        self._tar: Any = None  # a webdataset TarWriter while a shard is open
        self._file: Any = None
        self._tmp: Path | None = None
        self._n = 0

    def write(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._tar.write({"__key__": key, **dict(members)})
        self._n += 1
        if self._n >= self.per_shard:
            self._close()

    def _open(self) -> None:
        from webdataset.writer import TarWriter  # imported here: webdataset loads torch

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        self._tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        # Deterministic headers: mtime 0, uid/gid 0 with no names, mode 0644; encoder off, so
        # members are the bytes given. The tar is in tarfile's default pax format (webdataset
        # 1.0.2 drops its `format` argument), plain ustar headers as long as mtime is an int:
        # a float one would add a pax record. TarWriter orders a sample's members by extension.
        self._tar = TarWriter(self._file, user="", group="", mode=0o644, mtime=0,
                              encoder=False)
        self._n = 0

    def _close(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()  # end-of-archive marker and padding; our file stays open
        self._file.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        os.chmod(self._tmp, 0o644)
        size, sha = self._tmp.stat().st_size, sha256_file(self._tmp)
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"name": name, "bytes": size, "sha256": sha, "n_samples": self._n})
        log.info("wrote %s (%d samples)", name, self._n)
        self._tar, self._file, self._tmp, self._n = None, None, None, 0

    def finish(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop an unfinished shard (after an error): only its temporary file existed."""
        if self._tar is not None:
            # Closed now, or tarfile's finaliser would later flush into the closed file.
            with contextlib.suppress(OSError, ValueError):  # e.g. the disk is full
                self._tar.close()
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar, self._file, self._tmp = None, None, None


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
                 *, source: str, on_bad_image: str = "error",
                 before_manifest: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write every split's shards and manifest.json into out_dir; returns the manifest.

    `source` names the dataset (e.g. its root and kind) and is recorded in the manifest. An
    unreadable image raises DataError naming the image and the CSV file:line, or with
    on_bad_image="skip" leaves the sample out and counts it (manifest: "skipped" per split;
    an eval row is left out when its top, bottom or any negative is unreadable).
    before_manifest runs just before the manifest is written (a lease check: the manifest
    publishes the shards, so it must not be written once another writer took over).
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
    if before_manifest is not None:
        before_manifest()
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


def verify(root: str, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read every shard a manifest names once (a folder or s3://bucket/prefix) and compare
    its size and sha256 with the manifest: a JSON-able report, "ok" true when all match.

    Per split: "ok" (how many shards match), "bad" ([{name, reason}]) and "missing" (names).
    "manifest_sha256" is computed as training computes its geco.manifest_sha256 tag, so a
    run's tag can be matched with the manifest verified here.
    """
    from geco.data.storage import Storage
    from geco.data.stream import load_manifest

    root = str(root)
    manifest = manifest if manifest is not None else load_manifest(root)
    storage = Storage(root)
    present = set(storage.list())  # one listing instead of a probe per shard
    splits: dict[str, Any] = {}
    for split, entry in manifest["splits"].items():
        report: dict[str, Any] = {"ok": 0, "bad": [], "missing": []}
        for s in entry["shards"]:
            if s["name"] not in present:
                report["missing"].append(s["name"])
                continue
            reason = _check_stored(storage, s)
            if reason:
                report["bad"].append({"name": s["name"], "reason": reason})
            else:
                report["ok"] += 1
        splits[split] = report
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    ok = not any(r["bad"] or r["missing"] for r in splits.values())
    return {"root": root, "manifest": storage.url(MANIFEST), "manifest_sha256": digest,
            "ok": ok, "splits": splits}


def _check_stored(storage: Any, entry: dict[str, Any]) -> str | None:
    """Why a stored shard does not match its manifest entry, or None."""
    from geco.data.storage import StorageError

    expect = shard_checksum(entry)
    if expect is None:
        return "the manifest records no sha256 for it"
    try:
        reader = DigestReader(storage.open_stream(entry["name"]))
        try:
            reader.drain()
        finally:
            reader.close()
    except (OSError, StorageError) as exc:
        return f"unreadable: {exc}"
    except Exception as exc:  # noqa: BLE001 - a connection dropped mid-object, ...
        return f"unreadable: {type(exc).__name__}: {exc}"
    return digest_problem(expect, reader)


def verify_shards(out_dir: Path | str, manifest: dict[str, Any]) -> list[str]:
    """Names of shards that are missing or whose size or sha256 differ from the manifest
    (empty list = all good); see `verify`."""
    report = verify(str(out_dir), manifest)
    return [*(b["name"] for r in report["splits"].values() for b in r["bad"]),
            *(n for r in report["splits"].values() for n in r["missing"])]


# --- the writers' lease -----------------------------------------------------------------------

def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


class ShardLease:
    """One `geco data shard` per output at a time: a lock object LOCK in the output folder or
    prefix, JSON {owner: host:pid:nonce, created, expires}.

    `acquire` first checks the bucket (so bad credentials or a missing bucket fail in
    seconds, before any rendering), then creates the lock only if it is absent (local:
    O_EXCL; S3: a conditional put) — creating it is the write check too. Someone else's
    unexpired lease is refused naming its owner and expiry; an expired one (a killed writer)
    is taken over, as is any one with break_stale. A daemon thread renews the lease every
    ttl/3; `check` (before the manifest goes out) and `release` only act on our own lease.
    Expiry compares wall clocks of different machines: keep ttl well above their skew.
    """

    def __init__(self, storage: Any, *, ttl: float = LEASE_TTL, break_stale: bool = False):
        self.storage, self.ttl, self.break_stale = storage, float(ttl), break_stale
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.url = storage.url(LOCK)
        self.created = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    def __enter__(self) -> ShardLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _body(self) -> bytes:
        return _json({"owner": self.owner, "created": _iso(self.created),
                      "expires": _iso(time.time() + self.ttl)})

    def _read(self) -> dict[str, Any] | None:
        """The lease as stored, or None if there is none."""
        from geco.data.storage import StorageError

        try:
            raw = self.storage.get_bytes(LOCK)
        except StorageError:
            if not self.storage.exists(LOCK):
                return None
            raise
        try:
            held = json.loads(raw)
            return held if isinstance(held, dict) else {}
        except ValueError:
            return {}  # not ours to judge: refused unless broken

    def _mine(self, held: dict[str, Any] | None) -> bool:
        return held is not None and held.get("owner") == self.owner

    def _describe(self, held: dict[str, Any] | None) -> str:
        if held is None:
            return "nobody (the lease was deleted)"
        return (f"{held.get('owner', 'an unknown writer')} "
                f"(lease until {held.get('expires', 'unknown')})")

    def acquire(self) -> None:
        from geco.data.storage import StorageError

        try:
            self.storage.check_bucket()
            for _ in range(3):
                if self.storage.put_new(self._body(), LOCK):
                    break
                held = self._read()
                if held is None:
                    continue  # released between our try and our look
                if not (self.break_stale or _expired(held)):
                    raise DataError(
                        f"{self.storage.root} is being written by {self._describe(held)}: "
                        f"wait until that `geco data shard` ends or its lease expires, or "
                        f"pass --break-lease if it is gone (lease object {self.url})")
                log.warning("taking over the lease %s of %s", self.url, self._describe(held))
                self.storage.delete(LOCK)
            held = self._read()  # servers without conditional puts: did a racer win?
        except StorageError as exc:
            raise StorageError(f"cannot write shards to {self.storage.root}: {exc}") from exc
        if not self._mine(held):
            raise DataError(f"{self.storage.root}: another writer took the lease "
                            f"{self.url} at the same time: {self._describe(held)}")
        self._held = True
        self._thread = threading.Thread(target=self._renew, name="geco-shard-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._mine(self._read()):
                    return  # taken over: `check` reports it
                self.storage.put_bytes(self._body(), LOCK)
            except Exception as exc:  # noqa: BLE001 - a blip: the next round retries
                log.warning("could not renew the lease %s: %s", self.url, exc)

    def check(self) -> None:
        """DataError unless the lease is still ours (call before publishing the manifest)."""
        held = self._read()
        if not self._mine(held):
            raise DataError(f"{self.storage.root}: lost the writing lease {self.url} to "
                            f"{self._describe(held)} (--break-lease?), so this run does not "
                            "write the manifest; once that writer is done, re-run `geco data "
                            "shard` (or `geco data verify`) for this output")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; never masks an error."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._held:
            return
        self._held = False
        try:
            if self._mine(self._read()):
                self.storage.delete(LOCK)
        except GecoError as exc:
            log.warning("could not release the lease %s (it expires by itself): %s",
                        self.url, exc)


def _expired(held: dict[str, Any]) -> bool:
    try:
        return datetime.fromisoformat(str(held["expires"])).timestamp() < time.time()
    except (KeyError, ValueError):
        return False  # an unreadable expiry: refused unless broken


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
    p.add_argument("--break-lease", action="store_true",
                   help=f"take over the output's writing lease ({LOCK}) even if it has not "
                   "expired: only when its owner is known to be gone")
    p.add_argument("--config", help="YAML config (see configs/); its data section is read")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.root=/data/FashionVC")


def cmd_shard(args, cfg) -> dict[str, Any]:
    """Read cfg.data as training does, write the shards, upload them if --out is s3://.

    The output's lease is taken first: bad credentials, a missing bucket or another writer
    fail before the dataset is even read, and the lease is released however this ends."""
    import dataclasses

    from geco.data.source import open_data
    from geco.data.storage import Storage

    spec = ShardSpec(image_size=args.image_size, jpeg_quality=args.quality,
                     samples_per_shard=args.samples_per_shard,
                     catalogue_per_shard=args.catalogue_per_shard).validate()
    out = str(args.out)
    storage = Storage(out)
    with ShardLease(storage, break_stale=getattr(args, "break_lease", False)) as lease:
        # The dataset folder, whatever data.shards says: shards are written from it.
        splits, images = open_data(dataclasses.replace(cfg.data, shards="")).splits(
            ("train", "valid", "test"))
        source = f"{cfg.data.root} (kind {cfg.data.kind})"
        if not storage.is_s3:
            manifest = write_shards(splits, images, storage.local_root, spec, source=source,
                                    on_bad_image=cfg.data.on_bad_image,
                                    before_manifest=lease.check)
            print(json.dumps(_summary(manifest, out), indent=2))
            return manifest
        with tempfile.TemporaryDirectory(prefix="geco-shards-") as tmp:
            stage = Path(args.work_dir) if args.work_dir else Path(tmp) / "shards"
            manifest = write_shards(splits, images, stage, spec, source=source,
                                    on_bad_image=cfg.data.on_bad_image)
            # Shards first, manifest last: a reader never finds a manifest naming absent shards.
            local_manifest = stage / "manifest.json"
            held = Path(tmp) / "manifest.json.hold"
            local_manifest.replace(held)
            upload = storage.sync_dir(stage)
            lease.check()
            upload["transferred" if storage.put_file(held, "manifest.json") else "skipped"] += 1
            held.replace(local_manifest)
    print(json.dumps({**_summary(manifest, out), "upload": upload}, indent=2))
    return manifest


# --- command line: `geco data verify URL` -----------------------------------------------------

def add_verify_command(subparsers) -> None:
    """Register `verify` under the `geco data` subcommands."""
    p = subparsers.add_parser("verify", help="check every shard's size and sha256 against "
                              "manifest.json (a folder or s3://bucket/prefix)")
    p.add_argument("url", help="shard folder or s3://bucket/prefix holding manifest.json")
    p.set_defaults(config=None, overrides=[])  # the CLI loads a config for every command


def cmd_verify(args) -> dict[str, Any]:
    """Print the report of `verify`; DataError (exit 2) naming the bad shards unless all match."""
    report = verify(args.url)
    print(json.dumps(report, indent=2, sort_keys=True))
    bad = [f"{b['name']} ({b['reason']})" for r in report["splits"].values() for b in r["bad"]]
    bad += [f"{n} (missing)" for r in report["splits"].values() for n in r["missing"]]
    if bad:
        total = sum(r["ok"] for r in report["splits"].values()) + len(bad)
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"{args.url}: {len(bad)} of {total} shards do not match "
                        f"{report['manifest']}: {shown}; re-run `geco data shard` for it")
    return report


def _summary(manifest: dict[str, Any], out: str) -> dict[str, Any]:
    return {"out": out, "splits": {k: {f: v[f] for f in ("samples", "n_shards", "skipped")}
                                   for k, v in manifest["splits"].items()}}
