"""The one training loop both stages run: epochs, DDP sampling, progress, checkpoints, resume.

A stage (CIGM or GECo) supplies the model-specific parts through the small `Stage`
protocol; everything generic lives here once: deterministic per-epoch shuffling shared by all
ranks, equal batch counts per rank, samples/s progress, skipped-sample counts, per-epoch
validation, best-epoch selection, atomic `last.pt`/`best.pt`, and resume from `last.pt`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from geco.config import Config, with_defaults
from geco.data.datasets import collate_skip
from geco.data.sampler import EpochBatchSampler
from geco.data.source import ensure_synthetic
from geco.errors import DataError, GecoError
from geco.train.runtime import Runtime, init_runtime, load_checkpoint, save_checkpoint

log = logging.getLogger("geco")


class Stage(Protocol):
    name: str  # "cigm" | "geco": sub-folder of the run dir
    epochs: int
    batch_size: int
    max_steps_per_epoch: int
    train_set: Dataset

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]: ...

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        """Called on every rank after each epoch; returns validation metrics (may be empty)."""

    def selection(self) -> tuple[str, str] | None:
        """(metric, "max"|"min") picking the best epoch, or None (keep the last)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def make_train_loader(stage: Stage, rt: Runtime, *, seed: int, num_workers: int) -> DataLoader:
    if isinstance(stage.train_set, IterableDataset):
        # A shard stream batches itself, per rank and worker, with equal steps per rank.
        return DataLoader(stage.train_set, batch_size=None, num_workers=num_workers,
                          pin_memory=rt.device.type == "cuda",
                          persistent_workers=num_workers > 0)
    # Same global batches for any world size; each rank takes its share (geco.data.sampler).
    sampler = EpochBatchSampler(len(stage.train_set), stage.batch_size, rank=rt.rank,
                                world_size=rt.world_size, seed=seed)
    return DataLoader(
        stage.train_set,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_skip,
        pin_memory=rt.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def _set_epoch(loader: DataLoader, epoch: int) -> None:
    target = loader.batch_sampler if loader.batch_sampler is not None else loader.dataset
    target.set_epoch(epoch)


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

    def update(self, step: int, n: int, data_time: float, parts: dict[str, float]) -> None:
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
            log.info(
                "[%s] epoch %d/%d step %d/%d %s | %.1f samples/s | data %.0f%% | eta %s",
                self.name, self.epoch + 1, self.epochs, step, self.steps, loss, rate,
                100 * self.data_time / max(elapsed, 1e-9), _fmt_seconds(eta),
            )
            self.last, self.window_samples = now, 0

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.samples * self.rt.world_size / max(time.perf_counter() - self.start, 1e-9)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def fit(
    stage: Stage,
    rt: Runtime,
    run_dir: Path,
    config: dict[str, Any],
    *,
    seed: int,
    num_workers: int = 0,
    resume: bool = True,
    log_every: int = 20,
    on_epoch_end: Callable[[dict[str, Any], Path], None] | None = None,
) -> dict[str, Any]:
    """Train `stage` for its epochs; returns the final summary (history, best epoch, paths).

    `on_epoch_end(record, last_checkpoint)` runs on every rank after rank 0 has written the
    epoch's checkpoint; an orchestrator (Ray Train) uses it to report.
    """
    out = run_dir / stage.name
    last_path, best_path = out / "last.pt", out / "best.pt"
    selection = stage.selection()
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": None, "metric": None, "value": None}
    start_epoch = 0

    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path)
        # Sections and keys added since the checkpoint was written take their defaults, so
        # upgrading geco does not orphan a run.
        drift = config_drift(with_defaults(ckpt["config"]), config)
        if stage.name == "cigm":  # GECo's settings do not change what CIGM trains
            drift = [d for d in drift if not d.startswith("geco.")]
        if drift:
            raise GecoError(
                f"{last_path} was trained with a different config ({', '.join(drift[:5])}); "
                "use a new --run-dir, or --no-resume to start over"
            )
        stage.load_state_dict(ckpt["state"])
        history, best = ckpt["history"], ckpt["best"]
        start_epoch = ckpt["epoch"] + 1
        if rt.is_main:
            log.info("[%s] resuming from %s after epoch %d", stage.name, last_path, start_epoch)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)

    loader = make_train_loader(stage, rt, seed=seed, num_workers=num_workers)
    steps = len(loader)
    if stage.max_steps_per_epoch:
        steps = min(steps, stage.max_steps_per_epoch)

    for epoch in range(start_epoch, stage.epochs):
        _set_epoch(loader, epoch)
        progress = Progress(stage.name, epoch, stage.epochs, steps, rt, log_every)
        skipped = 0
        t_data = time.perf_counter()
        for step, batch in enumerate(loader, start=1):
            if step > steps:
                break
            if batch is None:
                raise DataError(
                    f"[{stage.name}] every image in a training batch was unreadable "
                    f"(epoch {epoch + 1}, step {step}); see the warnings above"
                )
            skipped += int(batch.pop("skipped", 0))
            data_time = time.perf_counter() - t_data
            parts = stage.train_step(batch)
            n = int(next(v for v in batch.values() if torch.is_tensor(v)).shape[0])
            progress.update(step, n, data_time, parts)
            t_data = time.perf_counter()

        train_means = progress.means()
        keys = sorted(train_means)
        reduced = rt.all_reduce_sum([train_means[k] for k in keys]
                                    + [float(skipped), float(progress.samples)])
        train_means = {f"train_{k}": v / rt.world_size
                       for k, v in zip(keys, reduced[:-2], strict=True)}
        skipped_total, samples_total = int(reduced[-2]), int(reduced[-1])

        metrics = stage.end_epoch(epoch, out)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            **train_means,
            **metrics,
            "samples": samples_total,  # trained on, all ranks
            "skipped_samples": skipped_total,
            "samples_per_s": progress.rate(),
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

    return {
        "history": history, "best": best, "last": str(last_path),
        "best_path": str(best_path if best_path.exists() else last_path),
    }


# Settings that may change between a run and its resumption without changing what is trained.
_VOLATILE = ("runtime.", "eval.", "cluster.", "tracking.", "tune.", "baselines.",
             "data.num_workers", "cigm.epochs", "geco.epochs", "geco.cigm_checkpoint",
             "cigm.n_samples")


def config_drift(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, ignoring volatile settings."""
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) or isinstance(b, dict):  # key by key; a missing section = {}
            a = a if isinstance(a, dict) else {}
            b = b if isinstance(b, dict) else {}
            out += config_drift(a, b, dotted + ".")
        elif a != b and not dotted.startswith(_VOLATILE):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def start_runtime(cfg: Config) -> Runtime:
    """Join DDP when launched that way; rank 0 generates the synthetic dataset if configured."""
    rt = init_runtime(cfg.runtime)
    if rt.is_main:
        ensure_synthetic(cfg.data)
    rt.barrier()
    return rt


def fit_stage(stage: Stage, rt: Runtime, cfg: Config, run_dir: Path, *, resume: bool = True,
              on_epoch_end: Callable[[dict[str, Any], Path], None] | None = None) -> dict:
    """`fit` with the run settings taken from the config (saved with every checkpoint)."""
    return fit(stage, rt, run_dir, cfg.to_dict(), seed=cfg.runtime.seed,
               num_workers=cfg.data.num_workers, resume=resume,
               log_every=cfg.runtime.log_every, on_epoch_end=on_epoch_end)


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
