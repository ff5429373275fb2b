"""`geco compare`: GECo and the baselines of docs/model.md §5 side by side on one dataset, in
the layout of the paper's Tables 2 and 3.

Every model is evaluated on the same rows of the same split with the same metric code
(docs/model.md §4): GECo from its checkpoint through `geco.evaluate.evaluate` (what `geco
evaluate` runs; trained first, CIGM then GECo, when the run dir has none), the baselines as
`geco.baselines.Scorer`s through `evaluate_scorer`, which yields the same metric keys. Every
trainable model (CIGM, GECo, BPR-DAE, MGCM, Pix2PixCM) trains through the same loop
(`geco.train.loop.train`) into `<run-dir>/<model>/`; a finished one is loaded, not retrained.
The data come from `geco.data.source.open_data`: the dataset folder, or the shards.

Outputs under `<run-dir>/compare/`:
- `compare.md`: Table 2 (AUC 1-vs-1, MRR full ranking), Table 3 (AUC 1-vs-3, MRR 1-vs-9),
  plus Recall@k / NDCG@10, rows in the paper's model order;
- `compare.csv`: one row per model, every metric key;
- `compare.json`: metrics per model, where each trainable model came from (checkpoint,
  epochs, per-epoch history, its own config section) and the comparison's resolved config;
- `config.yaml`: that resolved config, loadable with `--config`.
With a tracking URI (`tracking.uri` or $MLFLOW_TRACKING_URI) the comparison is also an MLflow
run with one child run per model (metrics, per-epoch history, template grids).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from geco.baselines import PopularityScorer, RandomScorer, Scorer, evaluate_scorer
from geco.config import Config, save_config
from geco.data.source import open_data
from geco.errors import ConfigError, GecoError
from geco.evaluate import TABLE_KEYS, evaluate, evaluate_checkpoint
from geco.metrics import random_expectations
from geco.tracking import numeric
from geco.train.loop import train
from geco.train.runtime import init_runtime

log = logging.getLogger("geco")

DEFAULT_MODELS = ("geco", "mgcm", "pix2pixcm", "bpr-dae", "popularity", "random")


@dataclass(frozen=True)
class ModelEntry:
    label: str  # the row name in the tables (the paper's)
    # An untrained scorer from the config (Random, Popularity); None: a trainable model, whose
    # stage (geco.train.loop.STAGES) gives the scorer once trained. GECo is scored apart.
    make: Callable[[Config], Scorer] | None = None
    # A GECo ablation (Table 4's extension): the geco.template it trains with.
    template: str | None = None

    @property
    def trainable(self) -> bool:
        return self.make is None

    @property
    def ablation(self) -> bool:
        return self.template is not None


# Name -> entry, in the row order of the paper's Tables 2 and 3.
MODELS: dict[str, ModelEntry] = {
    "geco": ModelEntry("GECo"),
    "mgcm": ModelEntry("MGCM"),
    "pix2pixcm": ModelEntry("Pix2PixCM"),
    "bpr-dae": ModelEntry("BPR-DAE"),
    "popularity": ModelEntry("Popularity", lambda cfg: PopularityScorer()),
    "random": ModelEntry("Random", lambda cfg: RandomScorer(cfg.eval.seed)),
    # What the template adds (docs/model.md §3.1): GECo trained with a grey template, and
    # with a query of the top alone; same CIGM, data and settings as the GECo row.
    "geco-constant": ModelEntry("GECo, constant template", template="constant"),
    "geco-toponly": ModelEntry("GECo, top only", template="none"),
}
ABLATIONS = tuple(n for n, e in MODELS.items() if e.ablation)


def parse_models(models: str | Iterable[str]) -> list[str]:
    """Model names (a comma-separated string or a list; "all" = GECo and the five baselines,
    "ablations" = GECo and its template ablations) -> known names, deduplicated, in table
    order. Unknown names raise ConfigError."""
    if isinstance(models, str):
        models = models.split(",")
    names: list[str] = []
    for m in (m.strip().lower() for m in models if m.strip()):
        if m == "all":
            names += [n for n in MODELS if n not in ABLATIONS]
        elif m == "ablations":
            names += ["geco", *ABLATIONS]
        else:
            names.append(m)
    if not names:
        raise ConfigError(f"--models: name at least one model (available: {', '.join(MODELS)})")
    for name in names:
        if name not in MODELS:
            raise ConfigError(f"unknown model {name!r} (available: {', '.join(MODELS)}, all, "
                              "or ablations)")
    return [name for name in MODELS if name in names]


def geco_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / "geco" / "best.pt"


def run_compare(cfg: Config, run_dir: str | Path, models: str | Iterable[str] = DEFAULT_MODELS,
                *, split: str = "test", train_geco: bool = True) -> dict[str, Any]:
    """Train (or load) and evaluate `models` on `split`; write `<run-dir>/compare/` and, with a
    tracking URI, log the comparison to MLflow. Returns what compare.json holds."""
    run_dir = Path(run_dir)
    names = parse_models(models)
    if "geco" in names and not geco_checkpoint(run_dir).is_file() and not train_geco:
        raise GecoError(f"no GECo checkpoint at {geco_checkpoint(run_dir)}: train it first with "
                        f"`geco pipeline --config CONFIG --run-dir {run_dir}`, let compare "
                        "train it (leave out --no-train), or leave geco out of --models")
    data = open_data(cfg.data)
    tracker = open_tracking(cfg, run_dir)
    results: dict[str, dict[str, Any]] = {}
    try:
        if "geco" in names:
            results["geco"] = run_geco(cfg, run_dir, split, data)
        for name in (n for n in names if MODELS[n].ablation):
            results[name] = run_ablation(name, cfg, run_dir, split, data)
        for name in (n for n in names if n != "geco" and not MODELS[n].ablation):
            results[name] = run_baseline(name, cfg, run_dir, split, data)
        result = assemble(cfg, split, results, run_dir / "compare")
        write_outputs(result, run_dir / "compare")
        save_config(cfg, run_dir / "compare" / "config.yaml")
        if tracker.enabled:
            log_comparison(tracker, result)
            write_outputs(result, run_dir / "compare")  # now with the MLflow run id
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result


def run_baseline(name: str, cfg: Config, run_dir: Path, split: str, data,
                 on_epoch_end: Callable[[dict[str, Any], Path], None] | None = None
                 ) -> dict[str, Any]:
    """Fit (train, resume or load) one baseline into <run_dir>/<name>/ and evaluate it on
    `split`: its result entry. `on_epoch_end` runs after each epoch a trainable one saves."""
    entry = MODELS[name]
    if name == "geco":
        raise ConfigError("geco is not a baseline")
    t0 = time.perf_counter()
    splits, images = data.splits(("train", split))
    out: dict[str, Any] = {"label": entry.label, "trained_on": splits["train"].source,
                           "checkpoint": None}
    if entry.trainable:
        stage, summary = train(cfg, name, run_dir, on_epoch_end=on_epoch_end, data=data)
        scorer = stage.scorer(images)
        history = summary["history"]
        out.update(checkpoint=summary["last"], history=history,
                   config=asdict(getattr(stage.cfg.baselines, name.replace("-", "_"))),
                   info={**stage.info(), "epochs": len(history),
                         "epochs_trained": summary["epochs_trained"],
                         "resumed_after_epoch": summary["resumed_after_epoch"],
                         "train_seconds": summary["train_seconds"]})
        if (Path(summary["last"]).parent / "samples").is_dir():
            out["samples_dir"] = str(Path(summary["last"]).parent / "samples")
    else:
        init_runtime(cfg.runtime)  # seeds, as for every model
        scorer = entry.make(cfg)
        scorer.fit(splits["train"])
    out["fit_seconds"] = time.perf_counter() - t0
    out["metrics"] = evaluate_scorer(scorer, splits[split], ties=cfg.eval.ties)
    out["seconds"] = time.perf_counter() - t0
    _log_row(entry.label, out["metrics"])
    return out


def run_geco(cfg: Config, run_dir: Path, split: str, data) -> dict[str, Any]:
    """GECo's entry: its best checkpoint in the run dir (trained here first, CIGM then GECo,
    when absent; an interrupted training resumes), evaluated like `geco evaluate`."""
    t0 = time.perf_counter()
    ckpt_path = geco_checkpoint(run_dir)
    trained_here = not ckpt_path.is_file()
    if trained_here:
        log.info("compare: no GECo checkpoint at %s: training CIGM then GECo", ckpt_path)
        for stage in ("cigm", "geco"):
            save_config(cfg, run_dir / stage / "config.yaml")
            train(cfg, stage, run_dir, data=data)
    out = evaluate_checkpoint(cfg, ckpt_path, split, data)
    result = {"label": MODELS["geco"].label, "metrics": out["metrics"],
              "checkpoint": str(ckpt_path), "epoch": out["epoch"],
              "trained_config": out["trained_config"], "trained_here": trained_here,
              "seconds": time.perf_counter() - t0}
    _log_row("GECo", result["metrics"])
    retriever = out["retriever"]
    if retriever.prior_weight:  # reported with and without the popularity prior
        result["metrics_without_prior"] = evaluate(
            retriever, data, split, rt=init_runtime(cfg.runtime),
            image_size=out["trained_config"]["data"]["image_size"], cfg=cfg.eval,
            num_workers=cfg.data.loader_workers, prior_weights=[0.0])
        _log_row("GECo, w=0", result["metrics_without_prior"])
    return result


def run_ablation(name: str, cfg: Config, run_dir: Path, split: str, data) -> dict[str, Any]:
    """A GECo ablation's entry: GECo trained with `geco.template` = the entry's, into
    <run_dir>/<name>/geco/, with the generator of the run's CIGM (trained first if missing)."""
    from geco.config import config_from_dict
    from geco.models.geco import cigm_path

    entry, t0 = MODELS[name], time.perf_counter()
    generator = cigm_path(cfg, run_dir)
    if not generator.is_file():
        log.info("compare: %s needs a CIGM: training it into %s", name, run_dir)
        save_config(cfg, run_dir / "cigm" / "config.yaml")
        train(cfg, "cigm", run_dir, data=data)
        generator = cigm_path(cfg, run_dir)
    vcfg = config_from_dict(cfg.to_dict())
    vcfg.geco.template, vcfg.geco.cigm_checkpoint = entry.template, str(generator.resolve())
    ckpt_path = geco_checkpoint(run_dir / name)
    trained_here = not ckpt_path.is_file()
    if trained_here:
        save_config(vcfg, run_dir / name / "geco" / "config.yaml")
        train(vcfg, "geco", run_dir / name, data=data)
    out = evaluate_checkpoint(vcfg, ckpt_path, split, data)
    result = {"label": entry.label, "metrics": out["metrics"], "checkpoint": str(ckpt_path),
              "epoch": out["epoch"], "template": entry.template, "trained_here": trained_here,
              "seconds": time.perf_counter() - t0}
    _log_row(entry.label, result["metrics"])
    return result


