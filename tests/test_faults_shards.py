"""Faults around shards (issue 16, items 1 and 8): shards whose bytes changed after they were
written are caught when read (local and S3) and by `geco data verify`; shard writers take a
lease on their output and check the bucket and credentials before rendering anything."""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import time
import uuid
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

from geco.cli import main
from geco.config import load_config
from geco.data import shards
from geco.data.shards import LOCK, ShardLease, ShardSpec, verify_shards
from geco.data.storage import Storage, StorageError
from geco.data.stream import ShardStream, decode_jpeg
from geco.data.transforms import imagenet_transform
from geco.errors import DataError
from tests.conftest import write_folder_shards

SPEC = ShardSpec(image_size=64, samples_per_shard=37, catalogue_per_shard=30)
TF = imagenet_transform(64)


@pytest.fixture(scope="module")
def written(synth_small, tmp_path_factory) -> Path:
    return write_folder_shards(synth_small, tmp_path_factory.mktemp("fault-shards"), SPEC, "synth")


def _copy(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def _flip(shard: Path, offset: int) -> None:
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))


def _flip_in_jpeg(shard: Path) -> None:
    """Flip one bit of the first JPEG's JFIF density field: still a valid tar and a JPEG that
    decodes to the same picture, so only the checksum can tell."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    at = member.offset_data
    assert shard.read_bytes()[at + 6:at + 11] == b"JFIF\x00"
    _flip(shard, at + 15)  # the low byte of the X density


def _flip_in_padding(shard: Path) -> None:
    """Flip one bit of the zero padding after a member's data: every sample reads the same."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.size % 512)
    _flip(shard, member.offset_data + member.size)


def _stream(root, split="train", **kw):
    kw.setdefault("transform", TF)
    kw.setdefault("batch_size", 16)
    return ShardStream.from_manifest(str(root), split, **kw)


def _epoch(root, world=2, **kw):
    out = []
    for rank in range(world):
        ds = _stream(root, rank=rank, world_size=world, **kw)
        out += list(DataLoader(ds, batch_size=None, num_workers=0))
    return out


# --- verified reads ---------------------------------------------------------------------------

def test_flipped_byte_in_a_jpeg_fails_reading_the_split(written, tmp_path):
    root = _copy(written, tmp_path / "s")
    _flip_in_jpeg(root / "train-000003.tar")
    samples = list(_stream(written, on_bad="skip").raw_samples())  # the unchanged copy reads
    with tarfile.open(root / "train-000003.tar") as tar:  # and the flipped JPEG still decodes
        first = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        decode_jpeg(tar.extractfile(first).read())
    with pytest.raises(DataError) as err:
        list(_stream(root).raw_samples())
    msg = str(err.value)
    assert f"{root / 'train-000003.tar'} does not match {root / 'manifest.json'}" in msg
    assert "sha256" in msg and "geco data shard" in msg and "geco data verify" in msg
    assert len(samples) == 384


def test_changed_shard_fails_the_epoch_over_ranks(written, tmp_path, caplog):
    root = _copy(written, tmp_path / "s")
    _flip_in_padding(root / "train-000004.tar")
    with pytest.raises(DataError, match="train-000004.tar does not match"):
        _epoch(root)
    # Skip mode: the samples were handed on as read (each checked as it decoded); the
    # mismatch is a warning naming the shard, not a silent pass.
    batches = _epoch(root, on_bad="skip")
    assert sum(len(b["index"]) for b in batches) == 384
    assert sum(b["skipped"] for b in batches) == 0
    assert any("train-000004.tar does not match" in r.getMessage() for r in caplog.records)


def test_a_shard_with_extra_bytes_is_caught(written, tmp_path):
    root = _copy(written, tmp_path / "s")
    with open(root / "valid-000001.tar", "ab") as f:
        f.write(b"\0" * 512)  # past the end-of-archive marker: the tar reader never sees it
    with pytest.raises(DataError, match=r"valid-000001.tar does not match .*bytes, the manif"):
        list(DataLoader(_stream(root, "valid", kind="eval"), batch_size=None))


