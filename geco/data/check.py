"""Dataset anomalies: rows that parse fine but corrupt training or the metrics.

Per split (examples name the CSV line, and the ids):
- duplicate_rows: the same top and positive bottom as an earlier row (an evaluation query
  scored twice, a training pair drawn twice per epoch);
- self_pairs: a top paired with itself (top id == positive bottom id);
- negative_is_positive: an evaluation row whose negatives include its positive (a correct
  ranking is impossible);
- duplicate_negatives: an evaluation row naming one negative twice (FashionTaobao-TB has 79
  such valid rows and 81 test rows);
- train_overlap: evaluation tops that are also train tops (common in outfit datasets:
  FashionVC shares 60 of its 1000 test tops with train, ExpReduced 226).

Policy, `data.anomalies`: "error" (default) refuses a valid/test split with duplicate rows,
self-pairs or a negative equal to the positive, since its metrics would be wrong; everything
else is logged as a warning with counts. "warn" only warns. `FolderData` applies it to every
split it loads; `geco data check` prints the whole report for a dataset folder or shards.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from geco.data.splits import SPLIT_NAMES, DatasetLayout, Split, load_splits, resolve_layout
from geco.errors import DataError

log = logging.getLogger("geco")

Policy = Literal["error", "warn"]
Severity = Literal["ok", "warning", "error"]

# Check name -> what its count counts (report wording).
CHECKS: dict[str, str] = {
    "duplicate_rows": "duplicate rows (top and positive as an earlier row)",
    "self_pairs": "rows pairing a top with itself",
    "negative_is_positive": "rows with a negative equal to the positive",
    "duplicate_negatives": "rows naming a negative twice",
    "train_overlap": "tops also in train",
}
# What makes an evaluation split's metrics wrong; refused under data.anomalies=error.
CORRUPTS_METRICS = frozenset({"duplicate_rows", "self_pairs", "negative_is_positive"})
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Finding:
    count: int = 0
    examples: tuple[str, ...] = ()
    severity: Severity = "ok"
    note: str = ""  # context for the count, e.g. "60 of 1000 tops, 60 rows"


@dataclass(frozen=True)
class SplitReport:
    name: str
    source: str
    rows: int
    findings: dict[str, Finding]  # the CHECKS that apply to this split, in CHECKS order

    def messages(self, severity: Severity) -> list[str]:
        """One line per finding of that severity, naming the split, its file and a row."""
        out = []
        for check, f in self.findings.items():
            if f.severity == severity:
                note = f" ({f.note})" if f.note else ""
                out.append(f"{self.name} split {self.source}: {f.count} {CHECKS[check]}{note}, "
                           f"e.g. {'; '.join(f.examples)}")
        return out


@dataclass(frozen=True)
class Report:
    policy: Policy
    splits: tuple[SplitReport, ...]
    location: str = ""
    notes: tuple[str, ...] = ()  # e.g. a split the dataset does not have

    @property
    def errors(self) -> list[str]:
        return [m for s in self.splits for m in s.messages("error")]

    @property
    def warnings(self) -> list[str]:
        return [m for s in self.splits for m in s.messages("warning")]

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "policy": self.policy,
            "ok": not self.errors,
            "splits": {s.name: {"source": s.source, "rows": s.rows,
                                **{c: {"count": f.count, "severity": f.severity,
                                       "examples": list(f.examples),
                                       **({"note": f.note} if f.note else {})}
                                   for c, f in s.findings.items()}}
                       for s in self.splits},
            "errors": self.errors,
            "warnings": self.warnings,
            "notes": list(self.notes),
        }

    def format(self) -> str:
        """A table of counts per split and check, then every warning and error line."""
        lines = [f"dataset check: {self.location}; policy data.anomalies={self.policy}"]
        for s in self.splits:
            lines.append(f"{s.name:<6} {s.rows:>8} rows  {s.source}")
            for check, f in s.findings.items():
                mark = {"ok": "", "warning": "  warning", "error": "  ERROR"}[f.severity]
                note = f" ({f.note})" if f.note else ""
                lines.append(f"  {CHECKS[check]:<52} {f.count:>6}{note}{mark}")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {m}" for m in self.warnings]
        lines += [f"error: {m}" for m in self.errors]
        n = len(self.errors)
        lines.append(f"refused ({n} error{'s' if n > 1 else ''}): anomalies that corrupt "
                     "evaluation; data.anomalies=warn loads them anyway" if n else
                     "ok: nothing the policy refuses")
        return "\n".join(lines)


# --------------------------------------------------------------------------- the checks


def _rows(split: Split, why: Callable[[int], str | None]) -> Finding:
    """Rows for which `why(row)` says something, counted, the first few as examples."""
    hits = [(r, w) for r in range(len(split)) if (w := why(r)) is not None]
    return Finding(len(hits), tuple(f"line {split.lines[r]}: {w}" for r, w in hits[:MAX_EXAMPLES]))


def _duplicate_rows(split: Split) -> Finding:
    first: dict[tuple[str, str], int] = {}

    def why(r: int) -> str | None:
        pair = (split.tops[r], split.bottoms[r])
        seen = first.setdefault(pair, r)
        return None if seen == r else (f"top {pair[0]!r}, bottom {pair[1]!r} as at line "
                                       f"{split.lines[seen]}")

    return _rows(split, why)


def _self_pairs(split: Split) -> Finding:
    return _rows(split, lambda r: f"top {split.tops[r]!r} is its own positive"
                 if split.tops[r] == split.bottoms[r] else None)


def _negative_is_positive(split: Split, negs: tuple[tuple[str, ...], ...]) -> Finding:
    def why(r: int) -> str | None:
        k = next((k for k, n in enumerate(negs[r], 1) if n == split.bottoms[r]), 0)
        return f"neg_{k} {split.bottoms[r]!r} is the positive" if k else None

    return _rows(split, why)


def _duplicate_negatives(split: Split, negs: tuple[tuple[str, ...], ...]) -> Finding:
    def why(r: int) -> str | None:
        seen: set[str] = set()
        for n in negs[r]:
            if n in seen:
                return f"negative {n!r} twice (top {split.tops[r]!r})"
            seen.add(n)
        return None

    return _rows(split, why)


def _train_overlap(split: Split, train: Split) -> Finding:
    train_row: dict[str, int] = {}
    for r, top in enumerate(train.tops):
        train_row.setdefault(top, r)
    first: dict[str, int] = {}
    for r, top in enumerate(split.tops):
        first.setdefault(top, r)
    shared = [t for t in first if t in train_row]
    rows = sum(t in train_row for t in split.tops)
    examples = tuple(f"top {t!r} at line {split.lines[first[t]]} and {train.where(train_row[t])}"
                     for t in shared[:MAX_EXAMPLES])
    return Finding(len(shared), examples, note=f"{len(shared)} of {len(first)} tops, {rows} rows")


def _severity(split: str, check: str, count: int, policy: Policy) -> Severity:
    if not count:
        return "ok"
    refused = policy == "error" and split != "train" and check in CORRUPTS_METRICS
    return "error" if refused else "warning"


def check_split(split: Split, *, train: Split | None = None, policy: Policy = "error") -> SplitReport:
    """Every check that applies to one split; `train` (if any) for the overlap of tops."""
    found = {"duplicate_rows": _duplicate_rows(split), "self_pairs": _self_pairs(split)}
    if split.negatives is not None:
        found["negative_is_positive"] = _negative_is_positive(split, split.negatives)
        found["duplicate_negatives"] = _duplicate_negatives(split, split.negatives)
    if train is not None and split.name != "train":
        found["train_overlap"] = _train_overlap(split, train)
    findings = {c: Finding(f.count, f.examples, _severity(split.name, c, f.count, policy), f.note)
                for c, f in found.items()}
    return SplitReport(split.name, split.source, len(split), findings)


def check_splits(splits: Mapping[str, Split], *, train: Split | None = None,
                 policy: Policy = "error", location: str = "",
                 notes: tuple[str, ...] = ()) -> Report:
    """The report over `splits`; eval tops are compared with `train` or else splits["train"]."""
    train = train if train is not None else splits.get("train")
    order = sorted(splits, key=lambda s: SPLIT_NAMES.index(s) if s in SPLIT_NAMES else 9)
    return Report(policy, tuple(check_split(splits[s], train=train, policy=policy) for s in order),
                  location, notes)


def enforce(report: Report) -> None:
    """Log the warnings; raise one DataError line naming every refused split, file and row."""
    for message in report.warnings:
        log.warning("%s", message)
    if report.errors:
        raise DataError("; ".join(report.errors) + " (data.anomalies=warn loads them anyway)")


def check_loaded(layout: DatasetLayout, loaded: Mapping[str, Split],
                 earlier: Mapping[str, Split], *, n_negatives: int, policy: Policy) -> None:
    """Apply the policy to splits just read from a folder. Eval tops are compared with the
    train split, loaded now or before, or else read from its file for this only (evaluation
    alone never loads it); without a readable train file there is nothing to compare."""
    train = loaded["train"] if "train" in loaded else earlier.get("train")
    if train is None and set(loaded) - {"train"} and layout.train.is_file():
        try:
            train = load_splits(layout, n_negatives=n_negatives, splits=("train",),
                                strict=False)["train"]
        except DataError as exc:  # loading it is not this caller's business: no comparison
            log.info("eval tops not compared with train: %s", exc)
    enforce(check_splits(loaded, train=train, policy=policy))


# --------------------------------------------------------------------------- shards


def shard_splits(root: str, manifest: dict[str, Any], *, on_bad: str = "error") -> dict[str, Split]:
    """The train/eval splits the shards carry, from each sample's meta.json and neg.json only
    (the tars are read, no image is decoded or kept); lines are the source CSV's."""
    out = {}
    for name, entry in manifest["splits"].items():
        kind = entry.get("kind")
        if kind not in ("train", "eval"):
            continue  # catalogue shards hold bottoms, not rows
        rows = sorted(_shard_rows(root, name, manifest, kind, on_bad), key=lambda r: r[0])
        if not rows:
            raise DataError(f"{root}: no readable {name} samples in the shards")
        out[name] = Split(name=name, source=f"{root} [{name}]",
                          tops=tuple(r[1] for r in rows), bottoms=tuple(r[2] for r in rows),
                          negatives=tuple(r[3] for r in rows) if kind == "eval" else None,
                          lines=tuple(r[4] for r in rows))
    return out


