"""Frozen-or-trained image feature extractors and where their weights come from.

- ResNet-18 (512-d): GECo's backbone, shared by tops, templates and bottoms (docs/model.md §3.1);
  BPR-DAE's frozen features when AlexNet's weights are not available.
- AlexNet fc7 (4096-d): BPR-DAE's frozen features, as in the paper (docs/model.md §5.2).

Weights never come from the network implicitly: ImageNet weights are used only when
torchvision's file is already in the torch hub cache (`<torch.hub.get_dir()>/checkpoints/`,
honours $TORCH_HOME); otherwise a local state-dict path or an s3://bucket/key URI (fetched once
into ~/.cache/geco/weights) must be given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import alexnet, resnet18

from geco.errors import WeightsError

log = logging.getLogger(__name__)

RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file name
ALEXNET_IMAGENET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's IMAGENET1K_V1 file name


@dataclass
class BackboneConfig:
    # "imagenet" (torchvision cache), a local .pth path, an s3:// URI, or "random".
    weights: str = "imagenet"
    allow_random_init: bool = False

    def validate(self, key: str) -> None:
        pass  # any string names weights; resnet18_features checks them when it loads them


class ResNet18Features(nn.Module):
    """torchvision ResNet-18 up to global average pooling; `fc` is dropped, not merely unused.

    Attribute names match torchvision's, so its state dicts load strictly once `fc.*` is removed.
    """

    out_dim = 512

    def __init__(self) -> None:
        super().__init__()
        net = resnet18(weights=None)  # random init; never downloads
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.avgpool = net.avgpool

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


class AlexNetFC7(nn.Module):
    """B×3×H×W (ImageNet-normalised) -> B×4096 post-ReLU fc7 features of torchvision's
    AlexNet: `features` -> adaptive avgpool 6x6 -> flatten (9216) -> `classifier` without its
    last Linear. Attribute names match torchvision's, so its state dicts load strictly once
    the last classifier layer (`classifier.6.*`) is removed."""

    out_dim = 4096

    def __init__(self) -> None:
        super().__init__()
        net = alexnet(weights=None)  # random init; never downloads
        self.features, self.avgpool = net.features, net.avgpool
        # Dropout, Linear, ReLU, Dropout, Linear, ReLU: the last Linear (1000 classes) dropped.
        self.classifier = nn.Sequential(*list(net.classifier.children())[:-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def imagenet_weights_path(file: str = RESNET18_IMAGENET_FILE) -> Path:
    """Where torchvision caches an IMAGENET1K_V1 file (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "geco" / "weights"


def fetch_s3(uri: str) -> Path:
    """Download s3://bucket/key once into the cache; endpoint/credentials come from boto3's env."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise WeightsError(f"malformed S3 weights URI {uri!r}: expected s3://bucket/key")
    dest = _cache_root() / bucket / key
    if dest.is_file():
        return dest
    try:
        import boto3  # lazy: only S3 users need it
    except ImportError as e:
        raise WeightsError(
            f"boto3 is required to fetch weights from {uri} (pip install 'geco[orchestration]')"
        ) from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        boto3.client("s3").download_file(bucket, key, str(tmp))
        tmp.replace(dest)  # atomic: a crashed download never leaves a half file in the cache
    except Exception as e:  # botocore errors carry no secrets, only codes and messages
        tmp.unlink(missing_ok=True)
        raise WeightsError(
            f"could not download backbone weights {uri}: {type(e).__name__}: {e}"
        ) from e
    return dest


def _load_file(model: ResNet18Features, path: Path, label: str) -> None:
    if not path.is_file():
        raise WeightsError(
            f"backbone weights file {label} not found; give 'imagenet', 'random' (with "
            "allow_random_init), a local .pth/.pt path or an s3://bucket/key URI"
        )
    load_state_file(model, path, label, arch="ResNet-18", drop="fc.")


def load_state_file(model: nn.Module, path: Path, label: str, *, arch: str, drop: str) -> None:
    """Load a torchvision `arch` state dict from `path` into `model` strictly, after removing
    a DDP `module.` prefix and the keys starting with `drop` (the classifier layer the feature
    extractor leaves out); any mismatch is a WeightsError naming `label`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"could not read {arch} weights {label}: {e}") from e
    if not isinstance(state, Mapping):
        raise WeightsError(f"{label} is not a {arch} state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(drop)}
    try:
        res = model.load_state_dict(state, strict=False)  # strictness checked below, briefly
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"{label} does not match torchvision's {arch}: {str(e)[:500]}") from e
    if res.missing_keys or res.unexpected_keys:
        raise WeightsError(
            f"{label} does not match torchvision's {arch}: "
            f"{len(res.missing_keys)} missing keys {res.missing_keys[:5]}, "
            f"{len(res.unexpected_keys)} unexpected keys {res.unexpected_keys[:5]}"
        )


def resnet18_features(weights: str = "imagenet", *, allow_random_init: bool = False) -> nn.Module:
    """B×3×H×W -> B×512 ResNet-18 features.

    weights: "imagenet" (torchvision's cached file only), "random", a local state-dict path, or
    "s3://bucket/key" (downloaded to ~/.cache/geco/weights/<bucket>/<key>).
    """
    model = ResNet18Features()
    if weights == "random":
        if not allow_random_init:
            raise WeightsError(
                "backbone weights 'random' requested but allow_random_init is false; "
                "set allow_random_init: true in the config to train from scratch"
            )
        return model
    if weights == "imagenet":
        path = imagenet_weights_path()
        if path.is_file():
            _load_file(model, path, str(path))
        elif allow_random_init:
            log.warning("ImageNet ResNet-18 weights not found at %s; using random init", path)
        else:
            raise WeightsError(
                f"ImageNet ResNet-18 weights not found at {path}. Put torchvision's "
                f"{RESNET18_IMAGENET_FILE} there (or set $TORCH_HOME), give a local path or an "
                "s3://bucket/key URI as the backbone weights, or set allow_random_init: true "
                "in the config to train from random init"
            )
        return model
    if weights.startswith("s3://"):
        _load_file(model, fetch_s3(weights), weights)
        return model
    path = Path(weights).expanduser()
    _load_file(model, path, str(path))
    return model


def alexnet_fc7(weights: str = "imagenet") -> tuple[AlexNetFC7, str]:
    """(AlexNet fc7 extractor with `weights` loaded, a description of the weights).

    weights: "imagenet" (torchvision's cached file only, never downloaded), a local
    state-dict path, or "s3://bucket/key"."""
    model = AlexNetFC7()
    if weights == "imagenet":
        path = imagenet_weights_path(ALEXNET_IMAGENET_FILE)
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
        _load_alexnet_file(model, fetch_s3(weights), weights)
        return model, weights
    path = Path(weights).expanduser()
    _load_alexnet_file(model, path, str(path))
    return model, str(path)


def _load_alexnet_file(model: AlexNetFC7, path: Path, label: str) -> None:
    if not path.is_file():
        raise WeightsError(
            f"AlexNet weights file {label} not found; give a torchvision AlexNet state dict "
            "as baselines.bpr_dae.alexnet_weights (a local .pth path or an s3://bucket/key "
            "URI), or set baselines.bpr_dae.features=backbone"
        )
    load_state_file(model, path, label, arch="AlexNet", drop="classifier.6.")
