"""`geco compare`: GECo and the baselines of REFERENCE §5 side by side on one dataset, in the
layout of the paper's Tables 2 and 3.

Every model is evaluated on the same rows of the same split with the same metric code
(REFERENCE §4): GECo from its checkpoint through `EvalData.evaluate` (what `geco evaluate`
runs), baselines as `geco.baselines.Scorer`s through `evaluate_scorer`, which yields the same
metric keys. Outputs under `<run-dir>/compare/`:

- `compare.md`: Table 2 (AUC 1-vs-1, MRR full ranking), Table 3 (AUC 1-vs-3, MRR 1-vs-9),
  plus Recall@k / NDCG@10, rows in the paper's model order;
- `compare.csv`: one row per model, every metric key;
- `compare.json`: metrics per model, where each trainable model came from (checkpoint, epoch,
  its training config) and the resolved config of the comparison.

Extension point: `MODELS` maps a name to a `ModelEntry`; a baseline is added by giving its
entry a `make(ctx) -> Scorer` factory. A trainable baseline trains in its `fit` and keeps
its files under `ctx.out_dir` (`<run-dir>/<name>/`), exposing the file it ended with as a
`checkpoint` attribute, which lands in compare.json.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from geco.baselines import PopularityScorer, RandomScorer, Scorer, evaluate_scorer
from geco.config import Config
from geco.data.images import ImageFolder
from geco.data.splits import Split
from geco.errors import ConfigError, GecoError
from geco.evaluate import TABLE_KEYS
from geco.metrics import random_expectations

log = logging.getLogger("geco")

DEFAULT_MODELS = ("random", "popularity", "geco")


@dataclass
class CompareContext:
    """What a baseline factory gets: the comparison's config, the dataset's image folder and
    training split, and the model's own folder (checkpoints of trainable baselines)."""

    cfg: Config
    images: ImageFolder
    train: Split
    out_dir: Path


@dataclass(frozen=True)
class ModelEntry:
    label: str  # the row name in the tables (the paper's)
    make: Callable[[CompareContext], Scorer] | None = None  # None: GECo, or not implemented yet
    planned: str = ""  # non-empty: not implemented yet; what it needs (REFERENCE §5)


# Name -> entry, in the row order of the paper's Tables 2 and 3.
MODELS: dict[str, ModelEntry] = {
    "geco": ModelEntry("GECo"),
    "mgcm": ModelEntry("MGCM", planned=(
        "64 px generator (GAN + 10000·L1) + pants encoder + BPRNet, score "
        "α·dot + β·L1 template term (REFERENCE §5.3)")),
    "pix2pixcm": ModelEntry("Pix2PixCM", planned=(
        "MGCM with a U-Net generator and a 4x4 PatchGAN (REFERENCE §5.4)")),
    "bpr-dae": ModelEntry("BPR-DAE", planned=(
        "frozen CNN features + tied autoencoders, score dot(hidden) (REFERENCE §5.2)")),
    "popularity": ModelEntry("Popularity", make=lambda ctx: PopularityScorer()),
    "random": ModelEntry("Random", make=lambda ctx: RandomScorer(ctx.cfg.eval.seed)),
}


def parse_models(models: str | Iterable[str]) -> list[str]:
    """Model names (a comma-separated string or a list) -> known names, deduplicated, in the
    paper's table order. Unknown or not yet implemented names raise ConfigError."""
    if isinstance(models, str):
        models = models.split(",")
    names = [m.strip().lower() for m in models if m.strip()]
    if not names:
        raise ConfigError("--models: name at least one model "
                          f"(available: {', '.join(_available())})")
    for name in names:
        entry = MODELS.get(name)
        if entry is None:
            raise ConfigError(f"unknown model {name!r} (available: {', '.join(_available())})")
        if entry.planned:
            raise ConfigError(f"model {name!r} is not implemented yet ({entry.planned}); "
                              f"available: {', '.join(_available())}")
    return [name for name in MODELS if name in names]


def _available() -> list[str]:
    return [n for n, e in MODELS.items() if not e.planned]


def geco_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "geco" / "best.pt"


