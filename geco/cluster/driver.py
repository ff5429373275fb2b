"""The Ray drivers behind ray_jobs/: a training pipeline, a Tune sweep and a comparison, all
built from the same steps, plus the `cluster` and `tune` config sections they read.

Every pipeline: check the data (and so the S3 credentials) before any worker starts; open the
parent MLflow run (reopened when the same name is submitted again); get a CIGM (trained by
Ray Train as `<name>-cigm`, restored when that run finished, or given); train GECo (a Ray
Train run `<name>-geco`, or one Tune trial per hyperparameter draw, trials running the same
worker body as the training run: geco.cluster.worker); evaluate the best epoch on test once,
as a Ray task, which also registers the retriever; put it through the promotion gate.

Each stage is one `TorchTrainer` run (DDP over `cluster.num_workers` workers) under
`cluster.storage_path` (S3 or a path every node sees); a failed worker restarts the group
from the latest checkpoint (`cluster.max_failures`), and the same run name submitted again is
restored from storage. Ray is imported inside functions only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from geco.cluster.worker import (
    SCORE,
    baseline_task,
    checkpoint_source,
    checkpoint_uri,
    finalize,
    rank_batch,
    train_loop,
    trial_config,
    tune_trial,
)
from geco.errors import ConfigError, GecoError, TrackingError
from geco.settings import at_least, check_seed, require
from geco.tracking import TrackingFailure

if TYPE_CHECKING:
    from geco.config import Config
    from geco.tracking import Tracker

log = logging.getLogger("geco")

STAGES = ("cigm", "geco")


@dataclass
class ClusterConfig:
    """Ray Train settings (ray_jobs/); ignored by the plain `geco` command."""

    name: str = "geco"  # Ray run names <name>-cigm and <name>-geco; same name = resume
    # Where Ray Train keeps checkpoints and results: s3://bucket/prefix, or a local path every
    # node can see (relative paths resolve against the job's working directory).
    storage_path: str = "runs/ray"
    # DDP ranks: a number, or [min, max] for elastic training: Ray Train runs as many workers
    # as the cluster has room for in that range, shrinks when a node is lost and grows back
    # when one joins (checked every resize_interval_s). With a range, a stage's batch_size is
    # per rank at max workers and the global batch stays batch_size x max at every size
    # (worker.rank_batch); the learning rate is unchanged.
    num_workers: int | list[int] = 2
    resize_interval_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu
    # Checkpoints kept per stage: the best by the stage's selection metric, and always the
    # latest (resuming needs it); 0 = all.
    num_to_keep: int = 3
    max_failures: int = 2  # worker-group restarts from the last checkpoint; -1 = unlimited
    eval_cpus: float = 1.0  # the test-split evaluation task
    eval_gpus: float = 0.0

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) DDP ranks; equal unless elastic."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else (int(n[0]), int(n[1]))

    @property
    def elastic(self) -> bool:
        lo, hi = self.worker_range
        return lo < hi

    def validate(self, key: str) -> None:
        n = self.num_workers
        ok = (isinstance(n, int) and not isinstance(n, bool) and n >= 1) or (
            isinstance(n, list) and len(n) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in n)
            and 1 <= n[0] <= n[1])
        require(ok, f"{key}.num_workers", n, "a number >= 1, or [min, max] with 1 <= min <= max")
        require(self.resize_interval_s >= 0, f"{key}.resize_interval_s",
                self.resize_interval_s, "must be >= 0")
        at_least(f"{key}.num_to_keep", self.num_to_keep, 0)
        at_least(f"{key}.max_failures", self.max_failures, -1)
        require(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", self.cpus_per_worker,
                "must be > 0")
        require(self.gpus_per_worker >= 0 and (not self.use_gpu or self.gpus_per_worker > 0),
                f"{key}.gpus_per_worker", self.gpus_per_worker, "must be > 0 with use_gpu, else >= 0")
        require(self.eval_cpus > 0, f"{key}.eval_cpus", self.eval_cpus, "must be > 0")
        require(self.eval_gpus >= 0, f"{key}.eval_gpus", self.eval_gpus, "must be >= 0")
        require(bool(self.name) and "/" not in self.name, f"{key}.name", self.name,
                "a non-empty name without '/'")


@dataclass
class TuneConfig:
    """Ray Tune sweep of GECo's loss weights and temperature (ray_jobs/tune_geco.py). Each
    list holds the values of one `geco` setting; `space()` turns them into the search space."""

    search: Literal["random", "grid"] = "random"  # random: num_samples draws; grid: all
    num_samples: int = 8  # random: trials; grid: repeats of the grid
    alphas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    betas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    taus: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.05, 0.1, 0.5])
    gamma_min: float = 1e-4  # random: log-uniform in [gamma_min, gamma_max]
    gamma_max: float = 1e-1
    gammas: list[float] = field(default_factory=lambda: [1e-3, 1e-2])  # grid
    # Validation metric that ranks trials (and drives ASHA); never computed on test.
    metric: Literal["auc_1vs1", "mrr_full"] = "auc_1vs1"
    asha: bool = True
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    max_concurrent: int = 0  # 0 = as many as the resources allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int = 0  # the random search's draws

    def space(self) -> dict[str, Any]:
        """geco setting -> Ray Tune domain."""
        from ray import tune

        if self.search == "grid":
            return {"alpha": tune.grid_search(self.alphas), "beta": tune.grid_search(self.betas),
                    "tau": tune.grid_search(self.taus), "gamma": tune.grid_search(self.gammas)}
        return {"alpha": tune.choice(self.alphas), "beta": tune.choice(self.betas),
                "tau": tune.choice(self.taus),
                "gamma": tune.loguniform(self.gamma_min, self.gamma_max)}

    def validate(self, key: str) -> None:
        for name in ("alphas", "betas", "taus", "gammas"):
            values = getattr(self, name)
            require(bool(values) and all(math.isfinite(v) and v >= 0 for v in values),
                    f"{key}.{name}", values, "a non-empty list of numbers >= 0")
        require(all(v > 0 for v in self.taus), f"{key}.taus", self.taus,
                "temperatures must be > 0")
        if not 0 < self.gamma_min <= self.gamma_max:
            raise ConfigError(f"{key}.gamma_min/gamma_max={self.gamma_min}/{self.gamma_max}: "
                              "need 0 < gamma_min <= gamma_max")
        at_least(f"{key}.num_samples", self.num_samples, 1)
        at_least(f"{key}.grace_period", self.grace_period, 1)
        at_least(f"{key}.reduction_factor", self.reduction_factor, 2)
        at_least(f"{key}.max_concurrent", self.max_concurrent, 0, "0 = as many as fit")
        require(self.cpus_per_trial > 0, f"{key}.cpus_per_trial", self.cpus_per_trial,
                "must be > 0")
        require(self.gpus_per_trial >= 0, f"{key}.gpus_per_trial", self.gpus_per_trial,
                "must be >= 0")
        check_seed(f"{key}.seed", self.seed)


# --- steps every pipeline shares --------------------------------------------------------------

def storage_path(path: str) -> str:
    """`cluster.storage_path` as Ray Train wants it: an s3:// URI or an absolute path."""
    if "://" in path:
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def ray_storage(path: str) -> dict[str, Any]:
    """RunConfig's storage_path/storage_filesystem for `cluster.storage_path`: S3 through a
    filesystem with our timeouts and retries (geco.data.storage.arrow_location)."""
    from geco.data.storage import arrow_location

    where, filesystem = arrow_location(storage_path(path))
    return {"storage_path": where, "storage_filesystem": filesystem}