def _log_row(label: str, m: dict[str, Any]) -> None:
    log.info("compare: %-10s AUC-1vs1 %.4f  MRR-full %.4f  AUC-1vs3 %.4f  MRR-1vs9 %.4f",
             label, m["auc_1vs1"], m["mrr_full"], m.get("auc_1vs3", float("nan")),
             m.get("mrr_1vs9", float("nan")))


def assemble(cfg: Config, split: str, results: dict[str, dict[str, Any]],
             out_dir: Path | str) -> dict[str, Any]:
    """compare.json's content: results in the paper's row order plus the dataset and config.
    Every model was scored on the same rows, so the row and pool sizes are any model's."""
    ordered = {n: results[n] for n in MODELS if n in results}
    sizes = {(r["metrics"]["n_queries"], r["metrics"]["n_candidates"]) for r in ordered.values()}
    if len(sizes) != 1:
        raise GecoError(f"compare: the models were scored on different rows or pools "
                        f"(queries, candidates): {sorted(sizes)}")
    n_queries, n_candidates = sizes.pop()
    return {
        "dataset": cfg.data.location,
        "dataset_name": _dataset_name(cfg),
        "split": split,
        "ties": cfg.eval.ties,
        "n_queries": n_queries,
        "n_candidates": n_candidates,
        "models": ordered,
        "files": {k: str(Path(out_dir) / f"compare.{k}") for k in ("md", "csv", "json")},
        "config": cfg.to_dict(),
    }