def run_compare(cfg: Config, run_dir: str | Path, models: str | Iterable[str] = DEFAULT_MODELS,
                *, split: str = "test") -> dict[str, Any]:
    """Evaluate `models` on `split` of the dataset folder `cfg.data.root`; write
    `<run-dir>/compare/compare.{md,csv,json}` and return what compare.json holds."""
    from geco.data.source import EvalData, ensure_synthetic, open_dataset

    run_dir = Path(run_dir)
    names = parse_models(models)
    if cfg.data.shards:
        raise ConfigError(f"geco compare reads the dataset folder data.root, not shards "
                          f"(data.shards={cfg.data.shards!r}); set data.shards= (empty) and "
                          "data.root to the folder the shards were made from")
    ckpt_path = geco_checkpoint(run_dir)
    if "geco" in names and not ckpt_path.is_file():
        raise GecoError(f"no GECo checkpoint at {ckpt_path}: train it first with "
                        f"`geco pipeline --config CONFIG --run-dir {run_dir}` (or `geco train "
                        "cigm` then `geco train geco` with the same run dir), or leave geco "
                        "out of --models")

    ensure_synthetic(cfg.data)
    scorers = [n for n in names if n != "geco"]
    needed = ("train", split) if scorers else (split,)
    splits, images = open_dataset(cfg.data, needed)
    test = splits[split]
    log.info("compare: %s on %s (%d rows)", ", ".join(names), test.source, len(test))

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        t0 = time.perf_counter()
        if name == "geco":
            results[name] = _evaluate_geco(cfg, ckpt_path, EvalData(split, split=test,
                                                                     images=images))
        else:
            ctx = CompareContext(cfg=cfg, images=images, train=splits["train"],
                                 out_dir=run_dir / name)
            scorer = MODELS[name].make(ctx)
            scorer.fit(ctx.train)
            fit_s = time.perf_counter() - t0
            metrics = evaluate_scorer(scorer, test, ties=cfg.eval.ties)
            ckpt = getattr(scorer, "checkpoint", None)
            results[name] = {"label": MODELS[name].label, "metrics": metrics,
                             "checkpoint": str(ckpt) if ckpt else None,
                             "trained_on": splits["train"].source, "fit_seconds": fit_s}
        results[name]["seconds"] = time.perf_counter() - t0
        m = results[name]["metrics"]
        log.info("compare: %-10s AUC-1vs1 %.4f  MRR-full %.4f  AUC-1vs3 %.4f  MRR-1vs9 %.4f",
                 MODELS[name].label, m["auc_1vs1"], m["mrr_full"], m.get("auc_1vs3", float("nan")),
                 m.get("mrr_1vs9", float("nan")))

    out_dir = run_dir / "compare"
    result: dict[str, Any] = {
        "dataset": test.source,
        "dataset_name": Path(cfg.data.root).name,
        "split": split,
        "ties": cfg.eval.ties,
        "n_queries": len(test),
        "n_candidates": len(test.unique_bottoms()),
        "models": results,
        "files": {k: str(out_dir / f"compare.{k}") for k in ("md", "csv", "json")},
        "config": cfg.to_dict(),
    }
    write_outputs(result, out_dir)
    return result


def _evaluate_geco(cfg: Config, ckpt_path: Path, data) -> dict[str, Any]:
    """`geco evaluate` on the comparison's rows: the checkpoint's image size, eval settings
    of the comparison config."""
    from geco.train.geco import load_retriever
    from geco.train.runtime import init_runtime

    rt = init_runtime(cfg.runtime)
    retriever, ckpt = load_retriever(ckpt_path, rt.device)
    trained = ckpt["config"]
    if Path(trained["data"]["root"]).resolve() != Path(cfg.data.root).resolve():
        log.warning("compare: GECo checkpoint %s was trained on %s, evaluated on %s",
                    ckpt_path, trained["data"]["root"], cfg.data.root)
    metrics = data.evaluate(retriever, rt=rt, image_size=trained["data"]["image_size"],
                            batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                            ties=cfg.eval.ties, num_workers=cfg.data.num_workers)
    return {"label": MODELS["geco"].label, "metrics": metrics, "checkpoint": str(ckpt_path),
            "epoch": ckpt["epoch"] + 1, "trained_config": trained}


# --------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def format_comparison(result: dict[str, Any]) -> str:
    """Markdown: the paper's Tables 2 and 3 (rows = models) and the other ranking metrics."""
    models = result["models"]
    ds = result["dataset_name"]
    lines = [f"# Comparison on {ds} ({result['split']} split: {result['n_queries']} queries, "
             f"{result['n_candidates']} candidates in the full ranking)", ""]
    for title, (auc_key, mrr_key) in TABLE_KEYS.items():
        lines += [f"## {title}", "", f"| Model | {ds} AUC | {ds} MRR |", "|---|---|---|"]
        lines += [f"| {r['label']} | {_fmt(r['metrics'].get(auc_key))} | "
                  f"{_fmt(r['metrics'].get(mrr_key))} |" for r in models.values()]
        lines.append("")
    lines += ["## Full ranking, other metrics", "",
              "| Model | Recall@1 | Recall@10 | NDCG@10 | MRR-full / random |",
              "|---|---|---|---|---|"]
    for r in models.values():
        m = r["metrics"]
        lines.append(f"| {r['label']} | {_fmt(m.get('recall_at_1'))} | "
                     f"{_fmt(m.get('recall_at_10'))} | {_fmt(m.get('ndcg_at_10'))} | "
                     f"{_fmt(m.get('mrr_full_vs_random'))} |")
    n = result["n_candidates"]
    lines += ["", f"Chance level: AUC 0.5000, MRR-1vs9 {random_expectations(10)['mrr']:.4f}, "
              f"MRR-full {random_expectations(n)['mrr']:.4f} (H_U/U, U = {n}). AUC is strict "
              f"(ties lose); ranks use the '{result['ties']}' tie rule."]
    sources = [f"{r['label']}: {r['checkpoint']}" + (f" (epoch {r['epoch']})" if "epoch" in r
                                                     else "")
               for r in models.values() if r.get("checkpoint")]
    if sources:
        lines.append("Checkpoints: " + "; ".join(sources) + ".")
    return "\n".join(lines) + "\n"


def format_csv(result: dict[str, Any]) -> str:
    """One row per model: model, label, every metric key (first-seen order), checkpoint."""
    keys: dict[str, None] = {}
    for r in result["models"].values():
        keys.update(dict.fromkeys(r["metrics"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "label", *keys, "checkpoint"])
    for name, r in result["models"].items():
        writer.writerow([name, r["label"], *(r["metrics"].get(k, "") for k in keys),
                         r.get("checkpoint") or ""])
    return buf.getvalue()


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(format_comparison(result))
    (out_dir / "compare.csv").write_text(format_csv(result))
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