def run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.cluster.name}-{stage}"


def write_text(root: str, name: str, text: str) -> str:
    """`text` as object `name` under `root` (S3 or a folder); returns its URL."""
    from geco.data.storage import Storage

    store = Storage(root)
    store.put_bytes(text.encode(), name)
    return store.url(name)


def preflight(cfg: Config) -> dict[str, str]:
    """Fail in the driver, with the culprit named, before any worker starts. Returns the
    data's lineage tags (where the data came from; the manifest's sha256 for shards)."""
    from geco.data.source import open_data

    if cfg.cluster.use_gpu is False and cfg.runtime.device.startswith("cuda"):
        raise ConfigError("runtime.device=cuda needs cluster.use_gpu=true under Ray")
    if not cfg.data.shards:
        log.warning("data.shards is empty: every Ray node must see data.root=%s", cfg.data.root)
    lo, hi = cfg.cluster.worker_range
    for stage in STAGES:  # elastic: every world size in the range must split the global batch
        for world in range(lo, hi + 1):
            rank_batch(getattr(cfg, stage).batch_size * hi, world, f"{stage}.batch_size")
    data = open_data(cfg.data)  # names the URL; wrong credentials too
    data.check(("train", "valid"))
    return data.lineage


def connect(address: str | None = None) -> None:
    """ray.init for a driver: inside `ray job submit` RAY_ADDRESS is set; else `address`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto",
                 log_to_driver=True)


def open_run(cfg: Config, *, key: str, run_name: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None) -> Tracker:
    """The MLflow run for `key` (resumed when a run with that key exists: resubmitting a job
    continues its runs instead of opening new ones); the config is logged on creation."""
    from geco.tracking import Tracker

    tracker, created = Tracker.resume_or_start(
        cfg.tracking, key=key, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
    if created:
        tracker.log_config(cfg.to_dict())
        if tags and "geco.shards" in tags:
            log_datasets(tracker, tags, DATASET_SPLITS.get(tags.get("geco.kind", ""), ()))
    return tracker


# The splits each kind of run reads, and how MLflow's dataset panel names their use.
DATASET_SPLITS = {
    "pipeline": (("train", "training"), ("valid", "validation"), ("test", "evaluation")),
    "cigm": (("train", "training"), ("valid", "validation")),
    "geco": (("train", "training"), ("valid", "validation"), ("test", "evaluation")),
    "sweep": (("train", "training"), ("valid", "validation"), ("test", "evaluation")),
}


def log_datasets(tracker: Tracker, lineage: dict[str, str],
                 splits: tuple[tuple[str, str], ...]) -> None:
    """The run's data as MLflow dataset inputs: one per split, sourced at the shards' prefix
    (or the dataset folder), the manifest's sha256 as digest (shared by all splits of one
    manifest: they change together)."""
    import hashlib

    where = lineage["geco.shards"]
    digest = lineage.get("geco.manifest_sha256") or hashlib.sha256(where.encode()).hexdigest()
    base = where.rstrip("/").rsplit("/", 1)[-1] or where
    for split, context in splits:
        tracker.log_dataset(name=f"{base}/{split}", source=where, digest=digest,
                            context=context, schema={"split": split, "location": where})


def _begin(cfg: Config, key: str, kind: str, audit: TrackingAudit
           ) -> tuple[dict[str, str], Tracker]:
    """Check the data, point every worker and task at the driver's tracking URI, and open the
    pipeline's parent run: (lineage tags, parent run)."""
    from geco.tracking import resolve_uri

    lineage = preflight(cfg)
    if cfg.tracking.enabled:
        cfg.tracking.uri = resolve_uri(cfg.tracking)  # workers and tasks log where we do
    return lineage, audit.watch(open_run(cfg, key=key, run_name=key,
                                         tags={"geco.kind": kind, **lineage}))


