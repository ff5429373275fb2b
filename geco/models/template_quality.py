"""How much a CIGM's templates say about the true bottom, measured on a validation split.

The paper never measures its templates, and on real photos a generator can settle on one
near-blank image that tells GECo nothing while its L1 loss looks fine. Every CIGM epoch runs
`measure` (rank 0) and reports (docs/model.md §2.5):

- **template retrieval** — each row's template, drawn with seeded noise, ranks the split's
  candidate bottoms by similarity: negative pixel L1 at 32 px (`template_*_l1`) and cosine in
  a frozen ResNet-18 feature space (`template_*_feat`: ImageNet weights when the backbone
  config finds them, else a seeded random ResNet-18, which still sees colour and shape).
  AUC-1vs1 and full-ranking MRR of the true bottom, the same protocols as GECo's metrics.
- **diversity** — mean pixel L1 between the templates of one top under `noises` draws
  (`template_div_noise`) and between the templates of different tops
  (`template_div_tops`), the latter also as a ratio to the same L1 between the true bottoms
  (`template_div_ratio`; ≈ 0 when every top gets the same template). Both on images
  standardised per image and channel: the U-Net's skips copy each top's background tone into
  its template, which would make one garment drawn for every top look diverse.
- **blank detector** — a pixel is drawn when it differs from its image's background (the
  median of the border pixels) by more than INK; `template_blank` is the share of templates
  that draw less than BLANK_SHARE of what the median true bottom draws (at least BLANK of
  their pixels), `template_coverage` the templates' mean drawn share over the true bottoms'.
  Relative, because a faint sketch of a garment on a blank backdrop (seen on real photos)
  still draws a few per cent of its pixels, while a real bottom draws about a third.
- `template_collapsed` = 1 when most templates are blank (`template_blank` > 0.5) or the
  diversity between tops falls below `collapse_ratio` of the true bottoms'.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from geco.data.transforms import gan_to_imagenet, gan_transform
from geco.errors import DataError, WeightsError
from geco.metrics import reciprocal_rank

if TYPE_CHECKING:
    from geco.data.source import FolderData, ShardData
    from geco.models.backbone import BackboneConfig
    from geco.train.runtime import Runtime

log = logging.getLogger("geco")

PIXEL_SIZE = 32  # pixel L1 at a coarse size: shape and colour, not texture or alignment
INK = 0.2  # in [-1, 1] units (10% of the range): a pixel differing this much is drawn
BLANK = 0.02  # a template with fewer drawn pixels than this share is blank, whatever the data
BLANK_SHARE = 0.25  # ... and one drawing less than this share of the median true bottom's


class ValidationSet:
    """The first `max_rows` rows of an eval split (GAN-space tops, row positives and negatives)
    and every candidate bottom they mention, read once and kept on the CPU."""

    def __init__(self, data: FolderData | ShardData, split: str, image_size: int,
                 max_rows: int = 0, batch_size: int = 64) -> None:
        tf = gan_transform(image_size)
        rows = []  # (row index, top, positive, negatives)
        for batch in data.queries(split, tf, batch_size=batch_size, num_workers=0):
            if batch is None:  # every sample unreadable (skip mode): counted by the reader
                continue
            rows += [(int(r), batch["top"][i], batch["bottom_id"][i], list(batch["negatives"][i]))
                     for i, r in enumerate(batch["index"].tolist())]
            if max_rows and len(rows) >= max_rows:
                break
        rows.sort(key=lambda row: row[0])
        rows = rows[:max_rows] if max_rows else rows
        tops = [r[1] for r in rows]
        positives = [r[2] for r in rows]
        negatives = [r[3] for r in rows]
        wanted = set(positives) | {b for negs in negatives for b in negs}
        ids, images = [], []
        for batch in data.candidates(split, tf, batch_size=batch_size, num_workers=0):
            if batch is None:
                continue
            for item, image in zip(batch["id"], batch["image"], strict=True):
                if item in wanted:
                    ids.append(item)
                    images.append(image)
        order = {b: i for i, b in enumerate(ids)}
        keep = [r for r in range(len(tops))
                if all(b in order for b in (positives[r], *negatives[r]))]
        if not keep:
            raise DataError(f"{data.where}: no {split} rows to measure templates on")
        self.tops = torch.stack([tops[r] for r in keep])
        self.positives = [positives[r] for r in keep]
        self.negatives = [negatives[r] for r in keep]
        self.bottom_ids, self.order = ids, order
        self.bottoms = torch.stack(images)
        self.pos_bottoms = self.bottoms[torch.tensor([order[b] for b in self.positives])]

    def __len__(self) -> int:
        return len(self.tops)


def feature_space(backbone: BackboneConfig, device: torch.device, seed: int = 0
                  ) -> tuple[torch.nn.Module, str]:
    """A frozen eval-mode ResNet-18 and its name: the configured weights when they load, else a
    seeded random init (a measurement needs no trained weights to be comparable across epochs)."""
    from geco.models.backbone import resnet18_features

    try:
        if backbone.weights == "random":
            raise WeightsError("random weights configured")
        net, name = resnet18_features(backbone.weights), f"resnet18:{backbone.weights}"
    except WeightsError:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = resnet18_features("random", allow_random_init=True)
        name = f"resnet18:random(seed={seed})"
    return net.to(device).eval().requires_grad_(False), name


def matrix_metrics(sim: Tensor, order: dict[str, int], positives: list[str],
                   negatives: list[list[str]], prefix: str) -> dict[str, float]:
    """AUC-1vs1 and full-ranking MRR from a row × candidate similarity matrix (higher = more
    alike); ties count half, as the metrics' expected rule does."""
    rows = torch.arange(len(positives))
    pos_idx = torch.tensor([order[b] for b in positives])
    neg_idx = torch.tensor([order[negs[0]] for negs in negatives])
    pos, neg = sim[rows, pos_idx], sim[rows, neg_idx]
    auc = ((pos > neg).double() + 0.5 * (pos == neg).double()).mean().item()
    pool_ids = list(dict.fromkeys(positives))
    pool = sim[:, torch.tensor([order[b] for b in pool_ids])]
    s_pos = pos[:, None]
    g, t = (pool > s_pos).sum(1), (pool == s_pos).sum(1) - 1
    mrr = reciprocal_rank(g, t, "expected").mean().item()
    return {f"{prefix}_auc_1vs1": auc, f"{prefix}_mrr_full": mrr}


