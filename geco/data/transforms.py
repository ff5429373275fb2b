"""Image transforms, conversions between the two input spaces (docs/model.md §1.4, §7 item 1), and
the PNG grids runs log (template | top | bottom pictures).

GECo's ResNet sees ImageNet-normalised tensors; CIGM (the generator) is trained on [-1,1].
The reference feeds ImageNet tensors straight into CIGM and its tanh output straight into
the ResNet; `faithful=True` reproduces that, the default converts between the spaces.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GAN_MEAN = (0.5, 0.5, 0.5)
GAN_STD = (0.5, 0.5, 0.5)


def _resize(size: int) -> T.Resize:
    # Non-aspect-preserving bicubic resize on PIL images, as in the reference.
    return T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)


def gan_transform(size: int) -> T.Compose:
    """PIL -> 3xSxS float tensor in [-1,1] (CIGM input space)."""
    return T.Compose([_resize(size), T.ToTensor(), T.Normalize(GAN_MEAN, GAN_STD)])


def imagenet_transform(size: int) -> T.Compose:
    """PIL -> 3xSxS float tensor, ImageNet-normalised (GECo input space)."""
    return T.Compose([_resize(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _stats(x: Tensor, values: tuple[float, float, float]) -> Tensor:
    if x.dim() < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected a ...x3xHxW tensor, got shape {tuple(x.shape)}")
    # Shape (3,1,1) broadcasts over both 3xHxW and Nx3xHxW, on x's device and dtype.
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(3, 1, 1)


def _to_unit_imagenet(x: Tensor) -> Tensor:
    return x * _stats(x, IMAGENET_STD) + _stats(x, IMAGENET_MEAN)


def imagenet_to_gan(x: Tensor, faithful: bool = False) -> Tensor:
    """ImageNet space -> [-1,1]. faithful=True keeps the reference bug (returns x as is)."""
    if faithful:
        return x
    return _to_unit_imagenet(x) * 2.0 - 1.0


def gan_to_imagenet(x: Tensor, faithful: bool = False) -> Tensor:
    """Generator output [-1,1] -> ImageNet space. faithful=True returns x as is (reference)."""
    if faithful:
        return x
    return ((x + 1.0) * 0.5 - _stats(x, IMAGENET_MEAN)) / _stats(x, IMAGENET_STD)


def denormalize_gan(x: Tensor) -> Tensor:
    """[-1,1] -> [0,1] for saving sample grids."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def denormalize_imagenet(x: Tensor) -> Tensor:
    """ImageNet space -> [0,1] for saving sample grids."""
    return _to_unit_imagenet(x).clamp(0.0, 1.0)


def save_rows(columns: list[Tensor], path: Path, labels: list[str] | None = None,
              cell: int = 128) -> Path:
    """A PNG grid with one row per item and one column per tensor (each Nx3xHxW in [0,1]),
    e.g. top | templates | true bottom. Images smaller than `cell` are enlarged by a whole
    factor (nearest: every generated pixel stays visible); `labels` head the columns."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    rows = torch.stack([c.float().cpu().clamp(0, 1) for c in columns], dim=1)  # N, C, 3, H, W
    n, ncol, _, h, w = rows.shape
    factor = max(1, math.ceil(cell / max(h, w)))
    if factor > 1:
        rows = rows.flatten(0, 1).repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        rows = rows.view(n, ncol, 3, h * factor, w * factor)
    h, w, pad = h * factor, w * factor, 2
    head = 18 if labels else 0
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, head + n * (h + pad) + pad), "white")
    pixels = (rows.permute(0, 1, 3, 4, 2).numpy() * 255).round().astype(np.uint8)
    for r in range(n):
        for c in range(ncol):
            canvas.paste(Image.fromarray(pixels[r, c]),
                         (pad + c * (w + pad), head + pad + r * (h + pad)))
    if labels:
        draw = ImageDraw.Draw(canvas)
        try:
            font = ImageFont.load_default(size=13)
        except TypeError:  # Pillow < 10.1: the fixed bitmap font
            font = ImageFont.load_default()
        for c, text in enumerate(labels[:ncol]):
            draw.text((pad + c * (w + pad) + 3, 2), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
