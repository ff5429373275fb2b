"""Split files: (top, positive bottom[, negatives]) rows read from CSV, and dataset layouts.

Ids stay strings exactly as written: Polyvore ids are numeric, TB ids are 32-hex, MANGO ids
look like `43017044-05`; int-converting any of them would lose information or crash.
Every error names the file and the 1-based line (header = line 1) so a user can fix it.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from geco.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "valid", "test")
KINDS = ("fashionvc", "expreduced", "fashiontaobaotb", "standard", "pairs")

# Per kind: file names under root/files/ for train, valid, test (the reference's names).
_FILES: dict[str, tuple[str, str, str]] = {
    "fashionvc": ("traindata_unique.csv", "devdata_tops.csv", "testdata_tops.csv"),
    "expreduced": (
        "traindata_unique_1.csv",
        "devdata_tops_reduced_rs1.csv",
        "testdata_tops_reduced_rs1.csv",
    ),
    "fashiontaobaotb": ("train_no_dup_1vs9.csv", "valid_no_dup_1vs9.csv", "test_disj.csv"),
    "standard": ("train.csv", "valid.csv", "test.csv"),
}
_NEG_RE = re.compile(r"^neg_(\d+)$")
# Eval rows need at least 3 negatives: the reference's AUC and validation use neg_1..neg_3.
MIN_EVAL_NEGATIVES = 3


@dataclass(frozen=True)
class Split:
    name: str
    source: str
    tops: tuple[str, ...]
    bottoms: tuple[str, ...]
    negatives: tuple[tuple[str, ...], ...] | None
    lines: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.tops)

    @property
    def n_negatives(self) -> int:
        """K, the number of negatives per row (0 for train files)."""
        return len(self.negatives[0]) if self.negatives else 0

    def unique_tops(self) -> list[str]:
        return list(dict.fromkeys(self.tops))

    def unique_bottoms(self) -> list[str]:
        return list(dict.fromkeys(self.bottoms))

    def where(self, row: int) -> str:
        return f"{self.source}:{self.lines[row]}"

    def subset(self, rows: Sequence[int]) -> Split:
        rows = list(rows)
        return Split(
            name=self.name,
            source=self.source,
            tops=tuple(self.tops[r] for r in rows),
            bottoms=tuple(self.bottoms[r] for r in rows),
            negatives=None if self.negatives is None else tuple(self.negatives[r] for r in rows),
            lines=tuple(self.lines[r] for r in rows),
        )


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, stripped fields) per non-blank row; checks the field count."""
    src = str(path)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        # utf-8-sig tolerates a BOM from spreadsheets; newline="" lets csv track line numbers.
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            for fields in reader:
                if not any(f.strip() for f in fields):
                    continue  # blank lines (e.g. a trailing newline) are not rows
                fields = [f.strip() for f in fields]
                if header is None:
                    header, start = fields, reader.line_num
                elif len(fields) != len(header):
                    raise DataError(
                        f"{src}:{reader.line_num}: expected {len(header)} fields "
                        f"(as the header at line {start}), got {len(fields)}"
                    )
                else:
                    rows.append((reader.line_num, fields))
    except FileNotFoundError:
        raise DataError(f"split file not found: {src}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read split file {src}: {e}") from None
    if header is None:
        raise DataError(f"{src}: empty file (no header)")
    return header, rows


def _column(header: list[str], name: str, src: str) -> int:
    try:
        return header.index(name)
    except ValueError:
        raise DataError(f"{src}:1: missing required column {name!r} (header: {header})") from None


