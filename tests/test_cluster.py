"""geco.cluster's pieces that need no Ray cluster: config checks, storage paths, parameter
digests, generator sources, checkpoint packing, failure messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geco.cluster import driver, worker
from geco.config import load_config
from geco.errors import ConfigError, DataError, GecoError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, match", [
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("cluster.num_workers=[3,2]", "cluster.num_workers"),
    ("cluster.num_workers=[0,2]", "cluster.num_workers"),
    ("cluster.num_workers=[1,2,3]", "cluster.num_workers"),
    ("cluster.num_workers=two", "cluster.num_workers"),
    ("cluster.resize_interval_s=-1", "cluster.resize_interval_s"),
    ("cluster.name=a/b", "cluster.name"),
    ("cluster.max_failures=-2", "max_failures"),
    ("cluster.cpus_per_worker=0", "cpus_per_worker"),
])
def test_impossible_cluster_settings_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_elastic_range_keeps_the_global_batch_or_is_refused_by_name(tiny):
    from geco.cluster.worker import rank_batch

    fixed = tiny(None, "cluster.num_workers=2").cluster
    assert fixed.worker_range == (2, 2) and not fixed.elastic
    elastic = tiny(None, "cluster.num_workers=[2,4]").cluster
    assert elastic.worker_range == (2, 4) and elastic.elastic
    # batch_size 3 per rank at 4 ranks: global 12 -> 6 per rank on 2, 4 on 3, 3 on 4.
    assert [rank_batch(12, w, "geco.batch_size") for w in (2, 3, 4)] == [6, 4, 3]
    with pytest.raises(ConfigError, match=r"geco.batch_size.*12.*5 workers"):
        rank_batch(12, 5, "geco.batch_size")


def test_driver_refuses_a_range_that_cannot_split_the_batch(tiny, synth_small):
    from geco.cluster.driver import preflight

    cfg = tiny(synth_small, "cluster.num_workers=[2,3]", "cigm.batch_size=4",
               "geco.batch_size=5")  # cigm: 12 splits on 2 and 3; geco: 15 not on 2
    with pytest.raises(ConfigError, match=r"geco.batch_size.*15.*2 workers"):
        preflight(cfg)


def test_storage_path_is_absolute_or_a_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert driver.storage_path("runs/ray") == str(tmp_path / "runs" / "ray")
    assert driver.storage_path("s3://bucket/prefix/") == "s3://bucket/prefix"


def test_ray_storage_on_s3_has_patient_timeouts_and_pickles_without_secrets(tmp_path,
                                                                            monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    assert driver.ray_storage("runs/ray") == {"storage_path": str(tmp_path / "runs" / "ray"),
                                             "storage_filesystem": None}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "geco-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "geco-test-secret-value")
    monkeypatch.setenv("GECO_S3_READ_TIMEOUT", "45")
    got = driver.ray_storage("s3://bucket/prefix/")
    assert got["storage_path"] == "bucket/prefix"
    fs = got["storage_filesystem"]
    blob = pickle.dumps(fs)  # what Ray sends to every worker and keeps in checkpoints
    assert b"geco-test-secret-value" not in blob and b"geco-test-key" not in blob
    options = pickle.loads(blob).__reduce__()[1][0]
    assert fs.type_name == "s3" and options["endpoint_override"] == "http://127.0.0.1:9"
    assert options["request_timeout"] == 45 and options["connect_timeout"] == 5


def test_param_digest_tells_identical_weights_from_different_ones():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    b.load_state_dict(a.state_dict())
    b[1].running_mean += 1  # buffers are not parameters: DDP ranks may differ there
    assert worker.param_digest([a]) == worker.param_digest([b])
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    assert worker.param_digest([a]) != worker.param_digest([b])


class FakeCheckpoint:
    """ray.train.Checkpoint's download API on a local folder."""

    def __init__(self, path: Path):
        self.path = str(path)

    def to_directory(self, path: str) -> str:
        import shutil

        shutil.copytree(self.path, path, dirs_exist_ok=True)
        return path


