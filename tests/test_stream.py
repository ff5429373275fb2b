"""geco.data.stream: shards streamed over ranks × workers, exactly once, equal batch counts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from geco.data.datasets import ItemDataset, PairDataset, QueryDataset
from geco.data.images import ImageFolder
from geco.data.shards import ShardSpec, write_shards
from geco.data.splits import load_splits, resolve_layout
from geco.data.stream import (
    ShardStream,
    load_manifest,
    plan_slot,
    shard_counts,
    shard_urls,
    steps_per_rank,
)
from geco.data.transforms import imagenet_transform
from geco.errors import DataError

# 384 train pairs in 11 shards of <= 37: divides neither 2 ranks × 2 workers nor anything else.
SPEC = ShardSpec(image_size=64, samples_per_shard=37, catalogue_per_shard=30)
TF = imagenet_transform(64)


@pytest.fixture(scope="module")
def data(synth_small, tmp_path_factory):
    layout = resolve_layout(synth_small)
    splits, images = load_splits(layout), ImageFolder(layout.img_dir)
    out = tmp_path_factory.mktemp("stream-shards")
    write_shards(splits, images, out, SPEC, source="synth_small")
    return splits, images, out


def _stream(root, split="train", **kw):
    kw.setdefault("transform", TF)
    kw.setdefault("batch_size", 16)
    kw.setdefault("seed", 7)
    return ShardStream.from_manifest(str(root), split, **kw)


def _run(ds, epoch=0, workers=0, **loader_kw):
    ds.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=None, num_workers=workers, **loader_kw))


def _indices(batches):
    return [i for b in batches if b is not None for i in b["index"].tolist()]


# --- the plan, exhaustively over small cases (no I/O) -----------------------------------------

@pytest.mark.parametrize("kind", ["train", "eval"])
def test_plan_exactly_once_equal_steps(kind):
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        n_shards = 1 + trial % 7
        counts = (torch.randint(1, 40, (n_shards,), generator=gen)).tolist()
        world, workers = 1 + trial % 3, 1 + (trial // 3) % 3
        bs = 2 + trial % 9
        n = sum(counts)
        if n < 2 * world:
            continue
        order = torch.randperm(n_shards, generator=gen).tolist()
        offsets = [sum(counts[:i]) for i in range(n_shards)]
        seen, steps = [], set()
        for rank in range(world):
            n_batches, sizes_rank = 0, []
            for w in range(workers):
                segs, sizes = plan_slot(counts, rank=rank, world_size=world, worker=w,
                                        num_workers=workers, batch_size=bs, kind=kind,
                                        order=order)
                assert sum(sizes) == sum(b - a for _, a, b in segs)
                seen += [offsets[s] + j for s, a, b in segs for j in range(a, b)]
                n_batches += len(sizes)
                sizes_rank += sizes
            steps.add(n_batches)
            assert min(sizes_rank) >= (2 if kind == "train" else 1)
            assert max(sizes_rank) <= bs + (bs + 1) // 2 + 1  # a folded tail, never more
        assert sorted(seen) == list(range(n)), (counts, world, workers, bs)
        assert steps == {steps_per_rank(n, bs, world, kind)}


# --- the stream -------------------------------------------------------------------------------

def test_exactly_once_two_ranks_two_workers(data):
    splits, _, root = data
    n = len(splits["train"])
    manifest = load_manifest(str(root))
    assert manifest["splits"]["train"]["n_shards"] == 11
    counts, per_rank = Counter(), []
    for rank in (0, 1):
        ds = _stream(root, rank=rank, world_size=2, batch_size=20)
        batches = _run(ds, epoch=3, workers=2)
        per_rank.append(len(batches))
        assert len(batches) == len(ds)
        assert all(b["skipped"] == 0 and 2 <= len(b["index"]) <= 24 for b in batches)
        counts.update(_indices(batches))
    assert per_rank[0] == per_rank[1] == steps_per_rank(n, 20, 2, "train")
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}


def test_epochs_differ_and_repeat(data):
    _, _, root = data
    ds = _stream(root, rank=1, world_size=2)
    e0, e1, e0_again = (_indices(_run(ds, epoch=e)) for e in (0, 1, 0))
    assert e0 == e0_again and e0 != e1
    assert _indices(_run(_stream(root, rank=1, world_size=2), epoch=0)) == e0
    assert _indices(_run(_stream(root, rank=1, world_size=2, seed=8), epoch=0)) != e0


def test_set_epoch_reaches_persistent_workers(data):
    _, _, root = data
    ds = _stream(root)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    got = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got.append(_indices(list(loader)))
    fresh = [_indices(_run(_stream(root), epoch=e, workers=2)) for e in (0, 1)]
    assert got == fresh and got[0] != got[1]


def test_tensors_match_pair_dataset(data):
    splits, images, root = data
    batches = _run(_stream(root), epoch=0)
    ref = PairDataset(splits["train"], images, TF)
    b = batches[0]
    assert b["top"].shape == (16, 3, 64, 64) and b["top"].dtype == torch.float32
    for k in range(4):
        want = ref[int(b["index"][k])]
        for field in ("top", "bottom"):
            diff = (b[field][k] - want[field]).abs()
            # Re-encoding a JPEG at quality 90: small mean error, bounded peaks.
            assert diff.mean() < 0.05 and diff.max() < 0.8, (field, diff.mean(), diff.max())


def test_eval_and_catalogue_streams(data):
    splits, images, root = data
    test = splits["test"]
    # Unshuffled; each worker reads a contiguous run, so rows come in order within a worker.
    assert _indices(_run(_stream(root, "test"), workers=0)) == list(range(len(test)))
    batches = _run(_stream(root, "test"), workers=2)
    assert sorted(_indices(batches)) == list(range(len(test)))
    b = batches[0]
    assert b["negatives"][0] == list(test.negatives[0])
    want = QueryDataset(test, images, TF)[0]
    assert (b["top"][0] - want["top"]).abs().mean() < 0.05
    cat = _run(_stream(root, "catalogue-test", rank=0, world_size=1), workers=0)
    ids = [i for c in cat for i in c["id"]]
    order = list(dict.fromkeys(x for r, negs in zip(test.bottoms, test.negatives, strict=True)
                               for x in (r, *negs)))
    assert ids == order
    item = ItemDataset(order[:1], images, TF)[0]["image"]
    assert (cat[0]["image"][0] - item).abs().mean() < 0.05


def test_draft_decoding_at_half_size(synth_small, data, tmp_path):
    splits, images, _ = data
    big = ShardSpec(image_size=128, samples_per_shard=200)
    write_shards({"train": splits["train"]}, images, tmp_path, big, source="x")
    drafted = _run(_stream(tmp_path, transform=TF), epoch=0)[0]
    plain = _run(_stream(tmp_path, transform=TF, draft=False), epoch=0)[0]
    assert drafted["top"].shape == plain["top"].shape == (16, 3, 64, 64)
    assert torch.equal(drafted["index"], plain["index"])
    assert (drafted["top"] - plain["top"]).abs().mean() < 0.1


# --- bad input --------------------------------------------------------------------------------

def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def _corrupt_sample(shard: Path, key_index: int) -> str:
    """Rewrite a shard with one sample's top.jpg replaced by garbage, as if it had been written
    so (the manifest records the new bytes: its checksum passes); returns that key."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[3 * key_index][0].name.split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, blob in members:
            if m.name == f"{key}.top.jpg":
                blob = b"\xff\xd8\xff\xdb" + b"garbage" * 40
                m.size = len(blob)
            tar.addfile(m, io.BytesIO(blob))
    manifest_path = shard.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["name"] == shard.name:
                entry["bytes"] = shard.stat().st_size
                entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    return key


