"""`geco retrieve TOP.jpg`: the ranked bottoms a registered retriever gives one top, and a
picture of them: the top, its generated template, the top-k bottoms, the true bottom framed
when it is known (from `--true-bottom`, or the split CSVs of the dataset folder the top comes
from: <root>/img/<id>.jpg next to <root>/files/*.csv).

Pictures are also what the retrieval gallery (geco.gallery) is made of: `retrieval_row`.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from geco.errors import GecoError

log = logging.getLogger("geco")

DEFAULT_MODEL = "models:/geco-retriever@champion"
CELL = 128  # px per picture cell


def load_served_bundle(model_uri: str, tracking_uri: str, catalogue: str = ""):
    """The Bundle (geco.serving) of an MLflow model URI: models:/NAME@ALIAS, models:/NAME/N,
    runs:/ID/retriever or a local model folder; registry URIs resolve in `tracking_uri`.
    `catalogue`: a catalogue file or s3:// URI instead of the model's own."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)  # models:/ URIs resolve through the global one
    mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(
            model_uri, model_config={"catalogue": catalogue} if catalogue else None)
    except (MlflowException, OSError) as exc:
        raise GecoError(f"cannot load model {model_uri} from {tracking_uri}: "
                        f"{str(exc).splitlines()[0]}") from None
    python_model = model.unwrap_python_model()
    bundle = getattr(python_model, "bundle", None)
    if bundle is None:
        raise GecoError(f"{model_uri} is not a geco retriever")
    return bundle


def true_bottoms(top: Path) -> set[str]:
    """Bottoms paired with `top` in the split CSVs of its dataset folder, if it has one."""
    files = top.resolve().parent.parent / "files"
    found: set[str] = set()
    for name in ("train.csv", "valid.csv", "test.csv"):
        path = files / name
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) >= 2 and row[0] == top.stem:
                    found.add(row[1])
    return found


def template_image(bundle: Any, top_path: str | Path, seed: int):
    """The generated template of a top (a PIL image), or None for a top-only model."""

    from geco.data.transforms import denormalize_imagenet, imagenet_transform
    from geco.serving import open_image, query_noise

    x = imagenet_transform(bundle.image_size)(open_image(0, str(top_path), allow_paths=True))
    t = bundle.retriever.templates(x[None], query_noise(bundle.retriever, 1, seed))
    if t is None:
        return None
    return to_pil(denormalize_imagenet(t.float())[0].clamp(0, 1))


def to_pil(t):
    from PIL import Image

    arr = (t.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr)


def open_uri(uri: str):
    """A bottom's picture from its catalogue image URI (path or s3://), None if unreadable."""
    from PIL import Image

    if not uri:
        return None
    from geco.catalogue import read_bytes

    try:
        with Image.open(io.BytesIO(read_bytes(uri))) as im:
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - a missing picture is drawn as a grey cell
        return None


def retrieval_row(top, template, bottoms: list[tuple[str, float, Any]], truth: set[str],
                  cell: int = CELL):
    """One picture: top | template | bottoms (id, score, image or None) with labels; the true
    bottoms framed in green."""
    from PIL import Image, ImageDraw, ImageFont

    cells = [("top", top, False), ("template", template, False)]
    cells += [(f"#{r} {bid} {score:.1f}", im, bid in truth)
              for r, (bid, score, im) in enumerate(bottoms, 1)]
    head, pad = 18, 4
    canvas = Image.new("RGB", (len(cells) * (cell + pad) + pad, head + cell + 2 * pad), "white")
    draw = ImageDraw.Draw(canvas)
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    for c, (label, im, framed) in enumerate(cells):
        x, y = pad + c * (cell + pad), head + pad
        if im is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            draw.text((x + 6, y + cell // 2 - 6), "no image", fill="black", font=font)
        else:
            canvas.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
        if framed:
            draw.rectangle([x - 3, y - 3, x + cell + 2, y + cell + 2], outline=(0, 170, 0),
                           width=4)
        draw.text((x + 2, 2), label[:22], fill="black", font=font)
    return canvas


def retrieve(top: str | Path, *, model_uri: str = DEFAULT_MODEL, tracking_uri: str = "",
             k: int = 10, seed: int = 0, out: str | Path | None = None,
             truth: set[str] | None = None, bundle: Any = None, catalogue: str = ""
             ) -> dict[str, Any]:
    """Rank the catalogue for `top` with the model (or a loaded `bundle`) and draw the picture
    (default TOP_retrieved.png next to the top); returns {"results", "picture", "truth", ...}."""
    from geco.serving import open_image, rank

    top = Path(top)
    if not top.is_file():
        raise GecoError(f"top image not found: {top}")
    bundle = bundle or load_served_bundle(model_uri, tracking_uri, catalogue)
    answer = rank(bundle, [str(top)], k=k, seed=seed)
    truth = set(truth) if truth else true_bottoms(top)
    results = [{"rank": int(r.rank), "bottom_id": r.bottom_id, "score": float(r.score),
                "image_uri": r.image_uri, "true": r.bottom_id in truth}
               for r in answer.itertuples()]
    picture = Path(out) if out else top.parent / f"{top.stem}_retrieved.png"
    row = retrieval_row(open_image(0, str(top), allow_paths=True),
                        template_image(bundle, top, seed),
                        [(r["bottom_id"], r["score"], open_uri(r["image_uri"]))
                         for r in results], truth)
    picture.parent.mkdir(parents=True, exist_ok=True)
    row.save(picture)
    return {"top": str(top), "model": model_uri, "results": results, "picture": str(picture),
            "truth": sorted(truth)}
