"""Ray Tune sweep of GECo's loss weights and temperature over one shared, trained CIGM.

Each trial is a single-process GECo run (the same loop as `geco train geco`) with its own
(α, β, τ, γ) drawn from `cfg.tune` (random draws, or the full grid), reporting the validation
metrics after every epoch; ASHA stops weak trials early on `valid_<tune.metric>`. The test
split is never read by a trial: the best trial (best epoch over its history) is evaluated on
test once, after the sweep, by the same task as the training job. With tracking on, the sweep
is an MLflow parent run and every trial a child run (config, per-epoch metrics, grids).

Ray is imported inside functions only.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from geco.cluster import ray_train as rt_
from geco.config import Config, config_from_dict

log = logging.getLogger("geco")

SWEPT = ("alpha", "beta", "tau", "gamma")


def search_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    t = cfg.tune
    if t.search == "grid":
        return {"alpha": tune.grid_search(t.alphas), "beta": tune.grid_search(t.betas),
                "tau": tune.grid_search(t.taus), "gamma": tune.grid_search(t.gammas)}
    return {"alpha": tune.choice(t.alphas), "beta": tune.choice(t.betas),
            "tau": tune.choice(t.taus), "gamma": tune.loguniform(t.gamma_min, t.gamma_max)}


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with one trial's hyperparameters, validated (α=β=0 is refused)."""
    tree = {**base, "geco": {**base["geco"], **{k: float(params[k]) for k in SWEPT}}}
    return config_from_dict(tree)


