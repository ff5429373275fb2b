"""A real MLflow tracking server for integration tests, artifacts proxied into the test S3.

Started through infra/local/mlflow.sh (the same flags users get) in the base folder of the
session's `s3_server`, so it finds the S3 credentials file s3.sh wrote there, on a free
loopback port, once per test session, and always stopped:

    from tests.mlflow_server import mlflow_env, mlflow_server  # noqa: F401

    @pytest.mark.integration
    def test_track(mlflow_env, mlflow_server):
        Tracker.start(TrackingConfig(), run_name="x")   # uses $MLFLOW_TRACKING_URI

Artifacts land in s3://<s3_server.bucket>/mlflow/... Without mlflow installed the tests skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3_server import S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
MLFLOW_SH = REPO / "infra" / "local" / "mlflow.sh"


@dataclass
class MlflowServer:
    uri: str
    dir: Path  # DIR/mlflow: the store, server.log, ports.env
    port: int
    artifacts: str  # where the server puts artifacts, e.g. s3://geco-test/mlflow


def _mlflow_sh(*args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MLFLOW_SH), *args], capture_output=True, text=True, timeout=180,
        check=check, env={**os.environ, **env},
    )


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server) -> Iterator[MlflowServer]:
    """An MLflow server for the whole session; artifacts in s3://<s3_server.bucket>/mlflow."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow not installed (pip install -e '.[orchestration]')")
    base = s3_server.dir.parent
    port = free_port()
    artifacts = f"s3://{s3_server.bucket}/mlflow"
    started = _mlflow_sh("start", "--dir", str(base), "--port", str(port), check=False,
                         GECO_MLFLOW_ARTIFACTS=artifacts)
    try:
        if started.returncode != 0:
            log = base / "mlflow" / "server.log"
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            pytest.fail(f"could not start MLflow: {started.stderr.strip()}\n--- {log}:\n{tail}")
        if "already running" in started.stdout:
            # Two definitions of this fixture (e.g. imported by a test module as well as by
            # conftest.py) would share the state dir: the second would yield a dead port.
            pytest.fail(f"an MLflow server already runs in {base / 'mlflow'}: import the "
                        "mlflow_server fixture from tests/conftest.py only")
        yield MlflowServer(uri=f"http://127.0.0.1:{port}", dir=base / "mlflow", port=port,
                           artifacts=artifacts)
    finally:
        _mlflow_sh("stop", "--dir", str(base), check=False, GECO_MLFLOW_STOP_TIMEOUT="5")


@pytest.fixture
def mlflow_env(mlflow_server: MlflowServer, s3_env: S3Server,
               monkeypatch: pytest.MonkeyPatch) -> MlflowServer:
    """Point MLFLOW_TRACKING_URI (and the AWS environment, via s3_env) at the session servers."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    return mlflow_server