@pytest.mark.integration
def test_flipped_byte_on_s3_fails_reading_the_split(written, tmp_path, s3_env):
    root = _copy(written, tmp_path / "s")
    _flip_in_jpeg(root / "catalogue-test-000002.tar")
    url = f"s3://{s3_env.bucket}/faults-{uuid.uuid4().hex[:8]}"
    Storage(url).sync_dir(root)
    assert len(list(_stream(url, "catalogue-valid", kind="catalogue").raw_samples())) > 0
    with pytest.raises(DataError) as err:
        list(_stream(url, "catalogue-test", kind="catalogue").raw_samples())
    assert f"{url}/catalogue-test-000002.tar does not match {url}/manifest.json" in str(err.value)
    # The operator's view of the same prefix.
    assert verify_shards(url, json.loads((root / "manifest.json").read_text())) == [
        "catalogue-test-000002.tar"]


# --- geco data verify -------------------------------------------------------------------------

def test_verify_command(written, tmp_path, capsys, tiny):
    from geco.data.source import open_data

    root = _copy(written, tmp_path / "s")
    assert main(["data", "verify", str(root)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["splits"]["train"]["ok"] == 11
    assert all(not r["bad"] and not r["missing"] for r in report["splits"].values())
    # The digest a training run tags (geco.manifest_sha256) names the manifest verified here.
    lineage = open_data(tiny(None, f"data.shards={root}").data).lineage
    assert report["manifest_sha256"] == lineage["geco.manifest_sha256"]

    _flip_in_padding(root / "test-000001.tar")
    (root / "catalogue-valid-000000.tar").unlink()
    assert main(["data", "verify", str(root)]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False
    assert report["splits"]["test"]["bad"][0]["name"] == "test-000001.tar"
    assert "sha256" in report["splits"]["test"]["bad"][0]["reason"]
    assert report["splits"]["catalogue-valid"]["missing"] == ["catalogue-valid-000000.tar"]
    assert err.count("\n") == 1 and err.startswith("geco: error: ")
    assert "test-000001.tar" in err and "catalogue-valid-000000.tar (missing)" in err
    assert sorted(verify_shards(root, json.loads((root / "manifest.json").read_text()))) == [
        "catalogue-valid-000000.tar", "test-000001.tar"]


# --- the writers' lease -----------------------------------------------------------------------

def _shard_args(out: str, *extra: str, root: Path) -> tuple[argparse.Namespace, object]:
    parser = argparse.ArgumentParser()
    shards.add_shard_command(parser.add_subparsers(dest="data_cmd"))
    args = parser.parse_args(["shard", "--out", out, "--image-size", "64",
                              "--samples-per-shard", "100", *extra, f"data.root={root}"])
    return args, load_config(args.config, args.overrides)


@pytest.fixture
def renders(monkeypatch) -> list:
    """Records write_shards calls instead of rendering (the lease and checks come first)."""
    calls: list = []
    monkeypatch.setattr(shards, "write_shards",
                        lambda *a, **kw: calls.append(a) or {"splits": {}})
    return calls


def _foreign_lease(expires_in: float) -> bytes:
    until = shards._iso(time.time() + expires_in)
    return json.dumps({"owner": "otherhost:4242:cafe1234", "created": until,
                       "expires": until}).encode()


def test_local_writer_refused_while_another_holds_the_lease(synth_small, tmp_path, renders):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(_foreign_lease(600))
    with pytest.raises(DataError) as err:
        shards.cmd_shard(*_shard_args(str(out), root=synth_small))
    msg = str(err.value)
    assert "otherhost:4242:cafe1234" in msg and "--break-lease" in msg and str(out) in msg
    assert renders == [] and json.loads((out / LOCK).read_text())["owner"].startswith("other")
    # The operator knows that writer is gone: --break-lease takes over, and releases at the end.
    shards.cmd_shard(*_shard_args(str(out), "--break-lease", root=synth_small))
    assert len(renders) == 1 and not (out / LOCK).exists()


def test_expired_lease_is_taken_over_and_a_real_run_releases(synth_small, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_bytes(_foreign_lease(-60))
    manifest = shards.cmd_shard(*_shard_args(str(out), root=synth_small))
    assert manifest["splits"]["train"]["n_shards"] == 4
    assert not (out / LOCK).exists() and verify_shards(out, manifest) == []


def test_lease_renews_and_a_broken_lease_stops_the_manifest(tmp_path):
    store = Storage(str(tmp_path / "out"))
    with ShardLease(store, ttl=0.6) as lease:
        first = json.loads(store.get_bytes(LOCK))["expires"]
        time.sleep(1.5)  # > ttl: alive only because it was renewed
        held = json.loads(store.get_bytes(LOCK))
        assert held["owner"] == lease.owner and held["expires"] > first
        with pytest.raises(DataError, match="is being written by"):
            ShardLease(store).acquire()
    assert not store.exists(LOCK)
    with ShardLease(store) as lease:  # the default ttl: no renewal racing the break below
        thief = ShardLease(store, break_stale=True)
        thief.acquire()
        with pytest.raises(DataError, match=f"lost the writing lease .* to {thief.owner}"):
            lease.check()
    assert json.loads(store.get_bytes(LOCK))["owner"] == thief.owner  # not ours to delete
    thief.release()
    assert not store.exists(LOCK)


@pytest.mark.integration
def test_s3_writer_refused_while_another_holds_the_lease(synth_small, s3_env, renders):
    url = f"s3://{s3_env.bucket}/lease-{uuid.uuid4().hex[:8]}"
    store = Storage(url)
    first = ShardLease(store)
    first.acquire()
    try:
        with pytest.raises(DataError) as err:
            shards.cmd_shard(*_shard_args(url, root=synth_small))
        assert first.owner in str(err.value) and url in str(err.value)
        assert renders == []
    finally:
        first.release()
    assert not store.exists(LOCK)
    store.put_bytes(_foreign_lease(600), LOCK)
    with pytest.raises(DataError, match="otherhost:4242:cafe1234"):
        ShardLease(store).acquire()
    assert renders == []


@pytest.mark.integration
def test_bad_credentials_fail_before_rendering(synth_small, s3_env, tmp_path, renders,
                                               monkeypatch, capsys):
    work = tmp_path / "work"
    url = f"s3://{s3_env.bucket}/creds-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageError) as err:
        shards.cmd_shard(*_shard_args(url, "--work-dir", str(work), root=synth_small))
    assert "access denied / invalid credentials" in str(err.value)
    assert s3_env.bucket in str(err.value) and "not-the-secret" not in str(err.value)
    assert renders == [] and not work.exists()
    # The command line: one line, exit 2.
    assert main(["data", "shard", "--out", url, "--work-dir", str(work),
                 f"data.root={synth_small}"]) == 2
    err_line = capsys.readouterr().err
    assert err_line.count("\n") == 1 and s3_env.bucket in err_line
    assert renders == [] and not work.exists()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist at http"):
        shards.cmd_shard(*_shard_args("s3://no-such-bucket-x/p", root=synth_small))
    assert renders == [] and not Storage(url).exists(LOCK)


@pytest.mark.integration
def test_s3_upload_releases_the_lease(synth_small, s3_env, tmp_path):
    url = f"s3://{s3_env.bucket}/write-{uuid.uuid4().hex[:8]}"
    manifest = shards.cmd_shard(*_shard_args(url, root=synth_small))
    store = Storage(url)
    assert not store.exists(LOCK) and store.exists("manifest.json")
    assert verify_shards(url, manifest) == []