def run_trial(params: dict[str, Any], *, base: dict[str, Any], cigm: Any,
              parent_run_id: str | None) -> None:
    """Tune's function trainable: one GECo run, reporting validation metrics every epoch."""
    from ray import tune

    from geco.tracking import Tracker
    from geco.train.geco import GECoStage
    from geco.train.loop import fit_stage, start_runtime

    rt_._worker_logging(0)
    cfg = trial_config(base, params)
    cfg.runtime.device = "cuda" if cfg.tune.gpus_per_trial > 0 else "cpu"
    ctx = tune.get_context()
    work = Path(tempfile.mkdtemp(prefix="geco-trial-"))
    tracker = None
    try:
        restored = tune.get_checkpoint()
        if restored is not None:
            rt_._unpack(restored, "geco", work)
        generator = rt_.fetch_generator(cigm, work)
        cfg.geco.cigm_checkpoint = cigm if isinstance(cigm, str) else rt_.checkpoint_uri(cigm)
        rt = start_runtime(cfg)
        stage = GECoStage(cfg, rt, generator)
        if parent_run_id and cfg.tracking.enabled:
            tracker = Tracker.start(cfg.tracking, run_name=ctx.get_trial_name(),
                                    parent_run_id=parent_run_id,
                                    tags={"geco.kind": "trial", "geco.trial_id": ctx.get_trial_id()})
            tracker.log_config(cfg.to_dict())
        run_id = tracker.run_id if tracker is not None else None

        def report(record: dict[str, Any], last_path: Path) -> None:
            metrics = rt_.numeric(record)
            rt_.log_epoch(tracker, metrics, last_path)
            with tempfile.TemporaryDirectory(prefix="geco-ckpt-") as d:
                rt_._pack(last_path.parent, Path(d) / "geco")
                tune.report({**metrics, "mlflow_run_id": run_id or ""},
                            checkpoint=tune.Checkpoint.from_directory(d))

        fit_stage(stage, rt, cfg, work, resume=True, on_epoch_end=report)
        if tracker is not None:
            tracker.end()
    except Exception:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    # Anything else (Tune stopping the trial) leaves the run to the driver: _close_runs.
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_sweep(cfg: Config, cigm: Any, *, parent_run_id: str | None = None):
    """Run the sweep; returns Ray Tune's ResultGrid."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t = cfg.tune
    metric = f"valid_{t.metric}"
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.geco.epochs,
                               grace_period=min(t.grace_period, cfg.geco.epochs),
                               reduction_factor=t.reduction_factor)
                 if t.asha else FIFOScheduler())
    resources = {"cpu": t.cpus_per_trial}
    if t.gpus_per_trial > 0:
        resources["gpu"] = t.gpus_per_trial
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg.to_dict(), cigm=cigm,
                             parent_run_id=parent_run_id),
        resources)
    tuner = tune.Tuner(
        trainable,
        param_space=search_space(cfg),
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", scheduler=scheduler, num_samples=t.num_samples,
            search_alg=BasicVariantGenerator(random_state=t.seed,
                                             max_concurrent=t.max_concurrent)),
        # One checkpoint per trial: it carries best.pt (the trial's best epoch so far).
        run_config=tune.RunConfig(name=f"{cfg.cluster.name}-sweep",
                                  storage_path=rt_.storage_path(cfg.cluster.storage_path),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
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
        from geco.errors import GecoError

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
        rows.append({**{k: r.config.get(k) for k in SWEPT},
                     metric: float(df[metric].max()) if done else None,
                     "epochs": int(df["epoch"].max()) if done else 0,
                     "error": str(r.error).splitlines()[0] if r.error else ""})
    return sorted(rows, key=lambda x: -(x[metric] if x[metric] is not None else -1))


def best_config_yaml(cfg: Config, params: dict[str, Any]) -> str:
    tree = trial_config(cfg.to_dict(), params).to_dict()
    return yaml.safe_dump(tree, sort_keys=False)


def sweep_pipeline(cfg: Config, *, cigm: str = "", split: str = "test") -> dict[str, Any]:
    """Shared CIGM (trained with Ray Train unless `cigm` names one) -> sweep -> the best trial
    evaluated on `split` once -> registered and put through the promotion gate (with
    tracking). Writes best_config.yaml and sweep.json under <storage>/<name>-sweep/."""
    import json

    import ray

    from geco.evaluate import format_tables
    from geco.tracking import resolve_uri

    t0 = time.perf_counter()
    manifest_sha = rt_.preflight(cfg)
    tr, name = cfg.tracking, cfg.cluster.name
    if tr.enabled:
        tr.uri = resolve_uri(tr)
    lineage = {"geco.shards": cfg.data.shards or cfg.data.root,
               "geco.manifest_sha256": manifest_sha}
    parent = rt_.open_run(cfg, key=f"{name}-sweep", run_name=f"{name}-sweep",
                          tags={"geco.kind": "sweep", **lineage})
    try:
        if cigm:
            cigm_source: Any = cigm
        else:
            child = rt_.open_run(cfg, key=f"{name}-cigm", run_name=f"{name}-cigm",
                                 parent_run_id=parent.run_id,
                                 tags={"geco.kind": "cigm", **lineage})
            with child:
                cigm_source = rt_.run_stage(cfg, "cigm", mlflow_run_id=child.run_id).checkpoint
                child.set_tags({"geco.checkpoint": rt_.checkpoint_uri(cigm_source)})
        cigm_uri = cigm_source if isinstance(cigm_source, str) else rt_.checkpoint_uri(cigm_source)
        parent.set_tags({"geco.cigm_checkpoint": cigm_uri})

        grid = run_sweep(cfg, cigm_source, parent_run_id=parent.run_id)
        _close_runs(grid, cfg)
        table = summarise(grid, cfg)
        best, row = best_trial(grid, cfg)
        params = {k: float(best.config[k]) for k in SWEPT}
        metric = f"valid_{cfg.tune.metric}"
        log.info("best trial %s: %s, %s=%.4f at epoch %d", best.path, params, metric,
                 row[metric], int(row["epoch"]))
        best_cfg = trial_config(cfg.to_dict(), params)
        trial_run = str(row.get("mlflow_run_id") or "") or None
        c = cfg.cluster
        task = ray.remote(num_cpus=c.eval_cpus, num_gpus=c.eval_gpus)(rt_.finalize)
        metrics = ray.get(task.remote(best.checkpoint, cigm_source, best_cfg.to_dict(), split,
                                      trial_run))
        model = metrics.pop("model", None) or {}
        test = {f"{split}_{k}": v for k, v in rt_.numeric(metrics).items()}
        parent.log_metrics({**test, f"best_{metric}": float(row[metric])})
        if trial_run:
            from geco.tracking import Tracker

            Tracker.attach(tr, trial_run).log_metrics(test)
        result = {"best": params, "best_epoch": int(row["epoch"]),
                  f"best_{metric}": float(row[metric]), "test": metrics, "trials": table,
                  "cigm": cigm_uri, "mlflow_run_id": parent.run_id, "model": model,
                  "sweep_seconds": time.perf_counter() - t0}
        if model.get("version") is not None and not model.get("existing"):
            from geco.registry import promote

            result["gate"] = promote(tr.uri, tr.registered_model, model["version"],
                                     metric=tr.gate_metric, margin=tr.gate_margin)
        best_yaml = best_config_yaml(cfg, params)
        root = f"{rt_.storage_path(c.storage_path)}/{name}-sweep"
        where = rt_._write_text(root, "best_config.yaml", best_yaml)
        rt_._write_text(root, "sweep.json", json.dumps(result, indent=2, default=str) + "\n")
        parent.set_tags({"geco.best_config": where, **{f"geco.best.{k}": v
                                                        for k, v in params.items()}})
        parent.end()
    except BaseException:
        parent.end("FAILED")
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
        rt_._print_registry_help(tr, model, result.get("gate", {}))
    return result


def _close_runs(grid, cfg: Config) -> None:
    """Give every trial's MLflow run its final status: a trial ASHA stopped early never
    reaches its own `end()` (or is interrupted inside it): KILLED with tag geco.stopped_by."""
    if not cfg.tracking.enabled:
        return
    from geco.tracking import _client

    client = _client(cfg.tracking.uri)
    for r in grid:
        run_id = (r.metrics or {}).get("mlflow_run_id")
        if not run_id:
            continue
        epochs = int((r.metrics or {}).get("epoch", 0))
        if r.error is not None:
            status = "FAILED"
        elif epochs < cfg.geco.epochs:
            status = "KILLED"
            client.set_tag(run_id, "geco.stopped_by", f"asha after epoch {epochs}")
        else:
            status = "FINISHED"
        if client.get_run(run_id).info.status != status:
            client.set_terminated(run_id, status)
