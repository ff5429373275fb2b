"""Ray Train orchestration: CIGM, then GECo with the frozen generator, then the test metrics.

Each stage is one `TorchTrainer` run (DDP over `cluster.num_workers` workers) named
`<cluster.name>-<stage>` under `cluster.storage_path` (S3 or a path every node sees). Workers
run the same loop as `geco train` (geco.train.loop.fit) in a scratch folder; after every epoch
rank 0 packs the stage folder (last.pt, best.pt, metrics.jsonl, config.yaml, template grids)
into a Ray checkpoint and every rank calls `ray.train.report` with the epoch's metrics, the
parameter digests of all ranks included (so "the ranks hold identical weights" is checked at
every epoch, not assumed). On a restart (a worker died: FailureConfig; or the same run name
submitted again: Ray Train V2 restores the run from its storage folder) workers unpack the
latest checkpoint and the loop resumes after its epoch, so no epoch is trained or reported
twice. Evaluation of the best GECo epoch runs as one Ray task and its JSON is written next to
the checkpoints (`<storage>/<name>-geco/metrics_<split>.json`).

Ray is imported inside functions only: `import geco` never needs Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from geco.config import Config, config_from_dict, save_config
from geco.errors import ConfigError, GecoError

log = logging.getLogger("geco")

STAGES = ("cigm", "geco")
# Test hook: "<stage>:<rank>:<steps>:<marker file>" makes that rank SIGKILL itself after that
# many training steps of that stage, once (the marker file records that it happened). It waits
# a few seconds first: Ray Train collects reports when it polls the workers (every 2 s), and a
# report not yet collected when the group dies is lost with it (that epoch is then retrained).
# The test wants to kill mid-epoch, not race the poll.
FAULT_ENV = "GECO_FAULT_KILL"
_PACKED = ("last.pt", "best.pt", "metrics.jsonl", "config.yaml")


# --- storage ----------------------------------------------------------------------------------

def storage_path(path: str) -> str:
    """`cluster.storage_path` as Ray Train wants it: an s3:// URI or an absolute path."""
    if "://" in path:
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.cluster.name}-{stage}"


def checkpoint_uri(checkpoint) -> str:
    """A Ray checkpoint's location as a URI users can paste (s3://... or a local path)."""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def _write_text(root: str, name: str, text: str) -> str:
    from geco.data.storage import Storage

    store = Storage(root)
    store.put_bytes(text.encode(), name)
    return store.url(name)


# --- inside a training worker -----------------------------------------------------------------

def param_digest(modules) -> str:
    """sha256 over every parameter of `modules` (in order): equal digests = identical weights."""
    from geco.train.runtime import unwrap

    h = hashlib.sha256()
    for module in modules:
        for name, p in unwrap(module).named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stage_modules(stage) -> list:
    return [stage.g, stage.d] if stage.name == "cigm" else [stage.model]


