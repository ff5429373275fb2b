"""What runs inside Ray: the training worker (the same body for a Ray Train worker and a Ray
Tune trial), the evaluation + registration task, and the compare task of one baseline, plus
the Ray checkpoint format they share.

A Ray checkpoint of a stage is its run-dir folder: last.pt (resumable: the epoch's weights
and optimiser state), metrics.jsonl, config.yaml and the template grids. A worker trains in a
scratch run dir with the same loop as `geco train` (geco.train.loop); after every epoch rank 0
packs the folder into a checkpoint and every rank reports the epoch's metrics, the parameter
digests of all ranks included (so "the ranks hold identical weights" is checked every epoch,
not assumed), and `checkpoint_score`: Ray Train's CheckpointConfig keeps the best checkpoints
by it, plus the latest, and `Result.get_best_checkpoint` is the epoch `geco train` would
select (best.pt). On a restart (a worker died, the run name was submitted again, a trial was retried)
the worker unpacks the checkpoint it is given and the loop resumes after its epoch, so no
epoch is trained or reported twice.

Ray is imported inside functions only: `import geco` never needs Ray.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geco.errors import GecoError, TrackingError
from geco.tracking import Tracker, TrackingFailure, is_tracking_failure, numeric

if TYPE_CHECKING:  # geco.config composes the cluster sections: imported lazily here
    from geco.config import Config

log = logging.getLogger("geco")

PACKED = ("last.pt", "metrics.jsonl", "config.yaml")
# The report metric Ray Train ranks checkpoints by (CheckpointConfig, mode "max").
SCORE = "checkpoint_score"


# --- the checkpoint format --------------------------------------------------------------------

def checkpoint_uri(checkpoint) -> str:
    """A Ray checkpoint's location as a URI users can paste (s3://... or a local path)."""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def checkpoint_source(source: Any) -> str:
    """Where a CIGM source came from, as a string: a path or URI as given, or a Ray
    checkpoint's URI."""
    return source if isinstance(source, str) else checkpoint_uri(source)


def pack(src: Path, dest: Path) -> None:
    """The stage folder as a checkpoint: last.pt (resuming needs the optimiser state), the
    history, config and grids. No best.pt copy: the best epoch is a checkpoint of its own,
    kept by Ray (SCORE)."""
    dest.mkdir(parents=True)
    for name in PACKED:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)
    if (src / "samples").is_dir():
        shutil.copytree(src / "samples", dest / "samples")