def _all(root, on_bad, world=2, workers=2):
    out = []
    for rank in range(world):
        ds = _stream(root, rank=rank, world_size=world, on_bad=on_bad)
        out.append((len(ds), _run(ds, workers=workers)))
    return out


def test_corrupt_jpeg(data, tmp_path):
    splits, _, root = data
    root = _copy(root, tmp_path / "s")
    key = _corrupt_sample(root / "train-000002.tar", 5)
    with pytest.raises(DataError) as err:
        _all(root, "error", workers=0)
    assert "train-000002.tar" in str(err.value) and key in str(err.value)
    results = _all(root, "skip")
    assert all(n == len(batches) for n, batches in results)
    skipped = sum(b["skipped"] for _, batches in results for b in batches)
    seen = [i for _, batches in results for i in _indices(batches)]
    assert skipped == 1 and len(seen) == len(set(seen)) == len(splits["train"]) - 1
    assert int(key) not in seen


def test_truncated_shard(data, tmp_path):
    splits, _, root = data
    root = _copy(root, tmp_path / "s")
    shard = root / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    with pytest.raises(DataError) as err:
        _all(root, "error", workers=0)
    assert "train-000004.tar" in str(err.value)
    results = _all(root, "skip")
    assert all(n == len(batches) for n, batches in results)
    skipped = sum(b["skipped"] for _, batches in results for b in batches)
    seen = [i for _, batches in results for i in _indices(batches)]
    assert 0 < skipped < 37 and len(seen) + skipped == len(splits["train"])
    assert len(seen) == len(set(seen))