def _dataset_name(cfg: Config) -> str:
    where = cfg.data.location
    return where.rstrip("/").rsplit("/", 1)[-1] or where


# --------------------------------------------------------------------------- MLflow


def tracking_requested(cfg: Config) -> bool:
    """Compare logs to MLflow only when a tracking URI is set (config or environment)."""
    import os

    return cfg.tracking.enabled and bool(cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))


def open_tracking(cfg: Config, run_dir: Path, *, run_name: str = ""):
    """The comparison's parent MLflow run (reopened when the same comparison reruns), or a
    disabled tracker without a tracking URI."""
    from geco.tracking import Tracker

    if not tracking_requested(cfg):
        return Tracker(cfg.tracking)
    name = run_name or f"compare-{_dataset_name(cfg)}"
    key = f"compare:{Path(run_dir).resolve()}" if not run_name else f"compare:{run_name}"
    tracker, _ = Tracker.resume_or_start(cfg.tracking, key=key, run_name=name,
                                         tags={"geco.kind": "compare"})
    tracker.log_config(cfg.to_dict())
    return tracker


def log_comparison(tracker, result: dict[str, Any]) -> None:
    """The table files and `<model>.<metric>` metrics on the parent run; one child run per
    model with its metrics, per-epoch history and template grids."""
    from geco.tracking import Tracker

    if not tracker.enabled:
        return
    out_dir = Path(result["files"]["md"]).parent
    for name in ("md", "csv", "json"):
        tracker.log_artifact(out_dir / f"compare.{name}", "compare")
    flat: dict[str, float] = {}
    for name, r in result["models"].items():
        flat.update({f"{name}.{k}": v for k, v in numeric(r["metrics"]).items()})
        key = f"{tracker.run_id}:{name}"
        child, created = Tracker.resume_or_start(
            tracker.cfg, key=key, run_name=f"{r['label']}", parent_run_id=tracker.run_id,
            tags={"geco.kind": "compare-model", "geco.model": name,
                  "geco.checkpoint": str(r.get("checkpoint") or "")})
        with child:
            if r.get("config"):
                child.log_config(r["config"])
            child.log_metrics({f"{result['split']}_{k}": v
                               for k, v in numeric(r["metrics"]).items()})
            if created:
                for row in r.get("history") or []:
                    child.log_metrics(numeric(row, skip=("epoch",)), step=int(row["epoch"]))
                if r.get("samples_dir"):
                    _log_pngs(child, r["samples_dir"])
    tracker.log_metrics(flat)
    result["mlflow_run_id"] = tracker.run_id


