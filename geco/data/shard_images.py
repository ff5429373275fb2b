"""A dataset read whole from shards into memory: the splits (ids from each sample's
meta.json) and every image's JPEG bytes by id. For models that look images up by id — the
baselines of `geco compare` — when the data live only in shards (a cluster reading S3).

Shards hold images already resized to the manifest's `image_size`, so a model that wants
another size resizes them again; the CSV file:line of every row is kept for error messages.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

from PIL import Image

from geco.data.splits import Split
from geco.errors import DataError

log = logging.getLogger("geco")


class ShardImages:
    """id -> JPEG bytes, with ImageFolder's `load(item_id, context=)` interface."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.data: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"ShardImages({self.root!r}, {len(self.data)} images)"

    def __len__(self) -> int:
        return len(self.data)

    def add(self, item_id: str, data: bytes) -> None:
        self.data.setdefault(item_id, data)

    def load(self, item_id: str, *, context: str = "") -> Image.Image:
        where = f" (referenced by {context})" if context else ""
        data = self.data.get(item_id)
        if data is None:
            raise DataError(f"image {item_id!r} is not in the shards at {self.root}{where}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {item_id!r} from the shards at {self.root}"
                            f"{where}: {type(e).__name__}: {e}") from None


def _line(source: str, row: int) -> int:
    tail = str(source).rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else row + 2


def read_shard_dataset(root: str, splits: tuple[str, ...], *, on_bad: str = "error",
                       manifest: dict[str, Any] | None = None
                       ) -> tuple[dict[str, Split], ShardImages]:
    """The named splits ("train", "valid", "test") of the shards at `root` (a folder or
    s3://bucket/prefix) as Splits in source-row order, and the images of every id they
    mention (eval splits: their catalogue shards too). Unreadable samples raise DataError,
    or are counted and left out with on_bad="skip"."""
    from geco.data.stream import ShardStream, load_manifest

    manifest = manifest if manifest is not None else load_manifest(root)
    images = ShardImages(root)
    out: dict[str, Split] = {}
    for name in splits:
        entry = manifest["splits"].get(name)
        if entry is None:
            raise DataError(f"{root}: the shards hold no split {name!r} "
                            f"(has: {', '.join(sorted(manifest['splits']))})")
        kind = entry.get("kind")
        rows: list[tuple[int, str, str, tuple[str, ...] | None, int]] = []
        skipped = 0
        parts = [name] + ([f"catalogue-{name}"] if kind == "eval" else [])
        for part in parts:
            stream = ShardStream.from_manifest(root, part, manifest, transform=lambda im: im,
                                               batch_size=2, on_bad=on_bad, shuffle=False)
            for sample in stream.raw_samples():
                if sample is None:
                    skipped += 1
                    continue
                try:
                    meta = json.loads(sample["meta.json"])
                    if part.startswith("catalogue-"):
                        images.add(str(meta["id"]), sample["bottom.jpg"])
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
                images.add(top, sample["top.jpg"])
                images.add(bottom, sample["bottom.jpg"])
                rows.append((row, top, bottom, negs, _line(meta.get("source", ""), row)))
        if not rows:
            raise DataError(f"{root}: no readable {name} samples in the shards")
        if skipped:
            log.warning("%s [%s]: skipped %d unreadable samples", root, name, skipped)
        rows.sort(key=lambda r: r[0])
        out[name] = Split(name=name, source=f"{root} [{name}]",
                          tops=tuple(r[1] for r in rows), bottoms=tuple(r[2] for r in rows),
                          negatives=(tuple(r[3] for r in rows) if kind == "eval" else None),
                          lines=tuple(r[4] for r in rows))
    log.info("read %s from the shards at %s: %d images",
             ", ".join(f"{k} ({len(v)} rows)" for k, v in out.items()), root, len(images))
    return out, images
