"""BPR-DAE (docs/model.md §5.2): the loss by hand, the tied autoencoder, the frozen extractors
(AlexNet fc7, the backbone fallback), learning on the small synthetic set, and resuming."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torchvision.models import alexnet

from geco.baselines import evaluate_scorer
from geco.baselines.base import rolled_negatives
from geco.baselines.bprdae import TiedAutoencoder, bprdae_loss, frozen_extractor, init_bound
from geco.config import load_config
from geco.data.source import open_data
from geco.errors import ConfigError, WeightsError
from geco.models.backbone import ALEXNET_IMAGENET_FILE
from geco.train.loop import fit, make_stage
from geco.train.runtime import init_runtime

# --------------------------------------------------------------------------- loss by hand


def _hs(v: float) -> float:
    return min(max(v / 6 + 0.5, 0.0), 1.0)


def _enc(ae: TiedAutoencoder, x: list[float]) -> list[float]:
    w, b = ae.weight.tolist(), ae.enc_bias.tolist()
    return [_hs(sum(x[i] * w[i][j] for i in range(len(x))) + b[j]) for j in range(len(b))]


def _dec(ae: TiedAutoencoder, h: list[float]) -> list[float]:
    w, b = ae.weight.tolist(), ae.dec_bias.tolist()
    return [_hs(sum(h[j] * w[i][j] for j in range(len(h))) + b[i]) for i in range(len(b))]


def _mse(x: list[float], ae: TiedAutoencoder) -> float:
    r = _dec(ae, _enc(ae, x))
    return sum((a - b) ** 2 for a, b in zip(r, x, strict=True)) / len(x)


def _hand_loss(top, bottom, xt, xp, k, mu, lam, term):
    """Loop over the B·K explicit triplets (top i, positive i, negative = positive i-j)."""
    b = len(xt)
    rec_t = rec_p = rec_n = bpr = 0.0
    for i in range(b):
        for j in range(1, k + 1):
            xn = xp[(i - j) % b]
            ht, hp, hn = _enc(top, xt[i]), _enc(bottom, xp[i]), _enc(bottom, xn)
            d = sum(u * v for u, v in zip(ht, hp, strict=True)) - sum(
                u * v for u, v in zip(ht, hn, strict=True))
            bpr += -_hs(d) if term == "hardsigmoid" else math.log1p(math.exp(-d))
            rec_t += _mse(xt[i], top)
            rec_p += _mse(xp[i], bottom)
            rec_n += _mse(xn, bottom)
    n = b * k
    rec = (rec_t + rec_p + rec_n) / n

    def msq(t: torch.Tensor) -> float:
        vals = t.flatten().tolist()
        return sum(v * v for v in vals) / len(vals)

    reg = sum(msq(p) for ae in (top, bottom) for p in (ae.weight, ae.enc_bias, ae.dec_bias))
    return mu * rec + lam * reg + bpr / n, bpr / n, rec, reg


def _small_aes(seed: int = 0) -> tuple[TiedAutoencoder, TiedAutoencoder]:
    g = torch.Generator().manual_seed(seed)
    top = TiedAutoencoder(5, 3, generator=g).double()
    bottom = TiedAutoencoder(5, 3, generator=g).double()
    with torch.no_grad():  # non-zero biases, so every term of the loss is exercised
        for ae in (top, bottom):
            ae.enc_bias.uniform_(-0.5, 0.5, generator=g)
            ae.dec_bias.uniform_(-0.5, 0.5, generator=g)
    return top, bottom


@pytest.mark.parametrize("term", ["hardsigmoid", "logsigmoid"])
def test_loss_matches_a_hand_computation(term):
    top, bottom = _small_aes()
    g = torch.Generator().manual_seed(1)
    xt = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    xp = torch.rand(4, 5, generator=g, dtype=torch.float64) * 2
    mu, lam, k = 0.3, 0.2, 2
    want = _hand_loss(top, bottom, xt.tolist(), xp.tolist(), k, mu, lam, term)
    explicit = bprdae_loss(top, bottom, xt, xp, rolled_negatives(xp, k), mu=mu, lam=lam,
                           bpr_term=term)
    rolled = bprdae_loss(top, bottom, xt, xp, k, mu=mu, lam=lam, bpr_term=term)
    for parts in (explicit, rolled):
        got = [parts[key].item() for key in ("loss", "bpr", "rec", "reg")]
        assert got == pytest.approx(list(want), rel=1e-10, abs=1e-12)
        assert parts["loss"].requires_grad and not parts["bpr"].requires_grad
    # The rolled fast path also gives the same gradients as the explicit triplets.
    grads = []
    for x_n in (rolled_negatives(xp, k), k):
        top.zero_grad()
        bottom.zero_grad()
        bprdae_loss(top, bottom, xt, xp, x_n, mu=mu, lam=lam, bpr_term=term)["loss"].backward()
        grads.append([p.grad.clone() for p in (*top.parameters(), *bottom.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_the_hardsigmoid_term_is_the_reference_one():
    top, bottom = _small_aes()
    x = torch.rand(4, 5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="bpr_term"):
        bprdae_loss(top, bottom, x, x, 1, mu=0.0, lam=0.0, bpr_term="sigmoid")
    # The same bottom as positive and negative: difference 0, hardsigmoid 0.5 (-log σ: log 2).
    same = x[:, None, :]
    hs = bprdae_loss(top, bottom, x, x, same, mu=0.0, lam=0.0, bpr_term="hardsigmoid")
    ls = bprdae_loss(top, bottom, x, x, same, mu=0.0, lam=0.0, bpr_term="logsigmoid")
    assert hs["loss"].item() == pytest.approx(-0.5)
    assert ls["loss"].item() == pytest.approx(math.log(2))
    assert hs["auc"].item() == 0.0  # ties are not wins


def test_tied_weights_one_matrix_with_gradient_from_both_paths():
    ae = TiedAutoencoder(6, 4, generator=torch.Generator().manual_seed(0)).double()
    names = {n: tuple(p.shape) for n, p in ae.named_parameters()}
    assert names == {"weight": (6, 4), "enc_bias": (4,), "dec_bias": (6,)}
    x = torch.rand(3, 6, dtype=torch.float64)
    h, r = ae(x)
    loss = ((r - x) ** 2).mean() + h.sum()
    loss.backward()
    # Untied copy: the tied gradient is the encoder's plus the decoder's.
    w_enc = ae.weight.detach().clone().requires_grad_(True)
    w_dec = ae.weight.detach().clone().requires_grad_(True)
    h2 = torch.nn.functional.hardsigmoid(x @ w_enc + ae.enc_bias.detach())
    r2 = torch.nn.functional.hardsigmoid(h2 @ w_dec.t() + ae.dec_bias.detach())
    (((r2 - x) ** 2).mean() + h2.sum()).backward()
    assert w_enc.grad.abs().sum() > 0 and w_dec.grad.abs().sum() > 0
    torch.testing.assert_close(ae.weight.grad, w_enc.grad + w_dec.grad)


def test_init_bounds_and_seeding():
    ae = TiedAutoencoder(4096, 512, generator=torch.Generator().manual_seed(3))
    bound = 4 * math.sqrt(6 / (512 + 4096))
    assert init_bound(4096, 512) == pytest.approx(bound)
    w = ae.weight.detach()
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    assert w.mean().abs() < 0.01 * bound  # symmetric
    assert (ae.enc_bias == 0).all() and (ae.dec_bias == 0).all()
    again = TiedAutoencoder(4096, 512, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again.weight, ae.weight)


# --------------------------------------------------------------------------- extractors


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full torchvision AlexNet state dict (random weights, classifier.6 included)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("alexnet") / "alexnet.pth"
    torch.save(alexnet(weights=None).state_dict(), path)
    return path


def test_alexnet_fc7_from_a_weights_file(alexnet_file, tmp_path):
    cfg = load_config(None, ["baselines.bpr_dae.features=alexnet",
                             f"baselines.bpr_dae.alexnet_weights={alexnet_file}"])
    module, dim, desc = frozen_extractor(cfg)
    assert dim == 4096 and "alexnet fc7" in desc and str(alexnet_file) in desc
    assert not module.training
    assert all(not p.requires_grad for p in module.parameters())
    ref = alexnet(weights=None)
    ref.load_state_dict(torch.load(alexnet_file, weights_only=True))
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    out = module(x)
    assert out.shape == (2, 4096) and (out >= 0).all() and not out.requires_grad
    # fc7 is the input of the reference's last Linear.
    with torch.no_grad():
        torch.testing.assert_close(ref.classifier[6](out), ref(x))
    # A file that is not an AlexNet state dict is refused, naming it.
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    cfg = load_config(None, ["baselines.bpr_dae.features=alexnet",
                             f"baselines.bpr_dae.alexnet_weights={bad}"])
    with pytest.raises(WeightsError, match="bad.pth"):
        frozen_extractor(cfg)
    cfg = load_config(None, ["baselines.bpr_dae.features=auto",
                             f"baselines.bpr_dae.alexnet_weights={tmp_path / 'missing.pth'}"])
    with pytest.raises(WeightsError, match="missing.pth"):  # explicit file: no silent fallback
        frozen_extractor(cfg)


def test_alexnet_imagenet_missing_raises_and_auto_falls_back(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / ALEXNET_IMAGENET_FILE
    cfg = load_config(None, ["baselines.bpr_dae.features=alexnet"])
    with pytest.raises(WeightsError) as err:
        frozen_extractor(cfg)
    assert str(expected) in str(err.value) and "features=backbone" in str(err.value)

    # auto with neither AlexNet nor backbone weights (and no random init allowed): both named.
    with pytest.raises(WeightsError, match="features=auto") as err:
        frozen_extractor(load_config(None, ["baselines.bpr_dae.features=auto"]))
    assert str(expected) in str(err.value) and "resnet18-f37072fd.pth" in str(err.value)

    cfg = tiny(None, "runtime.device=cpu", "baselines.bpr_dae.features=auto")
    state = torch.get_rng_state()
    module, dim, desc = frozen_extractor(cfg)
    assert torch.equal(torch.get_rng_state(), state)  # seeded on the side
    again, _, _ = frozen_extractor(cfg)  # a random init is the same network every time
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    assert dim == 512 and "resnet18" in desc and "auto fallback" in desc
    assert not module.training and all(not p.requires_grad for p in module.parameters())
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 512)


# --------------------------------------------------------------------------- training


def _stage(tiny, root: Path, run: Path, overrides: list[str]):
    """(BPR-DAE stage for run dir `run`, runtime, train/test splits, images): the tiny
    config (32 px, GECo's random-init ResNet-18 as the frozen extractor) on the CPU."""
    cfg = tiny(root, "runtime.device=cpu", *overrides)
    data = open_data(cfg.data)
    rt = init_runtime(cfg.runtime)
    splits, images = data.splits(("train", "test"))
    return make_stage("bpr-dae", cfg, rt, run, data=data), rt, splits, images


KEYS = ("auc_1vs1", "auc_1vs3", "mrr_full_vs_random")


def test_learns_the_synthetic_compatibility(tiny, synth_small, tmp_path):
    # Random-init ResNet features at 32 px differ little between items; the reference's
    # lr 0.01 learns nothing in a few hundred steps (measured: AUC ~0.5), lr 1.0 does.
    stage, rt, splits, images = _stage(tiny, synth_small, tmp_path, [
        "baselines.bpr_dae.hidden=64", "baselines.bpr_dae.batch_size=32",
        "baselines.bpr_dae.lr=1.0", "baselines.bpr_dae.epochs=30"])
    before = evaluate_scorer(stage.scorer(images), splits["test"])
    summary = fit(stage, rt, tmp_path)
    scorer = stage.scorer(images)
    after = evaluate_scorer(scorer, splits["test"])
    # Measured (100 test rows, baselines.bpr_dae.seed 0-3): untrained AUC-1vs1 0.44-0.54,
    # AUC-1vs3 0.48-0.55, MRR-full ~1x random; trained AUC-1vs1 0.77-0.80, AUC-1vs3
    # 0.79-0.83, MRR-full 2.9-3.4x random.
    assert after["auc_1vs1"] > 0.65 and after["auc_1vs3"] > 0.68, after
    assert after["mrr_full_vs_random"] > 1.8, after
    assert after["auc_1vs3"] > before["auc_1vs3"] + 0.15, (before, after)

    assert summary["last"] == str(tmp_path / "bpr-dae" / "last.pt")
    assert Path(summary["last"]).is_file()
    history = summary["history"]
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert set(history[0]) >= {"epoch", "train_loss", "train_bpr", "train_rec", "train_reg",
                               "samples_per_s", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    info = stage.info()
    assert (info["feature_dim"], info["hidden"], len(history)) == (512, 64, 30)
    assert "resnet18" in info["features"] and summary["train_seconds"] > 0

    # Eval embeddings come from the training features' transform and extractor.
    ids = list(splits["train"].tops[:3])
    with torch.no_grad():
        torch.testing.assert_close(scorer.top_embeddings(ids),
                                   stage.top_ae.encode(stage.extract(ids)))
    # score_pool is score against the replicated pool.
    pool = list(splits["test"].unique_bottoms()[:5])
    torch.testing.assert_close(scorer.score_pool(ids, pool), scorer.score(ids, [pool] * 3),
                               rtol=1e-5, atol=1e-5)


def test_resume_continues_and_refuses_another_config(tiny, synth_small, tmp_path, monkeypatch):
    small = ["baselines.bpr_dae.hidden=16", "baselines.bpr_dae.batch_size=64"]
    stage, rt, _, _ = _stage(tiny, synth_small, tmp_path, small + ["baselines.bpr_dae.epochs=2"])
    first = fit(stage, rt, tmp_path)
    assert [h["epoch"] for h in first["history"]] == [1, 2]

    second_stage, rt, splits, images = _stage(tiny, synth_small, tmp_path,
                                              small + ["baselines.bpr_dae.epochs=3"])
    second = fit(second_stage, rt, tmp_path)
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3]
    assert second["history"][:2] == first["history"]  # epochs 1, 2 come from the checkpoint
    assert second["resumed_after_epoch"] == 2 and second["epochs_trained"] == 1

    # The same config again: nothing to train, not even features to extract.
    third_stage, rt, _, _ = _stage(tiny, synth_small, tmp_path, small + ["baselines.bpr_dae.epochs=3"])

    def no_extract(ids):
        raise AssertionError("a complete checkpoint must not re-extract features")

    monkeypatch.setattr(third_stage, "extract", no_extract)
    third = fit(third_stage, rt, tmp_path)
    assert third["history"] == second["history"]
    for a, b in zip(third_stage.top_ae.state_dict().values(),
                    second_stage.top_ae.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(
        evaluate_scorer(third_stage.scorer(images), splits["test"])["auc_1vs3"],
        evaluate_scorer(second_stage.scorer(images), splits["test"])["auc_1vs3"])

    other, rt, _, _ = _stage(tiny, synth_small, tmp_path, ["baselines.bpr_dae.hidden=32",
                                                     "baselines.bpr_dae.batch_size=64",
                                                     "baselines.bpr_dae.epochs=3"])
    with pytest.raises(ConfigError, match="baselines.bpr_dae.hidden"):
        fit(other, rt, tmp_path)
