"""MLflow lost mid-run (issue 16, item 7): the job's error names the first failure (what was
being logged, and why) in one line, never the secondary failure to end the run as FAILED; under
tracking.on_error=warn the job ends with a line saying from when it was not tracked and that
the model was not registered, and its JSON says tracked/registered false.

The end-to-end cases run the training pipeline's driver (geco.cluster.driver.train_pipeline)
against a real MLflow server of their own, stopped after the CIGM stage's first epoch. Ray is
the only stand-in: each stage runs the real worker body (worker.run_worker) in this process as
rank 0 of a one-rank group, a failure reaches the driver as Ray Train hands it over (a
WorkerGroupError holding the rank's exception), and the evaluation task (worker.finalize) runs
in-process too.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from geco.cluster import driver, worker
from geco.config import TrackingConfig
from geco.errors import TrackingError
from geco.tracking import START_HINT, Tracker, client
from tests.mlflow_server import _mlflow_sh
from tests.s3_server import free_port

pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
REFUSED = "ConnectionRefusedError: [Errno 111] Connection refused"


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


def _job_runner() -> Callable[[Callable[[], Any]], None]:
    """ray_jobs/_common.py's `run`: what prints a job's `geco: error:` line."""
    spec = importlib.util.spec_from_file_location("geco_job_common",
                                                  REPO / "ray_jobs" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run


# --- without a server: the pieces ---------------------------------------------------------------

def test_a_server_gone_mid_run_is_named_with_what_was_being_logged(tmp_path: Path) -> None:
    uri, run_id = _dead_uri(), uuid.uuid4().hex
    tracker = Tracker.attach(TrackingConfig(uri=uri, on_error="fail"), run_id)
    with pytest.raises(TrackingError) as err:
        worker.log_epoch(tracker, {"epoch": 2, "train_loss": 0.5}, tmp_path / "last.pt")
    assert str(err.value) == (f"MLflow tracking server {uri} unreachable while logging epoch 2 "
                              f"of run {run_id}: {REFUSED}; {START_HINT}")
    assert tracker.failure.when == f"logging epoch 2 of run {run_id}"


def test_ending_a_failed_run_never_replaces_the_error_that_ended_it(
        caplog: pytest.LogCaptureFixture) -> None:
    uri = _dead_uri()
    cfg = TrackingConfig(uri=uri, on_error="fail")
    run = Tracker(cfg, uri=uri, client=client(uri), run_id=uuid.uuid4().hex, owned=True)
    with caplog.at_level(logging.WARNING, logger="geco"):
        with pytest.raises(RuntimeError, match="training diverged"):
            try:
                raise RuntimeError("training diverged")
            except BaseException:
                run.end("FAILED")  # what the pipelines do on their way out
                raise
    assert any("ending the run as FAILED" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    # A run that finished but could not be closed is still an error of its own.
    other = Tracker(cfg, uri=uri, client=client(uri), run_id=uuid.uuid4().hex, owned=True)
    with pytest.raises(TrackingError, match="ending the run as FINISHED"):
        other.end()


def test_rank_0s_tracking_error_is_the_job_error_not_a_ray_paragraph() -> None:
    pytest.importorskip("ray")
    from ray.train.v2.api.exceptions import WorkerGroupError

    first = TrackingError(f"MLflow tracking server http://127.0.0.1:1 unreachable while logging "
                          f"epoch 2 of run abc: {REFUSED}; {START_HINT}")
    failed = WorkerGroupError("2 workers failed", {
        1: RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"),
        0: first})
    assert driver.explain_failure(failed) is first


def test_a_geco_error_in_a_ray_task_prints_as_one_line(capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("ray")
    import traceback

    from ray.exceptions import RayTaskError

    def main() -> None:
        try:
            raise TrackingError("MLflow tracking server http://127.0.0.1:1 unreachable")
        except TrackingError as e:
            raise RayTaskError("finalize", traceback.format_exc(), e).as_instanceof_cause() from e

    with pytest.raises(SystemExit) as out:
        _job_runner()(main)
    assert out.value.code == 2
    assert capsys.readouterr().err == (
        "geco: error: MLflow tracking server http://127.0.0.1:1 unreachable\n")


def test_warn_summary_names_the_first_failure_and_what_was_lost(tmp_path: Path) -> None:
    """What a rank 0 that lost the server at epoch 2 reports, and the summary drawn from it."""
    uri, run_id = _dead_uri(), uuid.uuid4().hex
    tracker = Tracker.attach(TrackingConfig(uri=uri, on_error="warn"), run_id)
    untracked = []
    for epoch in (2, 3):
        worker.log_epoch(tracker, {"epoch": epoch, "train_loss": 0.5}, tmp_path / "last.pt")
        untracked.append(epoch)
    report = worker.tracking_report(tracker, untracked)
    assert report["mlflow_untracked"] == "2,3"

    audit = driver.TrackingAudit(enabled=True)
    audit.stage("cigm", [{"epoch": 1, "mlflow_untracked": ""}, report])
    audit.stage("geco", [{"epoch": 1, "mlflow_untracked": "1"}])
    assert audit.outcome({}) == {
        "tracked": False, "registered": False,
        "tracking_failure": f"while logging epoch 2 of run {run_id} ({REFUSED})",
        "untracked_epochs": {"cigm": [2, 3], "geco": [1]}}
    assert audit.warning({}, "run it again") == (
        f"MLflow tracking failed while logging epoch 2 of run {run_id} ({REFUSED}): cigm epochs "
        "2..3, geco epoch 1 not tracked; the model was NOT registered (run it again)")
    assert driver.TrackingAudit(enabled=True).outcome({"version": 3}) == {
        "tracked": True, "registered": True}
    assert driver.TrackingAudit(enabled=True).warning({"version": 3}, "x") is None


# --- a real server, stopped mid-run -------------------------------------------------------------

@dataclass
class LoneServer:
    """An MLflow server of one test (artifacts in a local folder), which the test may stop."""

    uri: str
    dir: Path

    def stop(self) -> None:
        _mlflow_sh("stop", "--dir", str(self.dir), check=False, GECO_MLFLOW_STOP_TIMEOUT="5")


@pytest.fixture
def lone_mlflow(tmp_path: Path) -> Iterator[LoneServer]:
    port = free_port()
    server = LoneServer(uri=f"http://127.0.0.1:{port}", dir=tmp_path / "stack")
    started = _mlflow_sh("start", "--dir", str(server.dir), "--port", str(port), check=False,
                         GECO_MLFLOW_ARTIFACTS=str(tmp_path / "artifacts"))
    try:
        if started.returncode != 0:
            pytest.fail(f"could not start MLflow: {started.stdout}{started.stderr}")
        yield server
    finally:
        server.stop()


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The worker body may configure the root logger (geco.setup_logging): put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class InProcessRay:
    """Ray Train's `run_stage` and the evaluation task, run in this process (see the module
    docstring); `after_report(stage, metrics, job)` runs after each of rank 0's reports."""

    def __init__(self, tmp: Path, after_report: Callable[[str, dict, dict], None]) -> None:
        self.tmp, self.after_report = tmp, after_report

    def run_stage(self, cfg, stage: str, *, cigm: Any = None, mlflow_run_id: str | None = None):
        from ray.train import Checkpoint
        from ray.train.v2.api.exceptions import WorkerGroupError

        job = {"stage": stage, "config": cfg.to_dict(), "cigm": cigm,
               "cigm_uri": worker.checkpoint_source(cigm) if cigm is not None else "",
               "mlflow_run_id": mlflow_run_id}
        kept: list[tuple[Any, dict]] = []

        def report(metrics: dict, checkpoint: Any = None) -> None:
            # Ray uploads the checkpoint folder before report returns; the worker deletes it.
            dest = self.tmp / f"{stage}-{len(kept) + 1}"
            shutil.copytree(checkpoint.path, dest)
            kept.append((Checkpoint.from_directory(str(dest)), dict(metrics)))
            self.after_report(stage, metrics, job)

        try:
            worker.run_worker(job, rank=0, restored=None, report=report,
                              checkpoint_cls=Checkpoint)
        except Exception as e:  # what trainer.fit() raises once the retries are spent
            raise driver.explain_failure(WorkerGroupError("rank 0 failed", {0: e})) from None
        def best(metric: str, mode: str):  # ray.train.Result.get_best_checkpoint
            return max(kept, key=lambda cm: cm[1][metric])[0]

        return SimpleNamespace(checkpoint=kept[-1][0], metrics=kept[-1][1],
                               best_checkpoints=kept, get_best_checkpoint=best)

    @staticmethod
    def evaluate(cfg, checkpoint, cigm_source, config, split, run_id):
        metrics = worker.finalize(checkpoint, cigm_source, config, split, run_id)
        return metrics, metrics.pop("model", None) or {}


