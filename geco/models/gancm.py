"""The networks of the MGCM (docs/model.md §5.3) and Pix2PixCM (§5.4) baselines, at 64 px.

Everything is parameterised by the first conv width f (the reference: f = 64), so the
filters are f, 2f, 4f, 8f, 8f, 8f. Inputs are 3×64×64 in [-1, 1].

- `MGCMGenerator` (no skips): encoder to `enc` (8f×2×2, the top embedding), a final encoder
  block to 8f×1×1, decoder whose first block outputs `d1` (8f×2×2, the template embedding).
  forward -> (enc, d1, image).
- `GeneratorSkip` (Pix2PixCM's U-Net): encoder e1..e6 (e5 = 8f×2×2 is the top embedding),
  decoder with skips; forward -> (e5, d1, image).
- `GlobalDiscriminator` (MGCM): D(top, bottom) -> (sigmoid, logit) of one value per pair.
- `PatchDiscriminator` (Pix2PixCM): D(top, bottom) -> (sigmoid, logit), a 4×4 patch each.
- `PantsEncoder`: E(bottom) -> 8f×2×2.
- `BPRNet`: global mean of a 2×2 map, then Linear(8f -> emb_dim) per side, sigmoid.

Encoder blocks of the generators are LeakyReLU(0.01) -> BatchNorm -> Conv (BN on the block's
input); the pants encoder's are LeakyReLU(0.01) -> Conv -> BN; decoder blocks are ReLU ->
ConvTranspose -> Dropout(0.5) -> BN. All convs are k4 s2 p1 unless stated; weights keep
PyTorch's default init except BPRNet's (Xavier-uniform, zero bias), as in the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from geco.errors import ConfigError

IMAGE_SIZE = 64


def _check_features(features: int) -> int:
    if features < 1:
        raise ConfigError(f"features={features}: must be >= 1")
    return features


def _check_input(x: Tensor, channels: int, who: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{who} expects B×{channels}×{IMAGE_SIZE}×{IMAGE_SIZE} input, got "
                         f"{tuple(x.shape)}")


def _enc_block(cin: int, cout: int) -> nn.Sequential:
    """Generator encoder block: LeakyReLU(0.01) -> BN(cin) -> Conv k4 s2 p1 (halves H, W)."""
    return nn.Sequential(nn.LeakyReLU(0.01), nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 4, 2, 1))


def _dec_block(cin: int, cout: int) -> nn.Sequential:
    """Decoder block: ReLU -> ConvTranspose k4 s2 p1 (doubles H, W) -> Dropout(0.5) -> BN."""
    return nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.Dropout(0.5),
                         nn.BatchNorm2d(cout))


def _out_block(cin: int) -> nn.Sequential:
    """ReLU -> ConvTranspose cin -> 3 (32 -> 64 px) -> Tanh."""
    return nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin, 3, 4, 2, 1), nn.Tanh())


class MGCMGenerator(nn.Module):
    """MGCM's encoder-decoder generator (no skips). forward(top) -> (enc, d1, image):
    enc 8f×2×2 (top embedding), d1 8f×2×2 (template embedding), image 3×64×64 in [-1, 1]."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        f = _check_features(features)
        self.features = f
        self.enc0 = nn.Conv2d(3, f, 4, 2, 1)  # 64 -> 32
        self.encoder = nn.Sequential(
            _enc_block(f, 2 * f),  # 16
            _enc_block(2 * f, 4 * f),  # 8
            _enc_block(4 * f, 8 * f),  # 4
            _enc_block(8 * f, 8 * f),  # 2: enc
        )
        self.final_enc = _enc_block(8 * f, 8 * f)  # 1
        self.m = _dec_block(8 * f, 8 * f)  # 2: d1
        self.decoder = nn.Sequential(
            _dec_block(8 * f, 8 * f),  # 4
            _dec_block(8 * f, 4 * f),  # 8
            _dec_block(4 * f, 2 * f),  # 16
            _dec_block(2 * f, f),  # 32
        )
        self.out = _out_block(f)  # 64

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_input(x, 3, type(self).__name__)
        enc = self.encoder(self.enc0(x))
        d1 = self.m(self.final_enc(enc))
        return enc, d1, self.out(self.decoder(d1))


