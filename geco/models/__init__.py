"""Models, one module each with its config, networks, losses and training stage: CIGM
(`cigm`), GECo (`geco`), the feature backbones (`backbone`) and the MGCM / Pix2PixCM networks
(`gancm`; trained by geco.baselines.gancm)."""

from geco.models.backbone import RESNET18_IMAGENET_FILE, ResNet18Features, resnet18_features
from geco.models.cigm import Generator, PatchDiscriminator, build_cigm, init_pix2pix_weights
from geco.models.geco import GECo, Retriever

__all__ = [
    "GECo",
    "Generator",
    "PatchDiscriminator",
    "RESNET18_IMAGENET_FILE",
    "ResNet18Features",
    "Retriever",
    "build_cigm",
    "init_pix2pix_weights",
    "resnet18_features",
]
