"""geco.data.storage: the same API on a local folder and on a real S3 server (SeaweedFS on
loopback, auth on, started once per session by tests/s3_server.py through infra/local/s3.sh).

The local-folder tests need no server; every test that touches S3 is marked `integration`.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
import threading
import uuid
from pathlib import Path

import pytest

from geco.data.storage import (
    Storage,
    StorageError,
    is_s3,
    parse_s3_url,
    register_webdataset_s3,
    retry_policy,
    s3_client,
)
from tests.s3_server import S3_SH, S3Server, free_port

MiB = 1024 * 1024


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path: Path) -> Storage:
    """An empty Storage root: a local folder, or a fresh prefix in the test bucket."""
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_env")
    return Storage(f"s3://{server.bucket}/t-{uuid.uuid4().hex[:8]}/root")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------- URL helpers


def test_urls():
    assert is_s3("s3://b/k") and not is_s3("/tmp/x") and not is_s3("runs/s3://x")
    assert parse_s3_url("s3://bucket/key/prefix") == ("bucket", "key/prefix")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="no bucket"):
        parse_s3_url("s3:///key")
    assert Storage("s3://b/p/").url("x/y.tar") == "s3://b/p/x/y.tar"
    assert Storage("s3://b").url("y.tar") == "s3://b/y.tar"
    assert Storage("/data/shards").url("a.tar") == "/data/shards/a.tar"


@pytest.mark.parametrize("bad", ["", "/abs", "../up", "a/../b", "a//b"])
def test_invalid_names_rejected(bad):
    with pytest.raises(StorageError, match="invalid object name"):
        Storage("s3://b/p").url(bad)


# ------------------------------------------------------------------------- same API, both modes


def test_roundtrip(store: Storage):
    assert store.list() == []
    assert not store.exists("a/one.bin")
    store.put_bytes(b"hello", "a/one.bin")
    store.put_bytes(b"world!", "b.bin")
    assert store.exists("a/one.bin") and store.exists("b.bin")
    assert store.get_bytes("a/one.bin") == b"hello"
    with store.open_stream("b.bin") as f:
        assert f.read(3) == b"wor" and f.read() == b"ld!"
    assert store.list() == ["a/one.bin", "b.bin"]
    assert store.list("a/") == ["a/one.bin"]
    store.put_bytes(b"v2", "b.bin")  # overwrite
    assert store.get_bytes("b.bin") == b"v2"


def test_missing_object(store: Storage):
    with pytest.raises(StorageError, match="does not exist") as e:
        store.get_bytes("nope.tar")
    assert store.url("nope.tar") in str(e.value)


def test_put_file_and_sync_dir_skip_identical(store: Storage, tmp_path: Path):
    src = tmp_path / "src"
    write(src / "train-000000.tar", b"a" * 1000)
    write(src / "train-000001.tar", b"b" * 2000)
    write(src / "sub" / "manifest.json", b"{}")
    first = store.sync_dir(src, prefix="shards")
    assert first == {"transferred": 3, "skipped": 0, "bytes": 3002}
    assert store.list("shards/") == [
        "shards/sub/manifest.json", "shards/train-000000.tar", "shards/train-000001.tar",
    ]
    # Re-running transfers nothing.
    assert store.sync_dir(src, prefix="shards") == {"transferred": 0, "skipped": 3, "bytes": 0}
    # A changed file (same size) is re-uploaded, the rest skipped.
    write(src / "train-000001.tar", b"c" * 2000)
    assert store.sync_dir(src, prefix="shards") == {"transferred": 1, "skipped": 2, "bytes": 2000}
    assert store.get_bytes("shards/train-000001.tar") == b"c" * 2000
    # put_file with a known checksum.
    f = src / "train-000000.tar"
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    assert store.put_file(f, "shards/train-000000.tar", sha256=sha) is False
    assert store.put_file(f, "other/copy.tar", sha256=sha) is True
    assert store.get_bytes("other/copy.tar") == b"a" * 1000


def test_sync_dir_rejects_missing_dir(store: Storage, tmp_path: Path):
    with pytest.raises(StorageError, match="not a directory"):
        store.sync_dir(tmp_path / "absent")


def _tree(root: Path, n: int) -> Path:
    for i in range(n):
        write(root / f"train-{i:06d}.tar", bytes([i]) * (100 + i))
    return root


def test_sync_dir_uploads_concurrently(tmp_path: Path, monkeypatch):
    # Two uploads must be in flight at once to pass the barrier; one at a time would time out.
    store = Storage(str(tmp_path / "store"))
    barrier, put = threading.Barrier(2, timeout=10), store.put_file

    def put_together(local, name, **kw):
        barrier.wait()
        return put(local, name, **kw)

    monkeypatch.setattr(store, "put_file", put_together)
    assert store.sync_dir(_tree(tmp_path / "src", 4)) == {
        "transferred": 4, "skipped": 0, "bytes": 100 + 101 + 102 + 103}


def test_sync_dir_stops_at_the_first_error_and_names_it(tmp_path: Path, monkeypatch):
    store = Storage(str(tmp_path / "store"))
    started: list[str] = []
    put = store.put_file

    def failing_put(local, name, **kw):
        started.append(name)
        if name == "train-000002.tar":
            raise StorageError(f"upload to {store.url(name)} failed: disk on fire")
        return put(local, name, **kw)

    monkeypatch.setattr(store, "put_file", failing_put)
    with pytest.raises(StorageError, match=r"train-000002\.tar failed: disk on fire"):
        store.sync_dir(_tree(tmp_path / "src", 40), threads=2)
    assert len(started) < 40  # the uploads not yet started never start


def test_local_writes_are_atomic(tmp_path: Path):
    store = Storage(str(tmp_path / "st"))
    store.put_bytes(b"x" * 10, "d/f.bin")
    # Only the final file exists: no temporary left behind, and temporaries are never listed.
    assert [p.name for p in (tmp_path / "st" / "d").iterdir()] == ["f.bin"]
    write(tmp_path / "st" / "d" / ".g.bin.tmp-abc", b"partial")
    assert store.list() == ["d/f.bin"]


# ---------------------------------------------------------------------------- S3 specifics


@pytest.mark.integration
def test_wrong_secret_refused_without_leaking_it(s3_env: S3Server, monkeypatch):
    good = Storage(f"s3://{s3_env.bucket}/auth")
    good.put_bytes(b"data", "obj.bin")
    wrong = "WrongSecret" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    bad = Storage(f"s3://{s3_env.bucket}/auth")
    for op in (lambda: bad.get_bytes("obj.bin"), lambda: bad.exists("obj.bin"),
               lambda: bad.put_bytes(b"x", "obj.bin"), lambda: bad.list()):
        with pytest.raises(StorageError) as e:
            op()
        msg = str(e.value)
        assert "access denied / invalid credentials" in msg
        assert f"s3://{s3_env.bucket}/auth" in msg and "AWS_SECRET_ACCESS_KEY" in msg
        assert wrong not in msg and s3_env.secret_key not in msg
    # An unknown access key is refused too.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "GECONOSUCHKEY0000000")
    with pytest.raises(StorageError, match="invalid credentials"):
        Storage(f"s3://{s3_env.bucket}/auth").get_bytes("obj.bin")


@pytest.mark.integration
def test_anonymous_access_refused(s3_server: S3Server):
    import botocore
    from botocore.config import Config
    from botocore.exceptions import ClientError

    anon = s3_server.client(config=Config(signature_version=botocore.UNSIGNED))
    with pytest.raises(ClientError, match="AccessDenied"):
        anon.list_objects_v2(Bucket=s3_server.bucket)


@pytest.mark.integration
def test_missing_bucket(s3_env: S3Server, tmp_path: Path):
    store = Storage("s3://no-such-bucket-geco/p")
    for op in (lambda: store.get_bytes("k"), lambda: store.exists("k"),
               lambda: store.put_bytes(b"x", "k"), lambda: store.list(),
               lambda: store.put_file(write(tmp_path / "f", b"x"), "k")):
        with pytest.raises(StorageError) as e:
            op()
        assert f"bucket 'no-such-bucket-geco' does not exist at {s3_env.endpoint}" in str(e.value)


@pytest.fixture
def aws_env(monkeypatch, tmp_path: Path) -> Path:
    """An AWS environment of our own (endpoint: a closed loopback port, a config file in
    tmp_path, returned): no developer setting leaks in."""
    for key in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE", "AWS_DEFAULTS_MODE",
                "AWS_ENDPOINT_URL_S3", "GECO_S3_MAX_ATTEMPTS"):
        monkeypatch.delenv(key, raising=False)
    config = tmp_path / "aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "geco-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "geco-test-secret")
    return config


def _retries() -> tuple[dict, tuple[int, str]]:
    return s3_client().meta.config.retries, retry_policy()


def test_standard_aws_retry_settings_win(aws_env: Path, monkeypatch):
    # Nothing standard set: geco's defaults.
    assert _retries() == ({"total_max_attempts": 5, "mode": "standard"}, (5, "standard"))
    # The standard variables, as botocore resolves them (its default mode is standard).
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert _retries() == ({"total_max_attempts": 2, "mode": "standard"}, (2, "standard"))
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    assert _retries() == ({"total_max_attempts": 2, "mode": "legacy"}, (2, "legacy"))
    monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    assert _retries() == ({"mode": "legacy"}, (5, "legacy"))  # legacy's own 5 attempts
    monkeypatch.delenv("AWS_RETRY_MODE")
    # The profile's settings in the AWS config file.
    aws_env.write_text("[default]\nmax_attempts = 7\n[profile slow]\nretry_mode = adaptive\n")
    assert _retries() == ({"total_max_attempts": 7, "mode": "standard"}, (7, "standard"))
    monkeypatch.setenv("AWS_PROFILE", "slow")
    assert _retries() == ({"mode": "adaptive"}, (3, "adaptive"))  # botocore's 3 attempts
    # The retired geco variable overrides nothing.
    monkeypatch.setenv("GECO_S3_MAX_ATTEMPTS", "9")
    assert _retries() == ({"mode": "adaptive"}, (3, "adaptive"))


def test_aws_max_attempts_is_honoured(aws_env: Path, monkeypatch):
    """Counted on the wire: every attempt against a closed port is one request sent."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    store = Storage("s3://bucket/p")
    sent = []
    store.client.meta.events.register("before-send.s3", lambda **kw: sent.append(1))
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1:"):
        store.get_bytes("k")
    assert len(sent) == 2


