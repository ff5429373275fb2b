"""The one training loop every model runs: CIGM, GECo and the trainable baselines (MGCM,
Pix2PixCM, BPR-DAE) alike.

A model supplies its specific parts through the small `Stage` protocol (its loader, one
training step, what to do after an epoch, its state); everything generic lives here once:
progress lines with samples/s, skipped-sample counts, per-epoch validation and best-epoch
selection, atomic `last.pt` / `best.pt` with the resolved config and history, resume from
`last.pt` after a drift check, and optional per-epoch RNG streams.

`train(cfg, name, run_dir)` builds the stage `name` (see STAGES) on the configured data and
fits it into `<run_dir>/<name>/`: what `geco train`, `geco compare`, the Ray workers and the
Ray compare tasks all call.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from geco.config import drift
from geco.data.jpeg import decode_batch
from geco.data.source import open_data
from geco.errors import ConfigError, DataError, GecoError
from geco.models.geco import cigm_path
from geco.train.runtime import Runtime, init_runtime, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from geco.config import Config
    from geco.data.source import Loader

log = logging.getLogger("geco")

# Every trainable model: name (its run-dir folder and checkpoint tag) -> its Stage class.
STAGES = {
    "cigm": "geco.models.cigm:CIGMStage",
    "geco": "geco.models.geco:GECoStage",
    "mgcm": "geco.baselines.gancm:MGCMStage",
    "pix2pixcm": "geco.baselines.gancm:Pix2PixCMStage",
    "bpr-dae": "geco.baselines.bprdae:BPRDAEStage",
}


class Stage(Protocol):
    name: str  # sub-folder of the run dir, and the "stage" its checkpoints carry
    cfg: Config  # the resolved config it trains with, saved in every checkpoint
    epochs: int
    max_steps_per_epoch: int  # 0 = whole epochs
    loader: Loader  # the training batches of this rank
    # Config keys (sections or fields) that define the model: a checkpoint whose values differ
    # there is another model and is not resumed. Fields declared `resumable` are not compared.
    depends_on: tuple[str, ...]
    # None: steps draw from the process RNG. An int: every epoch runs under its own RNG
    # stream seeded from (rng_seed, epoch, rank), so a resumed run trains exactly like an
    # uninterrupted one.
    rng_seed: int | None
    modules: list[torch.nn.Module]  # the trained networks (a Ray worker digests their weights)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]: ...

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        """Called on every rank after each epoch; returns validation metrics (may be empty)."""

    def selection(self) -> tuple[str, str] | None:
        """(metric, "max"|"min") picking the best epoch, or None (keep the last)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_stage(name: str, cfg: Config, rt: Runtime, run_dir: Path, *,
               generator: Path | None = None, data=None) -> Stage:
    """The stage `name` on the configured data (opened here unless given). GECo trains with
    the generator file `generator` (a Ray worker's download; geco.cigm_checkpoint then names
    where it came from), else geco.cigm_checkpoint, else <run_dir>/cigm/best.pt (or last.pt)."""
    if name not in STAGES:
        raise GecoError(f"unknown model {name!r} to train (known: {', '.join(STAGES)})")
    if name == "geco" and generator is None:
        generator = cigm_path(cfg, run_dir)
        if not generator.is_file():
            raise GecoError(
                f"no CIGM generator at {generator}: run `geco train cigm` with the same "
                "--run-dir first, or set geco.cigm_checkpoint=PATH"
            )
        # The generator's path travels with every GECo checkpoint (lineage, evaluation).
        cfg.geco.cigm_checkpoint = str(generator.resolve())
    data = data if data is not None else open_data(cfg.data, rt)
    module, cls = STAGES[name].split(":")
    stage_cls = getattr(importlib.import_module(module), cls)
    if name == "geco":
        return stage_cls(cfg, rt, data, Path(generator))
    return stage_cls(cfg, rt, data)


def train(cfg: Config, name: str, run_dir: str | Path, *, resume: bool = True,
          on_epoch_end: Callable[[dict[str, Any], Path], None] | None = None,
          data=None) -> tuple[Stage, dict[str, Any]]:
    """Build the stage `name` (on `data` when given, else the configured data) and fit it
    into <run_dir>/<name>/, resuming from its last.pt; returns the stage and `fit`'s summary."""
    rt = init_runtime(cfg.runtime)  # joins DDP when launched that way (torchrun, Ray Train)
    stage = make_stage(name, cfg, rt, Path(run_dir), data=data)
    return stage, fit(stage, rt, Path(run_dir), resume=resume, on_epoch_end=on_epoch_end)