def read_split_csv(path: str | Path, name: str, *, min_negatives: int = 0,
                   strict: bool = True) -> Split:
    """Read one split file: `tshirt,positive_pant[,outfit_id,has_exploded][,neg_1..neg_K]`.

    strict=False reads a negative equal to the positive instead of refusing it, so that
    geco.data.check can count it with the other anomalies and apply `data.anomalies`."""
    path = Path(path)
    src = str(path)
    header, rows = _read_table(path)
    i_top = _column(header, "tshirt", src)
    i_pos = _column(header, "positive_pant", src)
    negs = sorted((int(m.group(1)), i) for i, h in enumerate(header) if (m := _NEG_RE.match(h)))
    if [k for k, _ in negs] != list(range(1, len(negs) + 1)):
        raise DataError(f"{src}:1: negative columns must be neg_1..neg_K, got {header}")
    if len(negs) < min_negatives:
        raise DataError(
            f"{src}:1: split {name!r} needs at least {min_negatives} negative columns "
            f"(neg_1..neg_{min_negatives}), found {len(negs)}"
        )
    i_negs = [i for _, i in negs]

    tops: list[str] = []
    bottoms: list[str] = []
    negatives: list[tuple[str, ...]] = []
    lines: list[int] = []
    for line, f in rows:
        row_negs = tuple(f[i] for i in i_negs)
        for col, value in (("tshirt", f[i_top]), ("positive_pant", f[i_pos])):
            if not value:
                raise DataError(f"{src}:{line}: empty id in column {col!r}")
        for k, value in enumerate(row_negs, 1):
            if not value:
                raise DataError(f"{src}:{line}: empty id in column 'neg_{k}'")
            # Duplicates among a row's negatives are tolerated (TB has them), but a negative
            # equal to the positive would make a correct ranking impossible.
            if strict and value == f[i_pos]:
                raise DataError(f"{src}:{line}: neg_{k} {value!r} equals the positive bottom")
        tops.append(f[i_top])
        bottoms.append(f[i_pos])
        negatives.append(row_negs)
        lines.append(line)
    if not tops:
        raise DataError(f"{src}: no data rows after the header")
    return Split(
        name=name,
        source=src,
        tops=tuple(tops),
        bottoms=tuple(bottoms),
        negatives=tuple(negatives) if i_negs else None,
        lines=tuple(lines),
    )


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    img_dir: Path
    kind: str
    train: Path
    valid: Path
    test: Path

    def split_path(self, name: str) -> Path:
        if name not in SPLIT_NAMES:
            raise ConfigError(f"unknown split {name!r}; expected one of {SPLIT_NAMES}")
        return getattr(self, name)


def _layout(root: Path, kind: str) -> DatasetLayout:
    if kind == "pairs":
        p = root / "pairs.csv"
        return DatasetLayout(root, root / "img", kind, p, p, p)
    train, valid, test = (root / "files" / f for f in _FILES[kind])
    return DatasetLayout(root, root / "img", kind, train, valid, test)


