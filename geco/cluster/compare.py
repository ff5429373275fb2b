"""The comparison on a Ray cluster (ray_jobs/compare.py): GECo through the Ray Train pipeline
(`train_pipeline`, resumable by name, tracked and registered), every other model as one Ray
task with the cluster's per-worker resources, all scored on the same split with the same
code as `geco compare`. Results land next to the Ray runs:

    <cluster.storage_path>/<name>-compare/compare.{md,csv,json}, config.yaml
    <cluster.storage_path>/<name>-compare/<model>/last.pt, samples/   (trainable baselines)

A baseline task starts from what its folder in storage holds (uploaded after every epoch),
so a task restarted by Ray (`cluster.max_failures`) or a resubmitted job continues; a
finished baseline is loaded, not retrained. Ray is imported lazily.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from geco.config import Config, config_from_dict, save_config

log = logging.getLogger("geco")


def compare_root(cfg: Config) -> str:
    from geco.cluster.ray_train import storage_path

    return f"{storage_path(cfg.cluster.storage_path)}/{cfg.cluster.name}-compare"


def _download(store, prefix: str, dest: Path) -> int:
    """Every object under prefix/ into dest (keeping relative paths); returns the count."""
    names = store.list(prefix + "/")
    for name in names:
        path = dest / name[len(prefix) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(store.get_bytes(name))
    return len(names)


def baseline_task(name: str, config: dict[str, Any], split: str, root: str) -> dict[str, Any]:
    """Ray task: fit (resume, or load) and evaluate one baseline; its folder is synced to
    `<root>/<name>/` after every epoch and at the end. Returns its compare.json entry, with
    storage URLs for the checkpoint and the grids."""
    from geco.cluster.ray_train import _worker_logging
    from geco.compare import load_data, run_baseline
    from geco.data.storage import Storage

    _worker_logging(0)
    cfg = config_from_dict(config)
    store = Storage(root)
    work = Path(tempfile.mkdtemp(prefix=f"geco-compare-{name}-"))
    try:
        local = work / name
        if _download(store, name, local):
            log.info("compare: %s resumes from %s/%s", name, root, name)
        splits, images = load_data(cfg, ("train", split))

        def sync(_path: Path | None = None) -> None:
            store.sync_dir(local, prefix=name)

        out = run_baseline(name, cfg, local, splits["train"], splits[split], images,
                           on_checkpoint=sync)
        if local.is_dir():
            sync()
        if out.get("checkpoint"):
            out["checkpoint"] = store.url(f"{name}/{Path(out['checkpoint']).name}")
        if out.get("samples_dir"):
            out["samples_dir"] = store.url(f"{name}/samples")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _geco_entry(result: dict[str, Any]) -> dict[str, Any]:
    from geco.compare import MODELS

    skip = {"split", "dataset", "epoch", "run", "cigm", "geco_checkpoint", "reported_epochs",
            "mlflow_run_id", "model", "pipeline_seconds", "gate"}
    return {"label": MODELS["geco"].label,
            "metrics": {k: v for k, v in result.items() if k not in skip},
            "checkpoint": result.get("geco_checkpoint"), "epoch": result.get("epoch"),
            "mlflow_run_id": result.get("mlflow_run_id"), "cigm": result.get("cigm"),
            "seconds": result.get("pipeline_seconds")}


def compare_pipeline(cfg: Config, models: str, *, split: str = "test") -> dict[str, Any]:
    """GECo (Ray Train pipeline) then the baselines (parallel Ray tasks); the comparison
    written to `compare_root(cfg)` and, with a tracking URI, logged to MLflow."""
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
    from geco.data.storage import Storage
    from geco.tracking import resolve_uri

    names = parse_models(models)
    root = compare_root(cfg)
    c = cfg.cluster
    if cfg.tracking.enabled:
        cfg.tracking.uri = resolve_uri(cfg.tracking)  # tasks log where the driver does
    results: dict[str, dict[str, Any]] = {}
    if "geco" in names:  # first: its Ray Train workers need the resources the tasks would hold
        from geco.cluster.ray_train import train_pipeline

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
