"""Losing worker nodes of a real local multi-node Ray cluster (tests/ray_cluster.py: a head with
0 CPUs and three 1-CPU worker nodes on 127.0.0.1) while GECo trains, through `ray job submit`,
with the real S3 and MLflow servers. A node is lost the way a preempted one is: every process
of it SIGKILLed, by pid; the fixture starts it again for the next test.

- fixed size (2 ranks): Ray Train restarts the group on the surviving nodes from the last
  checkpoint, the job succeeds, every epoch is reported once in Ray and in MLflow, no
  checkpoint is lost, and the weights and test metrics equal an uninterrupted run's to the
  bit; resubmitting the finished run resumes it (nothing retrained);
- elastic (cluster.num_workers=[2, 3]): the lost node shrinks the group to 2 ranks, its return
  grows it back to 3; every epoch once, every pair once per epoch at every size, the global
  batch unchanged.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from geco.data.storage import Storage
from tests.test_ray_train import _cigm_in_s3, _job_failed, _shard, _snapshot

pytestmark = pytest.mark.integration


def test_lost_node_mid_epoch_resumes_on_the_survivors(ray_cluster, s3_env, mlflow_server,
                                                      synth_small, tiny, tmp_path):
    from mlflow import MlflowClient

    shards = f"s3://{s3_env.bucket}/ray-loss"
    _shard(synth_small, shards, 64)
    storage = f"s3://{s3_env.bucket}/ray-loss-runs"
    # A trained CIGM as a .pt in S3 (trained here, in-process: the test is about GECo).
    base = tiny.args("data.image_size=64", "geco.epochs=2", "geco.batch_size=8",
                     "runtime.log_every=8", "cluster.num_workers=2", "cluster.num_to_keep=0",
                     "cluster.max_failures=1", "tracking.experiment=node-loss")
    cigm = _cigm_in_s3(s3_env, synth_small, base, tmp_path, "ray-loss-cigm")
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json",
                                  {**s3_env.profile_env, "MLFLOW_TRACKING_URI": mlflow_server.uri})

    def job(name: str) -> list[str]:
        return ["ray_jobs/train_geco.py", "--name", name, "--cigm", cigm, *base,
                f"data.shards={shards}", f"cluster.storage_path={storage}"]

    steady = ray_cluster.submit(env, *job("steady"))
    assert steady.returncode == 0, _job_failed(steady)

    # The same job again; once Ray Train holds epoch 1's report and checkpoint, the worker node
    # of rank 0 (the rank that uploads checkpoints) dies with every process on it.
    run = Storage(f"{storage}/lost-geco")
    log = tmp_path / "job.log"
    proc = ray_cluster.start(env, log, *job("lost"))

    def snapshot() -> list[dict]:
        return _snapshot(run)

    deadline = time.monotonic() + 600
    while not snapshot():
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-4000:]
        time.sleep(0.5)
    victim_id = snapshot()[0]["metrics"]["rank_nodes"].split(",")[0]
    victim = ray_cluster.node_of(victim_id)
    assert victim.startswith("n"), victim
    number = int(victim[1:])
    try:
        ray_cluster.kill_node(number)
        done = ray_cluster.finish(proc, log)
        assert done.returncode == 0, _job_failed(done)
        out = done.stdout
        assert "restored" in out  # the new worker group started from the checkpoint

        # Ray: each epoch reported once, every registered checkpoint still in S3, the last
        # epochs trained without the lost node.
        results = snapshot()
        assert [r["metrics"]["epoch"] for r in results] == [1, 2]
        for r in results:
            assert run.exists(f"{r['checkpoint_dir_name']}/geco/last.pt"), r
        assert victim_id not in results[-1]["metrics"]["rank_nodes"].split(",")
        assert len(set(results[-1]["metrics"]["rank_nodes"].split(","))) == 2

        # MLflow: each epoch once in the GECo run.
        client = MlflowClient(tracking_uri=mlflow_server.uri)
        exp = client.get_experiment_by_name("node-loss")
        geco_run = client.search_runs([exp.experiment_id],
                                      filter_string="tags.`geco.run_key` = 'lost-geco'")[0]
        steps = [m.step for m in client.get_metric_history(geco_run.info.run_id, "epoch")]
        assert sorted(steps) == [1, 2], steps
        # What the run page shows besides: step-level curves, each epoch's template grid as
        # an image with its step, both ranks' system metrics, the shards as dataset inputs.
        data = client.get_run(geco_run.info.run_id).data.metrics
        assert "step/loss" in data and "step/samples_per_s" in data
        assert {"system/rank0/cpu_utilization_percentage",
                "system/rank1/cpu_utilization_percentage"} <= set(data), sorted(data)
        images = [a.path for a in client.list_artifacts(geco_run.info.run_id, "images")]
        assert {int(i.split("+step+")[1].split("+")[0]) for i in images} == {1, 2}, images
        inputs = client.get_run(geco_run.info.run_id).inputs.dataset_inputs
        assert sorted(d.dataset.name for d in inputs) == \
            ["ray-loss/test", "ray-loss/train", "ray-loss/valid"]
        assert {d.dataset.source_type for d in inputs} == {"s3"}

        # The interrupted run ends where the uninterrupted one does, to the bit: the restarted
        # group resumed epoch 2 with the RNG streams, data order and state of the first.
        steady_run = Storage(f"{storage}/steady-geco")
        a = json.loads(steady_run.get_bytes("metrics_test.json"))
        b = json.loads(run.get_bytes("metrics_test.json"))
        print("uninterrupted", a["auc_1vs1"], a["mrr_full"], "node lost", b["auc_1vs1"],
              b["mrr_full"])
        for k in ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full"):
            assert a[k] == b[k], (k, a, b)
        weights = []
        for r, store in ((_snapshot(steady_run)[-1], steady_run), (results[-1], run)):
            path = tmp_path / f"{len(weights)}.pt"
            path.write_bytes(store.get_bytes(f"{r['checkpoint_dir_name']}/geco/last.pt"))
            weights.append(torch.load(path, weights_only=True)["state"]["model"])
        assert [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])] == []

        # The same run name again: Ray Train restores the finished run; nothing is retrained.
        again = ray_cluster.submit(env, *job("lost"))
        assert again.returncode == 0, _job_failed(again)
        assert "epoch 1/2 done" not in again.stdout and "was registered" in again.stdout
        assert [r["checkpoint_dir_name"] for r in snapshot()] == \
            [r["checkpoint_dir_name"] for r in results]
    finally:
        ray_cluster.start_node(number)


@pytest.mark.slow
def test_elastic_training_shrinks_when_a_node_is_lost_and_grows_when_it_returns(
        ray_cluster, s3_env, synth_small, tiny, tmp_path):
    shards = f"s3://{s3_env.bucket}/ray-elastic"
    _shard(synth_small, shards, 64)
    storage = f"s3://{s3_env.bucket}/ray-elastic-runs"
    # 2 to 3 ranks, global batch 3 x 4 = 12 at every size (6 per rank on 2, 4 on 3).
    base = tiny.args("data.image_size=64", "geco.epochs=4", "geco.batch_size=4",
                     "runtime.log_every=8", "cluster.num_workers=[2,3]",
                     "cluster.resize_interval_s=5", "cluster.num_to_keep=0",
                     "cluster.max_failures=2")
    cigm = _cigm_in_s3(s3_env, synth_small, base, tmp_path, "ray-elastic-cigm")
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json", s3_env.profile_env)
    run = Storage(f"{storage}/elastic-geco")
    log = tmp_path / "job.log"
    proc = ray_cluster.start(env, log, "ray_jobs/train_geco.py", "--name", "elastic",
                             "--cigm", cigm, *base, f"data.shards={shards}",
                             f"cluster.storage_path={storage}")

    def sizes() -> list[int]:
        return [int(r["metrics"]["world_size"]) for r in _snapshot(run)]

    def wait(what: str, until) -> None:
        deadline = time.monotonic() + 600
        while not until():
            assert time.monotonic() < deadline and proc.poll() is None, \
                f"waiting for {what}: {sizes()}\n{log.read_text()[-4000:]}"
            time.sleep(0.5)

    wait("an epoch on 3 ranks", lambda: 3 in sizes())
    victim_id = _snapshot(run)[-1]["metrics"]["rank_nodes"].split(",")[-1]
    number = int(ray_cluster.node_of(victim_id)[1:])
    try:
        ray_cluster.kill_node(number)
        wait("an epoch on 2 ranks", lambda: 2 in sizes())
    finally:
        ray_cluster.start_node(number)  # the node returns: the group grows back to 3
    done = ray_cluster.finish(proc, log)
    assert done.returncode == 0, _job_failed(done)

    results = [r["metrics"] for r in _snapshot(run)]
    assert [int(r["epoch"]) for r in results] == [1, 2, 3, 4]  # each epoch once
    world = [int(r["world_size"]) for r in results]
    print("world size per epoch", world)
    shrink = world.index(2)
    assert 3 in world[:shrink] and 3 in world[shrink:], world  # shrank, then grew back
    for r in results:
        # Every pair once per epoch at every size; the same global batch; one node per rank;
        # the replicas in sync.
        assert r["samples"] == 384, r
        assert int(r["rank_batch"]) * int(r["world_size"]) == 12, r
        assert len(set(r["rank_nodes"].split(","))) == int(r["world_size"]), r
        assert r["ranks_in_sync"] == 1
    assert victim_id not in results[shrink]["rank_nodes"].split(",")
