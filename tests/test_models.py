"""Models: exact reference parameter counts, shapes, noise handling, weights policy, gradients."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from geco.errors import ConfigError, WeightsError
from geco.models import (
    RESNET18_IMAGENET_FILE,
    GECo,
    Generator,
    PatchDiscriminator,
    build_cigm,
    init_pix2pix_weights,
    resnet18_features,
)
from geco.models import backbone as backbone_mod
from geco.models.geco import geco_loss

RESNET18_NO_FC = 11_176_512


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- CIGM


def test_reference_param_counts_without_allocating() -> None:
    with torch.device("meta"):  # counts only; no 200 MB allocation, no init cost
        assert n_params(Generator(features=64, image_size=128)) == 50_218_179
        assert n_params(PatchDiscriminator(features=64)) == 2_768_705


@pytest.mark.parametrize(("size", "n_downs"), [(32, 3), (64, 4), (128, 5), (256, 6)])
def test_generator_depth_and_shapes(size: int, n_downs: int) -> None:
    g = Generator(features=4, noise_dim=8, image_size=size)
    assert len(g.downs) == n_downs and len(g.ups) == n_downs + 1
    out = g(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3, size, size)


@pytest.mark.parametrize(("size", "patch"), [(64, 6), (128, 8)])
def test_build_cigm_shapes(size: int, patch: int) -> None:
    g, d = build_cigm(features=8, noise_dim=16, image_size=size)
    x, y = torch.randn(2, 3, size, size), torch.randn(2, 3, size, size)
    fake = g(x)
    assert fake.shape == x.shape
    assert d(x, fake).shape == (2, 1, patch, patch)
    assert d(x, y).shape == (2, 1, patch, patch)


def test_generator_has_no_unused_parameters() -> None:
    g = Generator(features=4, noise_dim=8, image_size=64)
    g(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in g.parameters())


def test_generator_noise_semantics() -> None:
    torch.manual_seed(0)
    g = Generator(features=8, noise_dim=16, image_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    z1, z2 = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        a = g(x, z1)
        assert torch.equal(a, g(x, z1.view(3, 16, 1, 1)))
        assert not torch.allclose(a, g(x, z2))
        assert a.abs().max() <= 1.0
        state = torch.get_rng_state()
        r1 = g(x, rng=torch.Generator().manual_seed(7))
        r2 = g(x, rng=torch.Generator().manual_seed(7))
        assert torch.equal(torch.get_rng_state(), state)  # a seeded rng leaves the global one alone
        assert torch.equal(r1, r2)
        assert not torch.equal(g(x), g(x))  # fresh global draw each call


def test_generator_rejects_bad_inputs() -> None:
    g = Generator(features=4, noise_dim=8, image_size=32)
    with pytest.raises(ValueError, match="noise must have shape"):
        g(torch.randn(2, 3, 32, 32), torch.randn(2, 9))
    with pytest.raises(ValueError, match="B×3×32×32"):
        g(torch.randn(2, 3, 64, 64))
    with pytest.raises(ConfigError, match="power of two"):
        Generator(image_size=100)
    with pytest.raises(ConfigError, match="image_size"):
        build_cigm(features=4, noise_dim=8, image_size=16)


def test_pix2pix_init_and_faithful_discriminator() -> None:
    torch.manual_seed(0)
    g, d = build_cigm(features=8, noise_dim=16, image_size=64)
    bn = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(not torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bn)
    assert abs(g.downs[-1][0].weight.std().item() - 0.02) < 0.002
    assert abs(d.model[-1].weight.std().item() - 0.02) < 0.005

    _, d_ref = build_cigm(features=8, noise_dim=16, image_size=64, init_discriminator=False)
    d_bn = [m for m in d_ref.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in d_bn)  # PyTorch default

    conv = nn.Conv2d(3, 4, 3)
    bias = conv.bias.detach().clone()
    init_pix2pix_weights(conv)
    assert torch.equal(conv.bias, bias)  # biases keep PyTorch's default, as in the reference


# ---------------------------------------------------------------- backbone


def _save_torchvision_state(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    state = resnet18(weights=None).state_dict()  # includes fc.*
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return state


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert not any(k.startswith("fc.") for k in own)
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(v, state[k]) for k, v in own.items())


def test_backbone_has_no_fc_and_outputs_512() -> None:
    m = resnet18_features("random", allow_random_init=True)
    assert n_params(m) == RESNET18_NO_FC
    assert not any(k.startswith("fc.") for k in m.state_dict())
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_backbone_loads_local_state_dict(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "r18.pth"
    state = _save_torchvision_state(path, prefix)
    _assert_loaded(resnet18_features(str(path)), state)


def test_backbone_local_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="nope.pth"):
        resnet18_features(str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        resnet18_features(str(garbage))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match="missing keys"):
        resnet18_features(str(wrong))
    with pytest.raises(WeightsError, match="allow_random_init"):
        resnet18_features("random")


def test_backbone_imagenet_from_hub_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsError) as err:
        resnet18_features("imagenet")
    msg = str(err.value)
    assert RESNET18_IMAGENET_FILE in msg and "s3://" in msg and "allow_random_init" in msg
    with caplog.at_level(logging.WARNING):
        resnet18_features("imagenet", allow_random_init=True)
    assert "random init" in caplog.text

    (tmp_path / "checkpoints").mkdir()
    state = _save_torchvision_state(tmp_path / "checkpoints" / RESNET18_IMAGENET_FILE)
    _assert_loaded(resnet18_features("imagenet"), state)


def test_backbone_s3_downloads_once_to_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.pth"
    state = _save_torchvision_state(src)
    calls: list[tuple[str, str]] = []

    class FakeClient:
        def download_file(self, bucket: str, key: str, filename: str) -> None:
            calls.append((bucket, key))
            if key.startswith("missing"):
                Path(filename).write_bytes(b"partial")
                raise RuntimeError("An error occurred (404) when calling HeadObject")
            Path(filename).write_bytes(src.read_bytes())

    fake = types.SimpleNamespace(client=lambda service: FakeClient())
    monkeypatch.setitem(sys.modules, "boto3", fake)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    for _ in range(2):
        _assert_loaded(resnet18_features("s3://bkt/w/r18.pth"), state)
    assert calls == [("bkt", "w/r18.pth")]
    assert (tmp_path / "cache/geco/weights/bkt/w/r18.pth").is_file()

    with pytest.raises(WeightsError, match="s3://bkt/missing.pth"):
        resnet18_features("s3://bkt/missing.pth")
    assert list((tmp_path / "cache/geco/weights/bkt").glob("missing*")) == []
    with pytest.raises(WeightsError, match="malformed"):
        resnet18_features("s3://bkt")
    assert backbone_mod.RESNET18_IMAGENET_FILE == RESNET18_IMAGENET_FILE


# ---------------------------------------------------------------- GECo


@pytest.fixture(scope="module")
def geco_model() -> GECo:
    torch.manual_seed(0)
    return GECo(resnet18_features("random", allow_random_init=True))


def test_geco_param_count_and_init(geco_model: GECo) -> None:
    assert n_params(geco_model) == RESNET18_NO_FC + 131_200 + 65_664
    for lin in (geco_model.query_proj, geco_model.bottom_proj):
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
        assert lin.weight.abs().max() <= bound


def test_geco_every_parameter_gets_a_gradient(geco_model: GECo) -> None:
    geco_model.train().zero_grad()
    tops, temps, bottoms = (torch.randn(4, 3, 32, 32) for _ in range(3))
    q, p = geco_model(tops, temps, bottoms)
    assert q.shape == p.shape == (4, 128)
    loss, _ = geco_loss(q, p, geco_model.parameters(), alpha=1.0, beta=1.0, gamma=1e-3, tau=0.1)
    loss.backward()
    missing = [n for n, t in geco_model.named_parameters() if t.grad is None]
    assert missing == []


def test_geco_forward_matches_parts_and_calls_backbone_separately(geco_model: GECo) -> None:
    torch.manual_seed(1)
    tops, temps, bottoms = (torch.randn(4, 3, 32, 32) for _ in range(3))
    geco_model.eval()
    with torch.no_grad():
        q, p = geco_model(tops, temps, bottoms)
        assert torch.allclose(q, geco_model.query(tops, temps))
        assert torch.allclose(p, geco_model.embed_bottoms(bottoms))
        s = GECo.score(q, p)
        assert s.shape == (4,) and torch.allclose(s, torch.einsum("bd,bd->b", q, p))

    geco_model.train()  # BN batch stats: separate calls differ from one joint batch
    with torch.no_grad():
        f = geco_model.features
        separate = geco_model.query_proj(torch.cat([f(tops), f(temps)], 1))
        joint = f(torch.cat([tops, temps]))
        joint_q = geco_model.query_proj(torch.cat([joint[:4], joint[4:]], 1))
        q = geco_model.query(tops, temps)
    assert torch.allclose(q, separate, atol=1e-5)
    assert not torch.allclose(q, joint_q, atol=1e-3)


def test_template_norm_exclude_keeps_templates_out_of_running_stats() -> None:
    """geco.template_norm: "reference" and "exclude" normalise templates with their own batch
    statistics in training (same query); "exclude" and "running" leave the running statistics
    to the real photos; "running" normalises templates with them."""
    torch.manual_seed(2)
    tops, temps = torch.randn(4, 3, 32, 32), torch.rand(4, 3, 32, 32) + 1
    models = {}
    for mode in ("reference", "exclude", "running"):
        torch.manual_seed(0)
        models[mode] = GECo(resnet18_features("random", allow_random_init=True),
                            template_norm=mode).train()
    torch.manual_seed(0)
    tops_only = GECo(resnet18_features("random", allow_random_init=True)).train()
    with torch.no_grad():
        q = {mode: m.query(tops, temps) for mode, m in models.items()}
        tops_only.features(tops)  # the running statistics of the tops alone
    assert torch.allclose(q["reference"], q["exclude"])
    assert not torch.allclose(q["reference"], q["running"], atol=1e-3)

    def stats(m: GECo) -> list[torch.Tensor]:
        return [b for n, b in m.backbone.named_buffers() if "running" in n]

    for mode in ("exclude", "running"):
        assert all(torch.equal(a, b) for a, b in zip(stats(models[mode]), stats(tops_only),
                                                     strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(stats(models["reference"]),
                                                     stats(tops_only), strict=True))
    for m in models.values():  # restored
        assert all(bn.momentum == 0.1 and bn.training for bn in m.backbone.modules()
                   if isinstance(bn, torch.nn.BatchNorm2d))
