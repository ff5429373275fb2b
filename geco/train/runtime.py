"""Process-level runtime: device, distributed rank/world, seeding, autocast, checkpoint files.

DDP-aware without requiring it: when torch.distributed is initialised (torchrun, Ray Train)
the rank and world size come from it; otherwise this is rank 0 of 1. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from geco.errors import ConfigError, GecoError
from geco.settings import at_least, check_seed, require

log = logging.getLogger("geco")


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42  # offset by rank in DDP
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on CUDA
    deterministic: bool = False
    log_every: int = 20  # steps between progress lines

    def validate(self, key: str) -> None:
        require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, f"{key}.device",
                self.device, "expected auto, cpu, cuda or cuda:N")
        check_seed(f"{key}.seed", self.seed)
        at_least(f"{key}.log_every", self.log_every, 1, "steps between progress lines")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    amp_dtype: torch.dtype | None  # bf16 autocast on CUDA, None on CPU
    channels_last: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_runtime(cfg: RuntimeConfig) -> Runtime:
    """Resolve device and DDP coordinates; join a process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"runtime.device={cfg.device}: no CUDA device is available here")
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    on_cuda = device.type == "cuda"
    amp = {"auto": on_cuda, "bf16": True, "off": False}[cfg.amp]
    if amp and not on_cuda:
        log.warning("runtime.amp=bf16 requested on CPU: running in fp32 instead")
        amp = False
    channels_last = {"auto": on_cuda, "on": True, "off": False}[cfg.channels_last]

    seed_everything(cfg.seed + rank)  # different data-independent randomness per rank
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif on_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, rank, world, local_rank, torch.bfloat16 if amp else None, channels_last)


def gather_rows(x: torch.Tensor, rt: Runtime) -> tuple[torch.Tensor, int]:
    """Differentiable all-gather of every rank's rows (ranks may hold different counts).

    Returns the concatenation in rank order and the offset of this rank's first row in it.
    Gradients flow back to each rank's own rows, summed over the ranks that used them (DDP's
    gradient averaging then divides by the world size, as for any shared computation).
    """
    if not rt.distributed:
        return x, 0
    import torch.distributed._functional_collectives as fc

    # all_gather_single_autograd is the current name (torch >= 2.14); older torch has the other.
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd

    size = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(rt.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - len(x)))
    # Autograd-aware gather (backward sums every rank's gradient for our rows); shapes are
    # equal thanks to the padding.
    gathered = fc.wait_tensor(gather(padded, 0, dist.group.WORLD))
    parts = gathered.split(max(counts))
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]), sum(counts[:rt.rank])


def shutdown_distributed() -> None:
    """Leave the process group; exiting with one still open can abort the interpreter."""
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Atomic write: a crash mid-save never leaves a truncated checkpoint behind, and a failed
    write (disk full, quota, permissions) raises a GecoError naming the file and the cause,
    removes the partial file and leaves the previous checkpoint at `path` as it was."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Through a Python file (not a path) so that an OS error surfaces as OSError with its
        # errno, not torch's "enforce fail at inline_container.cc"; fsync so a full disk shows
        # here, not after the rename.
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
        kept = f"the previous {path.name} is unchanged" if path.is_file() else "nothing was saved"
        raise GecoError(f"cannot write checkpoint {path}: {cause}; {kept} (free space in "
                        f"{path.parent} or point the run dir elsewhere)") from exc


def _first_line(exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # torch wraps the OS error of a file object in a RuntimeError
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise GecoError(f"checkpoint not found: {p}")
    try:
        # Our checkpoints hold tensors, numbers, strings and dicts only: weights_only is safe.
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise GecoError(f"cannot read checkpoint {p}: {exc}") from exc


def save_slim(src: str | Path, dst: str | Path) -> Path:
    """A checkpoint without optimiser state: the weights a retriever needs (model for GECo,
    generator for CIGM), config, epoch and history. For registries and serving: about a
    third of the size of a resumable checkpoint."""
    ckpt = load_checkpoint(src)
    keep = {"geco": ("model",), "cigm": ("generator",)}.get(ckpt.get("stage"), ())
    ckpt["state"] = {k: v for k, v in ckpt["state"].items() if k in keep}
    save_checkpoint(Path(dst), ckpt)
    return Path(dst)