class Progress:
    """Rank-0 progress lines with global samples/s, data-wait share and ETA."""

    def __init__(self, name: str, epoch: int, epochs: int, steps: int, rt: Runtime, every: int):
        self.name, self.epoch, self.epochs, self.steps = name, epoch, epochs, steps
        self.rt, self.every = rt, max(1, every)
        self.start = self.last = time.perf_counter()
        self.samples = self.window_samples = 0
        self.data_time = 0.0
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, step: int, n: int, data_time: float, parts: dict[str, float]
               ) -> dict[str, float] | None:
        """Count a step; on rank 0 every `every` steps log a line and return what it says
        (the step's losses, samples/s over the window, data-wait share), else None."""
        self.samples += n
        self.window_samples += n
        self.data_time += data_time
        self.count += 1
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if self.rt.is_main and (step % self.every == 0 or step == self.steps):
            now = time.perf_counter()
            rate = self.window_samples * self.rt.world_size / max(now - self.last, 1e-9)
            elapsed = now - self.start
            eta = elapsed / step * (self.steps - step)
            loss = " ".join(f"{k}={v:.4f}" for k, v in parts.items())
            data_share = self.data_time / max(elapsed, 1e-9)
            log.info(
                "[%s] epoch %d/%d step %d/%d %s | %.1f samples/s | data %.0f%% | eta %s",
                self.name, self.epoch + 1, self.epochs, step, self.steps, loss, rate,
                100 * data_share, _fmt_seconds(eta),
            )
            self.last, self.window_samples = now, 0
            return {**parts, "samples_per_s": rate, "data_wait": data_share}
        return None

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.samples * self.rt.world_size / max(time.perf_counter() - self.start, 1e-9)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@contextlib.contextmanager
def _epoch_rng(stage: Stage, epoch: int, rt: Runtime):
    """The epoch's own RNG stream when the stage asks for one (one per DDP rank: ranks draw
    different noise); the process RNG is restored."""
    if stage.rng_seed is None:
        yield
        return
    seed = stage.rng_seed * 1_000_003 + 7919 * (epoch + 1) + 104_729 * rt.rank
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(seed % (2**63 - 1))
        yield