def unpack(checkpoint, stage: str, work: Path) -> None:
    """Copy a Ray checkpoint's stage folder into the scratch run dir `work`.

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


def fetch_generator(source: Any, work: Path) -> Path:
    """The CIGM generator as a local file. `source`: the CIGM stage's Ray checkpoint, a Ray
    checkpoint folder URI/path (holding cigm/last.pt), or a CIGM .pt file (local or s3://).
    From a checkpoint or folder it is the epoch CIGM selected (best.pt, else last.pt)."""
    from geco.models.geco import selected_generator

    dest = work / "cigm" / "last.pt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(source, str):  # a ray.train.Checkpoint
        unpack(source, "cigm", work)
        return selected_generator(work / "cigm")
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

        from geco.data.storage import arrow_location

        path, filesystem = arrow_location(source)
        unpack(ray.train.Checkpoint(path, filesystem=filesystem), "cigm", work)
        return selected_generator(work / "cigm")
    path = selected_generator(Path(source) / "cigm")
    if not path.is_file():
        raise GecoError(f"no cigm/last.pt under {source}")
    return path


def checkpoint_score(selection: tuple[str, str] | None, record: dict[str, Any]) -> float:
    """The epoch's rank for Ray's CheckpointConfig (higher = better), ordered as
    geco.train.loop selects best.pt: the selection metric (negated for "min"), less 1e-9 per
    epoch so that a tie keeps the earlier epoch (Ray keeps the later); no selection (CIGM's
    "last", the baselines): the latest epoch; a missing or NaN value: never the best."""
    import math

    epoch = int(record["epoch"])
    if selection is None:
        return float(epoch)
    metric, mode = selection
    value = record.get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        return float("-inf")
    return (value if mode == "max" else -value) - 1e-9 * epoch


def param_digest(modules) -> str:
    """sha256 over every parameter of `modules` (in order): equal digests = identical weights."""
    from geco.train.runtime import unwrap

    h = hashlib.sha256()
    for module in modules:
        for name, p in unwrap(module).named_parameters():
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def log_epoch(tracker: Tracker | None, metrics: dict[str, Any], last_path: Path) -> None:
    """One epoch into MLflow: its metrics at step=epoch and its template grid as the image
    "templates" at step=epoch."""
    if tracker is None:
        return
    epoch = int(metrics["epoch"])
    tracker.log_metrics(metrics, step=epoch, what=f"logging epoch {epoch}")
    # Then wait for the epoch's step metrics, queued asynchronously: a server gone is named by
    # the synchronous call above, whose error carries the network cause (an asynchronous
    # failure comes back as text).
    tracker.flush()
    grid = last_path.parent / "samples" / f"epoch_{epoch:03d}.png"
    if grid.is_file():  # an image with a step: the run page slides through the epochs
        tracker.log_image(grid, "templates", epoch,
                          what=f"logging the template grid of epoch {epoch}")


def log_step(tracker: Tracker | None, step: int, values: dict[str, float]) -> None:
    """A progress line's values as step metrics ("step/loss", "step/samples_per_s", ...),
    queued without waiting for the server."""
    if tracker is not None:
        tracker.log_metrics({f"step/{k}": v for k, v in values.items()}, step=step,
                            what=f"logging training step {step}", synchronous=False)


def tracking_report(tracker: Tracker | None, untracked: list[int]) -> dict[str, Any]:
    """What rank 0 adds to every report so the driver can say what MLflow missed: the epochs
    of this attempt that were not logged ("2,3") and the tracker's first failure."""
    out: dict[str, Any] = {"mlflow_untracked": ",".join(str(e) for e in untracked)}
    if tracker is not None and tracker.failure is not None:
        out.update(tracker.failure.fields())
    return out


# --- the training worker ----------------------------------------------------------------------

def ray_node_id() -> str:
    """The id of the Ray node this process runs on ("" outside Ray)."""
    try:
        import ray
    except ImportError:
        return ""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def run_worker(job: dict[str, Any], *, rank: int, restored: Any,
               report: Callable[..., None], checkpoint_cls: Any) -> None:
    """Train `job["stage"]` with `job["config"]` in a scratch run dir, reporting after every
    epoch through `report(metrics, checkpoint=...)` (rank 0 attaches the checkpoint, made
    with `checkpoint_cls.from_directory`). `restored`: the checkpoint to resume from, if any.

    job: {"stage", "config", "cigm" (GECo: the generator's source, see fetch_generator),
    "cigm_uri" (where it came from, recorded as geco.cigm_checkpoint), "mlflow_run_id" (the
    run to log epochs into, or None), "extra" (values added to every report)}."""
    import torch.distributed as dist

    from geco import setup_logging
    from geco.config import config_from_dict, save_config
    from geco.train.loop import fit, make_stage
    from geco.train.runtime import init_runtime

    name: str = job["stage"]
    cfg = config_from_dict(job["config"])
    setup_logging(rank)
    work = Path(tempfile.mkdtemp(prefix=f"geco-{name}-rank{rank}-"))
    monitor = system_metrics(cfg.tracking, job.get("mlflow_run_id"), rank)
    try:
        if restored is not None:
            unpack(restored, name, work)
            log.info("[%s] rank %d restored %s", name, rank, checkpoint_uri(restored))
        rt = init_runtime(cfg.runtime)
        generator = None
        if name == "geco":
            generator = fetch_generator(job["cigm"], work)
            cfg.geco.cigm_checkpoint = str(job.get("cigm_uri") or generator)
        stage = make_stage(name, cfg, rt, work, generator=generator)
        tracker, logged, untracked = None, set(), []
        if rank == 0:
            save_config(cfg, work / name / "config.yaml")
            tracker = Tracker.attach(cfg.tracking, job.get("mlflow_run_id"))
            # An attempt that died (its node lost) after logging an epoch but before Ray took
            # that epoch's checkpoint trains it again: MLflow keeps the first record only.
            logged = tracker.logged_steps("epoch")

        node = ray_node_id()

        def on_epoch_end(record: dict[str, Any], last_path: Path) -> None:
            mine = (param_digest(stage.modules), node)
            ranks = [mine]
            if rt.distributed:
                ranks = [None] * rt.world_size
                dist.all_gather_object(ranks, mine)
            digests = [digest for digest, _ in ranks]
            # Where each rank ran (rank order): placement is visible in every report.
            metrics = {**numeric(record), **job.get("extra", {}), "stage": name,
                       SCORE: checkpoint_score(stage.selection(), record),
                       "rank_batch": getattr(cfg, name).batch_size,
                       "param_digests": ",".join(digests),
                       "ranks_in_sync": int(len(set(digests)) == 1),
                       "rank_nodes": ",".join(n for _, n in ranks)}
            if rank != 0:
                report(metrics, checkpoint=None)
                return
            epoch = int(record["epoch"])
            if epoch not in logged:
                log_epoch(tracker, metrics, last_path)
                if not tracker.enabled:  # no run, or tracking failed (on_error=warn)
                    untracked.append(epoch)
            metrics.update(tracking_report(tracker, untracked))
            with tempfile.TemporaryDirectory(prefix="geco-ckpt-") as d:
                pack(last_path.parent, Path(d) / name)
                report(metrics, checkpoint=checkpoint_cls.from_directory(d))

        fit(stage, rt, work, resume=True, on_epoch_end=on_epoch_end,
            on_step=lambda step, values: log_step(tracker, step, values))
    finally:
        if monitor is not None:
            monitor.finish()
        shutil.rmtree(work, ignore_errors=True)


def system_metrics(cfg: Any, run_id: str | None, rank: int) -> Any:
    """MLflow's system metrics monitor for this rank, started: CPU, memory, disk, network
    (and GPU when nvidia-ml-py finds one) every 10 s as "system/rank<N>/..." in the stage's
    run; None when tracking is off or psutil is missing. Best effort by design: a monitor
    that cannot log stops itself with a warning and never stops training."""
    if not (cfg.enabled and run_id):
        return None
    try:
        import psutil  # noqa: F401 - what mlflow.system_metrics samples with
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as exc:
        log.warning("no system metrics in MLflow: %s (pip install psutil)", exc)
        return None
    from geco.tracking import resolve_uri

    try:
        monitor = SystemMetricsMonitor(run_id, node_id=f"rank{rank}", resume_logging=True,
                                       tracking_uri=resolve_uri(cfg))
        monitor.start()
    except Exception as exc:  # noqa: BLE001 - the epochs' own tracking reports real failures
        log.warning("no system metrics in MLflow for rank %d: %s", rank, exc)
        return None
    return monitor


def rank_batch(global_batch: int, world: int, key: str) -> int:
    """The per-rank batch of an elastic run at `world` ranks: the global batch split evenly, so
    every world size trains with the same global batch and learning rate."""
    if global_batch % world:
        from geco.errors import ConfigError

        raise ConfigError(
            f"{key}: elastic training keeps the global batch ({global_batch} = batch_size x "
            f"max workers) at every world size, and {world} workers cannot split it evenly; "
            "choose a batch_size or worker range where every size divides it")
    return global_batch // world


def train_loop(job: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker for either stage (one DDP rank)."""
    import ray.train

    from geco.cluster.driver import ClusterConfig
    from geco.settings import build

    cfg = job["config"]
    if cfg["cluster"]["use_gpu"]:
        import ray.train.torch

        device = str(ray.train.torch.get_device())
    else:
        device = "cpu"
    cfg = {**cfg, "runtime": {**cfg["runtime"], "device": device}}
    ctx = ray.train.get_context()
    cluster = build(ClusterConfig, cfg["cluster"])
    if cluster.elastic:  # this attempt's share of the global batch
        stage = job["stage"]
        batch = rank_batch(cfg[stage]["batch_size"] * cluster.worker_range[1],
                           ctx.get_world_size(), f"{stage}.batch_size")
        cfg = {**cfg, stage: {**cfg[stage], "batch_size": batch}}
    run_worker({**job, "config": cfg}, rank=ctx.get_world_rank(),
               restored=ray.train.get_checkpoint(), report=ray.train.report,
               checkpoint_cls=ray.train.Checkpoint)


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    """The base config with one trial's GECo hyperparameters, validated (α=β=0 is refused)."""
    from geco.config import config_from_dict

    tree = {**base, "geco": {**base["geco"], **{k: float(v) for k, v in params.items()}}}
    return config_from_dict(tree)


def tune_trial(params: dict[str, Any], *, base: dict[str, Any], cigm: Any,
               parent_run_id: str | None) -> None:
    """Ray Tune's function trainable: one single-process GECo run with the trial's
    hyperparameters, the same worker body as Ray Train's, reporting after every epoch; with
    tracking, the trial is a child MLflow run of the sweep."""
    from ray import tune

    cfg = trial_config(base, params)
    cfg.runtime.device = "cuda" if cfg.tune.gpus_per_trial > 0 else "cpu"
    ctx = tune.get_context()
    tracker = None
    if parent_run_id and cfg.tracking.enabled:
        # Keyed by the sweep run and trial id: a retried trial (its node was lost) logs into
        # the run its first attempt opened.
        tracker, created = Tracker.resume_or_start(
            cfg.tracking, key=f"{parent_run_id}/{ctx.get_trial_id()}",
            run_name=ctx.get_trial_name(), parent_run_id=parent_run_id,
            tags={"geco.kind": "trial", "geco.trial_id": ctx.get_trial_id()})
        if created:
            tracker.log_config(cfg.to_dict())
    run_id = tracker.run_id if tracker is not None else None
    job = {"stage": "geco", "config": cfg.to_dict(), "cigm": cigm,
           "cigm_uri": checkpoint_source(cigm), "mlflow_run_id": run_id,
           "extra": {"mlflow_run_id": run_id or ""}}
    try:
        run_worker(job, rank=0, restored=tune.get_checkpoint(), report=tune.report,
                   checkpoint_cls=tune.Checkpoint)
    except Exception:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    # Anything else (Tune stopping the trial) leaves the run to the driver, which closes it.
    if tracker is not None:
        tracker.end()


# --- the evaluation task ----------------------------------------------------------------------

def finalize(geco_checkpoint: Any, cigm_source: Any, config: dict[str, Any], split: str,
             mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Metrics of the best GECo epoch on `split`; with an MLflow run, also log the retriever
    (pyfunc: generator + GECo weights + the split's embedded catalogue) into that run and
    register it as a new version with alias "candidate". Runs as a Ray task or in-process."""
    from geco import setup_logging
    from geco.config import config_from_dict
    from geco.data.source import open_data
    from geco.evaluate import evaluate_checkpoint

    setup_logging(0)
    cfg = config_from_dict(config)
    work = Path(tempfile.mkdtemp(prefix="geco-final-"))
    try:
        unpack(geco_checkpoint, "geco", work)
        best = work / "geco" / "best.pt"  # checkpoints written before Ray chose the best
        path = best if best.is_file() else work / "geco" / "last.pt"
        generator = fetch_generator(cigm_source, work)
        data = open_data(cfg.data)
        ev = evaluate_checkpoint(cfg, path, split, data, generator=generator)
        out = {"split": split, "dataset": ev["dataset"], "epoch": ev["epoch"], **ev["metrics"],
               "eval_node": ray_node_id()}
        if mlflow_run_id and cfg.tracking.enabled:
            out["model"] = _registered(cfg, mlflow_run_id, lambda: _register(
                cfg, ev, path, generator, data, split, work, mlflow_run_id))
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _registered(cfg: Config, run_id: str, register: Callable[[], dict[str, Any]]
                ) -> dict[str, Any]:
    """The model registered from `run_id`: the version made before (a resubmitted, finished
    job registers nothing new), else `register()`'s. A tracking failure on the way follows
    tracking.on_error: TrackingError, or a warning and {"failure": ...} for the summary."""
    try:
        existing = registered_version(cfg, run_id)
        if existing is not None:
            return {"version": existing, "existing": True}
        return register()
    except GecoError:
        raise
    except Exception as e:
        if not is_tracking_failure(e):
            raise
        from geco.tracking import resolve_uri

        failure = TrackingFailure.of(f"registering the model of run {run_id}", e)
        uri = resolve_uri(cfg.tracking)
        if cfg.tracking.on_error != "warn":
            raise TrackingError(failure.message(uri, hint=True)) from e
        log.warning("%s; the model is not registered", failure.message(uri, hint=False))
        return {"failure": failure.fields()}


def registered_version(cfg: Config, run_id: str | None) -> int | None:
    """The registered version already made from `run_id`, if any."""
    if not run_id or not cfg.tracking.enabled:
        return None
    from geco.tracking import client, resolve_uri

    found = client(resolve_uri(cfg.tracking)).search_model_versions(
        f"name='{cfg.tracking.registered_model}' and run_id='{run_id}'")
    return max((int(v.version) for v in found), default=None)


def _register(cfg: Config, ev: dict[str, Any], path: Path, generator: Path, data, split: str,
              work: Path, run_id: str) -> dict[str, Any]:
    """Log + register the retriever; slim checkpoints (no optimiser state) go into the model."""
    from geco.registry import build_catalogue, log_gallery, log_retriever
    from geco.tracking import resolve_uri
    from geco.train.runtime import save_slim

    catalogue = work / "catalogue.pt"
    build_catalogue(ev["retriever"], data, split, catalogue,
                    image_size=ev["trained_config"]["data"]["image_size"])
    # The validation metrics of the selected epoch: what the promotion gate compares.
    ckpt = ev["ckpt"]
    record = next((h for h in ckpt["history"] if h["epoch"] == ckpt["epoch"] + 1), {})
    valid = {k: float(v) for k, v in record.items() if k.startswith("valid_")}
    uri, geco_slim = resolve_uri(cfg.tracking), save_slim(path, work / "geco-retriever.pt")
    generator_slim = save_slim(generator, work / "cigm-generator.pt")
    splits, images = data.splits((split,))
    first_top = splits[split].tops[0]
    out = log_retriever(
        run_id, tracking_uri=uri, geco_checkpoint=geco_slim,
        generator_checkpoint=generator_slim, catalogue=catalogue,
        registered_model=cfg.tracking.registered_model, metrics=valid,
        example_image=_jpeg(images.load(first_top)))
    # What people look at: the version's retrievals on the validation split.
    out["gallery"] = log_gallery(
        run_id, tracking_uri=uri, geco_checkpoint=geco_slim,
        generator_checkpoint=generator_slim, data=data, split="valid", metrics=valid,
        registered_model=cfg.tracking.registered_model, version=out["version"])["uri"]
    return out


def _jpeg(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --- the compare task of one baseline ---------------------------------------------------------

def baseline_task(name: str, config: dict[str, Any], split: str, root: str) -> dict[str, Any]:
    """Fit (resume, or load) and evaluate one baseline (geco.compare.run_baseline); its folder
    is synced to `<root>/<name>/` after every epoch and at the end, and it starts from what
    that folder holds. Returns its compare.json entry, with storage URLs for the checkpoint
    and the grids."""
    from geco import setup_logging
    from geco.compare import run_baseline
    from geco.config import config_from_dict
    from geco.data.source import open_data
    from geco.data.storage import Storage

    setup_logging(0)
    cfg = config_from_dict(config)
    store = Storage(root)
    work = Path(tempfile.mkdtemp(prefix=f"geco-compare-{name}-"))
    try:
        local = work / name
        names = store.list(name + "/")
        for obj in names:  # what an earlier attempt saved
            dest = local / obj[len(name) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get_bytes(obj))
        if names:
            log.info("compare: %s resumes from %s/%s", name, root, name)

        def sync(*_: Any) -> None:
            store.sync_dir(local, prefix=name)

        out = run_baseline(name, cfg, work, split, open_data(cfg.data), on_epoch_end=sync)
        if local.is_dir():
            sync()
        if out.get("checkpoint"):
            out["checkpoint"] = store.url(f"{name}/{Path(out['checkpoint']).name}")
        if out.get("samples_dir"):
            out["samples_dir"] = store.url(f"{name}/samples")
        return {**out, "node": ray_node_id()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the catalogue task: one unit of an inventory ---------------------------------------------

_EMBEDDERS: dict[str, Any] = {}  # per worker process: the model of the last checkpoint seen


def catalogue_task(checkpoint: bytes, unit: Any, *, batch_size: int, on_bad: str,
                   image_base: str) -> dict[str, Any]:
    """Embed one unit (geco.catalogue.Unit) with the GECo checkpoint `checkpoint` (bytes, from
    the object store); the model is built once per worker process and checkpoint."""
    from geco import setup_logging
    from geco.catalogue import embed_unit, load_embedder

    setup_logging(0)
    key = hashlib.sha256(checkpoint).hexdigest()
    if key not in _EMBEDDERS:
        _EMBEDDERS.clear()
        _EMBEDDERS[key] = load_embedder(checkpoint)
    model, size = _EMBEDDERS[key]
    out = embed_unit(model, size, unit, batch_size=batch_size, on_bad=on_bad,
                     image_base=image_base)
    out["embeddings"] = out["embeddings"].numpy()  # plain arrays through the object store
    return {**out, "node": ray_node_id()}
