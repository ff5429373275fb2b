"""`geco catalogue build`: a bottom inventory (CSV of id,uri, folder, catalogue shards) embedded
into a versioned catalogue equal to a brute-force embedding by the model; bad inventories named;
a catalogue only loads next to the model it was built with."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from geco import catalogue, serving
from geco.cli import main
from geco.data.transforms import imagenet_transform
from geco.errors import GecoError


def bottoms(root: Path) -> list[str]:
    with open(root / "items.csv", newline="") as f:
        return [r["id"] for r in csv.DictReader(f) if r["category"] == "bottom"]


def write_csv(path: Path, rows: list[tuple[str, str]], header=("id", "uri")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def brute_force(files, ids: list[str], img: Path) -> torch.Tensor:
    from PIL import Image

    net, size = catalogue.load_embedder(files["geco"])
    tf = imagenet_transform(size)
    with torch.no_grad():
        return net.embed_bottoms(torch.stack([tf(Image.open(img / f"{i}.jpg").convert("RGB"))
                                              for i in ids]))


def build(*args: str) -> dict:
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["catalogue", "build", *args]) == 0
    return json.loads(buf.getvalue())


def test_csv_inventory_builds_the_brute_force_catalogue(retriever_files, synth_small, tmp_path):
    files, _ = retriever_files
    ids = bottoms(synth_small)[:150]
    # Relative URIs resolve next to the CSV.
    up = os.path.relpath(synth_small / "img", tmp_path)
    inv = write_csv(tmp_path / "inventory.csv", [(i, f"{up}/{i}.jpg") for i in ids])
    out = build(str(inv), "--model", str(files["geco"]), "--out", f"{tmp_path}/cats/",
                "--batch-size", "32")
    path = Path(out["path"])
    assert path.name == f"catalogue-{out['version']}.pt" and out["bottoms"] == len(ids)
    cat = serving.load_catalogue(path)
    assert cat["ids"] == ids and cat["format"] == catalogue.FORMAT
    assert cat["image_uris"] == [str((synth_small / "img" / f"{i}.jpg").resolve()) for i in ids]
    torch.testing.assert_close(cat["embeddings"], brute_force(files, ids, synth_small / "img"),
                               rtol=1e-4, atol=1e-4)
    net, _ = catalogue.load_embedder(files["geco"])
    assert cat["model"]["fingerprint"] == catalogue.bottom_fingerprint(net)
    assert len(cat["sources"]["images_sha256"]) == 64 and cat["sources"]["kind"] == "csv"
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["version"] == out["version"] and "embeddings" not in summary

    # Same inventory, same model: same version. The served model ranks it, with image URIs.
    again = build(str(inv), "--model", str(files["geco"]), "--out", str(tmp_path / "again.pt"))
    assert again["version"] == out["version"]
    bundle = serving.load_bundle(files["geco"], files["generator"], path)
    top = next((synth_small / "img").glob("*.jpg"))
    answer = serving.rank(bundle, [str(top)], k=5)
    assert set(answer["bottom_id"]) <= set(ids)
    assert all(Path(u).is_file() for u in answer["image_uri"])


def test_folder_and_shard_inventories(retriever_files, synth_small, tmp_path):
    files, _ = retriever_files
    ids = bottoms(synth_small)[:40]
    folder = tmp_path / "inventory" / "img"
    folder.mkdir(parents=True)
    for i in ids:
        (folder / f"{i}.jpg").write_bytes((synth_small / "img" / f"{i}.jpg").read_bytes())
    out = build(str(folder.parent), "--model", str(files["geco"]), "--out",
                str(tmp_path / "folder.pt"))
    cat = serving.load_catalogue(out["path"])
    assert cat["ids"] == sorted(ids) and cat["sources"]["kind"] == "folder"

    shards = tmp_path / "shards"
    assert main(["data", "shard", "--out", str(shards), "--image-size", "64",
                 "--catalogue-per-shard", "60", f"data.root={synth_small}",
                 "data.kind=standard"]) == 0
    out = build(str(shards), "--model", str(files["geco"]), "--out", str(tmp_path / "s.pt"),
                "--split", "test", "--image-base", "https://cdn.example/img")
    cat = serving.load_catalogue(out["path"])
    manifest = json.loads((shards / "manifest.json").read_text())
    listed = manifest["splits"]["catalogue-test"]["shards"]
    assert len(listed) > 1  # several units
    assert [s["sha256"] for s in cat["sources"]["shards"]] == [s["sha256"] for s in listed]
    assert cat["image_uris"][0] == f"https://cdn.example/img/{cat['ids'][0]}.jpg"
    # The registered catalogue (the test split's bottoms) embeds the same vectors.
    reference = serving.load_catalogue(files["catalogue"])
    assert sorted(cat["ids"]) == sorted(reference["ids"])
    order = [cat["ids"].index(i) for i in reference["ids"]]
    # Shards hold the images re-encoded: close to, not equal to, the folder's.
    cos = torch.nn.functional.cosine_similarity(cat["embeddings"][order],
                                                reference["embeddings"], dim=1)
    assert cos.min() > 0.9


def test_bad_inventories_are_named(retriever_files, synth_small, tmp_path):
    files, _ = retriever_files
    ids = bottoms(synth_small)[:5]
    img = synth_small / "img"
    model = ["--model", str(files["geco"]), "--out", str(tmp_path / "c.pt")]

    def fails(inv: Path, *extra: str) -> str:
        import io
        from contextlib import redirect_stderr

        err = io.StringIO()
        with redirect_stderr(err):
            assert main(["catalogue", "build", str(inv), *model, *extra]) == 2
        return err.getvalue()

    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    rows = [(i, str(img / f"{i}.jpg")) for i in ids]
    assert "bottom 'x1': cannot read image" in fails(
        write_csv(tmp_path / "a.csv", [*rows, ("x1", str(bad))]))
    assert "'gone'" in fails(write_csv(tmp_path / "b.csv", [*rows, ("gone", "/no/such.jpg")]))
    assert "appears more than once" in fails(write_csv(tmp_path / "c.csv", [*rows, rows[0]]))
    assert "needs a header with columns id and uri" in fails(
        write_csv(tmp_path / "d.csv", rows, header=("sku", "picture")))
    assert "neither a CSV" in fails(tmp_path / "nothing-here")
    # Skip mode: the bad image is counted and left out, the rest embedded.
    out = build(str(tmp_path / "a.csv"), *model, "--on-bad-image", "skip")
    assert out["bottoms"] == len(ids) and out["sources"]["skipped"] == 1


def test_catalogue_of_another_model_is_refused(retriever_files, synth_small, tmp_path):
    files, _ = retriever_files
    # A model with other weights: the same checkpoint with its bottom projection changed.
    ckpt = torch.load(files["geco"], weights_only=True)
    ckpt["state"]["model"]["bottom_proj.bias"] = ckpt["state"]["model"]["bottom_proj.bias"] + 1
    torch.save(ckpt, tmp_path / "other.pt")
    inv = write_csv(tmp_path / "inv.csv", [(i, str(synth_small / "img" / f"{i}.jpg"))
                                           for i in bottoms(synth_small)[:10]])
    out = build(str(inv), "--model", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o.pt"))
    with pytest.raises(GecoError, match="rebuild it for this model"):
        serving.load_bundle(files["geco"], files["generator"], out["path"])