def _pipeline(monkeypatch, tmp_path: Path, server: LoneServer, tiny, data: Path, on_error: str
              ) -> tuple[Callable[[], dict], dict[str, str]]:
    """(the train pipeline, ready to run; the MLflow run id of each stage once it ran): CIGM 3
    epochs, GECo 1, tracked by `server`, which stops after the CIGM's first epoch."""
    pytest.importorskip("ray")
    runs: dict[str, str] = {}

    def after_report(stage: str, metrics: dict, job: dict) -> None:
        runs[stage] = job["mlflow_run_id"]
        if stage == "cigm" and int(metrics["epoch"]) == 1:
            server.stop()

    ray = InProcessRay(tmp_path / "reports", after_report)
    monkeypatch.setattr(driver, "run_stage", ray.run_stage)
    monkeypatch.setattr(driver, "_evaluate", ray.evaluate)
    cfg = tiny(data, "cigm.epochs=3", "cigm.max_steps_per_epoch=2", "geco.epochs=1",
               "geco.max_steps_per_epoch=2", "runtime.device=cpu", "cluster.num_workers=1",
               f"cluster.name=lost-{on_error}", f"cluster.storage_path={tmp_path / 'ray'}",
               f"tracking.uri={server.uri}", f"tracking.on_error={on_error}")
    return lambda: driver.train_pipeline(cfg), runs


