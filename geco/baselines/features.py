"""Frozen image feature extractors for BPR-DAE (REFERENCE §5.2).

- **AlexNet fc7** (the reference): torchvision's AlexNet `features` -> adaptive avgpool 6x6
  -> flatten (9216) -> `classifier` without its last Linear (Dropout, Linear 9216->4096, ReLU,
  Dropout, Linear 4096->4096, ReLU): the 4096-d post-ReLU fc7 feature. Weights are never
  downloaded: "imagenet" means torchvision's IMAGENET1K_V1 file already in the torch hub cache
  (`<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth`, honours $TORCH_HOME); a
  local state-dict path or an s3://bucket/key URI (fetched once into ~/.cache/geco/weights)
  works too.
- **backbone**: GECo's ResNet-18 (512-d) under `cfg.geco.backbone`'s weights policy.

`frozen_extractor(cfg)` picks one from `cfg.baselines.bpr_dae.features` ("auto": AlexNet when
its weights are available, else the backbone) and returns it in eval mode without gradients.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torchvision.models import alexnet

from geco.errors import ConfigError, WeightsError
from geco.models.backbone import (
    _fetch_s3,
    imagenet_weights_path,
    load_state_file,
    resnet18_features,
)

if TYPE_CHECKING:
    from geco.config import Config

log = logging.getLogger("geco")

ALEXNET_IMAGENET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 file name


class AlexNetFC7(nn.Module):
    """B×3×H×W (ImageNet-normalised) -> B×4096 post-ReLU fc7 features of torchvision's
    AlexNet. Attribute names match torchvision's, so its state dicts load strictly once the
    last classifier layer (`classifier.6.*`) is removed."""

    out_dim = 4096

    def __init__(self) -> None:
        super().__init__()
        net = alexnet(weights=None)  # random init; never downloads
        self.features, self.avgpool = net.features, net.avgpool
        # Dropout, Linear, ReLU, Dropout, Linear, ReLU: the last Linear (1000 classes) dropped.
        self.classifier = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def alexnet_weights_path() -> Path:
    """Where torchvision caches AlexNet's IMAGENET1K_V1 file (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_IMAGENET_FILE


def alexnet_available(weights: str) -> bool:
    """Whether `features: auto` would use AlexNet with these `alexnet_weights`: the ImageNet
    file is in the torch hub cache, or an explicit path / s3 URI is given (an explicit file
    that turns out to be missing is an error then, not a silent fallback)."""
    if weights == "imagenet":
        return alexnet_weights_path().is_file()
    return bool(weights)


def _load_alexnet_file(model: AlexNetFC7, path: Path, label: str) -> None:
    if not path.is_file():
        raise WeightsError(
            f"AlexNet weights file {label} not found; give a torchvision AlexNet state dict "
            "as baselines.bpr_dae.alexnet_weights (a local .pth path or an s3://bucket/key "
            "URI), or set baselines.bpr_dae.features=backbone"
        )
    load_state_file(model, path, label, arch="AlexNet", drop="classifier.6.")


def alexnet_fc7(weights: str = "imagenet") -> tuple[AlexNetFC7, str]:
    """(AlexNet fc7 extractor with `weights` loaded, a description of the weights).

    weights: "imagenet" (torchvision's cached file only, never downloaded), a local
    state-dict path, or "s3://bucket/key"."""
    model = AlexNetFC7()
    if weights == "imagenet":
        path = alexnet_weights_path()
        if not path.is_file():
            raise WeightsError(
                f"ImageNet AlexNet weights not found at {path}. Put torchvision's "
                f"{ALEXNET_IMAGENET_FILE} (IMAGENET1K_V1) there (or set $TORCH_HOME), give a "
                "local path or an s3://bucket/key URI as baselines.bpr_dae.alexnet_weights, "
                "or set baselines.bpr_dae.features=backbone (or auto) to use GECo's ResNet-18"
            )
        _load_alexnet_file(model, path, str(path))
        return model, "imagenet (torchvision IMAGENET1K_V1)"
    if weights.startswith("s3://"):
        _load_alexnet_file(model, _fetch_s3(weights), weights)
        return model, weights
    path = Path(weights).expanduser()
    _load_alexnet_file(model, path, str(path))
    return model, str(path)


def _backbone_weights_label(weights: str, allow_random_init: bool, seed: int) -> str:
    if weights == "imagenet" and not imagenet_weights_path().is_file() and allow_random_init:
        return f"imagenet requested, not in the torch cache: random init, seed {seed}"
    if weights == "random":
        return f"random init, seed {seed}"
    return weights


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def frozen_extractor(cfg: Config) -> tuple[nn.Module, int, str]:
    """(extractor, out_dim, description) for `cfg.baselines.bpr_dae.features`.

    The extractor is in eval mode with every parameter's requires_grad False; it maps
    ImageNet-normalised B×3×S×S images to B×out_dim features. The description names the
    network and its weights (and why "auto" chose it); it lands in the comparison JSON and in
    the BPR-DAE checkpoint config, so it holds no machine-specific paths except a
    user-given weights file."""
    b = cfg.baselines.bpr_dae
    if b.features not in ("auto", "alexnet", "backbone"):  # Config.validate rejects it too
        raise ConfigError(f"baselines.bpr_dae.features={b.features!r}: "
                          "expected auto, alexnet or backbone")
    choice, why = b.features, ""
    if choice == "auto":
        if alexnet_available(b.alexnet_weights):
            choice, why = "alexnet", "auto: AlexNet weights available"
        else:
            choice = "backbone"
            why = (f"auto fallback: AlexNet ImageNet weights {ALEXNET_IMAGENET_FILE} not in the "
                   "torch hub cache")
            log.info("bpr-dae: AlexNet ImageNet weights not found at %s; using GECo's "
                     "ResNet-18 backbone as the frozen feature extractor",
                     alexnet_weights_path())
    # A frozen extractor is not saved with the model: a randomly initialised one must be the
    # same network every time (training, resuming, evaluating), so it is drawn from its own
    # CPU generator seeded by baselines.bpr_dae.seed, leaving the global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(b.seed))
        if choice == "alexnet":
            model, label = alexnet_fc7(b.alexnet_weights)
            module: nn.Module = model
            out_dim, name = AlexNetFC7.out_dim, "alexnet fc7"
        elif choice == "backbone":
            bb = cfg.geco.backbone
            try:
                module = resnet18_features(bb.weights, allow_random_init=bb.allow_random_init)
            except WeightsError as e:
                if not why:
                    raise
                raise WeightsError(
                    f"bpr-dae features=auto: no AlexNet ImageNet weights at "
                    f"{alexnet_weights_path()}, and the fallback (GECo's backbone) has none "
                    f"either: {e}") from e
            out_dim, name = 512, "resnet18 backbone"
            label = _backbone_weights_label(bb.weights, bb.allow_random_init, int(b.seed))
    description = f"{name} ({out_dim}-d, weights {label})" + (f"; {why}" if why else "")
    log.info("bpr-dae: frozen features: %s", description)
    return _freeze(module), out_dim, description
