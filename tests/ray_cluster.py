"""A real local Ray head for integration tests, started through infra/local/ray.sh (the same
flags users get: everything on 127.0.0.1) on free ports in a temporary folder, once per test
session, and always stopped. Jobs go through the real `ray job submit` CLI.

    from tests.ray_cluster import ray_head  # noqa: F401  (or via tests/conftest.py)

Without Ray installed (the `orchestration` extra) the tests skip with a clear reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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

    def _submit_cmd(self, runtime_env: Path, args: tuple[str, ...]) -> list[str]:
        return [str(BIN / "ray"), "job", "submit", "--address", self.address,
                "--runtime-env", str(runtime_env), "--", "python", *args]

    def submit(self, runtime_env: Path, *args: str, timeout: int = 900
               ) -> subprocess.CompletedProcess:
        """`ray job submit ... -- python ARGS` (waits for the job; output captured)."""
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        return subprocess.run(self._submit_cmd(runtime_env, args), capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=REPO)

    def start(self, runtime_env: Path, log: Path, *args: str) -> subprocess.Popen:
        """`submit` without waiting: the job's output goes to `log`; `finish` collects it."""
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        with open(log, "w") as out:
            return subprocess.Popen(self._submit_cmd(runtime_env, args), stdout=out,
                                    stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)

    @staticmethod
    def finish(proc: subprocess.Popen, log: Path, timeout: int = 900
               ) -> subprocess.CompletedProcess:
        proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")

    def kill_training_worker(self, ready: Callable[[], bool], timeout: float = 300) -> int:
        """A Ray-level fault: once `ready()` holds, SIGKILL one live Ray Train worker process
        (its actor dies as on a crashed or preempted node). Returns the pid killed."""
        from ray.util.state import list_actors

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                workers = list_actors(address=self.address, limit=1000, filters=[
                    ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                if workers:
                    pid = max(int(w.pid) for w in workers)
                    os.kill(pid, signal.SIGKILL)
                    return pid
            time.sleep(0.2)
        raise AssertionError(f"no Ray Train worker to kill within {timeout:.0f} s")


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
