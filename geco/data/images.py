"""Image files `<img_dir>/<id><ext>`: strict decoding and a stat-only preflight.

Decoding is strict on purpose: PIL's LOAD_TRUNCATED_IMAGES would turn a half-downloaded
JPEG into a grey-padded picture, i.e. a silently wrong sample. We never set it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from geco.data.splits import Split
from geco.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ON_MISSING = ("error", "skip")
_SHOW = 5  # culprits listed in a preflight error


class ImageFolder:
    """One folder holding tops and bottoms alike, named by item id (as in the reference)."""

    def __init__(self, img_dir: str | Path, ext: str = ".jpg") -> None:
        self.img_dir = Path(img_dir)
        self.ext = ext

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.img_dir)!r}, ext={self.ext!r})"

    def path(self, item_id: str) -> Path:
        # Ids come from CSV files; one with a separator could read outside the folder.
        if not item_id or "/" in item_id or "\\" in item_id or item_id in (".", ".."):
            raise DataError(f"invalid item id {item_id!r} (empty or contains a path separator)")
        return self.img_dir / f"{item_id}{self.ext}"

    def load(self, item_id: str, *, context: str = "") -> Image.Image:
        """Fully decoded RGB image; any missing, corrupt or truncated file raises DataError."""
        path = self.path(item_id)
        try:
            with Image.open(path) as im:
                im.load()  # decode now, so a truncated file fails here and not in a transform
                return im.convert("RGB")
        except FileNotFoundError:
            reason = "file not found"
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # PIL reports bad data as OSError (incl. UnidentifiedImageError), SyntaxError or
            # ValueError depending on the codec.
            reason = f"{type(e).__name__}: {e}"
        where = f" (referenced by {context})" if context else ""
        raise DataError(f"cannot read image {path}{where}: {reason}")

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Ids without a file (stat only, no decoding), unique, in first-appearance order."""
        return [i for i in dict.fromkeys(ids) if not self.path(i).is_file()]


def preflight(split: Split, images: ImageFolder, *, on_missing: str = "error") -> tuple[Split, int]:
    """Check every id a row references has a file; fail listing culprits, or drop those rows.

    Returns the (possibly reduced) split and the number of rows dropped.
    """
    if on_missing not in ON_MISSING:
        raise ConfigError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
    negs = split.negatives or ((),) * len(split)
    row_ids = [(t, b, *n) for t, b, n in zip(split.tops, split.bottoms, negs, strict=True)]
    missing = set(images.missing(i for ids in row_ids for i in ids))
    if not missing:
        return split, 0
    bad = [r for r, ids in enumerate(row_ids) if any(i in missing for i in ids)]
    if on_missing == "error" or len(bad) == len(split):
        culprits = "; ".join(
            f"{split.where(r)} {next(i for i in row_ids[r] if i in missing)}" for r in bad[:_SHOW]
        )
        raise DataError(
            f"{len(bad)} of {len(split)} rows of split {split.name!r} reference missing images "
            f"({len(missing)} files missing under {images.img_dir}); first: {culprits}"
            + ("" if on_missing == "error" else " — every row is affected, nothing left to use")
        )
    keep = sorted(set(range(len(split))) - set(bad))
    log.warning(
        "split %r (%s): skipping %d of %d rows that reference %d missing images under %s",
        split.name,
        split.source,
        len(bad),
        len(split),
        len(missing),
        images.img_dir,
    )
    return split.subset(keep), len(bad)
