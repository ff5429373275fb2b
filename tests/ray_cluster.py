"""A real local multi-node Ray cluster for integration tests, started through
infra/local/ray.sh (the same flags users get: everything on 127.0.0.1) on free ports in a
temporary folder, once per test session, and always stopped: a head with 0 CPUs (drivers and
Ray's services only, as on KubeRay) and NODES worker nodes of 1 CPU, each its own raylet,
object store and temp dir. Jobs go through the real `ray job submit` CLI; a test can kill a
worker node (all its processes, by pid) and start it again.

    from tests.ray_cluster import ray_head  # noqa: F401  (or via tests/conftest.py)

Without Ray installed (the `orchestration` extra) the tests skip with a clear reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
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


NODES = 3  # worker nodes of 1 CPU: two DDP ranks land on two nodes, a third survives a loss


@dataclass
class RayCluster:
    dir: Path
    gcs_port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def runtime_env(self, path: Path, env: dict[str, str], working_dir: Path = REPO) -> Path:
        spec = {"working_dir": str(working_dir), "excludes": EXCLUDES,
                "env_vars": {"PYTHONUNBUFFERED": "1", **env}}
        path.write_text(json.dumps(spec))
        return path

    def submit_and_delete_checkout(self, tmp_path: Path, env: dict[str, str], *args: str,
                                   timeout: int = 900) -> subprocess.CompletedProcess:
        """`ray job submit` from a copy of the checkout that is deleted as soon as the job is
        submitted (its working_dir uploaded): the job can only succeed if no node reads
        anything from the submitting side but the runtime env's package."""
        checkout = tmp_path / "checkout"
        for part in ("geco", "ray_jobs", "configs", "pyproject.toml"):
            src = REPO / part
            if src.is_dir():
                shutil.copytree(src, checkout / part,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
            else:
                shutil.copy2(src, checkout / part)
        spec = self.runtime_env(tmp_path / "runtime_env_copy.json", env, working_dir=checkout)
        sid = f"geco-test-{uuid.uuid4().hex[:12]}"
        cmd = self._submit_cmd(spec, args)
        cmd[cmd.index("submit") + 1:cmd.index("submit") + 1] = ["--no-wait", "--submission-id", sid]
        ray_env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ray_env,
                       cwd=tmp_path, check=True)
        shutil.rmtree(checkout)
        logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--follow", "--address",
                               self.address, sid], capture_output=True, text=True,
                              timeout=timeout, env=ray_env)
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", self.address,
                                 sid], capture_output=True, text=True, timeout=60, env=ray_env)
        ok = "succeeded" in (status.stdout + status.stderr).lower()
        return subprocess.CompletedProcess(cmd, 0 if ok else 1, logs.stdout,
                                           logs.stderr + status.stdout + status.stderr)

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

    def ray_sh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _ray_sh(*args, "--dir", str(self.dir), "--port", str(self.gcs_port), check=check)

    def nodes(self) -> dict[str, dict]:
        """Ray's view of the cluster: node id -> {"name": head or n<I>, "alive": bool}."""
        from ray.util.state import list_nodes

        out = {}
        for n in list_nodes(address=self.address, limit=100):
            name = "head" if n.is_head_node else (n.labels or {}).get("geco-node", "?")
            out[n.node_id] = {"name": name, "alive": n.state == "ALIVE"}
        return out

    def node_of(self, node_id: str) -> str:
        return self.nodes()[node_id]["name"]

    def kill_node(self, number: int) -> None:
        """SIGKILL every process of worker node `number` (a preempted node)."""
        self.ray_sh("node-kill", str(number))

    def alive(self) -> set[str]:
        """Names of the nodes Ray counts alive."""
        return {v["name"] for v in self.nodes().values() if v["alive"]}

    def start_node(self, number: int) -> None:
        """Start worker node `number` (again); waits until Ray counts it alive."""
        self.ray_sh("node-start", str(number))
        deadline = time.monotonic() + 60
        while f"n{number}" not in self.alive():
            if time.monotonic() > deadline:
                raise AssertionError(f"worker node n{number} did not join the cluster")
            time.sleep(1)

    def wait_for_nodes(self) -> None:
        """Every worker node alive (one a test killed is started again)."""
        alive = self.alive()
        for i in range(1, NODES + 1):
            if f"n{i}" not in alive:
                self.start_node(i)


def _ray_sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(RAY_SH), *args], capture_output=True, text=True,
                          timeout=300, check=check,
                          env={**os.environ, "GECO_VENV_BIN": str(BIN)})


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    if not (BIN / "ray").exists():
        pytest.skip("Ray is not installed (pip install -e '.[orchestration]')")
    base = tmp_path_factory.mktemp("raystack")
    head = RayCluster(base, free_port(), free_port())
    common = ["--dir", str(base), "--port", str(head.gcs_port)]
    started = _ray_sh("start", *common, "--dashboard-port", str(head.dashboard_port),
                      "--workers", str(NODES), "--worker-cpus", "1", check=False)
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start the Ray cluster: {started.stdout}{started.stderr}")
        yield head
    finally:
        _ray_sh("stop", *common, check=False)


@pytest.fixture
def ray_cluster(ray_head: RayCluster) -> RayCluster:
    """The session's cluster with every worker node alive (restarted if a test killed one)."""
    ray_head.wait_for_nodes()
    return ray_head