def test_missing_shard_and_manifest(data, tmp_path):
    _, _, root = data
    root = _copy(root, tmp_path / "s")
    (root / "train-000007.tar").unlink()
    with pytest.raises(DataError, match="train-000007.tar"):
        _run(_stream(root), workers=0)
    with pytest.raises(DataError, match="manifest not found"):
        load_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no split"):
        shard_urls(str(root), "nope", load_manifest(str(root)))


def test_urls_for_s3_roots(data):
    _, _, root = data
    manifest = load_manifest(str(root))
    urls = shard_urls("s3://bucket/pre/fix/", "valid", manifest)
    assert urls == ["s3://bucket/pre/fix/valid-000000.tar", "s3://bucket/pre/fix/valid-000001.tar",
                    "s3://bucket/pre/fix/valid-000002.tar"]
    assert shard_counts("valid", manifest) == [37, 37, 22]


def test_batched_normalise_is_bit_identical(data):
    _, _, root = data
    from geco.data.transforms import gan_transform

    for tf in (TF, gan_transform(32)):
        fast = _run(_stream(root, transform=tf), epoch=2)[0]
        slow = _run(_stream(root, transform=tf, fast=False), epoch=2)[0]
        assert fast["top"].is_contiguous() and fast["top"].dtype == torch.float32
        assert torch.equal(fast["top"], slow["top"]) and torch.equal(fast["bottom"], slow["bottom"])


@pytest.mark.integration
def test_exactly_once_from_s3_with_auth(data, s3_env):
    """The same epoch plan over the real S3 server: 2 ranks x 2 workers, 11 uneven shards,
    every pair once; epochs differ and repeat; a wrong secret is refused, naming the object."""
    from geco.data.storage import Storage

    splits, _, root = data
    url = f"s3://{s3_env.bucket}/stream-test"
    Storage(url).sync_dir(root)
    n = len(splits["train"])
    counts = Counter()
    for rank in (0, 1):
        ds = _stream(url, rank=rank, world_size=2, batch_size=20)
        batches = _run(ds, epoch=1, workers=2)
        assert len(batches) == len(ds) == steps_per_rank(n, 20, 2, "train")
        counts.update(_indices(batches))
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}
    ds = _stream(url, rank=0, world_size=2)
    e0, e1, e0_again = (_indices(_run(ds, epoch=e)) for e in (0, 1, 0))
    assert e0 == e0_again and e0 != e1


