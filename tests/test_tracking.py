"""geco.tracking: runs, params, metrics, artifacts and tags round-trip through MLflow (a local
SQLite store, and the real server with artifacts in S3); a dead server fails fast and named, or
degrades to a warning; importing the module does not import mlflow."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from geco.config import TrackingConfig
from geco.errors import TrackingError
from geco.tracking import Tracker, check_reachable, flatten_config, resolve_uri
from tests.s3_server import free_port

mlflow = pytest.importorskip("mlflow")

CONFIG = {
    "geco": {"alpha": 0.5, "tau": 0.1, "layers": [1, 2]},
    "data": {"root": "data/x", "aws_secret_access_key": "s3cr3t"},
    "api_token": "t0k3n",
    "long": "x" * 7000,
}


def _png(path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def _round_trip(cfg: TrackingConfig, tmp_path: Path) -> tuple[str, list[str]]:
    """A parent run with two children: one finishes, one fails inside `with`."""
    png = _png(tmp_path / "sample.png")
    with Tracker.start(cfg, run_name="sweep", tags={"kind": "tune"}) as parent:
        assert parent.run_id
        children = []
        for i in range(2):
            child = Tracker.start(cfg, run_name=f"trial-{i}", parent_run_id=parent.run_id)
            children.append(child.run_id)
            try:
                with child:
                    child.log_config(CONFIG)
                    for step in range(3):
                        child.log_metrics({"loss": 1.0 / (step + 1), "note": "n/a"}, step=step)
                    child.log_artifact(png, "samples")
                    for epoch in (1, 2):  # an image with steps: the UI's slider over epochs
                        child.log_image(png, "templates", epoch)
                    child.log_metrics({"step/loss": 2.0}, step=7, synchronous=False)
                    child.log_dataset(name="shards/train", source="s3://bucket/shards",
                                      digest="d1g3st", context="training",
                                      schema={"split": "train"})
                    child.set_tags({"trial": str(i)})
                    if i == 1:
                        raise RuntimeError("trial diverged")
            except RuntimeError:
                pass
            child.end()  # idempotent: the `with` already ended it
        parent.log_metrics({"best_loss": 1 / 3})
    return parent.run_id, children


def _check_round_trip(client, parent_id: str, children: list[str]) -> None:
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert client.get_run(parent_id).data.tags["kind"] == "tune"
    statuses = []
    for i, run_id in enumerate(children):
        run = client.get_run(run_id)
        statuses.append(run.info.status)
        assert run.info.run_name == f"trial-{i}"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.tags["trial"] == str(i)
        params = run.data.params
        assert params["geco.alpha"] == "0.5"
        assert params["geco.layers"] == "[1, 2]"
        assert params["data.root"] == "data/x"
        assert len(params["long"]) == 6000
        assert not any("secret" in k or "token" in k for k in params)
        assert "s3cr3t" not in params.values()
        history = client.get_metric_history(run_id, "loss")
        assert [(m.step, round(m.value, 4)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.3333)]
        assert "note" not in run.data.metrics
        assert [a.path for a in client.list_artifacts(run_id, "samples")] == ["samples/sample.png"]
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        assert [any(f"templates+step+{e}+" in p and p.endswith(".png") for p in images)
                for e in (1, 2)] == [True, True], images
        # The asynchronous step metric landed before the run ended (end() flushes).
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "step/loss")] == \
            [(7, 2.0)]
        (data,) = run.inputs.dataset_inputs
        assert (data.dataset.name, data.dataset.digest, data.dataset.source_type) == \
            ("shards/train", "d1g3st", "s3")
        assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    assert statuses == ["FINISHED", "FAILED"]


def test_round_trip_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(uri=uri, experiment="unit")
    parent_id, children = _round_trip(cfg, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri)
    _check_round_trip(client, parent_id, children)
    # Artifacts sit next to the database, not in ./mlruns of whatever the cwd was.
    assert list((tmp_path / "mlartifacts").rglob("sample.png"))
    assert not (tmp_path / "mlruns").exists()


def test_attach_logs_into_existing_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="unit")
    owner = Tracker.start(cfg, run_name="driver")
    worker = Tracker.attach(cfg, owner.run_id)
    worker.log_metrics({"epoch_loss": 0.25}, step=4)
    worker.end()  # the worker does not terminate the driver's run
    client = mlflow.MlflowClient(tracking_uri=cfg.uri)
    assert client.get_run(owner.run_id).info.status == "RUNNING"
    owner.end("KILLED")
    run = client.get_run(owner.run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics["epoch_loss"] == 0.25


def test_disabled_tracker_is_a_no_op(tmp_path: Path) -> None:
    for tracker in (Tracker.start(TrackingConfig(enabled=False), run_name="x"),
                    Tracker.attach(TrackingConfig(), None)):
        assert tracker.run_id is None
        with tracker:
            tracker.log_config(CONFIG)
            tracker.log_metrics({"a": 1.0})
            tracker.log_artifact(tmp_path / "missing.png")
            tracker.set_tags({"a": "b"})
        tracker.end()


def test_resolve_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_uri(TrackingConfig(uri="sqlite:///a.db")) == "sqlite:///a.db"
    assert resolve_uri(TrackingConfig()) == "http://127.0.0.1:1"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert (tmp_path / "runs").is_dir()


def test_flatten_config_drops_secrets() -> None:
    flat = dict(flatten_config({"a": {"b": 1, "password": "p", "x": {"access_key": "k"}},
                                "Token": "t"}))
    assert flat == {"a.b": "1"}


def test_dead_server_fails_fast_and_named() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=uri) as err:
        Tracker.start(TrackingConfig(uri=uri, on_error="fail"), run_name="x")
    assert time.monotonic() - t0 < 15
    assert "mlflow.sh start" in str(err.value)
    with pytest.raises(TrackingError, match=uri):
        check_reachable(uri, timeout_s=1)


def test_dead_server_warns_and_disables(caplog: pytest.LogCaptureFixture) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="geco"):
        tracker = Tracker.start(TrackingConfig(uri=uri, on_error="warn"), run_name="x")
    assert tracker.run_id is None
    assert any(uri in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    tracker.log_metrics({"a": 1.0})
    tracker.end()


@pytest.mark.parametrize("on_error", ["fail", "warn"])
def test_server_gone_mid_run(on_error: str, caplog: pytest.LogCaptureFixture) -> None:
    """A server that disappears after start: log calls fail within seconds, not minutes."""
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker.attach(TrackingConfig(uri=uri, on_error=on_error), uuid.uuid4().hex)
    t0 = time.monotonic()
    if on_error == "fail":
        with pytest.raises(TrackingError, match=uri):
            tracker.log_metrics({"a": 1.0}, step=1)
    else:
        with caplog.at_level(logging.WARNING, logger="geco"):
            tracker.log_metrics({"a": 1.0}, step=1)
            tracker.log_metrics({"a": 2.0}, step=2)  # no second attempt, no second warning
        assert tracker.run_id is None
        assert len([r for r in caplog.records if uri in r.getMessage()]) == 1
    assert time.monotonic() - t0 < 15


def test_import_does_not_import_mlflow() -> None:
    code = "import sys, geco.tracking; print('mlflow' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.integration
def test_round_trip_server_artifacts_in_s3(mlflow_env, s3_server, tmp_path: Path) -> None:
    cfg = TrackingConfig(experiment=f"it-{uuid.uuid4().hex[:8]}")
    assert resolve_uri(cfg) == mlflow_env.uri
    parent_id, children = _round_trip(cfg, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=mlflow_env.uri)
    _check_round_trip(client, parent_id, children)
    # Proxied artifacts: the PNG went through the server into the bucket under mlflow/.
    listing = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="mlflow/")
    keys = [o["Key"] for o in listing.get("Contents", [])]
    for run_id in children:
        assert any(run_id in k and k.endswith("samples/sample.png") for k in keys), keys


def test_resume_or_start_reopens_the_run_of_a_key(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="resume")
    first, created = Tracker.resume_or_start(cfg, key="job-a", run_name="job-a")
    assert created and first.run_id
    first.log_metrics({"x": 1.0}, step=1)
    first.end()
    again, created_again = Tracker.resume_or_start(cfg, key="job-a", run_name="job-a")
    assert not created_again and again.run_id == first.run_id
    client = MlflowClient(tracking_uri=cfg.uri)
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.log_metrics({"x": 2.0}, step=2)
    again.end()
    assert [m.value for m in client.get_metric_history(first.run_id, "x")] == [1.0, 2.0]
    other, created_other = Tracker.resume_or_start(cfg, key="job-b", run_name="job-b")
    assert created_other and other.run_id != first.run_id