def test_pack_then_unpack_restores_the_stage_folder(tmp_path):
    from geco.train.runtime import save_checkpoint

    src = tmp_path / "work" / "geco"
    (src / "samples").mkdir(parents=True)
    for name in ("last.pt", "metrics.jsonl", "config.yaml", "samples/epoch_001.png"):
        (src / name).write_text(name)
    save_checkpoint(src / "best.pt", {"stage": "geco", "epoch": 1, "config": {}, "history": [],
                                      "state": {"model": {"w": torch.ones(3)},
                                                "optimizer": {"m": torch.ones(3)}}})
    (src / "scratch.tmp").write_text("not packed")
    ckpt = tmp_path / "ckpt"
    worker.pack(src, ckpt / "geco")
    restored = tmp_path / "restored"
    worker.unpack(FakeCheckpoint(ckpt), "geco", restored)
    names = sorted(str(p.relative_to(restored / "geco")) for p in (restored / "geco").rglob("*")
                   if p.is_file())
    # No best.pt copy: Ray keeps the best epoch's own checkpoint (worker.SCORE).
    assert names == ["config.yaml", "last.pt", "metrics.jsonl", "samples/epoch_001.png"]
    with pytest.raises(GecoError, match="holds no cigm/last.pt"):
        worker.unpack(FakeCheckpoint(ckpt), "cigm", tmp_path / "other")


def test_generator_sources_local_file_folder_and_missing(tmp_path):
    pt = tmp_path / "gen.pt"
    pt.write_bytes(b"x")
    assert worker.fetch_generator(str(pt), tmp_path / "w1") == pt
    folder = tmp_path / "ckpt"
    (folder / "cigm").mkdir(parents=True)
    (folder / "cigm" / "last.pt").write_bytes(b"x")
    assert worker.fetch_generator(str(folder), tmp_path / "w2") == folder / "cigm" / "last.pt"
    with pytest.raises(GecoError, match="nope.pt"):
        worker.fetch_generator(str(tmp_path / "nope.pt"), tmp_path / "w3")
    with pytest.raises(GecoError, match="no cigm/last.pt"):
        worker.fetch_generator(str(tmp_path / "empty"), tmp_path / "w4")


def test_ray_failures_become_one_message_naming_each_rank():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("wrapper")
            self.cause = cause

    class WorkerGroupError(Exception):
        worker_failures = {1: Wrapped(DataError("shard s3://b/train-000003.tar: truncated")),
                           0: RuntimeError("gloo: connection reset\nby peer")}

    err = driver.explain_failure(WorkerGroupError("boom"))
    text = str(err)
    assert "rank 0: RuntimeError: by peer" in text
    assert "rank 1: DataError: shard s3://b/train-000003.tar: truncated" in text


def test_checkpoint_uri_names_the_filesystem():
    class FS:
        type_name = "s3"

    class Ck:
        path, filesystem = "bucket/ray/run/checkpoint_1", FS()

    assert worker.checkpoint_uri(Ck()) == "s3://bucket/ray/run/checkpoint_1"
    Ck.filesystem = type("L", (), {"type_name": "local"})()
    assert worker.checkpoint_uri(Ck()) == "bucket/ray/run/checkpoint_1"


@pytest.mark.parametrize("job", ["train_geco.py", "train_cigm.py"])
def test_job_scripts_explain_themselves_without_a_cluster(job):
    out = subprocess.run([sys.executable, f"ray_jobs/{job}", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--config" in out.stdout and "--name" in out.stdout


def test_library_imports_neither_ray_nor_mlflow():
    code = ("import sys, geco.cli, geco.cluster.driver, geco.cluster.worker, geco.models.geco, "
            "geco.evaluate, geco.compare; "
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_ray_ranks_checkpoints_as_the_training_loop_selects_best_pt():
    """checkpoint_score orders epochs as geco.train.loop._improves picks best.pt: the best
    value, the earlier epoch on ties, never NaN; "min" metrics negated; no selection: latest."""
    from geco.train.loop import _improves

    values = [0.5, 0.7, float("nan"), 0.7, 0.6, 0.7]
    for mode in ("max", "min"):
        records = [{"epoch": i + 1, "m": v} for i, v in enumerate(values)]
        best = {"epoch": None, "metric": None, "value": None}
        for r in records:
            if _improves(("m", mode), r, best):
                best = {"epoch": r["epoch"], "metric": "m", "value": r["m"]}
        # Ray keeps the highest score, the later on ties: as in its checkpoint manager.
        ranked = sorted(records, key=lambda r: (worker.checkpoint_score(("m", mode), r),
                                                r["epoch"]))
        assert ranked[-1]["epoch"] == best["epoch"], mode
    latest = max(({"epoch": e} for e in (1, 2, 3)),
                 key=lambda r: worker.checkpoint_score(None, r))
    assert latest["epoch"] == 3