def _cigm(cfg: Config, cigm: str, parent: Tracker, lineage: dict[str, str],
          audit: TrackingAudit) -> tuple[Any, str | None]:
    """(the CIGM source, its MLflow run id): `cigm` as given, or the Ray Train stage (a child
    run of `parent`), restored when it finished before."""
    if cigm:
        return cigm, None
    name = run_name(cfg, "cigm")
    child = audit.watch(open_run(cfg, key=name, run_name=name, parent_run_id=parent.run_id,
                                 tags={"geco.kind": "cigm", **lineage}))
    with child:
        result = run_stage(cfg, "cigm", mlflow_run_id=child.run_id)
        audit.stage("cigm", stage_reports(result))
        source = best_checkpoint(result)  # the epoch with the best templates
        child.set_tags({"geco.checkpoint": checkpoint_uri(source)})
    return source, child.run_id


def _evaluate(cfg: Config, checkpoint: Any, cigm_source: Any, config: dict[str, Any],
              split: str, run_id: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, registered model) of the best epoch of `checkpoint` on `split`, from one
    Ray task (geco.cluster.worker.finalize), which also registers the retriever."""
    import ray

    c = cfg.cluster
    task = ray.remote(num_cpus=c.eval_cpus, num_gpus=c.eval_gpus)(finalize)
    metrics = ray.get(task.remote(checkpoint, cigm_source, config, split, run_id))
    return metrics, metrics.pop("model", None) or {}


def _gate(cfg: Config, model: dict[str, Any]) -> dict[str, Any] | None:
    """The promotion gate's decision on a newly registered version (None: nothing new)."""
    tr = cfg.tracking
    if model.get("existing"):
        log.info("%s version %s was registered from this run already: not registering "
                 "or gating again", tr.registered_model, model["version"])
        return None
    if model.get("version") is None:
        return None
    from geco.registry import promote
    from geco.tracking import is_tracking_failure

    try:
        return promote(tr.uri, tr.registered_model, model["version"], metric=tr.gate_metric,
                       margin=tr.gate_margin)
    except Exception as exc:
        if isinstance(exc, GecoError) or not is_tracking_failure(exc):
            raise
        # The version is registered; only the decision is missing: `promote.py promote`
        # takes it later. Under on_error=warn the job still ends as trained and registered.
        failure = TrackingFailure.of(f"gating {tr.registered_model} version "
                                     f"{model['version']}", exc)
        text = (f"{failure.message(tr.uri, hint=False)}; the version is registered but not "
                f"gated: python ray_jobs/promote.py promote --version {model['version']}")
        if tr.on_error == "fail":
            raise TrackingError(text) from exc
        log.warning("%s", text)
        return {"gate.decision": "not gated", "gate.reason": failure.cause}


def explain_failure(exc: BaseException) -> GecoError:
    """A one-paragraph error from Ray Train's failure, naming each failed rank's own error.
    A rank's TrackingError is the error itself: only rank 0 tracks, and the other ranks'
    errors (a collective that lost its peer) follow from it."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return GecoError(f"Ray Train failed: {exc}")
    causes = {rank: _root(err) for rank, err in sorted(failures.items())}
    tracking = [c for c in causes.values() if isinstance(c, TrackingError)]
    if tracking:
        return tracking[0]
    lines = []
    for rank, cause in causes.items():
        text = str(cause).strip().splitlines()
        lines.append(f"rank {rank}: {type(cause).__name__}: {text[-1] if text else ''}")
    return GecoError("Ray Train failed after its retries:\n  " + "\n  ".join(lines))


def _root(err: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (`cause`: a Ray task error)."""
    while getattr(err, "cause", None) is not None and err.cause is not err:
        err = err.cause
    return err