@pytest.mark.integration
def test_wrong_secret_is_refused_by_name(data, s3_env, monkeypatch):
    from geco.data.storage import Storage
    from geco.errors import GecoError

    _, _, root = data
    url = f"s3://{s3_env.bucket}/stream-auth"
    Storage(url).sync_dir(root)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(GecoError, match="stream-auth/manifest.json") as err:
        load_manifest(url)
    assert "not-the-secret" not in str(err.value)


# --- decoding on the training device (data.decode=device; libjpeg here, nvJPEG on a GPU) -------

def _on_device(batches, device="cpu"):
    from geco.data.jpeg import decode_batch

    out = []
    for b in batches:
        skipped = b.pop("skipped")
        b, lost = decode_batch(b, torch.device(device))
        out.append((b, skipped + lost))
    return out


def test_device_decoding_matches_the_cpu_path(data):
    """JPEG bytes through the DataLoader (pinned where asked), decoded after it: the same rows,
    the same images up to the two JPEG decoders' rounding."""
    _, _, root = data
    from geco.data.jpeg import JpegBatch

    cpu = _run(_stream(root), epoch=1, workers=2)
    raw = _run(_stream(root, decode="device"), epoch=1, workers=2)
    assert isinstance(raw[0]["top"], JpegBatch) and raw[0]["top"].data[0].dim() == 1
    dev = _on_device(raw)
    assert len(dev) == len(cpu)
    for (b, skipped), c in zip(dev, cpu, strict=True):
        assert skipped == 0 and torch.equal(b["index"], c["index"])
        for k in ("top", "bottom"):
            assert b[k].shape == c[k].shape and b[k].dtype == torch.float32
            assert (b[k] - c[k]).abs().max() < 0.1, k  # a few uint8 levels at most


def test_device_decoding_resizes_to_the_training_size(data, tmp_path):
    splits, images, _ = data
    write_shards({"train": splits["train"]}, images, tmp_path,
                 ShardSpec(image_size=96, samples_per_shard=200), source="x")
    cpu = _run(_stream(tmp_path, draft=False), epoch=0)[0]
    (dev, _), = _on_device(_run(_stream(tmp_path, decode="device"), epoch=0)[:1])
    assert dev["top"].shape == cpu["top"].shape == (16, 3, 64, 64)
    # PIL's and torch's antialiased bicubic differ slightly; the pictures are the same.
    assert (dev["top"] - cpu["top"]).abs().mean() < 0.05


def test_device_decoding_names_or_skips_a_corrupt_jpeg(data, tmp_path):
    splits, _, root = data
    root = _copy(root, tmp_path / "s")
    key = _corrupt_sample(root / "train-000002.tar", 5)
    batches = [b for r in range(2) for b in
               _run(_stream(root, rank=r, world_size=2, decode="device"), workers=2)]
    with pytest.raises(DataError) as err:
        _on_device([dict(b) for b in batches])
    assert "train-000002.tar" in str(err.value) and key in str(err.value)
    assert "top.jpg" in str(err.value)
    results = _on_device([b for r in range(2) for b in _run(
        _stream(root, rank=r, world_size=2, decode="device", on_bad="skip"), workers=2)])
    seen = [i for b, _ in results for i in b["index"].tolist()]
    assert sum(s for _, s in results) == 1 and int(key) not in seen
    assert len(seen) == len(set(seen)) == len(splits["train"]) - 1
    for b, _ in results:
        assert b["top"].shape[0] == b["bottom"].shape[0] == b["index"].shape[0]


def test_device_decoding_is_refused_where_it_cannot_apply(data):
    _, _, root = data
    from geco.errors import ConfigError

    with pytest.raises(ConfigError, match="decode=device"):
        _stream(root, "valid", kind="eval", decode="device")
    with pytest.raises(ConfigError, match="decode"):
        _stream(root, decode="gpu")
