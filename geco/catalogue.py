"""Bottom catalogues: the inventory a served retriever ranks, embedded once per model version.

A catalogue is data, not a by-product of a split: `geco catalogue build` embeds an inventory
and writes a versioned artifact that a served model loads by URI (geco.serving), so a new
inventory needs no new model version. Inventories:

- catalogue shards: a shard root with manifest.json (`geco data shard`), the bottoms of one
  split's `catalogue-<split>` shards;
- a folder of images (<folder>/img/ when it has one): id = file name without extension;
- a CSV (local or s3://) with a header and columns `id` and `uri` (or `image_uri`/`path`):
  a local path or s3:// URI per bottom, relative ones resolved next to the CSV.

The artifact (torch.save, weights-only loadable) holds ids, embeddings [N, d], image_size,
image_uris, `model` (URI, registered name/version/run when known, and the fingerprint of the
weights that embed bottoms, checked when a served model loads it), `sources` (the shards'
sha256 from the manifest, or the sha256 of every image read), `version` (a digest of all of
it) and `format`. A JSON summary without the embeddings lands next to it.

The work comes in units (one shard, or up to `chunk` CSV/folder items) that `embed_unit`
embeds anywhere: in this process, or as Ray tasks (geco.cluster.driver.catalogue_pipeline).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geco.errors import ConfigError, DataError, GecoError

log = logging.getLogger("geco")

FORMAT = "geco-catalogue/1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
URI_COLUMNS = ("uri", "image_uri", "path")


@dataclass
class Unit:
    """One piece of embedding work: a catalogue shard, or (id, image URI) items."""

    shard: str = ""
    n_samples: int = 0
    items: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.n_samples if self.shard else len(self.items)


# --------------------------------------------------------------------------- inventories


def _is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def read_bytes(uri: str) -> bytes:
    """An object's bytes: a local path (or file://) or s3://bucket/key."""
    if _is_s3(uri):
        from geco.data.storage import Storage

        parent, _, name = uri.rpartition("/")
        return Storage(parent).get_bytes(name)
    return Path(uri.removeprefix("file://")).read_bytes()


def plan(source: str, *, split: str = "test", image_base: str = "", chunk: int = 512
         ) -> tuple[list[Unit], dict[str, Any]]:
    """The units of an inventory and what it is ({"kind", "location", ...} for `sources`)."""
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    source = str(source)
    if source.lower().endswith(".csv"):
        items = _csv_items(source)
        kind = "csv"
        extra: dict[str, Any] = {"csv_sha256": hashlib.sha256(read_bytes(source)).hexdigest()}
    elif _is_s3(source) or (Path(source) / "manifest.json").is_file():
        return _shard_units(source, split, image_base)
    elif Path(source).is_dir():
        items, kind, extra = _folder_items(Path(source)), "folder", {}
    else:
        raise DataError(f"inventory {source} is neither a CSV, a shard root with "
                        "manifest.json, nor a folder of images")
    if image_base:
        items = [(i, f"{image_base.rstrip('/')}/{Path(u).name}") for i, u in items]
    _check_unique([i for i, _ in items], source)
    units = [Unit(items=items[i:i + chunk]) for i in range(0, len(items), chunk)]
    return units, {"kind": kind, "location": source, "items": len(items), **extra}


def _check_unique(ids: list[str], source: str) -> None:
    if not ids:
        raise DataError(f"inventory {source} holds no bottoms")
    seen: set[str] = set()
    dup = next((i for i in ids if i in seen or seen.add(i)), None)  # type: ignore[func-returns-value]
    if dup is not None:
        raise DataError(f"inventory {source}: bottom id {dup!r} appears more than once")


def _csv_items(source: str) -> list[tuple[str, str]]:
    try:
        text = read_bytes(source).decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"inventory CSV not found: {source}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read inventory CSV {source}: {exc}") from None
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    column = next((c for c in URI_COLUMNS if c in fields), None)
    if "id" not in fields or column is None:
        raise DataError(f"{source}: needs a header with columns id and uri (or image_uri, "
                        f"path); found {fields}")
    base = source.rpartition("/")[0] if _is_s3(source) else str(Path(source).resolve().parent)
    items = []
    for line, row in enumerate(reader, start=2):
        bid, uri = (row.get("id") or "").strip(), (row.get(column) or "").strip()
        if not bid or not uri:
            raise DataError(f"{source}:{line}: empty id or {column}")
        if not _is_s3(uri) and not uri.startswith("/"):
            uri = f"{base}/{uri}" if _is_s3(base) else str(Path(base, uri).resolve())
        items.append((bid, uri))
    return items


def _folder_items(folder: Path) -> list[tuple[str, str]]:
    root = folder / "img" if (folder / "img").is_dir() else folder
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p.stem, str(p.resolve())) for p in files]