def run_stage(cfg: Config, stage: str, *, cigm: Any = None, mlflow_run_id: str | None = None):
    """One TorchTrainer run of `stage`; returns Ray's Result (resumes a run of the same name)."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        RunConfig,
        ScalingConfig,
        TrainingFailedError,
    )
    from ray.train.torch import TorchTrainer

    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"stage": stage, "config": cfg.to_dict(), "cigm": cigm,
                           "cigm_uri": checkpoint_source(cigm) if cigm is not None else "",
                           "mlflow_run_id": mlflow_run_id},
        scaling_config=ScalingConfig(
            num_workers=c.worker_range if c.elastic else c.worker_range[0], use_gpu=c.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=c.resize_interval_s),
        run_config=RunConfig(
            name=run_name(cfg, stage), **ray_storage(c.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=c.num_to_keep or None,
                                               checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except TrainingFailedError as exc:
        raise explain_failure(exc) from None
    if result.checkpoint is None:
        raise GecoError(f"{run_name(cfg, stage)}: Ray Train finished without a checkpoint")
    log.info("[%s] Ray Train run %s done in %.1f min; latest checkpoint %s", stage,
             run_name(cfg, stage), (time.perf_counter() - t0) / 60,
             checkpoint_uri(result.checkpoint))
    return result


def best_checkpoint(result):
    """The checkpoint of a run's best epoch (the one `geco train` selects as best.pt), as Ray
    Train ranked them by SCORE; the latest for runs reported without a score."""
    return result.get_best_checkpoint(SCORE, "max") or result.checkpoint


def stage_reports(result) -> list[dict[str, Any]]:
    """The metrics of every report Ray Train still holds for a run (the kept checkpoints'
    and the latest), oldest first."""
    reports = sorted((m for _, m in (result.best_checkpoints or [])), key=lambda m: m["epoch"])
    return [*reports, result.metrics] if result.metrics else reports


@dataclass
class TrackingAudit:
    """What MLflow missed in one pipeline, for the job's summary: the first tracking failure
    (of the driver's runs, of a stage's rank 0, reported through Ray, or of the registration)
    and the epochs each stage could not log. Under tracking.on_error=fail the first failure
    ends the job; under warn the job goes on, and this says so at the end."""

    enabled: bool
    trackers: list[Tracker] = field(default_factory=list)
    failures: list[TrackingFailure] = field(default_factory=list)
    untracked: dict[str, list[int]] = field(default_factory=dict)

    def watch(self, tracker: Tracker) -> Tracker:
        self.trackers.append(tracker)
        return tracker

    def stage(self, name: str, reports: list[dict[str, Any]]) -> None:
        """A stage's Ray reports (worker.tracking_report): its untracked epochs and failure."""
        epochs: set[int] = set()
        for record in reports:
            epochs.update(int(e) for e in str(record.get("mlflow_untracked") or "").split(",")
                          if e)
            failure = TrackingFailure.from_fields(record)
            if failure is not None:
                self.failures.append(failure)
        if epochs:
            self.untracked[name] = sorted(epochs)

    def first_failure(self, model: dict[str, Any]) -> TrackingFailure | None:
        found = [*self.failures, *(t.failure for t in self.trackers if t.failure is not None)]
        if model.get("failure"):
            found.append(TrackingFailure.from_fields(model["failure"]))
        return min(found, key=lambda f: f.time, default=None)

    def outcome(self, model: dict[str, Any]) -> dict[str, Any]:
        """tracked (every run and epoch logged), registered, and what failed, for the JSON."""
        failure = self.first_failure(model) if self.enabled else None
        out: dict[str, Any] = {
            "tracked": self.enabled and failure is None and not self.untracked,
            "registered": model.get("version") is not None}
        if failure is not None:
            out["tracking_failure"] = f"while {failure.when} ({failure.cause})"
        if self.enabled and self.untracked:
            out["untracked_epochs"] = self.untracked
        return out

    def warning(self, model: dict[str, Any], again: str) -> str | None:
        """The summary line when tracking failed (None when it did not): when and why, what
        was not tracked, whether the model was registered; `again`: how to register it."""
        failure = self.first_failure(model) if self.enabled else None
        if failure is None:
            return None
        lost = ", ".join(f"{name} {_epochs(epochs)}" for name, epochs in self.untracked.items())
        lost = f"{lost} not tracked" if lost else "every epoch was tracked, later records were not"
        version = model.get("version")
        registered = (f"the model is registered as version {version}" if version is not None
                      else f"the model was NOT registered ({again})")
        return (f"MLflow tracking failed while {failure.when} ({failure.cause}): {lost}; "
                f"{registered}")