@pytest.mark.integration
def test_unreachable_endpoint(s3_env: S3Server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match="cannot reach S3 endpoint http://127.0.0.1:") as e:
        Storage(f"s3://{s3_env.bucket}/p").get_bytes("k")
    assert f"s3://{s3_env.bucket}/p/k" in str(e.value)


@pytest.mark.integration
def test_multipart_upload_roundtrip(s3_env: S3Server, tmp_path: Path):
    data = os.urandom(12 * MiB + 123)
    f = write(tmp_path / "big.tar", data)
    sha = hashlib.sha256(data).hexdigest()
    store = Storage(f"s3://{s3_env.bucket}/mp-{uuid.uuid4().hex[:6]}",
                    multipart_threshold=5 * MiB)
    assert store.put_file(f, "big.tar") is True
    head = s3_env.client().head_object(Bucket=s3_env.bucket, Key=parse_s3_url(store.url("big.tar"))[1])
    assert head["Metadata"]["sha256"] == sha
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    assert hashlib.sha256(store.get_bytes("big.tar")).hexdigest() == sha
    assert store.put_file(f, "big.tar") is False  # re-run: nothing transferred


@pytest.mark.integration
def test_webdataset_reads_s3(s3_env: S3Server):
    import webdataset as wds

    register_webdataset_s3()
    register_webdataset_s3()  # idempotent
    store = Storage(f"s3://{s3_env.bucket}/wds")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for member, payload in (("000000.txt", b"first"), ("000001.txt", b"second")):
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    store.put_bytes(buf.getvalue(), "shard-000000.tar")
    url = store.url("shard-000000.tar")
    with wds.gopen(url) as stream:
        assert stream.read() == buf.getvalue()
    samples = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["txt"] for s in samples] == [b"first", b"second"]
    with pytest.raises(StorageError, match="does not exist"):
        wds.gopen(store.url("absent.tar"))


