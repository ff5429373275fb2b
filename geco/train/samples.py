"""Template sample grids: one row per validation top, columns top | template | true bottom."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.utils import save_image

from geco.data.transforms import denormalize_gan, denormalize_imagenet, imagenet_to_gan
from geco.models.cigm import Generator
from geco.train.runtime import Runtime


@torch.no_grad()
def save_template_grid(
    generator: Generator, pairs: Dataset, path: Path, *, rt: Runtime, seed: int,
    space: str = "gan", faithful: bool = False,
) -> Path:
    """`pairs` yields {"top", "bottom"} in `space` ("gan" = [-1,1], "imagenet" = GECo input)."""
    items = [pairs[i] for i in range(len(pairs))]
    items = [it for it in items if it is not None]
    tops = torch.stack([it["top"] for it in items]).to(rt.device)
    bottoms = torch.stack([it["bottom"] for it in items]).to(rt.device)
    gen_in = tops if space == "gan" else imagenet_to_gan(tops, faithful=faithful)
    rng = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(items), generator.noise_dim, generator=rng).to(rt.device)
    was_training = generator.training
    generator.eval()
    with rt.autocast():
        templates = generator(gen_in, noise).float()
    generator.train(was_training)
    to01 = denormalize_gan if space == "gan" else denormalize_imagenet
    return save_rows([to01(tops), denormalize_gan(templates), to01(bottoms)], path)


def save_rows(columns: list[torch.Tensor], path: Path) -> Path:
    """A PNG grid with one row per item and one column per tensor (each Nx3xHxW in [0,1]),
    e.g. top | template | true bottom."""
    rows = torch.stack([c.float().cpu() for c in columns], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows.flatten(0, 1).clamp(0, 1), path, nrow=len(columns), padding=2,
               pad_value=1.0)
    return path
