"""Images by item id: files `<img_dir>/<id><ext>` (`ImageFolder`) or JPEG bytes read from
shards into memory (`ShardImages`), both strictly decoded, plus a stat-only preflight.

Decoding is strict on purpose: PIL's LOAD_TRUNCATED_IMAGES would turn a half-downloaded
JPEG into a grey-padded picture, i.e. a silently wrong sample. We never set it.
"""

from __future__ import annotations

import io
import logging
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

from PIL import Image

from geco.data.splits import Split
from geco.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# What to do with a bad sample (missing, unreadable, malformed): stop naming it, or leave it
# out and count it. The one list of these choices, for config fields and readers alike.
OnBad = Literal["error", "skip"]
ON_BAD: tuple[str, ...] = typing.get_args(OnBad)
_SHOW = 5  # culprits listed in a preflight error
# PIL reports bad data as OSError (incl. UnidentifiedImageError), SyntaxError or ValueError
# depending on the codec.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")


class ImageSource(Protocol):
    """Images by item id: `ImageFolder` or `ShardImages`."""

    def load(self, item_id: str, *, context: str = "") -> Image.Image: ...


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
        except DECODE_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
        where = f" (referenced by {context})" if context else ""
        raise DataError(f"cannot read image {path}{where}: {reason}")

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Ids without a file (stat only, no decoding), unique, in first-appearance order."""
        return [i for i in dict.fromkeys(ids) if not self.path(i).is_file()]


class ShardImages:
    """id -> JPEG bytes read from shards (geco.data.source), with ImageFolder's interface: for
    models that look images up by id (the baselines) when the data live only in shards."""

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
        except DECODE_ERRORS as e:
            raise DataError(f"cannot decode image {item_id!r} from the shards at {self.root}"
                            f"{where}: {type(e).__name__}: {e}") from None


def preflight(split: Split, images: ImageFolder, *, on_missing: OnBad = "error"
              ) -> tuple[Split, int]:
    """Check every id a row references has a file; fail listing culprits, or drop those rows.

    Returns the (possibly reduced) split and the number of rows dropped.
    """
    check_choice("on_missing", on_missing, ON_BAD)
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