def _listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(hex local address, port) of every TCP socket in LISTEN state owned by pid."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:
                addr, port = local.split(":")
                out.append((addr, int(port, 16)))
    return out


@pytest.mark.integration
def test_server_listens_on_loopback_only(s3_server: S3Server):
    pid = int((s3_server.dir / "weed.pid").read_text())
    listening = _listening_addresses(pid)
    assert s3_server.port in {p for _, p in listening}
    assert len(listening) >= 5  # master, volume, filer, s3 and their gRPC ports
    not_loopback = [(a, p) for a, p in listening if a != "0100007F"]  # 127.0.0.1, little-endian
    assert not_loopback == [], f"weed listens beyond 127.0.0.1: {not_loopback}"


@pytest.mark.integration
def test_s3sh_start_is_idempotent_and_env_prints_exports(s3_server: S3Server, tmp_path: Path):
    base = str(s3_server.dir.parent)
    again = subprocess.run(["bash", str(S3_SH), "start", "--dir", base],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already running" in again.stdout
    status = subprocess.run(["bash", str(S3_SH), "status", "--dir", base],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "running" in status.stdout
    env = subprocess.run(["bash", str(S3_SH), "env", "--dir", base],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"export AWS_ENDPOINT_URL={s3_server.endpoint}" in env
    assert f"export AWS_ACCESS_KEY_ID={s3_server.access_key}" in env
    assert "export AWS_DEFAULT_REGION=us-east-1" in env
    creds = s3_server.dir / "credentials.env"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    # The start/stop output never shows the secret.
    assert s3_server.secret_key not in again.stdout + again.stderr + status.stdout
    assert s3_server.secret_key not in (s3_server.dir / "weed.log").read_text()
    # bucket: create, then idempotent.
    made = subprocess.run(["bash", str(S3_SH), "bucket", "made-by-s3sh", "--dir", base],
                          capture_output=True, text=True, timeout=60, check=True)
    assert "created" in made.stdout
    again_b = subprocess.run(["bash", str(S3_SH), "bucket", "made-by-s3sh", "--dir", base],
                             capture_output=True, text=True, timeout=60, check=True)
    assert "already exists" in again_b.stdout
    # stop on a folder with no server is a no-op.
    stop = subprocess.run(["bash", str(S3_SH), "stop", "--dir", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "not running" in stop.stdout
