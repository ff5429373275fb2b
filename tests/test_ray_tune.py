"""Ray Tune sweep + MLflow end to end: a real local multi-node Ray cluster (tests/ray_cluster),
the S3 server and the MLflow server (SQL backend, artifacts proxied into S3). `ray job submit`
runs ray_jobs/tune_geco.py: a shared CIGM (Ray Train), 4 trials with ASHA on the worker nodes,
one of which is killed mid-sweep (its trial is retried from its checkpoint), the best trial
evaluated on test once, registered and promoted; then the champion is loaded in a fresh
process and queried."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geco.data.storage import Storage
from geco.data.synth import generate
from tests.test_ray_train import LEARN_SPEC, _job_failed, _shard

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# The learning test's model size and epochs (tests/test_learning.py): a champion good enough
# to be queried. ASHA may stop half of the trials after 3 epochs.
SWEEP = ["data.image_size=64", "cigm.features=16", "cigm.epochs=3", "cigm.batch_size=8",
         "geco.epochs=5", "geco.batch_size=32", "cluster.num_workers=2", "tune.num_samples=4",
         "tune.max_concurrent=2", "tune.grace_period=3", "tune.metric=auc_1vs1", "tune.seed=1"]


def test_sweep_tracks_every_trial_registers_the_best_and_serves_it(
        ray_cluster, s3_env, mlflow_server, tiny, tmp_path):
    from mlflow import MlflowClient

    data = tmp_path / "synth"
    generate(data, LEARN_SPEC)
    shards = f"s3://{s3_env.bucket}/tune-shards"
    _shard(data, shards, 64)
    storage = f"s3://{s3_env.bucket}/tune-runs"
    env = ray_cluster.runtime_env(tmp_path / "runtime_env.json",
                               {**s3_env.profile_env, "MLFLOW_TRACKING_URI": mlflow_server.uri})
    log = tmp_path / "job.log"
    job = ray_cluster.start(env, log, "ray_jobs/tune_geco.py", "--name", "sw",
                            *tiny.args(*SWEEP), f"data.shards={shards}",
                            f"cluster.storage_path={storage}", "tracking.experiment=sweep-test")
    # Once a trial has saved a checkpoint, the node of a running trial dies (every process).
    sweep_dir = Storage(f"{storage}/sw-sweep")
    deadline = time.monotonic() + 900
    while not any("/checkpoint_" in k for k in sweep_dir.list("")):
        assert time.monotonic() < deadline and job.poll() is None, log.read_text()[-4000:]
        time.sleep(1)
    victim = ray_cluster.node_of(_trial_node(ray_cluster))
    try:
        ray_cluster.kill_node(int(victim[1:]))
        proc = ray_cluster.finish(job, log, timeout=1500)
    finally:
        ray_cluster.start_node(int(victim[1:]))
    assert proc.returncode == 0, _job_failed(proc)
    out = proc.stdout + proc.stderr
    assert s3_env.secret_key not in out
    summary = json.loads(Storage(f"{storage}/sw-sweep").get_bytes("sweep.json"))
    assert len(summary["trials"]) == 4
    # Every trial finished (the one on the lost node was retried) on worker nodes only, and the
    # winner is the best on validation.
    names = {node_id: v["name"] for node_id, v in ray_cluster.nodes().items()}
    for t in summary["trials"]:
        assert t["error"] == "" and t["nodes"], t
        assert all(names[n] != "head" for n in t["nodes"]), t
    assert summary["best_valid_auc_1vs1"] == max(t["valid_auc_1vs1"] for t in summary["trials"])
    assert "alpha" in Storage(f"{storage}/sw-sweep").get_bytes("best_config.yaml").decode()
    # Selection on validation; test computed once, for the chosen trial.
    assert summary["test"]["split"] == "test" and summary["best_valid_auc_1vs1"] > 0.5

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if r.data.tags.get("geco.kind") == "sweep")
    trials = [r for r in runs if r.data.tags.get("geco.kind") == "trial"]
    assert len(trials) == 4  # the retried trial logged into its first attempt's run
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all(t.info.status in ("FINISHED", "KILLED") for t in trials)
    for t in trials:
        assert "geco.alpha" in t.data.params and "valid_auc_1vs1" in t.data.metrics
        history = client.get_metric_history(t.info.run_id, "valid_auc_1vs1")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        grids = [a.path for a in client.list_artifacts(t.info.run_id, "images")
                 if a.path.endswith(".png")]  # the template grid of each epoch, with its step
        assert sorted(int(g.split("+step+")[1].split("+")[0]) for g in grids) == \
            [m.step for m in history], grids
    assert "test_auc_1vs1" in parent.data.metrics
    assert parent.data.tags["geco.manifest_sha256"]
    # The PNGs really live in the S3 bucket (artifacts proxied by the server).
    objs = s3_env.client().list_objects_v2(Bucket=s3_env.bucket, Prefix="mlflow/")
    assert any(o["Key"].endswith(".png") for o in objs.get("Contents", []))

    version = summary["model"]["version"]
    mv = client.get_model_version_by_alias("geco-retriever", "champion")
    assert int(mv.version) == version  # first version: the gate accepts it
    assert client.get_model_version("geco-retriever", str(version)).tags["gate.decision"] \
        == "accepted"

    # The champion in a fresh process: the true bottom of synthetic test tops in its top 10.
    test_rows = (data / "files" / "test.csv").read_text().splitlines()[1:61]
    queries = [(str(data / "img" / f"{r.split(',')[0]}.jpg"), r.split(",")[1]) for r in test_rows]
    (tmp_path / "queries.json").write_text(json.dumps(queries))
    code = f"""
import json, mlflow
m = mlflow.pyfunc.load_model("models:/geco-retriever@champion")
queries = json.load(open({str(tmp_path / "queries.json")!r}))
out = m.predict({{"image": [q for q, _ in queries]}}, params={{"k": 10}})
hits = sum(b in set(out[out["query"] == i]["bottom_id"]) for i, (_, b) in enumerate(queries))
print(json.dumps({{"hits": int(hits), "n": len(queries)}}))
"""
    served = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**s3_env.env, "MLFLOW_TRACKING_URI":
                                              mlflow_server.uri, "PATH": "/usr/bin:/bin"})
    assert served.returncode == 0, served.stderr[-3000:]
    rate = json.loads(served.stdout.strip().splitlines()[-1])
    print("champion top-10 hit rate", rate, "sweep", summary["best"], summary["test"])
    # Random: 10 of 120 candidates = 8.3 %. This CI-sized sweep (576 pairs, <= 5 epochs)
    # reaches ~30 %, matching its test recall@10 (the pyfunc is faithful: tests/test_registry);
    # the demo-sized model serves ~85 % (README). Bar: 3x random.
    assert rate["hits"] / rate["n"] >= 0.25, rate
    assert abs(rate["hits"] / rate["n"] - summary["test"]["recall_at_10"]) < 0.2, rate


def _trial_node(cluster) -> str:
    """The Ray node of a running trial (a Tune function trainable's actor)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        actors = list_actors(address=cluster.address, limit=1000,
                             filters=[("state", "=", "ALIVE")])
        found = [a.node_id for a in actors if "ImplicitFunc" in a.class_name]
        if found:
            return found[0]
        time.sleep(0.5)
    raise AssertionError("no running trial to lose a node under")
