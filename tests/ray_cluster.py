"""A real local Ray head for integration tests, started through infra/local/ray.sh (the same
flags users get: everything on 127.0.0.1) on free ports in a temporary folder, once per test
session, and always stopped. Jobs go through the real `ray job submit` CLI.

    from tests.ray_cluster import ray_head  # noqa: F401  (or via tests/conftest.py)

Without Ray installed (the `orchestration` extra) the tests skip with a clear reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3_server import free_port

REPO = Path(__file__).resolve().parents[1]
RAY_SH = REPO / "infra" / "local" / "ray.sh"
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".git", "runs", "data", "tmp", ".gpu_data", "*.egg-info", "__pycache__",
            ".pytest_cache", ".ruff_cache", "*.pt"]


@dataclass
class RayHead:
    dir: Path
    gcs_port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def runtime_env(self, path: Path, env: dict[str, str]) -> Path:
        spec = {"working_dir": str(REPO), "excludes": EXCLUDES,
                "env_vars": {"PYTHONUNBUFFERED": "1", **env}}
        path.write_text(json.dumps(spec))
        return path

    def submit(self, runtime_env: Path, *args: str, timeout: int = 900
               ) -> subprocess.CompletedProcess:
        """`ray job submit ... -- python ARGS` (waits for the job; output captured)."""
        cmd = [str(BIN / "ray"), "job", "submit", "--address", self.address,
               "--runtime-env", str(runtime_env), "--", "python", *args]
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=REPO)


def _ray_sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RAY_SH), *args], capture_output=True, text=True,
                          timeout=180, check=check,
                          env={**os.environ, "GECO_VENV_BIN": str(BIN)})


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    if not (BIN / "ray").exists():
        pytest.skip("Ray is not installed (pip install -e '.[orchestration]')")
    base = tmp_path_factory.mktemp("raystack")
    head = RayHead(base, free_port(), free_port())
    common = ["--dir", str(base), "--port", str(head.gcs_port)]
    started = _ray_sh("start", *common, "--dashboard-port", str(head.dashboard_port),
                      "--num-cpus", "4", check=False)
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start the Ray head: {started.stdout}{started.stderr}")
        yield head
    finally:
        _ray_sh("stop", *common, check=False)
