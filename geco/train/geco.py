"""Stage 2: GECo, the ResNet-18 retriever trained with the frozen CIGM (REFERENCE §3).

Per step: templates from the eval-mode generator (no gradient), q = query(top ⊕ template),
p = bottom embedding, loss α·BPR (rolled in-batch negative) + β·InfoNCE(τ) + γ·reg. After each
epoch: StepLR, validation on the valid split, best epoch by `geco.selection_metric`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from geco.config import Config
from geco.data.source import open_training_data
from geco.data.transforms import imagenet_transform
from geco.evaluate import Retriever
from geco.losses import geco_loss
from geco.models.backbone import resnet18_features
from geco.models.geco import GECo
from geco.train.cigm import load_generator
from geco.train.loop import fit_stage, start_runtime
from geco.train.runtime import Runtime, gather_rows, load_checkpoint, unwrap
from geco.train.samples import save_template_grid

log = logging.getLogger("geco")


def cigm_path(cfg: Config, run_dir: Path) -> Path:
    return Path(cfg.geco.cigm_checkpoint) if cfg.geco.cigm_checkpoint else run_dir / "cigm" / "last.pt"


def build_model(cfg: Config) -> GECo:
    b = cfg.geco.backbone
    backbone = resnet18_features(b.weights, allow_random_init=b.allow_random_init)
    return GECo(backbone, emb_dim=cfg.geco.emb_dim)


class GECoStage:
    name = "geco"

    def __init__(self, cfg: Config, rt: Runtime, generator_path: Path):
        self.cfg, self.rt = cfg, rt
        g = cfg.geco
        self.epochs, self.batch_size = g.epochs, g.batch_size
        self.max_steps_per_epoch = g.max_steps_per_epoch
        size = cfg.data.image_size
        tf = imagenet_transform(size)
        self.train_set, self.valid = open_training_data(
            cfg.data, tf, rank=rt.rank, world_size=rt.world_size, seed=cfg.runtime.seed,
            batch_size=g.batch_size)
        self.sample_set = self.valid.sample_pairs(8, tf) if rt.is_main else []

        self.generator, gen_cfg = load_generator(generator_path, rt.device)
        if gen_cfg["data"]["image_size"] != size:
            from geco.errors import ConfigError

            raise ConfigError(
                f"CIGM {generator_path} was trained at {gen_cfg['data']['image_size']} px but "
                f"data.image_size={size}"
            )
        model = build_model(cfg).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.generator = self.generator.to(memory_format=torch.channels_last)
        self.model = model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.model = DDP(model, device_ids=ids)
        self.retriever = Retriever(self.generator, model, faithful=g.faithful)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=g.lr, betas=tuple(g.betas))
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=g.lr_step,
                                                     gamma=g.lr_gamma)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        rt, g = self.rt, self.cfg.geco
        tops, bottoms = rt.to_device(batch["top"]), rt.to_device(batch["bottom"])
        self.model.train()
        with rt.autocast():
            noise = torch.randn(len(tops), self.generator.noise_dim, device=rt.device)
            templates = self.retriever.templates(tops, noise)
            q, p = self.model(tops, templates, bottoms)
        q, p = q.float(), p.float()
        p_all, offset = None, 0
        if g.global_negatives and rt.distributed:
            # Every rank's positives become InfoNCE negatives for every query.
            p_all, offset = gather_rows(p, rt)
        loss, parts = geco_loss(q, p, unwrap(self.model).parameters(), alpha=g.alpha,
                                beta=g.beta, gamma=g.gamma, tau=g.tau, reg=g.reg,
                                p_all=p_all, offset=offset)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return parts

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        self.sched.step()
        metrics: dict[str, float] = {}
        if self.rt.is_main:
            m = self.valid.evaluate(
                self.retriever, rt=self.rt, image_size=self.cfg.data.image_size, batch_size=self.cfg.eval.batch_size,
                seed=self.cfg.eval.seed, ties=self.cfg.eval.ties,
                num_workers=self.cfg.data.num_workers,
            )
            metrics = {f"valid_{k}": float(v) for k, v in m.items()
                       if isinstance(v, float) and k != "eval_seconds"}
            metrics["lr"] = self.sched.get_last_lr()[0]
            save_template_grid(self.generator, self.sample_set,
                               out_dir / "samples" / f"epoch_{epoch + 1:03d}.png", rt=self.rt,
                               seed=self.cfg.eval.seed, space="imagenet",
                               faithful=self.cfg.geco.faithful)
        return self.rt.broadcast_object(metrics)

    def selection(self) -> tuple[str, str]:
        return f"valid_{self.cfg.geco.selection_metric}", "max"

    def state_dict(self) -> dict[str, Any]:
        return {"model": unwrap(self.model).state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def train_geco(cfg: Config, run_dir: Path, *, resume: bool = True, on_epoch_end=None) -> dict:
    rt = start_runtime(cfg)
    gen_path = cigm_path(cfg, run_dir)
    if not gen_path.is_file():
        from geco.errors import GecoError

        raise GecoError(
            f"no CIGM generator at {gen_path}: run `geco train cigm` with the same --run-dir "
            "first, or set geco.cigm_checkpoint=PATH"
        )
    # The resolved generator path travels with every GECo checkpoint (lineage, evaluation).
    cfg.geco.cigm_checkpoint = str(gen_path.resolve())
    return fit_stage(GECoStage(cfg, rt, gen_path), rt, cfg, run_dir, resume=resume,
                     on_epoch_end=on_epoch_end)


def load_retriever(checkpoint: str | Path, device: torch.device,
                   generator_path: str | Path | None = None) -> tuple[Retriever, dict]:
    """Rebuild the retriever from a GECo checkpoint (its config names the CIGM it used, unless
    `generator_path` gives the generator's file, e.g. one fetched from a Ray checkpoint)."""
    from geco.config import config_from_dict

    ckpt = load_checkpoint(checkpoint)
    cfg = config_from_dict(ckpt["config"])
    # The weights come from the checkpoint: the backbone's initial weights are irrelevant.
    cfg.geco.backbone.weights, cfg.geco.backbone.allow_random_init = "random", True
    model = build_model(cfg)
    model.load_state_dict(ckpt["state"]["model"])
    model.eval().to(device)
    generator, _ = load_generator(generator_path or cfg.geco.cigm_checkpoint, device)
    return Retriever(generator, model, faithful=cfg.geco.faithful), ckpt
