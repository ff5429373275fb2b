"""Transforms: value ranges, the ImageNet <-> [-1,1] conversions and the faithful switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from geco.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize_gan,
    denormalize_imagenet,
    gan_to_imagenet,
    gan_transform,
    imagenet_to_gan,
    imagenet_transform,
)


@pytest.fixture(scope="module")
def img() -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0)
    arr[1, 1] = (255, 255, 255)
    return Image.fromarray(arr)


def test_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_shapes_and_ranges(img):
    g = gan_transform(48)(img)
    assert g.shape == (3, 48, 48) and g.dtype == torch.float32  # squashed, not cropped
    assert g.min() >= -1.0 and g.max() <= 1.0 and g.min() < -0.5 and g.max() > 0.5
    x = imagenet_transform(48)(img)
    assert x.shape == (3, 48, 48)
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert (x.amin(dim=(1, 2)) >= lo - 1e-5).all() and (x.amax(dim=(1, 2)) <= hi + 1e-5).all()


def test_same_resize_both_spaces(img):
    # GECo's input mapped to the generator space equals the CIGM pipeline's own tensor.
    x = imagenet_transform(64)(img).unsqueeze(0)
    torch.testing.assert_close(imagenet_to_gan(x), gan_transform(64)(img).unsqueeze(0))
    torch.testing.assert_close(
        denormalize_imagenet(x), denormalize_gan(gan_transform(64)(img))[None]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trips(dtype):
    g = torch.rand(4, 3, 8, 8, dtype=dtype) * 2 - 1
    x = gan_to_imagenet(g)
    assert x.dtype == dtype and x.shape == g.shape
    torch.testing.assert_close(imagenet_to_gan(x), g)
    torch.testing.assert_close(gan_to_imagenet(imagenet_to_gan(x)), x)
    # A single image (3xHxW) broadcasts the same way.
    torch.testing.assert_close(gan_to_imagenet(g[0]), x[0])


def test_known_values():
    white = torch.ones(1, 3, 2, 2)  # [-1,1] space: white
    x = gan_to_imagenet(white)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    torch.testing.assert_close(denormalize_imagenet(x), torch.ones_like(x))
    torch.testing.assert_close(denormalize_gan(-white), torch.zeros_like(white))
    assert denormalize_gan(torch.full((3, 1, 1), 5.0)).max() == 1.0  # clamped for image saving


def test_faithful_is_identity():
    x = torch.randn(2, 3, 4, 4)
    assert imagenet_to_gan(x, faithful=True) is x
    assert gan_to_imagenet(x, faithful=True) is x
    assert not torch.allclose(imagenet_to_gan(x), x)


def test_rejects_wrong_channels():
    with pytest.raises(ValueError, match="3xHxW"):
        gan_to_imagenet(torch.zeros(2, 1, 4, 4))