def _log_pngs(run, folder: str) -> None:
    """A model's template grids (epoch_NNN.png in a folder, local or s3:// for a Ray task's)
    as the image "templates" at step NNN."""
    import re
    import tempfile

    from geco.data.storage import Storage

    store = Storage(folder)
    grids = {n: int(m.group(1)) for n in store.list() if (m := re.fullmatch(r"epoch_(\d+)\.png", n))}
    with tempfile.TemporaryDirectory(prefix="geco-grids-") as tmp:
        for name, epoch in sorted(grids.items(), key=lambda kv: kv[1]):
            path = store.local_root / name if store.local_root is not None else Path(tmp) / name
            if store.local_root is None:
                path.write_bytes(store.get_bytes(name))
            run.log_image(path, "templates", epoch)


# --------------------------------------------------------------------------- outputs


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def format_comparison(result: dict[str, Any]) -> str:
    """Markdown: the paper's Tables 2 and 3 (rows = models) and the other ranking metrics."""
    everything = result["models"]
    models = {n: r for n, r in everything.items() if not MODELS[n].ablation}
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
    ablations = {n: r for n, r in everything.items() if n == "geco" or MODELS[n].ablation}
    if len(ablations) > 1:
        lines += ["", "## Table 4, extended: what the template adds", "",
                  "| Model | AUC-1vs1 | AUC-1vs3 | MRR-1vs9 | MRR-full |", "|---|---|---|---|---|"]
        for r in ablations.values():
            m = r["metrics"]
            lines.append(f"| {r['label']} | {_fmt(m.get('auc_1vs1'))} | {_fmt(m.get('auc_1vs3'))}"
                         f" | {_fmt(m.get('mrr_1vs9'))} | {_fmt(m.get('mrr_full'))} |")
    geco = everything.get("geco", {})
    if "metrics_without_prior" in geco:
        w = geco["metrics"].get("popularity_weight", float("nan"))
        lines += ["", "## GECo's popularity prior (docs/model.md §3.7)", "",
                  "| Model | AUC-1vs1 | AUC-1vs3 | MRR-1vs9 | MRR-full |", "|---|---|---|---|---|"]
        chosen = (geco.get("trained_config") or {}).get("geco", {}).get("popularity_search")
        with_prior = f"GECo, prior w = {w:g}" + (" (chosen on validation)" if chosen else "")
        for label, m in ((with_prior, geco["metrics"]),
                         ("GECo, no prior (the paper's scoring)", geco["metrics_without_prior"])):
            lines.append(f"| {label} | {_fmt(m.get('auc_1vs1'))} | {_fmt(m.get('auc_1vs3'))}"
                         f" | {_fmt(m.get('mrr_1vs9'))} | {_fmt(m.get('mrr_full'))} |")
    n = result["n_candidates"]
    lines += ["", f"Chance level: AUC 0.5000, MRR-1vs9 {random_expectations(10)['mrr']:.4f}, "
              f"MRR-full {random_expectations(n)['mrr']:.4f} (H_U/U, U = {n}). AUC is strict "
              f"(ties lose); ranks use the '{result['ties']}' tie rule."]
    sources = [f"{r['label']}: {r['checkpoint']}" + (f" (epoch {r['epoch']})" if "epoch" in r
                                                     else "")
               for r in everything.values() if r.get("checkpoint")]
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
