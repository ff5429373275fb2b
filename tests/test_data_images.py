"""Image loading, preflight and Datasets: missing, corrupt and truncated files in both modes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from geco.data.datasets import ItemDataset, PairDataset, QueryDataset, collate_skip
from geco.data.images import ImageFolder, preflight
from geco.data.splits import Split, load_splits, read_split_csv, resolve_layout
from geco.data.transforms import imagenet_transform
from geco.errors import ConfigError, DataError

S = 32
GOOD = [f"g{i}" for i in range(12)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    """Good JPEGs g0..g11, plus `corrupt` (not an image), `trunc` (half a JPEG); no `gone`."""
    img = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    for i in GOOD:
        # Noise compresses badly, so cutting the file in half lands inside the scan data.
        Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(img / f"{i}.jpg")
    (img / "corrupt.jpg").write_bytes(b"this is not a jpeg" * 50)
    data = (img / "g0.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(data[: len(data) // 2])
    return ImageFolder(img)


def _split(tmp_path: Path, rows: list[str], negs: bool = True) -> Split:
    header = "tshirt,positive_pant" + (",neg_1,neg_2,neg_3" if negs else "")
    path = tmp_path / "files" / "test.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return read_split_csv(path, "test")


def test_strict_decoding_is_not_disabled():
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_load_good_and_bad(folder):
    im = folder.load("g1")
    assert im.mode == "RGB" and im.size == (80, 96)
    assert folder.path("g1") == folder.img_dir / "g1.jpg"
    for bad, reason in (("gone", "file not found"), ("corrupt", "cannot identify"),
                        ("trunc", "truncated")):  # fmt: skip
        with pytest.raises(DataError) as e:
            folder.load(bad, context="files/test.csv:17")
        msg = str(e.value)
        assert f"cannot read image {folder.img_dir / bad}.jpg" in msg
        assert "(referenced by files/test.csv:17)" in msg and reason in msg
    with pytest.raises(DataError, match="path separator"):
        folder.path("../etc/passwd")


def test_missing_is_stat_only(folder):
    assert folder.missing(["g1", "gone", "corrupt", "gone", "other"]) == ["gone", "other"]


def test_preflight(folder, tmp_path, caplog):
    rows = ["g0,g1,g2,g3,g4", "g5,g6,gone,g3,g4", "g7,g8,g9,g10,nope", "g1,g2,g3,g4,g5"]
    split = _split(tmp_path, rows)
    with pytest.raises(DataError) as e:
        preflight(split, folder)
    msg = str(e.value)
    assert "2 of 4 rows" in msg and "2 files missing" in msg
    assert "test.csv:3 gone" in msg and "test.csv:4 nope" in msg
    with caplog.at_level(logging.WARNING, logger="geco.data.images"):
        kept, dropped = preflight(split, folder, on_missing="skip")
    assert dropped == 2 and kept.lines == (2, 5) and "skipping 2 of 4 rows" in caplog.text
    assert preflight(kept, folder) == (kept, 0)
    with pytest.raises(DataError, match="every row"):
        preflight(split.subset([1, 2]), folder, on_missing="skip")
    with pytest.raises(ConfigError):
        preflight(split, folder, on_missing="ignore")


def test_datasets_error_mode_names_image_and_line(folder, tmp_path):
    tf = imagenet_transform(S)
    split = _split(tmp_path, ["g0,g1,g2,g3,g4", "g0,g1,g2,trunc,g4", "corrupt,g1,g2,g3,g4"])
    pairs = PairDataset(split, folder, tf)
    item = pairs[0]
    assert item["top"].shape == item["bottom"].shape == (3, S, S) and item["index"] == 0
    with pytest.raises(DataError, match=r"corrupt\.jpg \(referenced by .*test\.csv:4\)"):
        pairs[2]
    queries = QueryDataset(split, folder, tf)
    q = queries[1]  # the query side only: its `trunc` negative is an id here, not read
    assert q["top"].shape == (3, S, S) and q["index"] == 1
    assert (q["bottom_id"], q["negatives"]) == ("g1", ["g2", "trunc", "g4"])
    with pytest.raises(DataError, match=r"corrupt\.jpg \(referenced by .*test\.csv:4\)"):
        queries[2]
    with pytest.raises(DataError, match="evaluation needs neg_"):
        QueryDataset(_split(tmp_path, ["g0,g1"], negs=False), folder, tf)
    items = ItemDataset(["g0", "gone"], folder, tf, contexts=["catalog row 1", "catalog row 2"])
    assert items[0]["image"].shape == (3, S, S)
    with pytest.raises(DataError, match=r"gone\.jpg \(referenced by catalog row 2\)"):
        items[1]
    with pytest.raises(ConfigError):
        PairDataset(split, folder, tf, on_bad_image="ignore")


def test_datasets_skip_mode(folder, tmp_path):
    tf = imagenet_transform(S)
    split = _split(tmp_path, ["g0,g1,g2,g3,g4", "gone,g1,g2,g3,g4", "g0,g1,g2,g3,corrupt"])
    pairs = PairDataset(split, folder, tf, on_bad_image="skip")
    assert [pairs[i] is None for i in range(3)] == [False, True, False]
    items = ItemDataset(["g0", "trunc"], folder, tf, on_bad_image="skip")
    assert items[1] is None and items[0]["index"] == 0


def test_collate_skip():
    a = {"x": torch.zeros(2), "index": 0}
    b = {"x": torch.ones(2), "index": 1}
    out = collate_skip([a, None, b, None])
    assert out["skipped"] == 2 and out["x"].shape == (2, 2) and out["index"].tolist() == [0, 1]
    assert collate_skip([a])["skipped"] == 0
    assert collate_skip([None, None]) is None


def test_dataloader_workers_skip_counts_add_up(folder, tmp_path):
    # 24 rows, bad ones spread so no batch of 4 is entirely bad: every skip is counted.
    bad = {1: "gone", 6: "corrupt", 7: "trunc", 13: "gone", 22: "trunc"}
    rows = [f"{bad.get(r, GOOD[r % 12])},g1,g2,g3,g4" for r in range(24)]
    split = _split(tmp_path, rows)
    ds = PairDataset(split, folder, imagenet_transform(S), on_bad_image="skip")
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_skip)
    batches = list(loader)
    assert all(b is not None for b in batches)
    assert sum(b["skipped"] for b in batches) == len(bad)
    seen = sorted(i for b in batches for i in b["index"].tolist())
    assert seen == [r for r in range(24) if r not in bad]
    assert batches[0]["top"].shape == (3, 3, S, S)


def test_dataloader_workers_error_mode_raises_data_error(folder, tmp_path):
    split = _split(tmp_path, ["g0,g1,g2,g3,g4"] * 5 + ["g0,trunc,g2,g3,g4"])
    ds = PairDataset(split, folder, imagenet_transform(S))
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_skip)
    try:
        list(loader)
    except DataError as e:
        msg = str(e)
        # The traceback pins the loader's iterator in a reference cycle; freed later by the
        # gc, its worker shutdown stalls 5 s per worker. Dropping it frees the iterator now.
        e.__traceback__ = None
    else:
        pytest.fail("a truncated image in error mode must raise through the DataLoader")
    assert re.search(r"trunc\.jpg \(referenced by .*test\.csv:7\)", msg), msg


def test_mango_dev_images(shared_data):
    layout = resolve_layout(shared_data / "mango-dev")
    images = ImageFolder(layout.img_dir)
    splits = load_splits(layout)
    for split in splits.values():
        assert preflight(split, images) == (split, 0)
    test = splits["test"]
    tf = imagenet_transform(64)
    queries = QueryDataset(test, images, tf)
    for i in (0, len(test) - 1):
        item = queries[i]
        negatives = ItemDataset(item["negatives"], images, tf)
        assert item["top"].shape == (3, 64, 64) and len(negatives) == 9
        assert all(torch.isfinite(negatives[k]["image"]).all() for k in range(9))
