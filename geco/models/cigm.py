"""CIGM (stage 1): pix2pix-style U-Net generator with bottleneck noise, and a PatchGAN critic.

Follows REFERENCE.md §2 exactly at 128 px / features=64, minus the reference's unused `down6`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from geco.errors import ConfigError


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 4, 2, 1, bias=False, padding_mode="reflect"),
        nn.BatchNorm2d(cout),
        nn.LeakyReLU(0.2),
    )


def _up(cin: int, cout: int, dropout: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]
    if dropout:
        layers.append(nn.Dropout(0.5))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """U-Net generator G(top, z) -> bottom template in [-1, 1].

    At image_size=128, features=f the encoder maps are d1..d6 with widths f, 2f, 4f, 8f, 8f, 8f
    (spatial 64 … 2), a bottleneck conv takes d6 to 8f×1×1, the noise z (noise_dim×1×1) is
    concatenated in front of it, and six up blocks (dropout on the first two) plus a final
    transposed conv mirror the encoder with U-Net skips. This is REFERENCE §2.1 without the
    never-called `down6`.

    Other sizes (a power of two >= 16): the encoder has log2(image_size) - 1 maps, halving down
    to 2×2, with widths min(f·2^k, 8f); only the number of 8f-wide middle blocks changes
    (64 px: one fewer than at 128, 256 px: one more). Each up block outputs the width of the skip
    it is concatenated with, and dropout stays on the first two up blocks. Below 32 px the
    encoder never reaches 8f, so the bottleneck widens its input to 8f.
    """

    def __init__(
        self, in_channels: int = 3, features: int = 64, noise_dim: int = 1024, image_size: int = 128
    ) -> None:
        super().__init__()
        if image_size < 16 or image_size & (image_size - 1):
            raise ConfigError(f"image_size must be a power of two >= 16 (got {image_size})")
        if features < 1 or noise_dim < 1:
            raise ConfigError(
                f"features and noise_dim must be >= 1 (got features={features}, noise_dim={noise_dim})"
            )
        self.in_channels = in_channels
        self.noise_dim = noise_dim
        self.image_size = image_size
        widest = 8 * features
        enc = [min(features * 2**k, widest) for k in range(int(math.log2(image_size)) - 1)]

        self.initial_down = nn.Sequential(
            nn.Conv2d(in_channels, enc[0], 4, 2, 1, padding_mode="reflect"), nn.LeakyReLU(0.2)
        )
        self.downs = nn.ModuleList(_down(a, b) for a, b in zip(enc[:-1], enc[1:], strict=True))
        self.bottleneck = nn.Sequential(
            nn.Conv2d(enc[-1], widest, 4, 2, 1, padding_mode="reflect"), nn.ReLU()
        )
        ups = [_up(noise_dim + widest, enc[-1], dropout=True)]
        # Up block j (j >= 1) sees cat(previous up, skip enc[-j]) and outputs the next skip's width.
        for j in range(1, len(enc)):
            ups.append(_up(2 * enc[-j], enc[-j - 1], dropout=j < 2))
        self.ups = nn.ModuleList(ups)
        self.final_up = nn.Sequential(
            nn.ConvTranspose2d(2 * enc[0], in_channels, 4, 2, 1), nn.Tanh()
        )

    def _noise(self, x: Tensor, noise: Tensor | None, rng: torch.Generator | None) -> Tensor:
        b = x.shape[0]
        if noise is None:
            if rng is not None:
                # Draw where the generator lives so a seeded CPU rng gives the same z on any device.
                z = torch.randn(b, self.noise_dim, 1, 1, generator=rng, device=rng.device)
            else:
                z = torch.randn(b, self.noise_dim, 1, 1, device=x.device)
        else:
            if noise.shape not in ((b, self.noise_dim), (b, self.noise_dim, 1, 1)):
                raise ValueError(
                    f"noise must have shape ({b}, {self.noise_dim}) or ({b}, {self.noise_dim}, 1, 1),"
                    f" got {tuple(noise.shape)}"
                )
            z = noise.reshape(b, self.noise_dim, 1, 1)
        return z.to(device=x.device, dtype=x.dtype)

    def forward(
        self, x: Tensor, noise: Tensor | None = None, *, rng: torch.Generator | None = None
    ) -> Tensor:
        s = self.image_size
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (s, s):
            raise ValueError(
                f"Generator expects B×{self.in_channels}×{s}×{s} input, got {tuple(x.shape)}"
            )
        h = self.initial_down(x)
        skips = [h]
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[0](torch.cat([self._noise(x, noise, rng), self.bottleneck(h)], dim=1))
        for j, up in enumerate(self.ups[1:], start=1):
            h = up(torch.cat([h, skips[-j]], dim=1))
        return self.final_up(torch.cat([h, skips[0]], dim=1))


class PatchDiscriminator(nn.Module):
    """PatchGAN critic D(top, bottom) -> patch logits (REFERENCE §2.2; 8×8 for 128 px inputs).

    `padding=0` (the reference) needs inputs of at least 68 px; `build_cigm` switches to
    pix2pix's padding 1 below 128 px so the 64 px CPU config still gets a 6×6 patch.
    """

    def __init__(self, in_channels: int = 3, features: int = 64, *, padding: int = 0) -> None:
        super().__init__()
        f = features
        self.initial = nn.Sequential(
            nn.Conv2d(2 * in_channels, f, 4, 2, 1, padding_mode="reflect"), nn.LeakyReLU(0.2)
        )
        blocks: list[nn.Module] = []
        for cin, cout, stride in ((f, 2 * f, 2), (2 * f, 4 * f, 2), (4 * f, 8 * f, 1)):
            blocks += [
                nn.Conv2d(cin, cout, 4, stride, padding, bias=False),
                nn.BatchNorm2d(cout),
                nn.LeakyReLU(0.2),
            ]
        blocks.append(nn.Conv2d(8 * f, 1, 4, 1, padding))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.model(self.initial(torch.cat([x, y], dim=1)))


def init_pix2pix_weights(module: nn.Module) -> None:
    """pix2pix init over `module` and all its submodules (recursive: do not pass to `.apply`).

    Conv / transposed-conv weights ~ N(0, 0.02), their biases keep PyTorch's default (as in the
    reference); BatchNorm weight ~ N(1, 0.02), bias 0.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def build_cigm(
    features: int = 64,
    noise_dim: int = 1024,
    image_size: int = 128,
    *,
    init_discriminator: bool = True,
) -> tuple[Generator, PatchDiscriminator]:
    """Generator and discriminator for RGB images, pix2pix-initialised.

    The reference initialises only the generator; `init_discriminator=False` reproduces that.
    """
    if image_size < 32:
        raise ConfigError(
            f"image_size must be >= 32 for the PatchGAN discriminator (got {image_size})"
        )
    gen = Generator(3, features, noise_dim, image_size)
    disc = PatchDiscriminator(3, features, padding=0 if image_size >= 128 else 1)
    init_pix2pix_weights(gen)
    if init_discriminator:
        init_pix2pix_weights(disc)
    return gen, disc