class GeneratorSkip(nn.Module):
    """Pix2PixCM's U-Net generator. forward(top) -> (e5, d1, image): e5 8f×2×2 (top
    embedding), d1 8f×2×2 (template embedding), image 3×64×64 in [-1, 1]."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        f = _check_features(features)
        self.features = f
        self.e1 = nn.Conv2d(3, f, 4, 2, 1)  # 32
        self.e2 = _enc_block(f, 2 * f)  # 16
        self.e3 = _enc_block(2 * f, 4 * f)  # 8
        self.e4 = _enc_block(4 * f, 8 * f)  # 4
        self.e5 = _enc_block(8 * f, 8 * f)  # 2
        self.e6 = _enc_block(8 * f, 8 * f)  # 1
        self.d1 = _dec_block(8 * f, 8 * f)  # 2
        self.d2 = _dec_block(16 * f, 8 * f)  # cat(d1, e5) -> 4
        self.d3 = _dec_block(16 * f, 4 * f)  # cat(d2, e4) -> 8
        self.d4 = _dec_block(8 * f, 2 * f)  # cat(d3, e3) -> 16
        self.d5 = _dec_block(4 * f, f)  # cat(d4, e2) -> 32
        self.out = _out_block(2 * f)  # cat(d5, e1) -> 64

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        _check_input(x, 3, type(self).__name__)
        e1 = self.e1(x)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        e4 = self.e4(e3)
        e5 = self.e5(e4)
        d1 = self.d1(self.e6(e5))
        h = self.d2(torch.cat([d1, e5], 1))
        h = self.d3(torch.cat([h, e4], 1))
        h = self.d4(torch.cat([h, e3], 1))
        h = self.d5(torch.cat([h, e2], 1))
        return e5, d1, self.out(torch.cat([h, e1], 1))


class GlobalDiscriminator(nn.Module):
    """MGCM's discriminator on cat(top, bottom): Conv 6 -> f + LeakyReLU(0.01), three
    Conv -> BN -> LeakyReLU(0.01) blocks (2f, 4f, 8f; 64 -> 4 px), Linear(8f·16 -> 1).
    forward(top, bottom) -> (sigmoid [B, 1], logit [B, 1])."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        f = _check_features(features)
        layers: list[nn.Module] = [nn.Conv2d(6, f, 4, 2, 1), nn.LeakyReLU(0.01)]
        for cin, cout in ((f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f)):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.01)]
        self.features_net = nn.Sequential(*layers)
        self.fc = nn.Linear(8 * f * 4 * 4, 1)

    def forward(self, top: Tensor, bottom: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(top, 3, type(self).__name__)
        logit = self.fc(self.features_net(torch.cat([top, bottom], 1)).flatten(1))
        return torch.sigmoid(logit), logit


class PatchDiscriminator(nn.Module):
    """Pix2PixCM's PatchGAN on cat(top, bottom): Conv 6 -> f (reflect) + LeakyReLU(0.2), three
    Conv (reflect, no bias) -> BN -> LeakyReLU(0.2) blocks (2f, 4f, 8f; 64 -> 4 px), Conv 1×1
    8f -> 1. forward(top, bottom) -> (sigmoid [B, 1, 4, 4], logit [B, 1, 4, 4])."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        f = _check_features(features)
        layers: list[nn.Module] = [nn.Conv2d(6, f, 4, 2, 1, padding_mode="reflect"),
                                   nn.LeakyReLU(0.2)]
        for cin, cout in ((f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f)):
            layers += [nn.Conv2d(cin, cout, 4, 2, 1, bias=False, padding_mode="reflect"),
                       nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(8 * f, 1, 1))
        self.model = nn.Sequential(*layers)

    def forward(self, top: Tensor, bottom: Tensor) -> tuple[Tensor, Tensor]:
        _check_input(top, 3, type(self).__name__)
        logit = self.model(torch.cat([top, bottom], 1))
        return torch.sigmoid(logit), logit


class PantsEncoder(nn.Module):
    """E(bottom) -> 8f×2×2: Conv 3 -> f, then four LeakyReLU(0.01) -> Conv -> BN blocks
    (2f, 4f, 8f, 8f)."""

    def __init__(self, features: int = 64) -> None:
        super().__init__()
        f = _check_features(features)
        layers: list[nn.Module] = [nn.Conv2d(3, f, 4, 2, 1)]
        for cin, cout in ((f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f), (8 * f, 8 * f)):
            layers += [nn.LeakyReLU(0.01), nn.Conv2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, 3, type(self).__name__)
        return self.model(x)


class BPRNet(nn.Module):
    """Projections of the 8f×2×2 maps: global mean -> Linear(8f -> emb_dim) -> sigmoid, one
    Linear for tops (`top`) and one for bottoms (`bottom`); Xavier-uniform weights, zero bias."""

    def __init__(self, features: int = 64, emb_dim: int = 128) -> None:
        super().__init__()
        f = _check_features(features)
        if emb_dim < 1:
            raise ConfigError(f"emb_dim={emb_dim}: must be >= 1")
        self.top_fc = nn.Linear(8 * f, emb_dim)
        self.bottom_fc = nn.Linear(8 * f, emb_dim)
        for fc in (self.top_fc, self.bottom_fc):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    @staticmethod
    def _pool(x: Tensor) -> Tensor:
        # The reference's AvgPool(k2, s1) on a 2×2 map: the global mean.
        return x.mean(dim=(-2, -1)) if x.dim() == 4 else x

    def top(self, enc: Tensor) -> Tensor:
        return torch.sigmoid(self.top_fc(self._pool(enc)))

    def bottom(self, enc: Tensor) -> Tensor:
        return torch.sigmoid(self.bottom_fc(self._pool(enc)))

    def forward(self, top_enc: Tensor, bottom_enc: Tensor) -> tuple[Tensor, Tensor]:
        return self.top(top_enc), self.bottom(bottom_enc)


def compat_score(s_t: Tensor, s_b: Tensor, d1: Tensor, e_b: Tensor, *, alpha: float,
                 beta: float, faithful: bool) -> Tensor:
    """m = α·⟨s_t, s_b⟩ + sign·β·Σ|d1 − E(b)|, sign = +1 when `faithful` (the reference,
    docs/model.md §7 item 12: a farther template scores higher), else −1 (closer = more compatible).

    s_t/s_b [..., emb_dim]; d1/e_b [..., C, H, W] or already flattened [..., D]; leading dims
    broadcast. Returns [...]."""
    if d1.dim() > s_t.dim():
        d1 = d1.flatten(-3)
    if e_b.dim() > s_b.dim():
        e_b = e_b.flatten(-3)
    sign = 1.0 if faithful else -1.0
    return alpha * (s_t * s_b).sum(-1) + sign * beta * (d1 - e_b).abs().sum(-1)


GENERATORS: dict[str, type[nn.Module]] = {"mgcm": MGCMGenerator, "pix2pixcm": GeneratorSkip}
DISCRIMINATORS: dict[str, type[nn.Module]] = {"mgcm": GlobalDiscriminator,
                                              "pix2pixcm": PatchDiscriminator}


def build_gancm(kind: str, features: int = 64,
                emb_dim: int = 128) -> tuple[nn.Module, nn.Module, PantsEncoder, BPRNet]:
    """(generator, discriminator, pants encoder, BPRNet) of `kind` ("mgcm" or "pix2pixcm")."""
    if kind not in GENERATORS:
        raise ConfigError(f"unknown GAN baseline {kind!r}: expected one of {sorted(GENERATORS)}")
    return (GENERATORS[kind](features), DISCRIMINATORS[kind](features), PantsEncoder(features),
            BPRNet(features, emb_dim))
