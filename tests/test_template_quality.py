"""Template quality (geco.models.template_quality): the retrieval metrics equal a brute-force
computation, a constant generator is flagged as collapsed while an oracle is not, and CIGM keeps
the epoch with the best templates as the generator GECo trains with."""

from __future__ import annotations

import torch
from torch import nn

from geco.data.source import open_data
from geco.evaluate import score_rows
from geco.models.geco import cigm_path
from geco.models.template_quality import ValidationSet, matrix_metrics, measure
from geco.train.loop import train
from geco.train.runtime import Runtime

CPU = Runtime(torch.device("cpu"), 0, 1, 0, None, False)


def test_matrix_metrics_equal_the_dot_product_protocol():
    g = torch.Generator().manual_seed(3)
    ids = [f"b{i}" for i in range(40)]
    order = {b: i for i, b in enumerate(ids)}
    bottoms = torch.randint(-3, 4, (40, 6), generator=g).double()  # integer scores: ties happen
    queries = torch.randint(-3, 4, (25, 6), generator=g).double()
    perm = [torch.randperm(40, generator=g).tolist() for _ in range(25)]
    positives = [ids[p[0]] for p in perm]
    negatives = [[ids[i] for i in p[1:10]] for p in perm]
    want = score_rows(queries, bottoms, order, positives, negatives)
    got = matrix_metrics(queries @ bottoms.T, order, positives, negatives, "t")
    assert abs(got["t_auc_1vs1"] - want["auc_1vs1"]) < 1e-12
    assert abs(got["t_mrr_full"] - want["mrr_full"]) < 1e-12


class _Constant(nn.Module):
    noise_dim = 4

    def forward(self, x, z):
        return torch.full_like(x, 0.8)


class _Oracle(nn.Module):
    """Draws exactly the true bottom of each validation top (looked up by the top's pixels),
    with a noise-dependent speck so that draws differ."""

    noise_dim = 4

    def __init__(self, vs: ValidationSet):
        super().__init__()
        self.table = {t.numpy().tobytes(): b for t, b in zip(vs.tops, vs.pos_bottoms, strict=True)}

    def forward(self, x, z):
        out = torch.stack([self.table[t.numpy().tobytes()] for t in x]).clone()
        out[:, :, 0, 0] = z[:, :3].clamp(-1, 1)
        return out


def test_collapse_is_flagged_and_an_oracle_scores_perfectly(synth_small, tiny):
    data = open_data(tiny(synth_small).data)
    vs = ValidationSet(data, "valid", 32)
    assert len(vs) == 96 and vs.bottoms.shape[1:] == (3, 32, 32)
    flat, _ = measure(_Constant(), vs, rt=CPU, seed=0)
    assert flat["template_collapsed"] == 1.0
    assert flat["template_blank"] == 1.0 and flat["template_coverage"] == 0.0
    assert flat["template_div_ratio"] < 1e-6
    assert flat["template_div_noise"] < 1e-6
    oracle, first = measure(_Oracle(vs), vs, rt=CPU, seed=0)
    assert oracle["template_collapsed"] == 0.0
    assert oracle["template_l1_mrr_full"] > 0.9 and oracle["template_l1_auc_1vs1"] > 0.95
    assert abs(oracle["template_div_ratio"] - 1) < 0.05 and oracle["template_div_noise"] > 0
    assert first.shape == vs.tops.shape