def _unpack(checkpoint, stage: str, work: Path) -> None:
    """Copy a Ray checkpoint's stage folder into the worker's scratch run dir.

    Downloads into a folder of our own (`to_directory(path)`): `as_directory()` shares one
    temp folder per checkpoint between the processes of a node and deletes it when the first
    one is done, so concurrent Tune trials reading the same CIGM checkpoint raced (seen:
    "Checkpoint directory ... does not exist, even though it should have been created by
    another process").
    """
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"geco-dl-{stage}-", dir=work))
    try:
        checkpoint.to_directory(str(tmp))
        src = tmp / stage
        if not (src / "last.pt").is_file():
            raise GecoError(f"checkpoint {checkpoint_uri(checkpoint)} holds no {stage}/last.pt")
        shutil.copytree(src, work / stage, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pack(src: Path, dest: Path) -> None:
    """The stage folder as a checkpoint: last.pt whole (resuming needs the optimiser state),
    best.pt without it (only evaluation and registration read it): ~1/3 less to upload."""
    from geco.train.runtime import save_slim

    dest.mkdir(parents=True)
    for name in _PACKED:
        if name == "best.pt" and (src / name).is_file():
            save_slim(src / name, dest / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if (src / "samples").is_dir():
        shutil.copytree(src / "samples", dest / "samples")


def fetch_generator(source: Any, work: Path) -> Path:
    """The CIGM generator as a local file. `source`: the CIGM stage's Ray checkpoint, a Ray
    checkpoint folder URI/path (holding cigm/last.pt), or a CIGM .pt file (local or s3://)."""
    dest = work / "cigm" / "last.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(source, str):  # a ray.train.Checkpoint
        _unpack(source, "cigm", work)
        return dest
    if source.endswith(".pt"):
        if source.startswith("s3://"):
            from geco.data.storage import Storage

            parent, name = source.rsplit("/", 1)
            dest.write_bytes(Storage(parent).get_bytes(name))
            return dest
        if not Path(source).is_file():
            raise GecoError(f"CIGM checkpoint not found: {source}")
        return Path(source)
    if "://" in source:
        import ray.train

        _unpack(ray.train.Checkpoint(source), "cigm", work)
        return dest
    path = Path(source) / "cigm" / "last.pt"
    if not path.is_file():
        raise GecoError(f"no cigm/last.pt under {source}")
    return path


def _arm_fault(stage, rank: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    f_stage, f_rank, f_steps, marker = spec.split(":", 3)
    if f_stage != stage.name or int(f_rank) != rank or os.path.exists(marker):
        return
    inner, count = stage.train_step, [0]

    def train_step(batch):
        count[0] += 1
        if count[0] > int(f_steps) and not os.path.exists(marker):
            Path(marker).write_text(f"{stage.name} rank {rank} killed after {count[0] - 1} steps\n")
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(batch)

    stage.train_step = train_step


def numeric(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an epoch record (what Ray reports and MLflow logs as metrics)."""
    return {k: v for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def log_epoch(tracker, metrics: dict[str, Any], last_path: Path) -> None:
    """One epoch into MLflow: its metrics at step=epoch and its template grid as a PNG."""
    if tracker is None:
        return
    epoch = int(metrics["epoch"])
    tracker.log_metrics(metrics, step=epoch)
    grid = last_path.parent / "samples" / f"epoch_{epoch:03d}.png"
    if grid.is_file():
        tracker.log_artifact(grid, "samples")


def _worker_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=True)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for either stage (see the module docstring)."""
    import ray.train
    import torch.distributed as dist

    name: str = loop_config["stage"]
    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _worker_logging(rank)
    if cfg.cluster.use_gpu:
        import ray.train.torch

        cfg.runtime.device = str(ray.train.torch.get_device())
    else:
        cfg.runtime.device = "cpu"
    work = Path(tempfile.mkdtemp(prefix=f"geco-{name}-rank{rank}-"))
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            _unpack(restored, name, work)
            log.info("[%s] rank %d restored %s", name, rank, checkpoint_uri(restored))
        from geco.train.loop import fit_stage, start_runtime

        rt = start_runtime(cfg)
        if name == "cigm":
            from geco.train.cigm import CIGMStage

            stage = CIGMStage(cfg, rt)
        else:
            from geco.train.geco import GECoStage

            generator = fetch_generator(loop_config["cigm"], work)
            cfg.geco.cigm_checkpoint = str(loop_config.get("cigm_uri") or generator)
            stage = GECoStage(cfg, rt, generator)
        tracker = None
        if rank == 0:
            save_config(cfg, work / name / "config.yaml")
            from geco.tracking import Tracker

            tracker = Tracker.attach(cfg.tracking, loop_config.get("mlflow_run_id"))
        _arm_fault(stage, rank)

        def report(record: dict[str, Any], last_path: Path) -> None:
            digests = [None] * rt.world_size
            mine = param_digest(_stage_modules(stage))
            if rt.distributed:
                dist.all_gather_object(digests, mine)
            else:
                digests = [mine]
            metrics = numeric(record)
            metrics.update(stage=name, param_digests=",".join(digests),
                           ranks_in_sync=int(len(set(digests)) == 1))
            if rank != 0:
                ray.train.report(metrics, checkpoint=None)
                return
            log_epoch(tracker, metrics, last_path)
            with tempfile.TemporaryDirectory(prefix="geco-ckpt-") as d:
                _pack(last_path.parent, Path(d) / name)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

        fit_stage(stage, rt, cfg, work, resume=True, on_epoch_end=report)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- evaluation task --------------------------------------------------------------------------

def finalize(geco_checkpoint: Any, cigm_source: Any, config: dict[str, Any], split: str,
             mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Metrics of the best GECo epoch on `split`; with an MLflow run, also log the retriever
    (pyfunc: generator + GECo weights + the split's embedded catalogue) into that run and
    register it as a new version with alias "candidate". Runs as a Ray task or in-process."""
    from geco.data.source import open_eval_data
    from geco.train.geco import load_retriever
    from geco.train.runtime import init_runtime

    _worker_logging(0)
    cfg = config_from_dict(config)
    work = Path(tempfile.mkdtemp(prefix="geco-final-"))
    try:
        _unpack(geco_checkpoint, "geco", work)
        best = work / "geco" / "best.pt"
        path = best if best.is_file() else work / "geco" / "last.pt"
        generator = fetch_generator(cigm_source, work)
        rt = init_runtime(cfg.runtime)
        retriever, ckpt = load_retriever(path, rt.device, generator_path=generator)
        cfg.data.image_size = ckpt["config"]["data"]["image_size"]
        data = open_eval_data(cfg.data, split)
        metrics = data.evaluate(retriever, rt=rt, image_size=cfg.data.image_size,
                                batch_size=cfg.eval.batch_size, seed=cfg.eval.seed,
                                ties=cfg.eval.ties, num_workers=cfg.data.num_workers)
        out = {"split": split, "dataset": data.where, "epoch": ckpt["epoch"] + 1, **metrics}
        existing = registered_version(cfg, mlflow_run_id)
        if existing is not None:  # a resubmitted, already finished job: register nothing new
            out["model"] = {"version": existing, "existing": True}
        elif mlflow_run_id and cfg.tracking.enabled:
            out["model"] = _register(cfg, retriever, ckpt, path, generator, data, work,
                                     mlflow_run_id)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def registered_version(cfg: Config, run_id: str | None) -> int | None:
    """The registered version already made from `run_id`, if any."""
    if not run_id or not cfg.tracking.enabled:
        return None
    from geco.tracking import _client, resolve_uri

    found = _client(resolve_uri(cfg.tracking)).search_model_versions(
        f"name='{cfg.tracking.registered_model}' and run_id='{run_id}'")
    return max((int(v.version) for v in found), default=None)


def _register(cfg: Config, retriever, ckpt: dict[str, Any], path: Path, generator: Path, data,
              work: Path, run_id: str) -> dict[str, Any]:
    """Log + register the retriever; slim checkpoints (no optimiser state) go into the model."""
    from geco.registry import build_catalogue, log_retriever
    from geco.tracking import resolve_uri
    from geco.train.runtime import save_slim

    catalogue = work / "catalogue.pt"
    if data.shards:
        build_catalogue(retriever, data.shards, catalogue, image_size=cfg.data.image_size,
                        name=f"catalogue-{data.name}")
    else:
        ids = list(dict.fromkeys([*data.split.bottoms,
                                  *(b for negs in data.split.negatives for b in negs)]))
        build_catalogue(retriever, data.images, catalogue, image_size=cfg.data.image_size,
                        ids=ids)
    # The validation metrics of the selected epoch: what the promotion gate compares.
    record = next((h for h in ckpt["history"] if h["epoch"] == ckpt["epoch"] + 1), {})
    valid = {k: float(v) for k, v in record.items() if k.startswith("valid_")}
    return log_retriever(
        run_id, tracking_uri=resolve_uri(cfg.tracking),
        geco_checkpoint=save_slim(path, work / "geco-retriever.pt"),
        generator_checkpoint=save_slim(generator, work / "cigm-generator.pt"),
        catalogue=catalogue, registered_model=cfg.tracking.registered_model, metrics=valid)


# --- the driver -------------------------------------------------------------------------------

def preflight(cfg: Config) -> str:
    """Fail in the driver, with the culprit named, before any worker starts. Returns the
    sha256 of the shard manifest (lineage), or "" when reading a folder."""
    if cfg.cluster.use_gpu is False and cfg.runtime.device.startswith("cuda"):
        raise ConfigError("runtime.device=cuda needs cluster.use_gpu=true under Ray")
    if cfg.data.shards:
        from geco.data.stream import load_manifest

        manifest = load_manifest(cfg.data.shards)  # names the URL; wrong credentials too
        for split in ("train", "valid"):
            if split not in manifest["splits"]:
                raise GecoError(f"{cfg.data.shards}: the shards have no {split!r} split")
        blob = json.dumps(manifest, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()
    else:
        from geco.data.source import ensure_synthetic, open_dataset

        log.warning("data.shards is empty: every Ray node must see data.root=%s", cfg.data.root)
        ensure_synthetic(cfg.data)
        open_dataset(cfg.data, ("train", "valid"))
    return ""


def _explain(exc: BaseException) -> GecoError:
    """A one-paragraph error from Ray Train's failure, naming each failed rank's own error."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return GecoError(f"Ray Train failed: {exc}")
    lines = []
    for rank, err in sorted(failures.items()):
        cause = err
        while getattr(cause, "cause", None) is not None and cause.cause is not cause:
            cause = cause.cause
        text = str(cause).strip().splitlines()
        lines.append(f"rank {rank}: {type(cause).__name__}: {text[-1] if text else ''}")
    return GecoError("Ray Train failed after its retries:\n  " + "\n  ".join(lines))


def run_stage(cfg: Config, stage: str, *, cigm: Any = None, mlflow_run_id: str | None = None):
    """One TorchTrainer run of `stage`; returns Ray's Result (resumes a run of the same name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    cigm_uri = cigm if isinstance(cigm, str) or cigm is None else checkpoint_uri(cigm)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"stage": stage, "config": cfg.to_dict(), "cigm": cigm,
                           "cigm_uri": str(cigm_uri) if cigm_uri else "",
                           "mlflow_run_id": mlflow_run_id},
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(cfg, stage), storage_path=storage_path(c.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=c.num_to_keep or None),
            failure_config=FailureConfig(max_failures=c.max_failures),
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError family
        if type(exc).__name__ in ("WorkerGroupError", "ControllerError", "TrainingFailedError"):
            raise _explain(exc) from None
        raise
    if result.checkpoint is None:
        raise GecoError(f"{run_name(cfg, stage)}: Ray Train finished without a checkpoint")
    log.info("[%s] Ray Train run %s done in %.1f min; latest checkpoint %s", stage,
             run_name(cfg, stage), (time.perf_counter() - t0) / 60,
             checkpoint_uri(result.checkpoint))
    return result


def reported_epochs(result) -> list[int]:
    """Epochs of the checkpoints Ray Train holds for a run, over all attempts (all of them
    with cluster.num_to_keep=0, else the latest num_to_keep)."""
    return sorted(int(m["epoch"]) for _, m in (result.best_checkpoints or []))


def train_pipeline(cfg: Config, *, cigm: str = "", split: str = "test") -> dict[str, Any]:
    """CIGM (unless `cigm` names a trained one) -> GECo -> metrics of the best epoch on `split`,
    written to <storage>/<name>-geco/metrics_<split>.json and returned. With tracking on: an
    MLflow parent run `<name>` with children `<name>-cigm` and `<name>-geco` (config, per-epoch
    metrics, grids, lineage tags, test metrics), the retriever registered as a new version of
    `tracking.registered_model` and put through the promotion gate."""
    import ray

    from geco.evaluate import format_tables
    from geco.tracking import resolve_uri

    t0 = time.perf_counter()
    manifest_sha = preflight(cfg)
    tr = cfg.tracking
    if tr.enabled:
        tr.uri = resolve_uri(tr)  # workers and tasks log to the same place as the driver
    name, c = cfg.cluster.name, cfg.cluster
    lineage = {"geco.shards": cfg.data.shards or cfg.data.root, "geco.manifest_sha256": manifest_sha}
    parent = open_run(cfg, key=name, run_name=name, tags={"geco.kind": "pipeline", **lineage})
    try:
        cigm_run = ""
        if cigm:
            cigm_source: Any = cigm
            cigm_uri = cigm
        else:
            child = open_run(cfg, key=f"{name}-cigm", run_name=f"{name}-cigm",
                             parent_run_id=parent.run_id, tags={"geco.kind": "cigm", **lineage})
            with child:
                cigm_result = run_stage(cfg, "cigm", mlflow_run_id=child.run_id)
                cigm_source = cigm_result.checkpoint
                cigm_uri = checkpoint_uri(cigm_source)
                child.set_tags({"geco.checkpoint": cigm_uri})
            cigm_run = child.run_id or ""
        run = open_run(cfg, key=f"{name}-geco", run_name=f"{name}-geco",
                       parent_run_id=parent.run_id,
                       tags={"geco.kind": "geco", "geco.cigm_run_id": cigm_run,
                             "geco.cigm_checkpoint": str(cigm_uri), **lineage})
        with run:
            geco_result = run_stage(cfg, "geco", cigm=cigm_source, mlflow_run_id=run.run_id)
            run.set_tags({"geco.checkpoint": checkpoint_uri(geco_result.checkpoint)})
            task = ray.remote(num_cpus=c.eval_cpus, num_gpus=c.eval_gpus)(finalize)
            metrics = ray.get(task.remote(geco_result.checkpoint, cigm_source, cfg.to_dict(),
                                          split, run.run_id))
            test = {f"{split}_{k}": v for k, v in numeric(metrics).items()}
            run.log_metrics(test)
            parent.log_metrics(test)
        model = metrics.pop("model", None) or {}
        result = {**metrics, "run": run_name(cfg, "geco"), "cigm": str(cigm_uri),
                  "geco_checkpoint": checkpoint_uri(geco_result.checkpoint),
                  "reported_epochs": reported_epochs(geco_result),
                  "mlflow_run_id": run.run_id, "model": model,
                  "pipeline_seconds": time.perf_counter() - t0}
        if model.get("existing"):
            log.info("%s version %s was registered from this run already: not registering "
                     "or gating again", tr.registered_model, model["version"])
        elif model.get("version") is not None:
            from geco.registry import promote

            result["gate"] = promote(tr.uri, tr.registered_model, model["version"],
                                     metric=tr.gate_metric, margin=tr.gate_margin)
            parent.set_tags({k: v for k, v in result["gate"].items() if k.startswith("gate.")})
        parent.end()
    except BaseException:
        parent.end("FAILED")
        raise
    root = f"{storage_path(c.storage_path)}/{run_name(cfg, 'geco')}"
    where = _write_text(root, f"metrics_{split}.json", json.dumps(result, indent=2) + "\n")
    print(format_tables(metrics))
    print(f"metrics written to {where}")
    if model.get("version") is not None:
        _print_registry_help(tr, model, result.get("gate", {}))
    return result


def open_run(cfg: Config, *, key: str, run_name: str, parent_run_id: str | None = None,
             tags: dict[str, str] | None = None):
    """The MLflow run for `key` (resumed when a run with that key exists: resubmitting a job
    continues its runs instead of opening new ones); the config is logged on creation."""
    from geco.tracking import Tracker

    tracker, created = Tracker.resume_or_start(
        cfg.tracking, key=key, run_name=run_name, parent_run_id=parent_run_id, tags=tags)
    if created:
        tracker.log_config(cfg.to_dict())
    return tracker


def _print_registry_help(tr, model: dict[str, Any], gate: dict[str, Any]) -> None:
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
    print(f"champion: MLFLOW_TRACKING_URI={tr.uri} python -c \"import mlflow; "
          f"m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
          f"print(m.predict({{'image': ['path/to/top.jpg']}}, params={{'k': 10}}))\"")
    print(f"versions and gate decisions: python ray_jobs/promote.py show "
          f"--tracking-uri {tr.uri}")


def connect(address: str | None = None) -> None:
    """ray.init for a driver: inside `ray job submit` RAY_ADDRESS is set; else `address`."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto",
                 log_to_driver=True)