def _epochs(epochs: list[int]) -> str:
    """[2, 3, 4, 7] -> "epochs 2..4, 7"."""
    spans: list[list[int]] = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)
    return f"epoch{'s' if len(epochs) > 1 else ''} {text}"


def _warn(line: str | None) -> None:
    """The job's last line when tracking failed under on_error=warn."""
    if line:
        print(f"geco: warning: {line}", file=sys.stderr, flush=True)


def reported_epochs(result) -> list[int]:
    """Epochs of the checkpoints Ray Train holds for a run, over all attempts (all of them
    with cluster.num_to_keep=0, else the latest num_to_keep)."""
    return sorted(int(m["epoch"]) for _, m in (result.best_checkpoints or []))


# --- the training pipeline --------------------------------------------------------------------

def train_pipeline(cfg: Config, *, cigm: str = "", split: str = "test") -> dict[str, Any]:
    """CIGM (unless `cigm` names a trained one) -> GECo -> metrics of the best epoch on `split`,
    written to <storage>/<name>-geco/metrics_<split>.json and returned. With tracking on: an
    MLflow parent run `<name>` with children `<name>-cigm` and `<name>-geco` (config, per-epoch
    metrics, grids, lineage tags, test metrics), the retriever registered as a new version of
    `tracking.registered_model` and put through the promotion gate."""
    from geco.evaluate import format_tables
    from geco.tracking import numeric

    t0 = time.perf_counter()
    name = cfg.cluster.name
    audit = TrackingAudit(cfg.tracking.enabled)
    lineage, parent = _begin(cfg, name, "pipeline", audit)
    try:
        cigm_source, cigm_run = _cigm(cfg, cigm, parent, lineage, audit)
        cigm_uri = checkpoint_source(cigm_source)
        geco_name = run_name(cfg, "geco")
        run = audit.watch(open_run(
            cfg, key=geco_name, run_name=geco_name, parent_run_id=parent.run_id,
            tags={"geco.kind": "geco", "geco.cigm_run_id": cigm_run or "",
                  "geco.cigm_checkpoint": cigm_uri, **lineage}))
        with run:
            geco_result = run_stage(cfg, "geco", cigm=cigm_source, mlflow_run_id=run.run_id)
            audit.stage("geco", stage_reports(geco_result))
            best = best_checkpoint(geco_result)
            run.set_tags({"geco.checkpoint": checkpoint_uri(best)})
            metrics, model = _evaluate(cfg, best, cigm_source, cfg.to_dict(),
                                       split, run.run_id)
            test = {f"{split}_{k}": v for k, v in numeric(metrics).items()}
            run.log_metrics(test)
            parent.log_metrics(test)
        result = {**metrics, "run": geco_name, "cigm": cigm_uri,
                  "geco_checkpoint": checkpoint_uri(best),
                  "latest_checkpoint": checkpoint_uri(geco_result.checkpoint),
                  "reported_epochs": reported_epochs(geco_result),
                  "mlflow_run_id": run.run_id, "model": model,
                  "pipeline_seconds": time.perf_counter() - t0}
        gate = _gate(cfg, model)
        if gate is not None:
            result["gate"] = gate
            parent.set_tags({k: v for k, v in gate.items() if k.startswith("gate.")})
        parent.end()
    except BaseException:
        parent.end("FAILED")  # never raises: the error that got us here is the one to report
        raise
    result.update(audit.outcome(model))
    root = f"{storage_path(cfg.cluster.storage_path)}/{geco_name}"
    where = write_text(root, f"metrics_{split}.json", json.dumps(result, indent=2) + "\n")
    print(format_tables(metrics))
    print(f"metrics written to {where}")
    if model.get("version") is not None:
        print_registry_help(cfg, model, result.get("gate", {}))
    _warn(audit.warning(model, f"start the MLflow server and submit the job again with --name "
                               f"{name}: Ray Train restores the trained stages, then the model "
                               "is evaluated and registered"))
    return result


def print_registry_help(cfg: Config, model: dict[str, Any], gate: dict[str, Any]) -> None:
    tr = cfg.tracking
    name = tr.registered_model
    if model.get("existing"):
        print(f"{name} version {model['version']} was registered by this run before "
              "(nothing new to register or gate)")
    else:
        print(f"registered {name} version {model['version']} (alias candidate); gate "
              f"{gate.get('gate.decision')}: {gate.get('gate.reason')}; champion is version "
              f"{gate.get('champion')}")
    if tr.uri.startswith("http"):
        print(f"MLflow UI: {tr.uri}/#/models/{name}")
    else:
        print(f"MLflow store: {tr.uri} (UI: mlflow ui --backend-store-uri {tr.uri})")
    if model.get("gallery"):
        print(f"retrieval gallery of version {model['version']}: {model['gallery']}")
    print("serve the champion over REST: make serve (docs/serving.md); one top: "
          f"MLFLOW_TRACKING_URI={tr.uri} geco retrieve path/to/top.jpg")
    print(f"versions and gate decisions: python ray_jobs/promote.py show "
          f"--tracking-uri {tr.uri}")


