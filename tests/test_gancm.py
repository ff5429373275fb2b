"""MGCM and Pix2PixCM (docs/model.md §5.3-5.4): network shapes, the two discriminator losses
and the score's sign (the reference's and ours, docs/model.md §7 items 11-12), the frozen generator in the
compatibility step, learning on the small synthetic set, and resumable training."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from geco.baselines import evaluate_scorer
from geco.baselines.gancm import (
    GanCMConfig,
    GanCMModel,
    bpr_loss,
    discriminator_loss,
    generator_loss,
)
from geco.data.source import open_data
from geco.data.splits import load_splits, resolve_layout
from geco.errors import ConfigError
from geco.models.gancm import (
    BPRNet,
    GeneratorSkip,
    GlobalDiscriminator,
    MGCMGenerator,
    PantsEncoder,
    PatchDiscriminator,
    compat_score,
)
from geco.train.loop import make_stage, train
from geco.train.runtime import init_runtime


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a 2-core machine shared with other jobs, two OpenMP threads
    contending for busy cores run these small networks several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _n(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("f", [8, 64])
def test_network_shapes_at_64px(f):
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for gen in (MGCMGenerator(f).eval(), GeneratorSkip(f).eval()):
            emb, d1, img = gen(x)
            assert emb.shape == d1.shape == (2, 8 * f, 2, 2)
            assert img.shape == (2, 3, 64, 64) and img.abs().max() <= 1
        prob, logit = GlobalDiscriminator(f).eval()(x, y)
        assert prob.shape == logit.shape == (2, 1)
        assert torch.allclose(prob, torch.sigmoid(logit))
        prob, logit = PatchDiscriminator(f).eval()(x, y)
        assert prob.shape == logit.shape == (2, 1, 4, 4)
        assert torch.allclose(prob, torch.sigmoid(logit))
        e_b = PantsEncoder(f).eval()(y)
        assert e_b.shape == (2, 8 * f, 2, 2)
        net = BPRNet(f, 128)
        s_t, s_b = net(emb, e_b)
        assert s_t.shape == s_b.shape == (2, 128) and 0 < s_t.min() and s_t.max() < 1
        # The global mean of the 2×2 map, then Linear + sigmoid.
        assert torch.allclose(s_b, torch.sigmoid(e_b.mean((2, 3)) @ net.bottom_fc.weight.T))
    assert (net.top_fc.bias == 0).all() and (net.bottom_fc.bias == 0).all()
    if f == 64:
        n_gen = _n(MGCMGenerator(64))
        print(f"MGCM generator f=64: {n_gen:,} parameters; GeneratorSkip "
              f"{_n(GeneratorSkip(64)):,}; pants encoder {_n(PantsEncoder(64)):,}")
        assert 22.0e6 < n_gen < 22.6e6  # 22,297,731 by hand from docs/model.md §5.3
        assert 2.7e6 < _n(GlobalDiscriminator(64)) < 2.8e6


def test_bad_input_size_is_named():
    with pytest.raises(ValueError, match="MGCMGenerator expects B×3×64×64"):
        MGCMGenerator(4)(torch.zeros(1, 3, 128, 128))


# --------------------------------------------------------------------------- losses


def test_fixed_discriminator_loss_pushes_fakes_to_zero():
    d_fake = torch.tensor([[0.7], [0.2], [0.9]], requires_grad=True)
    d_real = torch.tensor([[0.6], [0.8], [0.3]], requires_grad=True)
    loss = discriminator_loss(d_fake, d_real, nu=0.01, faithful=False)
    hand = 0.01 * 0.5 * ((d_fake ** 2).mean() + ((d_real - 1) ** 2).mean())
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    loss.backward()
    assert (d_fake.grad > 0).all()  # gradient descent lowers every fake prediction
    assert (d_real.grad < 0).all()  # ... and raises every real one


def test_faithful_discriminator_loss_is_the_reference_bug():
    g = torch.Generator().manual_seed(3)
    d_fake = torch.rand(4, 1, 4, 4, generator=g).requires_grad_()  # a PatchGAN output
    d_real = torch.rand(4, 1, 4, 4, generator=g).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scalar target is broadcast explicitly
        loss = discriminator_loss(d_fake, d_real, nu=0.01, faithful=True)
    target = 0 + 0.5 * ((d_real.detach() - 1) ** 2).mean()
    hand = 0.01 * 0.5 * ((d_fake.detach() - target) ** 2).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    loss.backward()
    assert d_fake.grad is None  # nothing flows through the fake prediction
    assert d_real.grad is not None and d_real.grad.abs().sum() > 0


def test_generator_and_bpr_losses_by_hand():
    d_fake = torch.tensor([[0.25], [0.5]])
    fake, bottom = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    loss, adv, l1 = generator_loss(d_fake, fake, bottom, mu=0.1, lambda_l1=10000)
    assert adv.item() == pytest.approx(0.5 * (0.75 ** 2 + 0.5 ** 2) / 2)
    assert l1.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.1 * adv.item() + 5000)
    pos, neg = torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0], [0.0, -1.0]])
    hand = -torch.log(torch.sigmoid(pos[:, None] - neg) + 1e-12).mean()
    assert bpr_loss(pos, neg).item() == pytest.approx(hand.item())


# --------------------------------------------------------------------------- score


def test_score_sign_and_dot_term():
    g = torch.Generator().manual_seed(0)
    s_t, s_b = torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g)
    d1 = torch.randn(3, 4, 2, 2, generator=g)
    dot = (s_t * s_b).sum(-1)
    # beta 0: exactly alpha times the dot product.
    assert torch.allclose(compat_score(s_t, s_b, d1, d1 + 1, alpha=2.0, beta=0.0,
                                       faithful=False), 2 * dot)
    near, far = d1 + 0.1, d1 + 1.0  # Σ|d1 − E| = 16·0.1 and 16·1.0
    for faithful, sign in ((True, 1.0), (False, -1.0)):
        s_near = compat_score(s_t, s_b, d1, near, alpha=2.0, beta=0.5, faithful=faithful)
        s_far = compat_score(s_t, s_b, d1, far, alpha=2.0, beta=0.5, faithful=faithful)
        assert torch.allclose(s_near, 2 * dot + sign * 0.5 * 1.6, atol=1e-5)
        assert torch.allclose(s_far, 2 * dot + sign * 0.5 * 16, atol=1e-5)
        # faithful (the reference): a farther template scores higher; default: lower.
        assert ((s_far > s_near) if faithful else (s_far < s_near)).all()


def _cfg(tiny, root: Path, kind: str = "mgcm", *extra: str):
    """The tiny config (width 8, batch 16) with lr 1e-3 for `kind`, on the CPU."""
    return tiny(root, "runtime.device=cpu", f"baselines.{kind}.lr=1e-3", *extra)


def _train(tiny, root: Path, run: Path, *extra: str):
    """(trained MGCM stage, fit summary, scorer) in run dir `run`."""
    cfg = _cfg(tiny, root, "mgcm", *extra)
    data = open_data(cfg.data)
    stage, summary = train(cfg, "mgcm", run, data=data)
    return stage, summary, stage.scorer(data.splits(("train",))[1])


@pytest.mark.parametrize("faithful", [False, True])
def test_scorer_paths_agree_with_the_training_score(tiny, synth_small, tmp_path, faithful):
    """score (match), score_pool (matmul + cdist) and the training-time score are one score."""
    cfg = _cfg(tiny, synth_small, "pix2pixcm", f"baselines.pix2pixcm.faithful={faithful}",
               "baselines.pix2pixcm.beta=0.3")
    data = open_data(cfg.data)
    stage = make_stage("pix2pixcm", cfg, init_runtime(cfg.runtime), tmp_path, data=data)
    images = data.splits(("train",))[1]
    scorer = stage.scorer(images)
    tops, pool = list(stage.train_split.tops[:5]), list(dict.fromkeys(stage.train_split.bottoms))[:7]
    sampled = scorer.score(tops, [pool] * len(tops))
    full = scorer.score_pool(tops, pool)
    assert sampled.shape == full.shape == (5, 7)
    assert torch.allclose(sampled, full, rtol=1e-5, atol=1e-4)
    e = scorer.emb_dim
    t, b = scorer.top_embeddings(tops), scorer.bottom_embeddings(pool)
    assert t.shape == (5, e + 64 * 4) and b.shape == (7, e + 64 * 4)  # 8f·2·2 = 256
    x = torch.stack([scorer.top_transform()(images.load(i)) for i in tops])
    y = torch.stack([scorer.top_transform()(images.load(i)) for i in pool])
    scorer.model.eval()
    with torch.no_grad():
        s_t, d1 = scorer.model.top_parts(x)
        s_b, e_b = scorer.model.bottom_parts(y)
        direct = scorer.model.score(s_t[:, None], s_b[None], d1[:, None], e_b[None])
    assert torch.allclose(full.float(), direct, rtol=1e-5, atol=1e-4)
    l1 = (d1[:, None] - e_b[None]).abs().sum(-1)
    dot = s_t @ s_b.T
    sign = 1 if faithful else -1
    assert torch.allclose(direct, dot + sign * 0.3 * l1, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- training steps


def test_compat_step_changes_only_encoder_and_bprnet():
    torch.manual_seed(0)
    model = GanCMModel("mgcm", GanCMConfig(features=4, emb_dim=16, batch_size=8))
    model.train()
    x, y = torch.randn(8, 3, 64, 64), torch.randn(8, 3, 64, 64)

    def snap(m):
        return {k: v.clone() for k, v in m.state_dict().items()}

    gen, disc = snap(model.generator), snap(model.discriminator)
    enc, bpr = snap(model.encoder), snap(model.bprnet)
    model.compat_step(x, y)
    assert model.generator.training  # back in train mode
    for before, net in ((gen, model.generator), (disc, model.discriminator)):
        after = net.state_dict()  # parameters and BN buffers alike
        assert all(torch.equal(before[k], after[k]) for k in before)
    for before, net in ((enc, model.encoder), (bpr, model.bprnet)):
        after = net.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    # The GAN step is what trains the generator (and the discriminator).
    model.gan_step(x, y)
    assert any(not torch.equal(gen[k], v) for k, v in model.generator.state_dict().items())
    assert any(not torch.equal(disc[k], v) for k, v in model.discriminator.state_dict().items())


# --------------------------------------------------------------------------- learning


def test_mgcm_learns_the_synthetic_rule(tiny, synth_small, tmp_path):
    """f=8, 4 epochs of 24 steps (batch 16, lr 1e-3): measured AUC-1vs1 0.81, AUC-1vs3 0.80,
    MRR-full 0.125 (random 0.052) at seed 0; seeds 1-3 gave AUC-1vs3 0.79, 0.62, 0.77.
    Chance is AUC 0.5; the bars leave margin for other CPUs / torch builds."""
    stage, summary, scorer = _train(tiny, synth_small, tmp_path, "baselines.mgcm.epochs=4")
    test = load_splits(resolve_layout(synth_small), splits=("test",))["test"]
    m = evaluate_scorer(scorer, test)
    history = summary["history"]
    print({k: round(m[k], 4) for k in ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full")},
          [round(h["train_bpr"], 3) for h in history])
    assert m["auc_1vs3"] > 0.62 and m["auc_1vs1"] > 0.58
    assert m["mrr_full"] > 1.3 * m["random_mrr_full"]
    assert history[-1]["train_bpr"] < history[0]["train_bpr"]
    assert history[-1]["train_g_l1"] < history[0]["train_g_l1"]
    assert stage.info()["generator"] == "MGCMGenerator" and len(history) == 4


# --------------------------------------------------------------------------- resume


def test_resume_refit_config_drift_and_grids(tiny, synth_small, tmp_path):
    steps = "baselines.mgcm.max_steps_per_epoch=2"
    run = tmp_path / "run"
    samples = run / "mgcm" / "samples"
    _, one, _ = _train(tiny, synth_small, run, steps, "baselines.mgcm.epochs=1")
    assert one["epochs_trained"] == 1 and len(one["history"]) == 1
    assert one["last"] == str(run / "mgcm" / "last.pt") and Path(one["last"]).is_file()
    assert sorted(p.name for p in samples.iterdir()) == ["epoch_001.png"]

    two_stage, two, two_scorer = _train(tiny, synth_small, run, steps, "baselines.mgcm.epochs=2")
    assert two["epochs_trained"] == 1 and two["resumed_after_epoch"] == 1
    assert [h["epoch"] for h in two["history"]] == [1, 2]
    assert two["history"][0] == one["history"][0]
    assert two["history"][1]["steps"] == 2 and two["history"][1]["samples"] == 32
    assert sorted(p.name for p in samples.iterdir()) == ["epoch_001.png", "epoch_002.png"]

    # Resuming trains exactly what an uninterrupted run trains (CPU, fixed seeds).
    straight, _, straight_scorer = _train(tiny, synth_small, tmp_path / "straight", steps,
                                          "baselines.mgcm.epochs=2")
    a = two_stage.model.state_dict()["generator"]
    b = straight.model.state_dict()["generator"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = list(two_stage.train_split.tops[:4])
    assert torch.equal(two_scorer.score_pool(ids, ids[:3]), straight_scorer.score_pool(ids, ids[:3]))

    # The same config again: nothing to train, the saved model is loaded.
    _, again, again_scorer = _train(tiny, synth_small, run, steps, "baselines.mgcm.epochs=2")
    assert again["epochs_trained"] == 0 and len(again["history"]) == 2
    assert torch.equal(again_scorer.score_pool(ids, ids[:3]), two_scorer.score_pool(ids, ids[:3]))

    # Another model in the same folder is refused, naming the key.
    with pytest.raises(ConfigError, match="features"):
        _train(tiny, synth_small, run, steps, "baselines.mgcm.epochs=2", "baselines.mgcm.features=4")