def _shard_units(root: str, split: str, image_base: str) -> tuple[list[Unit], dict[str, Any]]:
    from geco.data.stream import load_manifest, shard_counts, shard_urls

    name = f"catalogue-{split}"
    manifest = load_manifest(root)
    urls, counts = shard_urls(root, name, manifest), shard_counts(name, manifest)
    shards = [{"name": s["name"], "sha256": s.get("sha256", "")}
              for s in manifest["splits"][name]["shards"]]
    units = [Unit(shard=u, n_samples=n) for u, n in zip(urls, counts, strict=True)]
    return units, {"kind": "shards", "location": root, "split": split, "shards": shards,
                   "image_base": image_base}


# --------------------------------------------------------------------------- embedding


def bottom_fingerprint(model: Any) -> str:
    """sha256 of the weights that embed a bottom (backbone + bottom projection): a catalogue
    is only valid for the model whose fingerprint it carries."""
    h = hashlib.sha256()
    state = {**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()},
             **{f"bottom_proj.{k}": v for k, v in model.bottom_proj.state_dict().items()}}
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_image(bid: str, uri: str):
    from PIL import Image

    try:
        data = read_bytes(uri)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB"), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        reason = "not found"
    except Exception as exc:  # noqa: BLE001 - any unreadable image, named below
        reason = f"{type(exc).__name__}: {exc}"
    raise DataError(f"bottom {bid!r}: cannot read image {uri}: {reason}")


def embed_unit(model: Any, image_size: int, unit: Unit, *, batch_size: int = 64,
               on_bad: str = "error", image_base: str = "") -> dict[str, Any]:
    """{"ids", "uris", "embeddings" [n, d] float32, "sha256" (per item; "" for shards),
    "skipped"} of one unit, embedded by `model` (a GECo network in eval mode) on the CPU."""
    import torch

    from geco.data.transforms import imagenet_transform

    tf = imagenet_transform(image_size)
    ids: list[str] = []
    uris: list[str] = []
    digests: list[str] = []
    out: list[torch.Tensor] = []
    skipped = 0
    with torch.no_grad():
        if unit.shard:
            from geco.data.stream import ShardStream

            stream = ShardStream([unit.shard], kind="catalogue", transform=tf,
                                 batch_size=batch_size, n_samples=[unit.n_samples],
                                 on_bad=on_bad)
            for batch in stream:
                if batch is None:
                    continue
                skipped += int(batch.get("skipped", 0))
                out.append(model.embed_bottoms(batch["image"]).float())
                ids += [str(i) for i in batch["id"]]
            base = image_base.rstrip("/")
            uris = [f"{base}/{i}.jpg" if base else "" for i in ids]
            digests = [""] * len(ids)
        else:
            for start in range(0, len(unit.items), batch_size):
                images = []
                for bid, uri in unit.items[start:start + batch_size]:
                    try:
                        im, digest = _load_image(bid, uri)
                    except DataError as exc:
                        if on_bad == "error":
                            raise
                        log.warning("skipping: %s", exc)
                        skipped += 1
                        continue
                    images.append(tf(im))
                    ids.append(bid)
                    uris.append(uri)
                    digests.append(digest)
                if images:
                    out.append(model.embed_bottoms(torch.stack(images)).float())
    dim = model.bottom_proj.out_features
    emb = torch.cat(out) if out else torch.empty(0, dim)
    return {"ids": ids, "uris": uris, "embeddings": emb, "sha256": digests, "skipped": skipped}


# --------------------------------------------------------------------------- the artifact


def assemble(parts: list[dict[str, Any]], *, image_size: int, model_info: dict[str, Any],
             sources: dict[str, Any]) -> dict[str, Any]:
    """The catalogue from the units' results, in unit order."""
    import torch

    ids = [i for p in parts for i in p["ids"]]
    if not ids:
        raise DataError(f"inventory {sources.get('location')}: no readable bottoms")
    _check_unique(ids, str(sources.get("location")))
    emb = torch.cat([p["embeddings"] for p in parts]).float().contiguous()
    digests = [d for p in parts for d in p["sha256"]]
    sources = dict(sources)
    if any(digests):  # the images themselves, for CSV and folder inventories
        h = hashlib.sha256()
        for bid, digest in sorted(zip(ids, digests, strict=True)):
            h.update(f"{bid}\t{digest}\n".encode())
        sources["images_sha256"] = h.hexdigest()
    sources["skipped"] = sum(int(p["skipped"]) for p in parts)
    version = hashlib.sha256()
    version.update(model_info["fingerprint"].encode())
    version.update("\n".join(ids).encode())
    version.update(emb.numpy().tobytes())
    return {"format": FORMAT, "version": version.hexdigest()[:16], "ids": ids,
            "embeddings": emb, "image_size": int(image_size),
            "image_uris": [u for p in parts for u in p["uris"]], "model": model_info,
            "sources": sources, "created": dt.datetime.now(dt.UTC).isoformat(),
            "source": str(sources.get("location", ""))}