# --- the sweep --------------------------------------------------------------------------------

def run_sweep(cfg: Config, cigm: Any, *, parent_run_id: str | None = None):
    """Run the sweep; returns Ray Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.geco.epochs,
                               grace_period=min(t.grace_period, cfg.geco.epochs),
                               reduction_factor=t.reduction_factor)
                 if t.asha else FIFOScheduler())
    resources = {"cpu": t.cpus_per_trial}
    if t.gpus_per_trial > 0:
        resources["gpu"] = t.gpus_per_trial
    trainable = tune.with_resources(
        tune.with_parameters(tune_trial, base=cfg.to_dict(), cigm=cigm,
                             parent_run_id=parent_run_id),
        resources)
    tuner = tune.Tuner(
        trainable,
        param_space=t.space(),
        tune_config=tune.TuneConfig(
            metric=f"valid_{t.metric}", mode="max", scheduler=scheduler,
            num_samples=t.num_samples,
            search_alg=BasicVariantGenerator(random_state=t.seed,
                                             max_concurrent=t.max_concurrent)),
        # Per trial, its best epoch's checkpoint (SCORE) and the latest: a trial whose node is
        # lost is retried from the latest (cluster.max_failures).
        run_config=tune.RunConfig(name=f"{cfg.cluster.name}-sweep",
                                  **ray_storage(cfg.cluster.storage_path),
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=1, checkpoint_score_attribute=SCORE,
                                      checkpoint_score_order="max"),
                                  failure_config=tune.FailureConfig(
                                      max_failures=cfg.cluster.max_failures)),
    )
    t0 = time.perf_counter()
    grid = tuner.fit()
    log.info("sweep %s-sweep: %d trials in %.1f min", cfg.cluster.name, len(grid),
             (time.perf_counter() - t0) / 60)
    return grid


def best_trial(grid, cfg: Config) -> tuple[Any, dict[str, Any]]:
    """(Result, its best epoch's metrics): the trial whose best validation epoch is highest."""
    metric = f"valid_{cfg.tune.metric}"
    errors = [r.error for r in grid if r.error is not None]
    best = grid.get_best_result(metric=metric, mode="max", scope="all")
    if best is None or best.checkpoint is None:
        raise GecoError(f"no trial reported {metric}; trial errors: {errors[:3]}")
    history = best.metrics_dataframe
    row = history.loc[history[metric].idxmax()].to_dict()
    return best, row


def summarise(grid, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial: its hyperparameters, best validation value, epochs run, status."""
    metric = f"valid_{cfg.tune.metric}"
    rows = []
    for r in grid:
        df = r.metrics_dataframe
        done = df is not None and metric in df
        nodes = df["rank_nodes"] if done and "rank_nodes" in df else []
        rows.append({**{k: r.config.get(k) for k in cfg.tune.space()},
                     metric: float(df[metric].max()) if done else None,
                     "epochs": int(df["epoch"].max()) if done else 0,
                     "nodes": sorted(set(nodes)),  # the Ray node(s) the trial ran on
                     "error": str(r.error).splitlines()[0] if r.error else ""})
    return sorted(rows, key=lambda x: -(x[metric] if x[metric] is not None else -1))


def sweep_pipeline(cfg: Config, *, cigm: str = "", split: str = "test") -> dict[str, Any]:
    """Shared CIGM (trained with Ray Train unless `cigm` names one) -> sweep -> the best trial
    evaluated on `split` once -> registered and put through the promotion gate (with
    tracking). Writes best_config.yaml and sweep.json under <storage>/<name>-sweep/."""
    import yaml

    from geco.evaluate import format_tables
    from geco.tracking import Tracker, numeric

    t0 = time.perf_counter()
    name = cfg.cluster.name
    audit = TrackingAudit(cfg.tracking.enabled)
    lineage, parent = _begin(cfg, f"{name}-sweep", "sweep", audit)
    metric = f"valid_{cfg.tune.metric}"
    try:
        cigm_source, _ = _cigm(cfg, cigm, parent, lineage, audit)
        cigm_uri = checkpoint_source(cigm_source)
        parent.set_tags({"geco.cigm_checkpoint": cigm_uri})

        grid = run_sweep(cfg, cigm_source, parent_run_id=parent.run_id)
        for r in grid:  # each trial's last report holds its untracked epochs
            metrics = r.metrics or {}
            audit.stage(f"trial {metrics.get('trial_id', '?')}", [metrics])
        audit.failures.extend(_close_runs(grid, cfg))
        table = summarise(grid, cfg)
        best, row = best_trial(grid, cfg)
        params = {k: float(best.config[k]) for k in cfg.tune.space()}
        log.info("best trial %s: %s, %s=%.4f at epoch %d", best.path, params, metric,
                 row[metric], int(row["epoch"]))
        best_cfg = trial_config(cfg.to_dict(), params)
        trial_run = str(row.get("mlflow_run_id") or "") or None
        metrics, model = _evaluate(cfg, best_checkpoint(best), cigm_source, best_cfg.to_dict(),
                                   split,
                                   trial_run)
        test = {f"{split}_{k}": v for k, v in numeric(metrics).items()}
        parent.log_metrics({**test, f"best_{metric}": float(row[metric])})
        if trial_run:
            Tracker.attach(cfg.tracking, trial_run).log_metrics(test)
        result = {"best": params, "best_epoch": int(row["epoch"]),
                  f"best_{metric}": float(row[metric]), "test": metrics, "trials": table,
                  "cigm": cigm_uri, "mlflow_run_id": parent.run_id, "model": model,
                  "sweep_seconds": time.perf_counter() - t0}
        gate = _gate(cfg, model)
        if gate is not None:
            result["gate"] = gate
        root = f"{storage_path(cfg.cluster.storage_path)}/{name}-sweep"
        where = write_text(root, "best_config.yaml",
                           yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
        result.update(audit.outcome(model))
        write_text(root, "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
        parent.set_tags({"geco.best_config": where,
                         **{f"geco.best.{k}": v for k, v in params.items()}})
        parent.end()
    except BaseException:
        parent.end("FAILED")  # never raises: the error that got us here is the one to report
        raise
    print(f"{len(table)} trials, ranked by {metric} (validation):")
    for r in table:
        value = "-" if r[metric] is None else f"{r[metric]:.4f}"
        print(f"  alpha={r['alpha']} beta={r['beta']} tau={r['tau']} gamma={r['gamma']:.5f} "
              f"{metric}={value} epochs={r['epochs']} {r['error']}")
    print(f"best: {params} (epoch {result['best_epoch']}); config: {where}")
    print(f"test metrics of the best trial only ({split}):")
    print(format_tables(metrics))
    if model.get("version") is not None:
        print_registry_help(cfg, model, result.get("gate", {}))
    _warn(audit.warning(model, "start the MLflow server and run the sweep again"))
    return result


def _close_runs(grid, cfg: Config) -> list[TrackingFailure]:
    """Give every trial's MLflow run its final status: a trial ASHA stopped early never
    reaches its own `end()` (or is interrupted inside it): KILLED with tag geco.stopped_by.
    A tracking failure follows tracking.on_error (warn: returned, the rest skipped)."""
    if not cfg.tracking.enabled:
        return []
    from geco.tracking import client, is_tracking_failure

    mlflow_client = client(cfg.tracking.uri)
    for r in grid:
        run_id = (r.metrics or {}).get("mlflow_run_id")
        if not run_id:
            continue
        try:
            _close_run(mlflow_client, run_id, r, cfg)
        except Exception as e:
            if not is_tracking_failure(e):
                raise
            failure = TrackingFailure.of(f"closing the run {run_id} of a trial", e)
            if cfg.tracking.on_error != "warn":
                raise TrackingError(failure.message(cfg.tracking.uri, hint=True)) from e
            log.warning("%s; the trials' runs keep their status",
                        failure.message(cfg.tracking.uri, hint=False))
            return [failure]
    return []


def _close_run(mlflow_client: Any, run_id: str, r: Any, cfg: Config) -> None:
    epochs = int((r.metrics or {}).get("epoch", 0))
    if r.error is not None:
        status = "FAILED"
    elif epochs < cfg.geco.epochs:
        status = "KILLED"
        mlflow_client.set_tag(run_id, "geco.stopped_by", f"asha after epoch {epochs}")
    else:
        status = "FINISHED"
    if mlflow_client.get_run(run_id).info.status != status:
        mlflow_client.set_terminated(run_id, status)


# --- the comparison ---------------------------------------------------------------------------

def compare_root(cfg: Config) -> str:
    return f"{storage_path(cfg.cluster.storage_path)}/{cfg.cluster.name}-compare"


def _geco_entry(result: dict[str, Any]) -> dict[str, Any]:
    from geco.compare import MODELS

    skip = {"split", "dataset", "epoch", "run", "cigm", "geco_checkpoint", "reported_epochs",
            "mlflow_run_id", "model", "pipeline_seconds", "gate", "tracked", "registered",
            "tracking_failure", "untracked_epochs"}
    return {"label": MODELS["geco"].label,
            "metrics": {k: v for k, v in result.items() if k not in skip},
            "checkpoint": result.get("geco_checkpoint"), "epoch": result.get("epoch"),
            "mlflow_run_id": result.get("mlflow_run_id"), "cigm": result.get("cigm"),
            "seconds": result.get("pipeline_seconds")}


def compare_pipeline(cfg: Config, models: str, *, split: str = "test") -> dict[str, Any]:
    """GECo (the training pipeline) then the baselines (parallel Ray tasks, each resuming from
    its folder in `compare_root(cfg)`); the comparison written there and, with a tracking URI,
    logged to MLflow."""
    import shutil
    import tempfile

    import ray

    from geco.compare import (
        MODELS,
        assemble,
        format_comparison,
        log_comparison,
        open_tracking,
        parse_models,
        write_outputs,
    )
    from geco.config import save_config
    from geco.data.storage import Storage
    from geco.tracking import resolve_uri

    names = parse_models(models)
    ablations = [n for n in names if MODELS[n].ablation]
    if ablations:
        raise ConfigError(f"compare on Ray: the GECo ablations ({', '.join(ablations)}) run "
                          "with `geco compare` for now (one process); leave them out of --models")
    root = compare_root(cfg)
    c = cfg.cluster
    if cfg.tracking.enabled:
        cfg.tracking.uri = resolve_uri(cfg.tracking)  # tasks log where the driver does
    results: dict[str, dict[str, Any]] = {}
    if "geco" in names:  # first: its Ray Train workers need the resources the tasks would hold
        results["geco"] = _geco_entry(train_pipeline(cfg, split=split))
    pending = {}
    for name in (n for n in names if n != "geco"):
        gpus = c.gpus_per_worker if (c.use_gpu and MODELS[name].trainable) else 0
        task = ray.remote(num_cpus=c.cpus_per_worker, num_gpus=gpus,
                          max_retries=c.max_failures)(baseline_task)
        pending[name] = task.remote(name, cfg.to_dict(), split, root)
    for name, ref in pending.items():
        results[name] = ray.get(ref)

    store = Storage(root)
    work = Path(tempfile.mkdtemp(prefix="geco-compare-"))
    try:
        result = assemble(cfg, split, results, work)
        tracker = open_tracking(cfg, work, run_name=f"{c.name}-compare")
        try:
            write_outputs(result, work)
            log_comparison(tracker, result)  # grids: read back from storage
        except BaseException:
            tracker.end("FAILED")
            raise
        tracker.end()
        result["files"] = {k: store.url(f"compare.{k}") for k in ("md", "csv", "json")}
        write_outputs(result, work)
        save_config(cfg, work / "config.yaml")
        for fname in ("compare.md", "compare.csv", "compare.json", "config.yaml"):
            store.put_file(work / fname, fname)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(format_comparison(result))
    print(f"comparison written to {root}/compare.{{md,csv,json}}")
    log.info("compare: %s", json.dumps({n: r.get("checkpoint") for n, r in results.items()}))
    return result


def catalogue_pipeline(cfg: Config, model: str, source: str, out: str, *, split: str = "test",
                       image_base: str = "", batch_size: int = 64, on_bad: str = "error",
                       chunk: int = 512) -> dict[str, Any]:
    """`geco catalogue build` on the cluster: the driver plans the units (one per catalogue
    shard, or `chunk` CSV items) and ships the GECo checkpoint once through the object store;
    each unit is a Ray task (cluster.cpus_per_worker CPUs, retried cluster.max_failures
    times); the driver assembles and saves the catalogue as the in-process build does."""
    import time

    import ray
    import torch

    from geco.catalogue import assemble, bottom_fingerprint, load_embedder, plan, resolve_model
    from geco.catalogue import save as save_catalogue
    from geco.catalogue import summary as catalogue_summary
    from geco.cluster.worker import catalogue_task
    from geco.tracking import resolve_uri

    ckpt, info = resolve_model(model, resolve_uri(cfg.tracking) if cfg.tracking.enabled else "")
    net, size = load_embedder(ckpt)
    info["fingerprint"] = bottom_fingerprint(net)
    units, sources = plan(source, split=split, image_base=image_base, chunk=chunk)
    c = cfg.cluster
    blob = ray.put(Path(ckpt).read_bytes())
    task = ray.remote(num_cpus=c.cpus_per_worker, max_retries=c.max_failures)(catalogue_task)
    refs = [task.remote(blob, unit, batch_size=batch_size, on_bad=on_bad, image_base=image_base)
            for unit in units]
    total, done, t0 = sum(len(u) for u in units), 0, time.perf_counter()
    sizes = {ref: len(unit) for ref, unit in zip(refs, units, strict=True)}
    waiting = list(refs)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        ray.get(ready)  # a failed unit fails here, with its error
        done += sizes[ready[0]]
        log.info("catalogue: %d/%d units, %d/%d bottoms | %.1f samples/s",
                 len(refs) - len(waiting), len(refs), done, total,
                 done / max(time.perf_counter() - t0, 1e-9))
    parts = ray.get(refs)
    nodes = sorted({p.pop("node") for p in parts})
    for p in parts:
        p["embeddings"] = torch.from_numpy(p["embeddings"])
    cat = assemble(parts, image_size=size, model_info=info, sources=sources)
    where = save_catalogue(cat, out)
    log.info("catalogue %s: %d bottoms from %d units on %d node(s), version %s -> %s", source,
             len(cat["ids"]), len(units), len(nodes), cat["version"], where)
    return {**catalogue_summary(cat), "path": where, "units": len(units), "nodes": nodes}
