"""Ray Train end to end on a real local multi-node Ray cluster (infra/local/ray.sh: a head with
0 CPUs and three 1-CPU worker nodes, 127.0.0.1 only) and the real S3 server: jobs go through
`ray job submit`, two CPU workers run DDP on two different nodes. Losing nodes:
tests/test_ray_faults.py.

- both stages from S3 shards reach the single-process learning bar (tests/test_learning.py)
  within a small tolerance, submitted from a checkout deleted once the job is submitted (the
  nodes read only the runtime env's package, S3 and MLflow); the test metrics land next to
  the checkpoints; both ranks hold identical parameters after every epoch; the ranks ran on
  two worker nodes and the evaluation on a worker node, none on the head;
- bad input (a shard URL that is not there) fails in the driver, naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from geco.cli import main
from geco.data.storage import Storage
from geco.data.synth import SynthSpec, generate

pytestmark = pytest.mark.integration

LEARN_SPEC = SynthSpec(n_train_tops=288, pairs_per_top=2, n_valid=96, n_test=120, image_size=64,
                       seed=3)
# tests/test_learning.py's run, split over 2 workers: per-worker batches of half the size keep
# the global batch (and so the number of steps) the same.
LEARN = ["data.image_size=64", "cigm.features=16", "cigm.epochs=3", "cigm.batch_size=8",
         "geco.epochs=5", "geco.batch_size=16", "runtime.log_every=10",
         "cluster.num_workers=2", "cluster.num_to_keep=0"]


def _shard(data: Path, url: str, size: int) -> None:
    assert main(["data", "shard", "--out", url, "--image-size", str(size),
                 "--samples-per-shard", "100", f"data.root={data}", "data.kind=standard"]) == 0


def _cigm_in_s3(s3_env, data: Path, args: list[str], tmp_path: Path, prefix: str) -> str:
    """A CIGM trained in-process on `data` with `args`, as a .pt in S3 (for GECo-only jobs)."""
    assert main(["train", "cigm", "--run-dir", str(tmp_path / "cigm-run"), *args,
                 f"data.root={data}", "tracking.enabled=false"]) == 0
    Storage(f"s3://{s3_env.bucket}/{prefix}").put_bytes(
        (tmp_path / "cigm-run" / "cigm" / "last.pt").read_bytes(), "cigm.pt")
    return f"s3://{s3_env.bucket}/{prefix}/cigm.pt"


def _snapshot(run: Storage) -> list[dict]:
    """The checkpoints Ray Train has registered for a run (oldest first), [] before any."""
    try:
        results = json.loads(run.get_bytes("checkpoint_manager_snapshot.json"))
    except Exception:  # noqa: BLE001 - not written yet
        return []
    # Ray lists them by checkpoint_score (worst first); by epoch here.
    return sorted(results["checkpoint_results"], key=lambda r: r["metrics"]["epoch"])


def _job_failed(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_ray_job_trains_both_stages_from_s3_to_the_learning_bar(ray_cluster, s3_env, tiny,
                                                                tmp_path):
    data = tmp_path / "synth"
    generate(data, LEARN_SPEC)
    shards = f"s3://{s3_env.bucket}/ray-learn"
    _shard(data, shards, 64)
    storage = f"s3://{s3_env.bucket}/ray-runs"
    proc = ray_cluster.submit_and_delete_checkout(
        tmp_path, s3_env.profile_env, "ray_jobs/train_geco.py", "--name", "learn",
        *tiny.args(*LEARN, f"data.shards={shards}", f"cluster.storage_path={storage}"))
    assert proc.returncode == 0, _job_failed(proc)
    out = proc.stdout + proc.stderr
    assert "samples/s" in out and "Table 2" in out
    assert s3_env.secret_key not in out  # the runtime env carries a file path, not the secret

    run = Storage(f"{storage}/learn-geco")
    m = json.loads(run.get_bytes("metrics_test.json"))
    # The single-process bar is AUC >= 0.75 and MRR-full >= 3x random; small tolerance.
    assert m["auc_1vs1"] >= 0.72 and m["auc_1vs3"] >= 0.72, m
    assert m["mrr_full"] >= 2.5 * m["random_mrr_full"], m
    assert m["n_queries"] == 120 and m["reported_epochs"] == [1, 2, 3, 4, 5]
    assert m["geco_checkpoint"].startswith(storage) and m["cigm"].startswith(storage)
    # The evaluated epoch is Ray's best checkpoint by checkpoint_score: the epoch `geco train`
    # selects (best valid AUC-1vs3, the earlier on ties), not the latest.
    reports = [r["metrics"] for r in _snapshot(Storage(f"{storage}/learn-geco"))]
    chosen = max(reports, key=lambda r: (r["valid_auc_1vs3"], -r["epoch"]))
    assert m["epoch"] == chosen["epoch"], ([(r["epoch"], r["valid_auc_1vs3"]) for r in reports])

    # Every epoch of both stages: both ranks' parameter digests, gathered after the epoch's
    # last optimiser step, are identical (DDP kept the replicas in sync), and each rank names
    # the Ray node it ran on: two different worker nodes, never the head. The evaluation and
    # registration task ran on a worker node too.
    nodes = ray_cluster.nodes()
    assert nodes[m["eval_node"]]["name"] != "head", (m["eval_node"], nodes)
    for stage, epochs in (("cigm", 3), ("geco", 5)):
        results = [r["metrics"] for r in _snapshot(Storage(f"{storage}/learn-{stage}"))]
        assert [r["epoch"] for r in results] == list(range(1, epochs + 1))
        for r in results:
            digests = r["param_digests"].split(",")
            assert len(digests) == 2 and digests[0] == digests[1], (stage, r["epoch"])
            assert r["ranks_in_sync"] == 1
            placed = [nodes[n]["name"] for n in r["rank_nodes"].split(",")]
            assert len(set(placed)) == 2 and "head" not in placed, (stage, placed)
        assert all(r["samples"] == 2 * 288 for r in results)  # every pair once per epoch

    # geco logs through Ray Train's own handlers: its lines are in the workers' application
    # log files (logs/train/ray-train-app-worker-*.log, JSON lines), not only on stdout.
    temp = Path(f"/tmp/geco-ray-{os.getuid()}-{ray_cluster.gcs_port}")  # infra/local/ray.sh
    app_logs = list(temp.parent.glob(f"{temp.name}*/session_*/logs/train/"
                                     "ray-train-app-worker-*.log"))
    assert any("[geco] epoch 5/5 done" in f.read_text(errors="replace") for f in app_logs), \
        [f.name for f in app_logs]


def test_missing_shards_fail_in_the_driver_by_name(ray_cluster, s3_env, tmp_path):
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    url = f"s3://{s3_env.bucket}/no-such-shards"
    proc = ray_cluster.submit(env, "ray_jobs/train_geco.py", "--name", "bad",
                           f"data.shards={url}", f"cluster.storage_path={tmp_path / 'ray'}",
                           timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "geco: error:" in out and f"{url}/manifest.json" in out
    assert "Traceback" not in out


def test_unreachable_tracking_server_fails_the_job_by_name(ray_cluster, s3_env, synth_small,
                                                           tmp_path):
    """tracking.on_error=fail (default): a dead MLflow server stops the job before training,
    naming the URI; nothing is trained untracked by accident."""
    from tests.s3_server import free_port

    shards = f"s3://{s3_env.bucket}/ray-dead-mlflow"
    _shard(synth_small, shards, 32)
    dead = f"http://127.0.0.1:{free_port()}"
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    proc = ray_cluster.submit(env, "ray_jobs/train_geco.py", "--name", "dead-mlflow",
                           f"data.shards={shards}", f"cluster.storage_path={tmp_path / 'ray'}",
                           f"tracking.uri={dead}", timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "geco: error:" in out and dead in out and "not reachable" in out


def test_catalogue_job_embeds_shards_in_parallel_tasks(ray_cluster, s3_env, synth_small,
                                                       retriever_files, tmp_path):
    """ray_jobs/build_catalogue.py: one Ray task per catalogue shard on the worker nodes; the
    catalogue it writes to S3 equals the in-process build of the same shards."""
    import torch

    from geco.catalogue import build

    files, _ = retriever_files
    shards = f"s3://{s3_env.bucket}/catalogue-shards"
    assert main(["data", "shard", "--out", shards, "--image-size", "32",
                 "--catalogue-per-shard", "40", f"data.root={synth_small}",
                 "data.kind=standard"]) == 0
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    out = f"s3://{s3_env.bucket}/catalogues/"
    proc = ray_cluster.submit(env, "ray_jobs/build_catalogue.py", shards, "--split", "test",
                              "--model", str(files["geco"]), "--out", out,
                              "tracking.enabled=false", timeout=600)
    assert proc.returncode == 0, _job_failed(proc)
    text = proc.stdout
    result = json.loads(text[text.index("\n{") + 1:text.rindex("\n}") + 2])
    assert result["units"] >= 3 and "samples/s" in proc.stdout + proc.stderr
    nodes = ray_cluster.nodes()
    assert result["nodes"] and all(nodes[n]["name"] != "head" for n in result["nodes"])
    assert result["path"] == f"{out}catalogue-{result['version']}.pt"

    store = Storage(f"s3://{s3_env.bucket}/catalogues")
    import io

    on_ray = torch.load(io.BytesIO(store.get_bytes(f"catalogue-{result['version']}.pt")),
                        weights_only=True)
    here = build(str(files["geco"]), shards, str(tmp_path / "here.pt"), split="test")
    local = torch.load(here["path"], weights_only=True)
    assert on_ray["ids"] == local["ids"] and on_ray["version"] == local["version"]
    torch.testing.assert_close(on_ray["embeddings"], local["embeddings"])
