"""geco.data.shards: deterministic WebDataset shards + manifest from a dataset."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest

from geco.config import load_config
from geco.data.images import ImageFolder
from geco.data.shards import (
    MANIFEST,
    ShardSpec,
    add_shard_command,
    cmd_shard,
    verify_shards,
    write_shards,
)
from geco.data.splits import load_splits, resolve_layout
from geco.errors import ConfigError, DataError

SPEC = ShardSpec(image_size=64, jpeg_quality=90, samples_per_shard=50, catalogue_per_shard=70)


def _open(root: Path):
    layout = resolve_layout(root)
    return load_splits(layout), ImageFolder(layout.img_dir)


@pytest.fixture(scope="module")
def written(synth_small, tmp_path_factory):
    splits, images = _open(synth_small)
    out = tmp_path_factory.mktemp("shards")
    manifest = write_shards(splits, images, out, SPEC, source="synth_small")
    return splits, out, manifest


def test_byte_identical_and_checksums(synth_small, written, tmp_path):
    splits, out, manifest = written
    again = write_shards(*_open(synth_small), tmp_path, SPEC, source="synth_small")
    assert again == manifest
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())  # no temp files left behind
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert verify_shards(out, manifest) == []
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            data = (out / s["name"]).read_bytes()
            assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert json.loads((out / MANIFEST).read_text()) == manifest


def test_counts_and_layout(written):
    splits, out, manifest = written
    m = manifest["splits"]
    assert manifest["spec"]["image_size"] == 64 and manifest["source"] == "synth_small"
    assert m["train"]["kind"] == "train" and m["valid"]["kind"] == "eval"
    for name, split in splits.items():
        assert m[name]["samples"] == len(split) and m[name]["skipped"] == 0
        assert m[name]["n_shards"] == math.ceil(len(split) / SPEC.samples_per_shard)
        assert [s["name"] for s in m[name]["shards"]][0] == f"{name}-000000.tar"
    for name in ("valid", "test"):
        split = splits[name]
        mentioned = {b for row in split.negatives for b in row} | set(split.bottoms)
        cat = m[f"catalogue-{name}"]
        assert cat["samples"] == len(mentioned) and cat["kind"] == "catalogue"
        assert cat["n_shards"] == math.ceil(len(mentioned) / SPEC.catalogue_per_shard)


def test_sample_contents(written):
    splits, out, manifest = written
    with tarfile.open(out / "train-000001.tar") as tar:
        members = tar.getmembers()
        # webdataset's TarWriter: a sample's members sorted by extension, plain ustar headers.
        assert [m.name for m in members[:3]] == ["000000050.bottom.jpg", "000000050.meta.json",
                                                 "000000050.top.jpg"]
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and m.uname == m.gname == ""
                   and m.mode == 0o644 and m.isreg() and not m.pax_headers for m in members)
        meta = json.loads(tar.extractfile(members[1]).read())
    tr = splits["train"]
    assert meta == {"top": tr.tops[50], "bottom": tr.bottoms[50], "split": "train", "row": 50,
                    "source": tr.where(50)}
    with tarfile.open(out / "test-000000.tar") as tar:
        names = tar.getnames()[:4]
        negs = json.loads(tar.extractfile("000000000.neg.json").read())
    assert sorted(n.split(".", 1)[1] for n in names) == ["bottom.jpg", "meta.json", "neg.json",
                                                         "top.jpg"]
    assert negs == list(splits["test"].negatives[0])


def _copy_with_bad_image(synth_small: Path, dest: Path, item: str) -> Path:
    shutil.copytree(synth_small, dest)
    (dest / "img" / f"{item}.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return dest


def test_bad_image_error_names_image_and_line(synth_small, tmp_path):
    splits, _ = _open(synth_small)
    bad = splits["train"].tops[5]
    root = _copy_with_bad_image(synth_small, tmp_path / "data", bad)
    with pytest.raises(DataError) as err:
        write_shards(*_open(root), tmp_path / "out", SPEC, source="x")
    msg = str(err.value)
    assert f"{bad}.jpg" in msg and f"{splits['train'].source.split('/')[-1]}:" in msg
    first = splits["train"].tops.index(bad)  # the first row that needs the image
    assert splits["train"].where(first).split("/")[-1] in msg
    assert not (tmp_path / "out" / MANIFEST).exists()
    # The shard being written when the error came is dropped: no temporary, no final name.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_bad_image_skip_is_counted(synth_small, tmp_path):
    splits, _ = _open(synth_small)
    bad = splits["train"].tops[5]
    root = _copy_with_bad_image(synth_small, tmp_path / "data", bad)
    manifest = write_shards(*_open(root), tmp_path / "out", SPEC, source="x",
                            on_bad_image="skip")
    n_bad = splits["train"].tops.count(bad)
    assert manifest["splits"]["train"]["skipped"] == n_bad
    assert manifest["splits"]["train"]["samples"] == len(splits["train"]) - n_bad


def test_bad_bottom_skips_eval_rows_that_mention_it(synth_small, tmp_path):
    splits, _ = _open(synth_small)
    test = splits["test"]
    bad = test.bottoms[0]
    root = _copy_with_bad_image(synth_small, tmp_path / "data", bad)
    manifest = write_shards(*_open(root), tmp_path / "out", SPEC, source="x",
                            on_bad_image="skip")
    rows = sum(1 for b, negs in zip(test.bottoms, test.negatives, strict=True)
               if bad == b or bad in negs)
    assert manifest["splits"]["test"]["skipped"] == rows
    assert manifest["splits"]["test"]["samples"] == len(test) - rows
    assert manifest["splits"]["catalogue-test"]["skipped"] == 1


def test_stale_shards_removed_and_spec_checked(synth_small, tmp_path):
    splits, images = _open(synth_small)
    (tmp_path / "train-000999.tar").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("keep me")
    write_shards(splits, images, tmp_path, SPEC, source="x")
    assert not (tmp_path / "train-000999.tar").exists() and (tmp_path / "notes.txt").exists()
    with pytest.raises(ConfigError):
        write_shards(splits, images, tmp_path, ShardSpec(jpeg_quality=0), source="x")


def test_cli_command(synth_small, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_shard_command(parser.add_subparsers(dest="data_cmd"))
    args = parser.parse_args(["shard", "--out", str(tmp_path / "s"), "--image-size", "64",
                              "--samples-per-shard", "100", f"data.root={synth_small}"])
    cfg = load_config(args.config, args.overrides)
    manifest = cmd_shard(args, cfg)
    assert manifest["splits"]["train"]["n_shards"] == 4
    assert (tmp_path / "s" / MANIFEST).is_file()
    assert '"train"' in capsys.readouterr().out