def test_cigm_keeps_the_epoch_with_the_best_templates_for_geco(synth_small, tiny, tmp_path):
    cfg = tiny(synth_small, "cigm.epochs=3", "cigm.max_steps_per_epoch=4")
    _, summary = train(cfg, "cigm", tmp_path)
    scores = [r["template_score"] for r in summary["history"]]
    assert all("template_feat_mrr_full" in r and "template_div_ratio" in r
               for r in summary["history"])
    best = max(range(3), key=lambda e: (scores[e], -e)) + 1  # ties keep the earlier epoch
    assert summary["best"]["epoch"] == summary["generator_epoch"] == best
    for r in summary["history"]:  # a collapsed epoch scores 0: never chosen over a sound one
        assert r["template_score"] == (0.0 if r["template_collapsed"] else
                                       r["template_feat_mrr_full"])
    assert cigm_path(cfg, tmp_path) == tmp_path / "cigm" / "best.pt"
    saved = torch.load(tmp_path / "cigm" / "best.pt", weights_only=True)
    assert saved["epoch"] + 1 == best
    grid = tmp_path / "cigm" / "samples" / "epoch_003.png"
    from PIL import Image

    with Image.open(grid) as im:  # 8 rows of >= 128 px cells under a label row
        assert im.width >= 5 * 128 and im.height >= 8 * 128

    # The reference's choice: the last epoch, no best.pt.
    last = tiny(synth_small, "cigm.epochs=2", "cigm.max_steps_per_epoch=2",
                "cigm.selection_metric=last")
    _, s2 = train(last, "cigm", tmp_path / "last")
    assert s2["generator_epoch"] == 2 and not (tmp_path / "last" / "cigm" / "best.pt").exists()
    assert cigm_path(last, tmp_path / "last") == tmp_path / "last" / "cigm" / "last.pt"


def test_popularity_prior_adds_w_log1p_count_to_every_score(synth_small, tiny, tmp_path):
    """geco.popularity_weight: the evaluation's metrics equal a brute-force ranking by
    <q, e_b> + w·log(1 + n_b), n_b = distinct training tops per bottom, and a large weight
    makes the most popular bottoms rank first; the counts travel in the checkpoint."""
    from collections import Counter

    from geco.data.splits import load_splits, resolve_layout
    from geco.data.transforms import imagenet_transform
    from geco.evaluate import embed_candidates, evaluate
    from geco.metrics import reciprocal_rank
    from geco.models.geco import load_retriever

    cfg = tiny(synth_small, "cigm.max_steps_per_epoch=2", "geco.max_steps_per_epoch=3",
               "geco.popularity_weight=0.7")
    train(cfg, "cigm", tmp_path)
    train(cfg, "geco", tmp_path)
    retriever, _ = load_retriever(tmp_path / "geco" / "best.pt", torch.device("cpu"))
    splits = load_splits(resolve_layout(synth_small))
    tr, test = splits["train"], splits["test"]
    counts = Counter(b for b, _ in set(zip(tr.bottoms, tr.tops, strict=True)))
    assert retriever.prior_weight == 0.7 and retriever.prior
    assert all(abs(retriever.prior[b] - torch.log1p(torch.tensor(float(n))).item()) < 1e-6
               for b, n in counts.items())
    data = open_data(cfg.data)
    got = evaluate(retriever, data, "test", rt=CPU, image_size=32, cfg=cfg.eval)

    # Brute force: embed with the model alone, add the prior by hand, rank.
    ids, emb, _ = embed_candidates(retriever.bottoms, data, "test", rt=CPU, image_size=32,
                                   batch_size=64)
    noise = torch.randn(len(test), retriever.generator.noise_dim,
                        generator=torch.Generator().manual_seed(cfg.eval.seed))
    batches = data.queries("test", imagenet_transform(32), batch_size=64, num_workers=0)
    q = torch.cat([retriever.queries(b["top"], noise[b["index"]]) for b in batches])
    pool = list(dict.fromkeys(test.bottoms))
    bias = torch.tensor([retriever.prior.get(b, 0.0) for b in pool])
    pool_emb = emb[torch.tensor([ids.index(b) for b in pool])]
    scores = q @ pool_emb.T + 0.7 * bias
    pos = torch.tensor([pool.index(b) for b in test.bottoms])
    s_pos = scores.gather(1, pos[:, None])
    g, t = (scores > s_pos).sum(1), (scores == s_pos).sum(1) - 1
    assert abs(got["mrr_full"] - reciprocal_rank(g, t, "expected").mean().item()) < 1e-6

    # A huge weight ranks by popularity first.
    retriever.prior_weight = 1e6
    top = retriever.with_prior_queries(q[:1]) @ retriever.with_prior_bottoms(pool, pool_emb).T
    best = pool[int(top.argmax())]
    assert retriever.prior.get(best, 0.0) == max(retriever.prior.get(b, 0.0) for b in pool)


