"""Stage 1: CIGM, the conditional GAN that draws a bottom template from a top (REFERENCE §2).

Per step (§2.3): one generator draw; a discriminator step on (real, detached fake); then a
generator step with adversarial + λ·L1 against the just-updated discriminator. No selection:
the generator after the last epoch is the one GECo uses (`cigm/last.pt`).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from geco.config import Config
from geco.data.source import open_training_data
from geco.data.transforms import gan_transform
from geco.losses import gan_d_half, gan_g_loss
from geco.models.cigm import Generator, build_cigm
from geco.train.loop import fit_stage, start_runtime
from geco.train.runtime import Runtime, load_checkpoint, unwrap
from geco.train.samples import save_template_grid

log = logging.getLogger("geco")


class CIGMStage:
    name = "cigm"

    def __init__(self, cfg: Config, rt: Runtime):
        self.cfg, self.rt = cfg, rt
        c = cfg.cigm
        self.epochs, self.batch_size = c.epochs, c.batch_size
        self.max_steps_per_epoch = c.max_steps_per_epoch
        tf = gan_transform(cfg.data.image_size)
        self.train_set, valid = open_training_data(
            cfg.data, tf, rank=rt.rank, world_size=rt.world_size, seed=cfg.runtime.seed,
            batch_size=c.batch_size)
        self.sample_set = valid.sample_pairs(c.n_samples, tf) if rt.is_main else []

        g, d = build_cigm(c.features, c.noise_dim, cfg.data.image_size,
                          init_discriminator=c.init_discriminator)
        g, d = g.to(rt.device), d.to(rt.device)
        if rt.channels_last:
            g, d = g.to(memory_format=torch.channels_last), d.to(memory_format=torch.channels_last)
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            g, d = DDP(g, device_ids=ids), DDP(d, device_ids=ids)
        self.g, self.d = g, d
        self.opt_g = torch.optim.Adam(g.parameters(), lr=c.lr, betas=tuple(c.betas))
        self.opt_d = torch.optim.Adam(d.parameters(), lr=c.lr, betas=tuple(c.betas))

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        rt = self.rt
        x, y = rt.to_device(batch["top"]), rt.to_device(batch["bottom"])
        self.g.train()
        self.d.train()
        with rt.autocast():
            fake = self.g(x)
        # Discriminator, L_D = ½·[BCE(D(x,y),1) + BCE(D(x,ŷ),0)] (losses.gan_d_loss). Real and
        # fake are scored in separate calls, each with its own BatchNorm batch statistics as in
        # the reference, so each half gets its own backward; under DDP the first half
        # accumulates locally (no_sync) and the second all-reduces the sum once.
        self.opt_d.zero_grad(set_to_none=True)
        sync_later = self.d.no_sync() if isinstance(self.d, DDP) else contextlib.nullcontext()
        with sync_later:
            with rt.autocast():
                d_real = self.d(x, y).float()
            loss_real = gan_d_half(d_real, real=True)
            loss_real.backward()
        with rt.autocast():
            d_fake = self.d(x, fake.detach()).float()
        loss_fake = gan_d_half(d_fake, real=False)
        loss_fake.backward()
        self.opt_d.step()
        loss_d = loss_real.detach() + loss_fake.detach()

        # Generator: the just-updated D scores the same fake. Call D's plain module so D's
        # gradients from this pass stay local (they are discarded by the next D step anyway).
        self.opt_g.zero_grad(set_to_none=True)
        with rt.autocast():
            logits = unwrap(self.d)(x, fake).float()
        loss_g, parts = gan_g_loss(logits, fake.float(), y, self.cfg.cigm.lambda_l1)
        loss_g.backward()
        self.opt_g.step()
        return {"d_loss": float(loss_d), **parts}

    def end_epoch(self, epoch: int, out_dir: Path) -> dict[str, float]:
        if self.rt.is_main:
            save_template_grid(
                unwrap(self.g), self.sample_set, out_dir / "samples" / f"epoch_{epoch + 1:03d}.png",
                rt=self.rt, seed=self.cfg.eval.seed, space="gan",
            )
        return {}

    def selection(self) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": unwrap(self.g).state_dict(),
            "discriminator": unwrap(self.d).state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.g).load_state_dict(state["generator"])
        unwrap(self.d).load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])


def train_cigm(cfg: Config, run_dir: Path, *, resume: bool = True, on_epoch_end=None) -> dict:
    rt = start_runtime(cfg)
    return fit_stage(CIGMStage(cfg, rt), rt, cfg, run_dir, resume=resume,
                     on_epoch_end=on_epoch_end)


def load_generator(path: str | Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """The frozen, eval-mode generator from a CIGM checkpoint, with the config it was trained with."""
    ckpt = load_checkpoint(path, map_location="cpu")
    if ckpt.get("stage") != "cigm":
        from geco.errors import GecoError

        raise GecoError(f"{path} is not a CIGM checkpoint (stage={ckpt.get('stage')!r})")
    c = ckpt["config"]
    g = Generator(features=c["cigm"]["features"], noise_dim=c["cigm"]["noise_dim"],
                  image_size=c["data"]["image_size"])
    g.load_state_dict(ckpt["state"]["generator"])
    g.eval().requires_grad_(False)
    return g.to(device), c