def _shard_rows(root: str, name: str, manifest: dict[str, Any], kind: str,
                on_bad: str) -> Iterator[tuple[int, str, str, tuple[str, ...], int]]:
    from geco.data.stream import ShardStream

    stream = ShardStream.from_manifest(root, name, manifest, transform=lambda im: im,
                                       batch_size=2, on_bad=on_bad, shuffle=False)
    for sample in stream.raw_samples():
        if sample is None:
            continue  # counted and logged by the stream in skip mode
        try:
            meta = json.loads(sample["meta.json"])
            negs = tuple(str(n) for n in json.loads(sample["neg.json"])) if kind == "eval" else ()
            row = int(meta["row"])
            line = str(meta.get("source", "")).rsplit(":", 1)[-1]
            yield (row, str(meta["top"]), str(meta["bottom"]), negs,
                   int(line) if line.isdigit() else row + 2)
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r}: "
                            f"bad metadata: {exc}") from None


# --------------------------------------------------------------------------- command line


def add_check_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `check` under the `geco data` subcommands."""
    p = subparsers.add_parser("check", help="report duplicate rows, self-pairs, bad negatives "
                              "and train/test overlap of data.root (or data.shards)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--config", help="YAML config (see configs/); its data section is read")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.root=/data/FashionVC")
    return p


def dataset_report(cfg: Any) -> Report:
    """The report for cfg.data (a DataConfig): its shards when set, else its folder."""
    if cfg.shards:
        from geco.data.stream import load_manifest

        splits = shard_splits(cfg.shards, load_manifest(cfg.shards), on_bad=cfg.on_bad_image)
        return check_splits(splits, policy=cfg.anomalies, location=cfg.shards)
    layout = resolve_layout(Path(cfg.root), cfg.kind)
    names = tuple(s for s in SPLIT_NAMES if layout.split_path(s).is_file())
    if not names:
        raise DataError(f"{layout.kind} dataset {layout.root}: none of its split files exist "
                        f"({', '.join(str(layout.split_path(s)) for s in SPLIT_NAMES)})")
    notes = tuple(f"no {s} split ({layout.split_path(s)} missing)"
                  for s in SPLIT_NAMES if s not in names)
    splits = load_splits(layout, n_negatives=cfg.n_negatives, splits=names, strict=False)
    return check_splits(splits, policy=cfg.anomalies, notes=notes,
                        location=f"{layout.root} (kind {layout.kind})")


def cmd_check(args: argparse.Namespace, cfg: Any) -> Report:
    """Print the report; refused anomalies raise DataError (the CLI exits 2)."""
    report = dataset_report(cfg.data)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if report.errors:
        n = len(report.errors)
        raise DataError(f"{report.location}: {n} anomal{'y' if n == 1 else 'ies'} that "
                        f"data.anomalies={report.policy} refuses; first: {report.errors[0]}")
    return report