def test_popularity_weight_is_chosen_on_validation_and_kept_with_the_model(synth_small, tiny,
                                                                            tmp_path):
    """geco.popularity_search: after each epoch the weight with the best validation selection
    metric is chosen (what scoring the same checkpoint with each weight gives), stored in the
    checkpoint, used when it is loaded again and kept in the served copy."""
    import csv
    import shutil

    from geco.evaluate import evaluate
    from geco.models.geco import load_retriever
    from geco.registry import _serving_copy

    # Synthetic validation bottoms never occur in training: make a few of them popular.
    root = tmp_path / "data"
    shutil.copytree(synth_small, root)
    with open(root / "files" / "valid.csv") as f:
        popular = [row[1] for row in list(csv.reader(f))[1:6]]
    with open(root / "files" / "train.csv") as f:
        tops = list(dict.fromkeys(row[0] for row in list(csv.reader(f))[1:]))
    with open(root / "files" / "train.csv", "a") as f:
        f.writelines(f"{t},{b}\n" for i, b in enumerate(popular) for t in tops[i::5][:12])
    weights = [0.0, 0.5, 1e4]
    cfg = tiny(root, "cigm.max_steps_per_epoch=2", "geco.max_steps_per_epoch=3",
               "geco.selection_metric=mrr_full", f"geco.popularity_search={weights}")
    train(cfg, "cigm", tmp_path)
    train(cfg, "geco", tmp_path)
    retriever, ckpt = load_retriever(tmp_path / "geco" / "best.pt", torch.device("cpu"))
    chosen = ckpt["state"]["prior_weight"]
    assert chosen in weights and retriever.prior_weight == chosen and retriever.prior
    data = open_data(cfg.data)
    each = {w: evaluate(retriever, data, "valid", rt=CPU, image_size=32, cfg=cfg.eval,
                        prior_weights=[w], select="mrr_full")["mrr_full"] for w in weights}
    assert each[chosen] == max(each.values()), each
    assert len(set(each.values())) > 1 and chosen > 0  # the popular bottoms do matter
    got = evaluate(retriever, data, "valid", rt=CPU, image_size=32, cfg=cfg.eval,
                   prior_weights=weights, select="mrr_full")
    assert got["popularity_weight"] == chosen and got["mrr_full"] == each[chosen]
    history = [r["valid_popularity_weight"] for r in ckpt["history"]]
    assert history[ckpt["epoch"]] == chosen
    slim = tmp_path / "served.pt"
    _serving_copy(tmp_path / "geco" / "best.pt", "geco", slim)
    served, _ = load_retriever(slim, torch.device("cpu"),
                               generator_path=tmp_path / "cigm" / "best.pt")
    assert served.prior_weight == chosen

    # `geco compare` reports GECo with the chosen weight and without the prior (w = 0).
    from geco.compare import run_compare

    result = run_compare(cfg, tmp_path, "geco,popularity", train_geco=False)
    entry = result["models"]["geco"]
    assert entry["metrics"]["popularity_weight"] == chosen
    plain = evaluate(retriever, data, "test", rt=CPU, image_size=32, cfg=cfg.eval,
                     prior_weights=[0.0], select="mrr_full")
    assert entry["metrics_without_prior"]["mrr_full"] == plain["mrr_full"]
    md = (tmp_path / "compare" / "compare.md").read_text()
    assert f"| GECo, prior w = {chosen:g} (chosen on validation) |" in md
    assert "| GECo, no prior (the paper's scoring) |" in md
