"""Evaluation of a retriever on a split: the paper's Table 2 and Table 3 metrics and more.

One function, `evaluate`, for every data source (geco.data.source) and every caller
(validation after each GECo epoch, `geco evaluate`, the Ray evaluation task, `geco compare`).
Efficient and deterministic (docs/model.md §4.5, §7 items 6-7):
- every candidate bottom is embedded once (eval-mode BatchNorm makes an embedding a function
  of the image alone), then gathered for positives, negatives and the full-ranking pool (the
  unique positive bottoms of the split);
- row r's template uses noise r of a draw seeded with `eval.seed`, so the numbers depend
  neither on batch size, worker count or source, nor on what ran before;
- AUC is pooled and strict, ranks are one matrix product (geco.metrics).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from geco.data.transforms import imagenet_transform
from geco.errors import DataError
from geco.metrics import TieRule, full_ranking_metrics, random_expectations, sampled_metrics
from geco.settings import at_least, check_seed, require

if TYPE_CHECKING:
    from pathlib import Path

    from geco.config import Config
    from geco.data.source import FolderData, ShardData
    from geco.models.geco import Retriever
    from geco.train.runtime import Runtime

log = logging.getLogger("geco")


@dataclass
class EvalConfig:
    batch_size: int = 128
    seed: int = 1234  # template noise at evaluation is seeded: metrics are reproducible
    ties: TieRule = "expected"
    # Share of a split's rows that must be scored for its metrics to be reported (test
    # and valid in `geco evaluate`, `geco compare`, the Ray evaluation task). Rows are lost
    # when data.on_missing_image=skip or on_bad_image=skip drop rows, unreadable samples or
    # candidates; metrics over a sliver of a split are not the split's.
    min_coverage: float = 1.0

    def validate(self, key: str) -> None:
        at_least(f"{key}.batch_size", self.batch_size, 1)
        check_seed(f"{key}.seed", self.seed)
        require(0 < self.min_coverage <= 1, f"{key}.min_coverage", self.min_coverage,
                "a share of the split's rows in (0, 1]")


@torch.no_grad()
def embed_candidates(embed, data: FolderData | ShardData, split: str, *, rt: Runtime,
                     image_size: int, batch_size: int, num_workers: int = 0
                     ) -> tuple[list[str], torch.Tensor, int]:
    """(ids, [N, d] embeddings, skipped) of the split's candidate bottoms, each once:
    `embed(batch of ImageNet-space images)` on the device, results in fp32 on the CPU."""
    ids: list[str] = []
    out: list[torch.Tensor] = []
    skipped = 0
    for batch in data.candidates(split, imagenet_transform(image_size), batch_size=batch_size,
                                 num_workers=num_workers, rt=rt):
        if batch is None:
            raise DataError(f"{data.where}: every image of a {split} candidate batch was "
                            "unreadable; see the warnings above")
        skipped += int(batch.get("skipped", 0))
        with rt.autocast():
            out.append(embed(rt.to_device(batch["image"])).float().cpu())
        ids += batch["id"]
    return ids, (torch.cat(out) if out else torch.empty(0)), skipped


@torch.no_grad()
def evaluate(retriever: Retriever, data: FolderData | ShardData, split: str, *, rt: Runtime,
             image_size: int, cfg: EvalConfig, num_workers: int = 0,
             prior_weights: Sequence[float] = (), select: str = "",
             min_coverage: float | None = None) -> dict[str, Any]:
    """All metrics of `retriever` on one valid/test split of `data`.

    `prior_weights` (with `select`, a metric name): score with each popularity weight and
    return the metrics of the one that maximises `select` (first on ties), under
    "popularity_weight"; the embeddings are computed once. Else the retriever's own weight.

    In skip mode, unreadable samples and rows whose bottoms are missing from the candidates
    are counted in "skipped", not scored; the metrics say how many rows were scored
    ("rows_scored" of "rows_total") and why the others were not. Fewer scored rows than
    `min_coverage` (default cfg.min_coverage) of the split raise a DataError naming the
    counts; 0 only warns (validation during training)."""
    if len(prior_weights) > 1 and not select:
        raise ValueError("evaluate: several prior_weights need `select`, the metric to choose by")
    t0 = time.perf_counter()
    retriever.generator.eval()
    retriever.model.eval()
    n_rows = data.n_rows(split)
    ids, bottoms, candidates_skipped = embed_candidates(
        retriever.bottoms, data, split, rt=rt, image_size=image_size,
        batch_size=cfg.batch_size, num_workers=num_workers)
    skipped = candidates_skipped
    order = {item: i for i, item in enumerate(ids)}

    noise = torch.randn(n_rows, retriever.generator.noise_dim,
                        generator=torch.Generator().manual_seed(cfg.seed))
    rows: list[tuple[int, torch.Tensor, str, list[str]]] = []
    for batch in data.queries(split, imagenet_transform(image_size), batch_size=cfg.batch_size,
                              num_workers=num_workers, rt=rt):
        if batch is None:
            raise DataError(f"{data.where}: every sample of a {split} batch was unreadable; "
                            "see the warnings above")
        skipped += int(batch.get("skipped", 0))
        index = batch["index"]
        if int(index.max()) >= n_rows:
            raise DataError(f"{data.where}: {split} row {int(index.max())} beyond the "
                            f"{n_rows} rows of its manifest (manifest out of date?)")
        with rt.autocast():
            q = retriever.queries(rt.to_device(batch["top"]), noise[index].to(rt.device))
        q = q.float().cpu()
        for i, r in enumerate(index.tolist()):
            rows.append((r, q[i], batch["bottom_id"][i], batch["negatives"][i]))
    rows.sort(key=lambda row: row[0])
    usable = [row for row in rows if all(b in order for b in (row[2], *row[3]))]
    if len(usable) < len(rows):
        missing = next(b for row in rows for b in (row[2], *row[3]) if b not in order)
        err = DataError(f"{data.where}: {len(rows) - len(usable)} {split} rows mention bottoms "
                        f"absent from its candidates (e.g. {missing!r})")
        if data.cfg.on_bad_image == "error":
            raise err
        log.warning("skipping rows: %s", err)
        skipped += len(rows) - len(usable)
    dropped = data.dropped_rows(split)
    coverage = {"rows_total": n_rows + dropped, "rows_scored": len(usable),
                # rows without a readable top, or dropped by the image check when loading
                "rows_unreadable": n_rows + dropped - len(rows),
                "rows_missing_candidates": len(rows) - len(usable),
                "candidates_unreadable": candidates_skipped}
    check_coverage(coverage, split, data.where,
                   cfg.min_coverage if min_coverage is None else min_coverage)
    queries = torch.stack([row[1] for row in usable])
    positives, negatives = [row[2] for row in usable], [row[3] for row in usable]
    metrics: dict[str, Any] = {}
    for w in (list(prior_weights) or [retriever.prior_weight]):  # geco.popularity_weight
        m = score_rows(retriever.with_prior_queries(queries, w),
                       retriever.with_prior_bottoms(ids, bottoms, w), order, positives,
                       negatives, ties=cfg.ties)
        if prior_weights or w:
            m["popularity_weight"] = float(w)
        if not metrics or m[select] > metrics[select]:
            metrics = m
    metrics["skipped"] = skipped
    metrics.update(coverage)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def check_coverage(coverage: dict[str, int], split: str, where: str, min_coverage: float) -> None:
    """Refuse metrics over less than `min_coverage` of a split's rows (0: warn only): a split
    that lost rows to skips is another, easier or harder, split."""
    total, scored = coverage["rows_total"], coverage["rows_scored"]
    if scored == total:
        return
    what = (f"{where}: scored {scored} of the {total} {split} rows "
            f"({coverage['rows_unreadable']} unreadable, {coverage['rows_missing_candidates']} "
            "naming bottoms absent from the candidates)")
    if scored == 0 or (min_coverage > 0 and scored < min_coverage * total):
        need = f"eval.min_coverage={min_coverage:g}" if min_coverage > 0 else "at least one row"
        raise DataError(f"{what}; {need} refuses metrics over the rest: fix the data (see the "
                        "warnings above), or lower eval.min_coverage to report them anyway")
    log.warning("%s: metrics cover %.1f%% of the split", what, 100 * scored / total)

def evaluate_checkpoint(cfg: Config, checkpoint: str | Path, split: str, data=None, *,
                        generator: str | Path | None = None) -> dict[str, Any]:
    """A GECo checkpoint (and its generator: the one its config names, unless given) on a
    split of the configured data, at the image size it was trained with, with `cfg.eval`:
    what `geco evaluate`, `geco compare` and the Ray evaluation task report. Returns
    {"metrics", "epoch" (1-based), "dataset", "trained_config", "retriever", "ckpt"}."""
    from geco.data.source import open_data
    from geco.models.geco import load_retriever
    from geco.train.runtime import init_runtime

    rt = init_runtime(cfg.runtime)
    retriever, ckpt = load_retriever(checkpoint, rt.device, generator_path=generator)
    trained = ckpt["config"]
    here = cfg.data.location
    there = trained["data"].get("shards") or trained["data"]["root"]
    if here != there:
        log.warning("GECo checkpoint %s was trained on %s, evaluated on %s", checkpoint, there,
                    here)
    data = data if data is not None else open_data(cfg.data)
    metrics = evaluate(retriever, data, split, rt=rt, image_size=trained["data"]["image_size"],
                       cfg=cfg.eval, num_workers=cfg.data.loader_workers)
    return {"metrics": metrics, "epoch": ckpt["epoch"] + 1, "dataset": data.describe(split),
            "trained_config": trained, "retriever": retriever, "ckpt": ckpt}


def score_rows(queries: torch.Tensor, bottoms: torch.Tensor, order: dict[str, int],
               positives: list[str], negatives: list[list[str]], *, ties: str = "expected"
               ) -> dict[str, Any]:
    """Every metric from embedded rows: `queries[r]` scores `positives[r]` against
    `negatives[r]`; `bottoms[order[id]]` is an item's embedding. The full-ranking pool is the
    unique positive bottoms in first-appearance order (docs/model.md §4.1)."""
    pos_idx = torch.tensor([order[b] for b in positives])
    neg_idx = torch.tensor([[order[b] for b in negs] for negs in negatives])
    pos = (queries * bottoms[pos_idx]).sum(-1)
    neg = torch.einsum("rd,rkd->rk", queries, bottoms[neg_idx])
    metrics: dict[str, Any] = sampled_metrics(pos, neg, ties=ties)

    pool_ids = list(dict.fromkeys(positives))
    pool_pos = {b: i for i, b in enumerate(pool_ids)}
    pool = bottoms[torch.tensor([order[b] for b in pool_ids])]
    pool_index = torch.tensor([pool_pos[b] for b in positives])
    metrics.update(full_ranking_metrics(queries, pool, pool_index, ties=ties))
    metrics["n_queries"], metrics["n_candidates"] = len(positives), len(pool_ids)
    rnd = random_expectations(len(pool_ids))
    metrics["random_mrr_full"] = rnd["mrr"]
    metrics["mrr_full_vs_random"] = metrics["mrr_full"] / rnd["mrr"]
    return metrics


TABLE_KEYS = {
    "Table 2 (AUC 1-vs-1, MRR full ranking)": ("auc_1vs1", "mrr_full"),
    "Table 3 (AUC 1-vs-3, MRR 1-vs-9)": ("auc_1vs3", "mrr_1vs9"),
}


def format_tables(metrics: dict[str, Any], model: str = "GECo") -> str:
    """Markdown rows in the layout of the paper's Tables 2 and 3."""
    lines = []
    for title, (auc_key, mrr_key) in TABLE_KEYS.items():
        lines += [title, "", "| Model | AUC | MRR |", "|---|---|---|",
                  f"| {model} | {metrics.get(auc_key, float('nan')):.4f} | "
                  f"{metrics.get(mrr_key, float('nan')):.4f} |", ""]
    lines.append(
        f"recall@1 {metrics.get('recall_at_1', float('nan')):.4f}  "
        f"recall@10 {metrics.get('recall_at_10', float('nan')):.4f}  "
        f"ndcg@10 {metrics.get('ndcg_at_10', float('nan')):.4f}  "
        f"({metrics.get('n_queries')} queries x {metrics.get('n_candidates')} candidates; "
        f"random MRR-full {metrics.get('random_mrr_full', float('nan')):.4f})"
    )
    return "\n".join(lines)