def summary(cat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cat.items() if k not in ("ids", "embeddings", "image_uris")} | {
        "bottoms": len(cat["ids"]), "dim": int(cat["embeddings"].shape[1])}


def save(cat: dict[str, Any], out: str) -> str:
    """Write the catalogue to `out` (local path or s3://; a name ending in "/" gets
    catalogue-<version>.pt inside) plus <same name>.json; returns where it went."""
    import torch

    out = str(out)
    if out.endswith("/"):
        out = f"{out}catalogue-{cat['version']}.pt"
    buf = io.BytesIO()
    torch.save(cat, buf)
    meta = (json.dumps(summary(cat), indent=2, sort_keys=True) + "\n").encode()
    sidecar = out.rsplit(".", 1)[0] + ".json" if out.endswith(".pt") else out + ".json"
    if _is_s3(out):
        from geco.data.storage import Storage

        parent, _, name = out.rpartition("/")
        store = Storage(parent)
        store.put_bytes(buf.getvalue(), name)
        store.put_bytes(meta, sidecar.rpartition("/")[2])
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(buf.getvalue())
        Path(sidecar).write_bytes(meta)
    return out


# --------------------------------------------------------------------------- the model


def resolve_model(model: str, tracking_uri: str = "") -> tuple[Path, dict[str, Any]]:
    """(local GECo checkpoint, model info) for a GECo checkpoint file or an MLflow model URI
    (models:/NAME@ALIAS, models:/NAME/N, runs:/..., a model folder) of a geco retriever."""
    info: dict[str, Any] = {"uri": model}
    if Path(model).is_file():
        return Path(model), info
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)  # models:/ resolves through the global URI
        mlflow.set_registry_uri(tracking_uri)
    try:
        ref = model.removeprefix("models:/") if model.startswith("models:/") else ""
        if "@" in ref or ref.partition("/")[2].isdigit():  # registered: record which version
            client = mlflow.MlflowClient()
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = ref.split("/", 1)
                mv = client.get_model_version(name, version)
            info.update(name=name, version=int(mv.version), run_id=mv.run_id)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model))
    except (MlflowException, OSError) as exc:
        raise GecoError(f"cannot load model {model}"
                        f"{f' from {tracking_uri}' if tracking_uri else ''}: "
                        f"{str(exc).splitlines()[0]}") from None
    ckpt = local / "artifacts" / "geco.pt"
    if not ckpt.is_file():
        raise GecoError(f"{model} is not a geco retriever (no artifacts/geco.pt)")
    return ckpt, info


def load_embedder(checkpoint: str | Path | bytes):
    """(GECo network in eval mode on the CPU, image size) from a GECo checkpoint (path or
    bytes): bottoms need neither the generator nor the catalogue."""
    import torch

    from geco.models.geco import model_from_checkpoint
    from geco.train.runtime import load_checkpoint

    source = io.BytesIO(checkpoint) if isinstance(checkpoint, bytes) else checkpoint
    ckpt = (torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(source, io.BytesIO) else load_checkpoint(source))
    if ckpt.get("stage") != "geco":
        raise GecoError(f"{checkpoint if not isinstance(checkpoint, bytes) else 'checkpoint'} "
                        f"is not a GECo checkpoint (stage={ckpt.get('stage')!r})")
    return model_from_checkpoint(ckpt), int(ckpt["config"]["data"]["image_size"])


def build(model: str, source: str, out: str, *, tracking_uri: str = "", split: str = "test",
          image_base: str = "", batch_size: int = 64, on_bad: str = "error",
          chunk: int = 512) -> dict[str, Any]:
    """`geco catalogue build` in this process: plan, embed every unit, save."""
    ckpt, info = resolve_model(model, tracking_uri)
    net, size = load_embedder(ckpt)
    info["fingerprint"] = bottom_fingerprint(net)
    units, sources = plan(source, split=split, image_base=image_base, chunk=chunk)
    total, done, t0, parts = sum(len(u) for u in units), 0, time.perf_counter(), []
    for n, unit in enumerate(units, 1):
        parts.append(embed_unit(net, size, unit, batch_size=batch_size, on_bad=on_bad,
                                image_base=image_base))
        done += len(unit)
        rate = done / max(time.perf_counter() - t0, 1e-9)
        log.info("catalogue: unit %d/%d, %d/%d bottoms | %.1f samples/s", n, len(units), done,
                 total, rate)
    cat = assemble(parts, image_size=size, model_info=info, sources=sources)
    where = save(cat, out)
    log.info("catalogue %s: %d bottoms, version %s -> %s", source, len(cat["ids"]),
             cat["version"], where)
    return {**summary(cat), "path": where}