def _mean_pairwise_l1(x: Tensor) -> float:
    """Mean pixel L1 over distinct pairs of the rows of x (N×D), N >= 2."""
    n = x.shape[0]
    d = torch.cdist(x, x, p=1) / x.shape[1]
    return (d.sum() / (n * (n - 1))).item()


@torch.no_grad()
def measure(generator: torch.nn.Module, vs: ValidationSet, *, rt: Runtime, seed: int,
            noises: int = 4, collapse_ratio: float = 0.1, features: torch.nn.Module | None = None,
            batch_size: int = 64) -> tuple[dict[str, float], Tensor]:
    """Template-quality metrics of `generator` (kept in eval mode) on `vs`; also returns the
    templates of the first noise draw (rows × 3×S×S in [-1, 1], CPU) for the grids.

    The noise of every (draw k, row r) comes from one draw seeded with `seed`: reproducible and
    independent of batch size, so epochs compare."""
    was_training = generator.training
    generator.eval()
    n = len(vs)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(noises, n, generator.noise_dim, generator=g)
    draws = []
    for k in range(noises):
        out = []
        for a in range(0, n, batch_size):
            x = rt.to_device(vs.tops[a:a + batch_size])
            with rt.autocast():
                out.append(generator(x, z[k, a:a + batch_size].to(rt.device)).float().cpu())
        draws.append(torch.cat(out))
    generator.train(was_training)
    templates = draws[0]

    def small(x: Tensor) -> Tensor:
        return F.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area").flatten(1)

    def shape(x: Tensor) -> Tensor:
        """The image minus its background (the per-channel median of its border pixels):
        what is drawn, not the tone of the backdrop."""
        x = F.interpolate(x, size=(PIXEL_SIZE, PIXEL_SIZE), mode="area")
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
        return (x - border.median(dim=-1).values[..., None, None]).flatten(1)

    metrics: dict[str, float] = {}
    t_small, b_small = small(templates), small(vs.bottoms)
    metrics.update(matrix_metrics(-torch.cdist(t_small, b_small, p=1), vs.order, vs.positives,
                                  vs.negatives, "template_l1"))
    if features is not None:
        def embed(x: Tensor) -> Tensor:
            out = []
            for a in range(0, len(x), batch_size):
                with rt.autocast():
                    out.append(features(rt.to_device(gan_to_imagenet(x[a:a + batch_size])))
                               .float().cpu())
            return F.normalize(torch.cat(out), dim=1)

        metrics.update(matrix_metrics(embed(templates) @ embed(vs.bottoms).T, vs.order,
                                      vs.positives, vs.negatives, "template_feat"))

    if noises > 1:
        per_top = [_mean_pairwise_l1(shape(torch.stack([d[r] for d in draws])))
                   for r in range(n)]
        metrics["template_div_noise"] = sum(per_top) / n
    truth = vs.pos_bottoms
    if n > 1:
        metrics["template_div_tops"] = _mean_pairwise_l1(shape(templates))
        real = _mean_pairwise_l1(shape(truth))
        metrics["template_div_ratio"] = metrics["template_div_tops"] / max(real, 1e-8)
    def coverage(x: Tensor) -> Tensor:
        """Per image, the share of pixels drawn: off the background by > INK in a channel."""
        dev = shape(x).view(len(x), 3, -1).abs().amax(1)
        return (dev > INK).float().mean(1)

    drawn, real_drawn = coverage(templates), coverage(truth)
    blank = max(BLANK, BLANK_SHARE * real_drawn.median().item())
    metrics["template_blank"] = (drawn < blank).float().mean().item()
    metrics["template_coverage"] = drawn.mean().item() / max(real_drawn.mean().item(), 1e-8)
    collapsed = metrics["template_blank"] > 0.5 or (
        metrics.get("template_div_ratio", 1.0) < collapse_ratio)
    metrics["template_collapsed"] = float(collapsed)
    return metrics, templates


def describe(metrics: dict[str, Any]) -> str:
    """One log line of the template metrics."""
    keys = [("template_feat_mrr_full", "MRR(feat)"), ("template_l1_mrr_full", "MRR(L1)"),
            ("template_feat_auc_1vs1", "AUC(feat)"), ("template_div_noise", "div/noise"),
            ("template_div_ratio", "div/tops"), ("template_blank", "blank"),
            ("template_coverage", "coverage")]
    return " ".join(f"{label}={metrics[k]:.3f}" for k, label in keys if k in metrics)
