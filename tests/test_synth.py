"""Synthetic outfits: determinism, the compatibility rule on the written CSVs, id hygiene,
balanced bottom usage, decodable images, and idempotent `ensure`."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geco.data.images import ImageFolder, preflight
from geco.data.splits import load_splits, resolve_layout
from geco.data.synth import (
    BOTTOM_SHAPES,
    COLOUR_MAP,
    COLOUR_RGB,
    COLOURS,
    PATTERNS,
    SHAPE_MAP,
    TRIM_MAP,
    TRIMS,
    SynthSpec,
    ensure,
    generate,
    is_compatible,
    load_items,
)
from geco.errors import ConfigError, DataError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_maps_are_derangements():
    assert sorted(COLOUR_MAP.values()) == sorted(COLOURS) and len(COLOURS) == 8
    assert sorted(TRIM_MAP.values()) == sorted(TRIMS) and len(TRIMS) == 3
    assert all(k != v for k, v in (COLOUR_MAP | TRIM_MAP).items())
    assert sorted(SHAPE_MAP.values()) == sorted(BOTTOM_SHAPES)
    top = {"colour": "red", "trim": "white", "pattern": "plain", "shape": "tee"}
    good = {"colour": COLOUR_MAP["red"], "trim": TRIM_MAP["white"], "pattern": "dots",
            "shape": SHAPE_MAP["tee"]}
    assert is_compatible(top, good)
    assert not is_compatible(top, {**good, "colour": "red"})
    assert not is_compatible(top, {**good, "trim": "white"})
    assert is_compatible(top, {**good, "pattern": "checks"})  # the fill pattern is a nuisance
    assert not is_compatible(top, {**good, "shape": SHAPE_MAP["tank"]})


def test_deterministic_by_seed(synth_small, synth_small_spec, tmp_path):
    spec = synth_small_spec
    again = generate(tmp_path / "again", spec)
    assert again["images"] == len(list((tmp_path / "again" / "img").iterdir()))
    assert _files(tmp_path / "again") == _files(synth_small)
    generate(tmp_path / "other", replace(spec, seed=1))
    other = _files(tmp_path / "other")
    assert other.keys() != _files(synth_small).keys()  # fresh ids
    assert other["files/test.csv"] != _files(synth_small)["files/test.csv"]


def test_rule_holds_on_written_csvs(synth_small, synth_small_spec):
    items = load_items(synth_small)
    splits = load_splits(resolve_layout(synth_small))
    spec = synth_small_spec
    assert resolve_layout(synth_small).kind == "standard"
    assert len(splits["train"]) == spec.n_train_tops * spec.pairs_per_top
    assert (len(splits["valid"]), len(splits["test"])) == (spec.n_valid, spec.n_test)
    for split in splits.values():
        for r in range(len(split)):
            top, pos = items[split.tops[r]], items[split.bottoms[r]]
            assert top["category"] == "top" and pos["category"] == "bottom"
            assert is_compatible(top, pos), split.where(r)
            if split.negatives is not None:
                negs = split.negatives[r]
                assert len(negs) == len(set(negs)) == spec.n_negatives
                assert split.bottoms[r] not in negs
                assert not any(is_compatible(top, items[n]) for n in negs), split.where(r)
        # Negatives come from the split's own pool, which is exactly its positives.
        if split.negatives is not None:
            pool = set(split.bottoms)
            assert {n for negs in split.negatives for n in negs} <= pool
            assert len(pool) == len(split)  # one row per top, each bottom used once
    # The rule is not "same colour": no positive shares its top's colour.
    train = splits["train"]
    pairs = zip(train.tops, train.bottoms, strict=True)
    assert all(items[t]["colour"] != items[b]["colour"] for t, b in pairs)


def test_ids_unique_and_disjoint(synth_small):
    items = load_items(synth_small)
    with open(synth_small / "items.csv", newline="") as fh:
        ids = [r["id"] for r in csv.DictReader(fh)]
    assert len(ids) == len(set(ids)) == len(items)
    assert all(len(i) == 10 and int(i, 16) >= 0 for i in ids)
    splits = load_splits(resolve_layout(synth_small))
    tops = [set(s.tops) for s in splits.values()]
    bottoms = [set(s.bottoms) for s in splits.values()]
    everything = set().union(*tops, *bottoms)
    assert sum(map(len, tops)) + sum(map(len, bottoms)) == len(everything) == len(items)
    # All 72 classes appear among each split's tops; fill patterns vary independently.
    for s in splits.values():
        assert len({(items[t]["colour"], items[t]["trim"], items[t]["shape"])
                    for t in s.tops}) == 72
    assert {a["pattern"] for a in items.values()} == set(PATTERNS)
    assert {a["shape"] for a in items.values()} == {
        "tee", "tank", "longsleeve", "trousers", "shorts", "skirt"
    }  # fmt: skip


def test_images_decode_unique_and_show_the_colour(synth_small, synth_small_spec):
    items = load_items(synth_small)
    folder = ImageFolder(synth_small / "img")
    for split in load_splits(resolve_layout(synth_small)).values():
        assert preflight(split, folder) == (split, 0)
    digests, hits = set(), 0
    for i, attrs in items.items():
        im = folder.load(i)
        assert im.size == (synth_small_spec.image_size,) * 2
        x = np.asarray(im, dtype=np.float64)
        digests.add(x.tobytes())
        # Colour is recoverable from pixels: brighter half of the garment vs the 8 hues
        # (grey-ish pixels, i.e. the white / black / grey trim band, left out).
        px = x.reshape(-1, 3)
        off_bg = np.abs(px - np.median(x[0], axis=0)).max(axis=1) > 60
        garment = px[off_bg & (px.max(axis=1) - px.min(axis=1) > 40)]
        base = garment[garment.sum(1) >= np.median(garment.sum(1))].mean(0)
        chroma = COLOUR_RGB / COLOUR_RGB.sum(1, keepdims=True)
        guess = COLOURS[int(np.argmin(((base / base.sum() - chroma) ** 2).sum(1)))]
        hits += guess == attrs["colour"]
    assert len(digests) == len(items)  # nuisance jitter makes every picture unique
    assert hits >= 0.95 * len(items)
    with Image.open(next((synth_small / "img").iterdir())) as im:
        assert im.format == "JPEG"


def test_default_spec_timing_and_balance(tmp_path):
    t0 = time.perf_counter()
    summary = generate(tmp_path / "default", SynthSpec())
    print(f"\nsynth default spec: {summary['images']} images in {time.perf_counter() - t0:.2f}s")
    assert summary["rows"] == {"train": 3000, "valid": 200, "test": 300}
    splits = load_splits(resolve_layout(tmp_path / "default"))
    # No popularity signal: every pool bottom is the positive of exactly pairs_per_top rows.
    assert set(Counter(splits["train"].bottoms).values()) == {2}
    assert len(splits["test"].unique_bottoms()) == 300
    neg_use = Counter(n for negs in splits["test"].negatives for n in negs)
    assert max(neg_use.values()) <= 30  # ~9 on average; no bottom is a favourite negative


def test_ensure_is_idempotent(tmp_path, synth_small_spec):
    out = tmp_path / "s"
    spec = replace(synth_small_spec, n_train_tops=96, pairs_per_top=1, image_size=32)
    assert ensure(out, spec) == out
    meta = json.loads((out / "synth.json").read_text())
    assert meta["spec"]["n_train_tops"] == 96 and meta["counts"]["rows"]["train"] == 96
    stamp = (out / "synth.json").stat().st_mtime_ns
    ensure(out, spec)
    assert (out / "synth.json").stat().st_mtime_ns == stamp  # not regenerated
    ensure(out, replace(spec, seed=5))
    assert json.loads((out / "synth.json").read_text())["spec"]["seed"] == 5
    assert len(list((out / "img").iterdir())) == meta["counts"]["images"]  # old images gone
    (out / "synth.json").unlink()  # an interrupted run has no synth.json: regenerate
    ensure(out, spec)
    assert (out / "synth.json").is_file()


def test_refuses_foreign_folder_and_bad_specs(tmp_path, synth_small_spec):
    spec = synth_small_spec
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing"):
        generate(tmp_path, spec)
    for bad in (
        {"n_train_tops": 100},  # < 72 classes x 2 pairs per top
        {"n_valid": 10},
        {"n_negatives": 2},
        {"n_negatives": 80},  # > 3/4 of the smallest eval split
        {"image_size": 8},
        {"jpeg_quality": 0},
    ):
        with pytest.raises(ConfigError):
            generate(tmp_path / "x", replace(spec, **bad))