def fit(
    stage: Stage,
    rt: Runtime,
    run_dir: Path,
    *,
    resume: bool = True,
    on_epoch_end: Callable[[dict[str, Any], Path], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train `stage` for its epochs into <run_dir>/<stage.name>/; returns the summary: history,
    best epoch, checkpoint paths, the epoch it resumed after (0 = from scratch) and how many
    epochs this call trained.

    `on_epoch_end(record, last_checkpoint)` runs on every rank after rank 0 has written the
    epoch's checkpoint; an orchestrator (Ray Train, Tune, a compare task) uses it to report.
    `on_step(global_step, values)` runs on rank 0 with each progress line's values (every
    runtime.log_every steps): step-level training curves.
    """
    out = run_dir / stage.name
    last_path, best_path = out / "last.pt", out / "best.pt"
    config = stage.cfg.to_dict()
    selection = stage.selection()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "metric": None, "value": None}
    start_epoch = 0

    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        if ckpt.get("stage") != stage.name:
            if "stage" not in ckpt and ckpt.get("model") == stage.name:
                raise GecoError(f"{last_path} was written by an older geco, whose baselines "
                                "had a checkpoint format of their own: delete it to retrain")
            raise GecoError(f"{last_path} holds a {ckpt.get('stage')!r} checkpoint, not "
                            f"{stage.name!r}: use another run dir")
        changed = drift(ckpt["config"], config, stage.depends_on)
        if changed:
            raise ConfigError(
                f"{last_path} was trained with a different config ({'; '.join(changed[:5])}); "
                "use a new --run-dir, or --no-resume to start over"
            )
        stage.load_state_dict(ckpt["state"])
        history, best = ckpt["history"], ckpt["best"]
        start_epoch = ckpt["epoch"] + 1
        if rt.is_main:
            if start_epoch < stage.epochs:
                log.info("[%s] resuming from %s after epoch %d", stage.name, last_path,
                         start_epoch)
            else:
                log.info("[%s] %s is complete (%d epochs): nothing to train", stage.name,
                         last_path, start_epoch)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)

    steps = len(stage.loader)
    if stage.max_steps_per_epoch:
        steps = min(steps, stage.max_steps_per_epoch)

    t_fit = time.perf_counter()
    for epoch in range(start_epoch, stage.epochs):
        stage.loader.set_epoch(epoch)
        progress = Progress(stage.name, epoch, stage.epochs, steps, rt, stage.cfg.runtime.log_every)
        skipped = 0
        batches = iter(stage.loader)  # before the epoch's RNG stream: loaders draw a seed
        t_data = time.perf_counter()
        with _epoch_rng(stage, epoch, rt):
            for step, batch in enumerate(batches, start=1):
                if step > steps:
                    break
                if batch is None:
                    raise DataError(
                        f"[{stage.name}] every image in a training batch was unreadable "
                        f"(epoch {epoch + 1}, step {step}); see the warnings above"
                    )
                skipped += int(batch.pop("skipped", 0))
                batch, lost = decode_batch(batch, rt.device)  # data.decode=device
                skipped += lost
                if batch is None:
                    raise DataError(f"[{stage.name}] no image of a training batch could be "
                                    f"decoded (epoch {epoch + 1}, step {step})")
                data_time = time.perf_counter() - t_data
                parts = stage.train_step(batch)
                n = int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
                line = progress.update(step, n, data_time, parts)
                if line is not None and on_step is not None:
                    on_step(epoch * steps + step, line)
                t_data = time.perf_counter()

        train_means = progress.means()
        keys = sorted(train_means)
        reduced = rt.all_reduce_sum([train_means[k] for k in keys]
                                    + [float(skipped), float(progress.samples)])
        train_means = {f"train_{k}": v / rt.world_size
                       for k, v in zip(keys, reduced[:-2], strict=True)}
        skipped_total, samples_total = int(reduced[-2]), int(reduced[-1])
        diverged = sorted(k for k, v in train_means.items() if not math.isfinite(v))
        if diverged:
            raise GecoError(f"[{stage.name}] {', '.join(diverged)} not finite in epoch "
                            f"{epoch + 1}: training diverged; lower the learning rate")

        metrics = stage.end_epoch(epoch, out)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            **train_means,
            **metrics,
            "steps": progress.count,
            "samples": samples_total,  # trained on, all ranks
            "world_size": rt.world_size,  # ranks that trained it (elastic runs vary)
            "skipped_samples": skipped_total,
            "samples_per_s": progress.rate(),
            "seconds": time.perf_counter() - progress.start,
        }
        improved = _improves(selection, metrics, best)
        if improved:
            metric, _ = selection
            best = {"epoch": epoch + 1, "metric": metric, "value": metrics[metric]}
        elif selection is None:
            best = {"epoch": epoch + 1, "metric": None, "value": None}
        history.append(record)
        if rt.is_main:
            val = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            log.info(
                "[%s] epoch %d/%d done: %s | %.1f samples/s | skipped %d%s",
                stage.name, epoch + 1, stage.epochs, val, record["samples_per_s"],
                skipped_total, " | new best" if improved else "",
            )
            payload = {
                "stage": stage.name, "epoch": epoch, "state": stage.state_dict(),
                "config": config, "history": history, "best": best,
            }
            save_checkpoint(last_path, payload)
            if improved:
                save_checkpoint(best_path, payload)
            _write_history(out / "metrics.jsonl", history)
        rt.barrier()
        if on_epoch_end is not None:
            on_epoch_end(record, last_path)

    summary = {
        "history": history, "best": best, "last": str(last_path),
        "best_path": str(best_path if best_path.exists() else last_path),
        "resumed_after_epoch": start_epoch,
        "epochs_trained": max(0, len(history) - start_epoch),
        "train_seconds": time.perf_counter() - t_fit,
    }
    report = getattr(stage, "report", None)  # a stage's own summary section (CIGM: templates)
    if report is not None:
        summary.update(report(summary))
    return summary


def _improves(selection: tuple[str, str] | None, metrics: dict[str, float], best: dict) -> bool:
    if selection is None:
        return False
    metric, mode = selection
    value = metrics.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best["value"] is None:
        return True
    # Strictly better, as in the reference (ties keep the earlier epoch).
    return value > best["value"] if mode == "max" else value < best["value"]


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten from the checkpoint's history each epoch: a resumed run never lists an epoch twice.
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)