def resolve_layout(root: str | Path, kind: str = "auto") -> DatasetLayout:
    """Where the split files and images of a dataset live; "auto" detects the kind.

    Split files are not checked here: TB's train file is missing from the public snapshot,
    and loading only valid/test must still work. `load_splits` checks what it reads.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset root is not a directory: {root}")
    kind = kind.lower()
    if kind != "auto":
        if kind not in KINDS:
            raise ConfigError(f"unknown dataset kind {kind!r}; expected 'auto' or one of {KINDS}")
        return _layout(root, kind)
    found = [k for k in KINDS if any(p.is_file() for p in _paths(_layout(root, k)))]
    if len(found) == 1:
        return _layout(root, found[0])
    if not found:
        raise DataError(
            f"cannot detect the dataset kind of {root}: found none of "
            f"{', '.join(f'files/{f}' for fs in _FILES.values() for f in fs)}, pairs.csv"
        )
    raise DataError(f"{root} matches several dataset kinds {found}; pass the kind explicitly")


def _paths(layout: DatasetLayout) -> tuple[Path, Path, Path]:
    return layout.train, layout.valid, layout.test


def load_splits(
    layout: DatasetLayout,
    *,
    n_negatives: int = 9,
    seed: int = 0,
    splits: Sequence[str] = SPLIT_NAMES,
    strict: bool = True,
) -> dict[str, Split]:
    """Read the requested splits. `n_negatives`/`seed` only matter for "pairs" layouts;
    `strict` as in `read_split_csv` (sampled "pairs" negatives never equal the positive)."""
    for s in splits:
        layout.split_path(s)  # validates the name
    if layout.kind == "pairs":
        if not layout.train.is_file():
            raise DataError(f"pairs dataset: missing file {layout.train}")
        every = _pairs_splits(layout.train, n_negatives=n_negatives, seed=seed)
        return {s: every[s] for s in splits}
    out: dict[str, Split] = {}
    for s in splits:
        path = layout.split_path(s)
        if not path.is_file():
            raise DataError(f"{layout.kind} dataset: missing {s} split file {path}")
        out[s] = read_split_csv(path, s, min_negatives=0 if s == "train" else MIN_EVAL_NEGATIVES,
                                strict=strict)
    return out


def split_of_top(top: str) -> str:
    """80/10/10 by a stable hash of the id (Python's hash() is salted per process)."""
    bucket = int.from_bytes(hashlib.sha1(top.encode("utf-8")).digest()[:8], "big") % 10
    return "train" if bucket < 8 else ("valid" if bucket == 8 else "test")


def _pairs_splits(path: Path, *, n_negatives: int, seed: int) -> dict[str, Split]:
    """Split a generic `top,bottom[,split]` file; eval rows get sampled negatives."""
    src = str(path)
    header, rows = _read_table(path)
    i_top = _column(header, "top", src)
    i_bot = _column(header, "bottom", src)
    i_split = header.index("split") if "split" in header else None
    aliases = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}
    per: dict[str, tuple[list[str], list[str], list[int]]] = {s: ([], [], []) for s in SPLIT_NAMES}
    positives: dict[str, set[str]] = {}
    for line, f in rows:
        top, bottom = f[i_top], f[i_bot]
        if not top or not bottom:
            raise DataError(f"{src}:{line}: empty id in column {'top' if not top else 'bottom'!r}")
        if i_split is None:
            s = split_of_top(top)
        else:
            s = aliases.get(f[i_split].lower(), "")
            if not s:
                raise DataError(f"{src}:{line}: unknown split {f[i_split]!r} (train/valid/test)")
        tops, bottoms, lines = per[s]
        tops.append(top)
        bottoms.append(bottom)
        lines.append(line)
        positives.setdefault(top, set()).add(bottom)
    if not any(per[s][0] for s in SPLIT_NAMES):
        raise DataError(f"{src}: no data rows after the header")

    out: dict[str, Split] = {}
    for k, s in enumerate(SPLIT_NAMES):
        tops, bottoms, lines = per[s]
        negatives = None
        if s != "train" and tops:
            # Each split gets its own stream so adding valid rows does not change test negatives.
            rng = np.random.default_rng([seed, k])
            negatives = _sample_negatives(tops, bottoms, lines, positives, n_negatives, rng, src)
        out[s] = Split(s, src, tuple(tops), tuple(bottoms), negatives, tuple(lines))
    return out


def _sample_negatives(
    tops: list[str],
    bottoms: list[str],
    lines: list[int],
    positives: dict[str, set[str]],
    n: int,
    rng: np.random.Generator,
    src: str,
) -> tuple[tuple[str, ...], ...]:
    """n distinct negatives per row from the split's positive bottoms, never a positive of the
    row's top (anywhere in the file), so the full-ranking pool and the 1-vs-K task agree."""
    if n < MIN_EVAL_NEGATIVES:
        raise ConfigError(f"n_negatives must be >= {MIN_EVAL_NEGATIVES}, got {n}")
    pool = list(dict.fromkeys(bottoms))
    index = {b: i for i, b in enumerate(pool)}
    out = []
    for top, line in zip(tops, lines, strict=True):
        banned = {index[b] for b in positives[top] if b in index}
        if len(pool) - len(banned) < n:
            raise DataError(
                f"{src}:{line}: cannot sample {n} negatives for top {top!r}: the split has only "
                f"{len(pool) - len(banned)} other positive bottoms"
            )
        # Draw n + |banned| distinct candidates, drop the banned ones: at least n remain.
        picks = rng.choice(len(pool), size=n + len(banned), replace=False)
        out.append(tuple(pool[i] for i in picks if i not in banned)[:n])
    return tuple(out)
