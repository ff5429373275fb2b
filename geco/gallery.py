"""Retrieval galleries: one self-contained HTML page per registered version that people look at
rather than read: ~24 validation tops, each with its generated template and its top-5 bottoms
(the true bottom framed green, or its rank given when it is not in the top 5), under the
version's metrics. Pictures are inline (data: URIs), so the page renders the same opened from
disk, from S3 or inside MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

THUMB = 128  # px


def _data_uri(im, size: int = THUMB) -> str:
    from PIL import Image

    buf = io.BytesIO()
    im.convert("RGB").resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _cell(label: str, uri: str | None, *, css: str = "") -> str:
    img = (f'<img src="{uri}" width="{THUMB}" height="{THUMB}" alt="{html.escape(label)}">'
           if uri else '<div class="missing">no image</div>')
    return (f'<figure class="{css}">{img}<figcaption>{html.escape(label)}</figcaption>'
            "</figure>")


def gallery_rows(bundle: Any, rows: list[tuple[str, str]], images: Any, *, k: int = 5,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Rank the bundle's catalogue for each (top id, true bottom id); `images` loads an id
    as a PIL image (geco.data ImageFolder or ShardImages)."""
    import torch

    from geco.data.transforms import denormalize_imagenet, imagenet_transform
    from geco.serving import query_noise

    tf = imagenet_transform(bundle.image_size)
    index = {b: i for i, b in enumerate(bundle.ids)}
    out = []
    with torch.no_grad():
        for top, truth in rows:
            top_im = images.load(top)
            x = tf(top_im)[None]
            noise = query_noise(bundle.retriever, 1, seed)
            q = bundle.retriever.with_prior_queries(
                bundle.retriever.queries(x, noise).float())
            scores = (q @ bundle.embeddings.T)[0]
            order = torch.sort(scores, descending=True, stable=True).indices.tolist()
            t = bundle.retriever.templates(x, noise)
            template = None
            if t is not None:
                from geco.retrieve import to_pil

                template = to_pil(denormalize_imagenet(t.float())[0].clamp(0, 1))
            true_rank = order.index(index[truth]) + 1 if truth in index else None
            out.append({"top": top, "top_image": top_im, "template": template,
                        "truth": truth, "true_rank": true_rank,
                        "bottoms": [(bundle.ids[j], float(scores[j]), images.load(bundle.ids[j]))
                                    for j in order[:k]],
                        "truth_image": images.load(truth) if truth in index else None})
    return out


def render(rows: list[dict[str, Any]], *, title: str, metrics: dict[str, float],
           notes: dict[str, str]) -> str:
    """The page: a header with the metrics and notes, one row per top."""
    k = max((len(r["bottoms"]) for r in rows), default=5)
    hits = sum(1 for r in rows if r["true_rank"] and r["true_rank"] <= k)
    head = "".join(f"<tr><th>{html.escape(key)}</th><td>{value:.4f}</td></tr>"
                   for key, value in sorted(metrics.items()))
    note = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(str(value))}</td></tr>"
                   for key, value in notes.items())
    body = []
    for r in rows:
        cells = [_cell(f"top {r['top']}", _data_uri(r["top_image"])),
                 _cell("template", _data_uri(r["template"]) if r["template"] else None,
                       css="template")]
        for n, (bid, score, im) in enumerate(r["bottoms"], 1):
            true = bid == r["truth"]
            cells.append(_cell(f"#{n} {bid} ({score:.1f})" + (" ✓ true" if true else ""),
                               _data_uri(im), css="true" if true else ""))
        if not (r["true_rank"] and r["true_rank"] <= k):
            where = f"rank {r['true_rank']}" if r["true_rank"] else "not in the catalogue"
            cells.append(_cell(f"true {r['truth']}: {where}",
                               _data_uri(r["truth_image"]) if r["truth_image"] else None,
                               css="missed"))
        body.append(f'<div class="row">{"".join(cells)}</div>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; margin: 0 0 8px; }}
table {{ border-collapse: collapse; margin: 0 24px 12px 0; display: inline-table;
         vertical-align: top; font-size: 13px; }}
th, td {{ text-align: left; padding: 2px 8px; border-bottom: 1px solid #ddd; }}
.row {{ display: flex; gap: 8px; margin: 6px 0; align-items: flex-start; }}
figure {{ margin: 0; width: {THUMB + 8}px; padding: 3px; border: 3px solid transparent; }}
figure img {{ display: block; background: #eee; }}
figcaption {{ font-size: 11px; overflow-wrap: anywhere; }}
figure.template {{ border-color: #ccc; border-style: dashed; margin-right: 12px; }}
figure.true {{ border-color: #00aa00; }}
figure.missed {{ border-color: #d08000; border-style: dotted; margin-left: 12px; }}
.missing {{ width: {THUMB}px; height: {THUMB}px; background: #ccc; display: flex;
            align-items: center; justify-content: center; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{head}</table><table>{note}
<tr><th>true bottom in the top {k}</th><td>{hits} of {len(rows)} tops</td></tr></table>
<p>Each row: the top, its generated template, the top-{k} bottoms of the catalogue (score
in brackets); the true bottom is framed green, or shown at the end with its rank.</p>
{"".join(body)}
</body></html>
"""


def write_gallery(bundle: Any, rows: list[tuple[str, str]], images: Any, out: str | Path, *,
                  title: str, metrics: dict[str, float], notes: dict[str, str],
                  k: int = 5, seed: int = 0) -> Path:
    page = render(gallery_rows(bundle, rows, images, k=k, seed=seed), title=title,
                  metrics=metrics, notes=notes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
