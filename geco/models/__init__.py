"""Models: CIGM generator/discriminator, ResNet-18 feature backbone, GECo retriever."""

from geco.models.backbone import RESNET18_IMAGENET_FILE, ResNet18Features, resnet18_features
from geco.models.cigm import Generator, PatchDiscriminator, build_cigm, init_pix2pix_weights
from geco.models.geco import GECo

__all__ = [
    "GECo",
    "Generator",
    "PatchDiscriminator",
    "RESNET18_IMAGENET_FILE",
    "ResNet18Features",
    "build_cigm",
    "init_pix2pix_weights",
    "resnet18_features",
]