@pytest.mark.integration
@pytest.mark.usefixtures("keep_logging")
def test_fail_server_lost_mid_run_ends_the_job_with_the_first_cause(
        monkeypatch, tmp_path: Path, lone_mlflow: LoneServer, tiny, synth_small,
        capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    pipeline, runs = _pipeline(monkeypatch, tmp_path, lone_mlflow, tiny, synth_small, "fail")
    with pytest.raises(SystemExit) as exit_:
        _job_runner()(pipeline)
    assert exit_.value.code == 2
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("geco: error:")]
    assert errors == [
        f"geco: error: MLflow tracking server {lone_mlflow.uri} unreachable while logging "
        f"epoch 2 of run {runs['cigm']}: {REFUSED}; {START_HINT}"], out.err
    assert out.err.endswith(errors[0] + "\n")
    # The runs could not be ended as FAILED either: said in passing, as a warning (geco's
    # log lines go to the handlers the host installed: here pytest's).
    assert any(r.levelno == logging.WARNING and "while ending the run as FAILED" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.integration
@pytest.mark.usefixtures("keep_logging")
def test_warn_server_lost_mid_run_ends_with_a_not_tracked_not_registered_summary(
        monkeypatch, tmp_path: Path, lone_mlflow: LoneServer, tiny, synth_small,
        capsys: pytest.CaptureFixture) -> None:
    pipeline, runs = _pipeline(monkeypatch, tmp_path, lone_mlflow, tiny, synth_small, "warn")
    result = pipeline()
    out = capsys.readouterr()
    summary = (f"geco: warning: MLflow tracking failed while logging epoch 2 of run "
               f"{runs['cigm']} ({REFUSED}): cigm epochs 2..3, geco epoch 1 not tracked; the "
               "model was NOT registered (start the MLflow server and submit the job again "
               "with --name lost-warn: Ray Train restores the trained stages, then the model is "
               "evaluated and registered)")
    assert out.err.splitlines()[-1:] == [summary], out.err
    assert "Table 2" in out.out  # the metrics were still printed, before the summary
    saved = json.loads((tmp_path / "ray" / "lost-warn-geco" / "metrics_test.json").read_text())
    for got in (result, saved):
        assert got["tracked"] is False and got["registered"] is False
        assert got["untracked_epochs"] == {"cigm": [2, 3], "geco": [1]}
        assert got["tracking_failure"].startswith(f"while logging epoch 2 of run {runs['cigm']}")


@pytest.mark.parametrize("on_error", ["fail", "warn"])
def test_a_server_lost_before_the_gate_leaves_the_version_registered_and_named(
        on_error: str, caplog: pytest.LogCaptureFixture) -> None:
    from geco.config import load_config

    cfg = load_config(None, [f"tracking.uri={_dead_uri()}", f"tracking.on_error={on_error}"])
    model = {"version": 3}
    if on_error == "fail":
        with pytest.raises(TrackingError, match="unreachable while gating geco-retriever "
                                                "version 3.*promote.py promote --version 3"):
            driver._gate(cfg, model)
        return
    gate = driver._gate(cfg, model)
    assert gate is not None and gate["gate.decision"] == "not gated"
    assert "Connection refused" in gate["gate.reason"]
    assert any("not gated" in r.getMessage() for r in caplog.records)
