"""Ray Train end to end against a real local Ray head (infra/local/ray.sh, 127.0.0.1 only) and
the real S3 server: jobs go through `ray job submit`, two CPU workers run DDP.

- both stages from S3 shards reach the single-process learning bar (tests/test_learning.py)
  within a small tolerance, the test metrics land next to the checkpoints, and both ranks hold
  identical parameters after every epoch;
- a training worker killed mid-epoch: the run restarts from the last checkpoint, finishes,
  reports every epoch exactly once, keeps every checkpoint; resubmitting the finished run
  resumes it (nothing retrained);
- bad input (a shard URL that is not there) fails in the driver, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def _job_failed(proc) -> str:
    return f"rc={proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_ray_job_trains_both_stages_from_s3_to_the_learning_bar(ray_head, s3_env, tiny,
                                                                tmp_path):
    data = tmp_path / "synth"
    generate(data, LEARN_SPEC)
    shards = f"s3://{s3_env.bucket}/ray-learn"
    _shard(data, shards, 64)
    storage = f"s3://{s3_env.bucket}/ray-runs"
    env = ray_head.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    proc = ray_head.submit(env, "ray_jobs/train_geco.py", "--name", "learn",
                           *tiny.args(*LEARN, f"data.shards={shards}",
                                      f"cluster.storage_path={storage}"))
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

    # Every epoch of both stages: both ranks' parameter digests, gathered after the epoch's
    # last optimiser step, are identical (DDP kept the replicas in sync), and each rank names
    # the Ray node it ran on (the head's one node here).
    from ray.util.state import list_nodes

    nodes = {n.node_id for n in list_nodes(address=ray_head.address)}
    for stage, epochs in (("cigm", 3), ("geco", 5)):
        snap = json.loads(Storage(f"{storage}/learn-{stage}")
                          .get_bytes("checkpoint_manager_snapshot.json"))
        results = [r["metrics"] for r in snap["checkpoint_results"]]
        assert [r["epoch"] for r in results] == list(range(1, epochs + 1))
        for r in results:
            digests = r["param_digests"].split(",")
            assert len(digests) == 2 and digests[0] == digests[1], (stage, r["epoch"])
            assert r["ranks_in_sync"] == 1
            placed = r["rank_nodes"].split(",")
            assert len(placed) == 2 and set(placed) <= nodes, (stage, placed, nodes)
        assert all(r["samples"] == 2 * 288 for r in results)  # every pair once per epoch


def test_killed_worker_resumes_and_nothing_is_counted_twice(ray_head, s3_env, synth_small,
                                                           tiny, tmp_path):
    shards = f"s3://{s3_env.bucket}/ray-kill"
    _shard(synth_small, shards, 64)
    storage = tmp_path / "ray"
    run = storage / "kill-cigm"
    # synth_small: 384 training pairs; global batch 2 x 4 -> 48 steps (several seconds) per
    # epoch, so the kill below lands inside an epoch.
    env = ray_head.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    args = ["ray_jobs/train_cigm.py", "--name", "kill",
            *tiny.args("data.image_size=64", "cigm.epochs=3", "cigm.batch_size=4",
                       f"data.shards={shards}", f"cluster.storage_path={storage}",
                       "cluster.max_failures=1", "cluster.num_to_keep=0")]
    log = tmp_path / "job.log"
    job = ray_head.start(env, log, *args)

    def epoch_1_registered() -> bool:
        # Ray Train has taken epoch 1's report and checkpoint (a report not yet collected
        # when the group dies is lost with it, and that epoch is trained again).
        try:
            snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return False
        return bool(snap.get("checkpoint_results"))

    # Then a worker process dies (SIGKILL, as on a lost node): in epoch 2 of 3.
    ray_head.kill_training_worker(epoch_1_registered)
    proc = ray_head.finish(job, log)
    assert proc.returncode == 0, _job_failed(proc)
    out = proc.stdout + proc.stderr
    assert "restored" in out  # the new worker group started from the checkpoint

    snap = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    results = snap["checkpoint_results"]
    assert [r["metrics"]["epoch"] for r in results] == [1, 2, 3]  # each epoch reported once
    for r in results:  # no registered checkpoint lost
        assert (run / r["checkpoint_dir_name"] / "cigm" / "last.pt").is_file()
    last = torch.load(run / results[-1]["checkpoint_dir_name"] / "cigm" / "last.pt",
                      weights_only=True)
    assert [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert all(h["samples"] == 384 for h in last["history"])
    lines = (run / results[-1]["checkpoint_dir_name"] / "cigm" / "metrics.jsonl").read_text()
    assert [json.loads(x)["epoch"] for x in lines.splitlines()] == [1, 2, 3]

    # The same run name again: Ray Train restores the finished run; nothing is retrained.
    again = ray_head.submit(env, *args)
    assert again.returncode == 0, _job_failed(again)
    assert "epochs reported: [1, 2, 3]" in again.stdout
    assert "epoch 1/3 done" not in again.stdout
    snap2 = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    assert [r["checkpoint_dir_name"] for r in snap2["checkpoint_results"]] == \
        [r["checkpoint_dir_name"] for r in results]


def test_missing_shards_fail_in_the_driver_by_name(ray_head, s3_env, tmp_path):
    env = ray_head.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    url = f"s3://{s3_env.bucket}/no-such-shards"
    proc = ray_head.submit(env, "ray_jobs/train_geco.py", "--name", "bad",
                           f"data.shards={url}", f"cluster.storage_path={tmp_path / 'ray'}",
                           timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "geco: error:" in out and f"{url}/manifest.json" in out
    assert "Traceback" not in out


def test_unreachable_tracking_server_fails_the_job_by_name(ray_head, s3_env, synth_small,
                                                           tmp_path):
    """tracking.on_error=fail (default): a dead MLflow server stops the job before training,
    naming the URI; nothing is trained untracked by accident."""
    from tests.s3_server import free_port

    shards = f"s3://{s3_env.bucket}/ray-dead-mlflow"
    _shard(synth_small, shards, 32)
    dead = f"http://127.0.0.1:{free_port()}"
    env = ray_head.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    proc = ray_head.submit(env, "ray_jobs/train_geco.py", "--name", "dead-mlflow",
                           f"data.shards={shards}", f"cluster.storage_path={tmp_path / 'ray'}",
                           f"tracking.uri={dead}", timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "geco: error:" in out and dead in out and "not reachable" in out
