"""Evaluation of a retriever on a split: the paper's Table 2 and Table 3 metrics and more.

Efficient and deterministic (REFERENCE §4, §7 items 13-14):
- every bottom image referenced by the split is embedded once (eval-mode BatchNorm makes an
  embedding a function of the image alone), then gathered for positives, negatives and the
  full-ranking pool (the unique positive bottoms of the split);
- each row's template uses noise drawn up front from a generator seeded with `eval.seed`, so
  the numbers do not depend on batch size, worker count or what ran before;
- AUC is pooled and strict, ranks are one matrix product (geco.metrics).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from geco.data.datasets import ItemDataset
from geco.data.images import ImageFolder
from geco.data.splits import Split
from geco.data.transforms import gan_to_imagenet, imagenet_to_gan, imagenet_transform
from geco.metrics import full_ranking_metrics, random_expectations, sampled_metrics
from geco.models.cigm import Generator
from geco.models.geco import GECo
from geco.train.runtime import Runtime

log = logging.getLogger("geco")


@dataclass
class Retriever:
    """A frozen generator plus a GECo model: the inference half of the system."""

    generator: Generator
    model: GECo
    faithful: bool = False

    @torch.no_grad()
    def templates(self, tops: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Tops in ImageNet space -> templates in ImageNet space (or raw, if faithful)."""
        fake = self.generator(imagenet_to_gan(tops, faithful=self.faithful), noise)
        return gan_to_imagenet(fake.float(), faithful=self.faithful)

    @torch.no_grad()
    def queries(self, tops: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.model.query(tops, self.templates(tops, noise))

    @torch.no_grad()
    def bottoms(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed_bottoms(images)


def _loader(ds, batch_size: int, num_workers: int, rt: Runtime) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=rt.device.type == "cuda")


@torch.no_grad()
def embed_items(fn, ids: list[str], images: ImageFolder, size: int, *, rt: Runtime,
                batch_size: int, num_workers: int, extra=None,
                contexts: list[str] | None = None) -> torch.Tensor:
    """Apply `fn(batch[, extra_slice])` over the images of `ids`, in order; returns [N, d] fp32.

    `contexts` (CSV file:line per id) goes into the message if an image cannot be read.
    """
    ds = ItemDataset(ids, images, imagenet_transform(size), contexts=contexts)
    out, start = [], 0
    for batch in _loader(ds, batch_size, num_workers, rt):
        x = rt.to_device(batch["image"])
        with rt.autocast():
            if extra is None:
                emb = fn(x)
            else:
                emb = fn(x, extra[start:start + len(x)].to(rt.device))
        out.append(emb.float().cpu())
        start += len(x)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def evaluate_split(
    retriever: Retriever, split: Split, images: ImageFolder, *, rt: Runtime, image_size: int,
    batch_size: int = 128, seed: int = 1234, ties: str = "expected", num_workers: int = 0,
) -> dict[str, Any]:
    """All metrics for one valid/test split; rows need >= 3 negatives (>= 9 for MRR-1vs9)."""
    if split.negatives is None:
        raise ValueError(f"{split.source}: evaluation needs neg_* columns")
    t0 = time.perf_counter()
    retriever.generator.eval()
    retriever.model.eval()
    n_rows = len(split)
    noise = torch.randn(n_rows, retriever.generator.noise_dim,
                        generator=torch.Generator().manual_seed(seed))
    queries = embed_items(retriever.queries, list(split.tops), images, image_size, rt=rt,
                          batch_size=batch_size, num_workers=num_workers, extra=noise,
                          contexts=[split.where(r) for r in range(n_rows)])

    # Every bottom the split mentions, embedded once; `order` maps id -> row of `bottoms`.
    order: dict[str, int] = {}
    first_row: list[int] = []
    for r, (b, negs) in enumerate(zip(split.bottoms, split.negatives, strict=True)):
        for item in (b, *negs):
            if item not in order:
                order[item] = len(order)
                first_row.append(r)
    bottoms = embed_items(retriever.bottoms, list(order), images, image_size, rt=rt,
                          batch_size=batch_size, num_workers=num_workers,
                          contexts=[split.where(r) for r in first_row])

    metrics = score_rows(queries, bottoms, order, list(split.bottoms), list(split.negatives),
                         ties=ties)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def score_rows(queries: torch.Tensor, bottoms: torch.Tensor, order: dict[str, int],
               positives: list[str], negatives: list[list[str]], *, ties: str = "expected"
               ) -> dict[str, Any]:
    """Every metric from embedded rows: `queries[r]` scores `positives[r]` against
    `negatives[r]`; `bottoms[order[id]]` is an item's embedding. The full-ranking pool is the
    unique positive bottoms in first-appearance order (REFERENCE §4)."""
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


def _stream_loader(stream, num_workers: int, rt: Runtime) -> DataLoader:
    return DataLoader(stream, batch_size=None, num_workers=num_workers,
                      pin_memory=rt.device.type == "cuda")


@torch.no_grad()
def embed_catalogue(retriever: Retriever, root: str, name: str, *, rt: Runtime,
                    image_size: int, batch_size: int = 128, num_workers: int = 0,
                    manifest: dict[str, Any] | None = None, on_bad: str = "error",
                    ) -> tuple[list[str], torch.Tensor, int]:
    """(ids, [N, d] embeddings, skipped) of a catalogue shard set ("catalogue-test", ...):
    the candidate side of retrieval, each bottom embedded once."""
    from geco.data.stream import ShardStream
    from geco.errors import DataError

    stream = ShardStream.from_manifest(root, name, manifest, kind="catalogue",
                                       transform=imagenet_transform(image_size),
                                       batch_size=batch_size, on_bad=on_bad)
    ids: list[str] = []
    out: list[torch.Tensor] = []
    skipped = 0
    for batch in _stream_loader(stream, num_workers, rt):
        if batch is None:
            raise DataError(f"{root}: every image of a {name} batch was unreadable; "
                            "see the warnings above")
        skipped += batch["skipped"]
        with rt.autocast():
            out.append(retriever.bottoms(rt.to_device(batch["image"])).float().cpu())
        ids += batch["id"]
    return ids, (torch.cat(out) if out else torch.empty(0)), skipped


@torch.no_grad()
def evaluate_shards(
    retriever: Retriever, root: str, split: str, *, rt: Runtime, image_size: int,
    batch_size: int = 128, seed: int = 1234, ties: str = "expected", num_workers: int = 0,
    manifest: dict[str, Any] | None = None, on_bad: str = "error",
) -> dict[str, Any]:
    """evaluate_split for shards (`geco data shard`, local or s3://): the split's eval shards
    give the rows, its catalogue shards the bottoms, each embedded once.

    A row's template noise is drawn for its row number in the source split, so shards written
    from a folder score like the folder (up to JPEG re-encoding). In skip mode, unreadable
    samples and rows whose bottoms are missing from the catalogue are counted, not scored.
    """
    from geco.data.stream import ShardStream, load_manifest
    from geco.errors import DataError

    t0 = time.perf_counter()
    manifest = manifest if manifest is not None else load_manifest(root)
    entry = manifest["splits"].get(split)
    if entry is None or entry.get("kind") != "eval":
        raise DataError(f"{root}: no eval shards for split {split!r} "
                        f"(has: {', '.join(sorted(manifest['splits']))})")
    retriever.generator.eval()
    retriever.model.eval()
    ids, bottoms, skipped = embed_catalogue(
        retriever, root, f"catalogue-{split}", rt=rt, image_size=image_size,
        batch_size=batch_size, num_workers=num_workers, manifest=manifest, on_bad=on_bad)
    order = {item: i for i, item in enumerate(ids)}

    n_rows = int(entry["samples"]) + int(entry.get("skipped", 0))
    noise = torch.randn(n_rows, retriever.generator.noise_dim,
                        generator=torch.Generator().manual_seed(seed))
    stream = ShardStream.from_manifest(root, split, manifest, kind="eval",
                                       transform=imagenet_transform(image_size),
                                       batch_size=batch_size, on_bad=on_bad)
    rows: list[tuple[int, torch.Tensor, str, list[str]]] = []
    for batch in _stream_loader(stream, num_workers, rt):
        if batch is None:
            raise DataError(f"{root}: every sample of a {split} batch was unreadable; "
                            "see the warnings above")
        skipped += batch["skipped"]
        index = batch["index"]
        if int(index.max()) >= n_rows:
            raise DataError(f"{root}: {split} row {int(index.max())} beyond the manifest's "
                            f"{n_rows} rows (manifest out of date?)")
        with rt.autocast():
            q = retriever.queries(rt.to_device(batch["top"]), noise[index].to(rt.device))
        q = q.float().cpu()
        for i, r in enumerate(index.tolist()):
            rows.append((r, q[i], batch["bottom_id"][i], batch["negatives"][i]))
    rows.sort(key=lambda row: row[0])
    usable = [row for row in rows if all(b in order for b in (row[2], *row[3]))]
    if len(usable) < len(rows):
        missing = next(b for row in rows for b in (row[2], *row[3]) if b not in order)
        err = DataError(f"{root}: {len(rows) - len(usable)} {split} rows mention bottoms absent "
                        f"from catalogue-{split} (e.g. {missing!r})")
        if on_bad == "error":
            raise err
        log.warning("skipping rows: %s", err)
        skipped += len(rows) - len(usable)
    if not usable:
        raise DataError(f"{root}: no {split} rows left to evaluate")
    queries = torch.stack([row[1] for row in usable])
    metrics = score_rows(queries, bottoms, order, [row[2] for row in usable],
                         [row[3] for row in usable], ties=ties)
    metrics["skipped"] = skipped
    metrics["eval_seconds"] = time.perf_counter() - t0
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
