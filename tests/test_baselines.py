"""Baselines (docs/model.md §5.1), their score-based metric path, `geco compare` and the Table 4
ablation presets."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from geco.baselines import (
    PopularityScorer,
    RandomScorer,
    Scorer,
    evaluate_scorer,
    score_metrics,
)
from geco.cli import main
from geco.compare import parse_models, run_compare
from geco.config import load_config
from geco.data.splits import Split, load_splits, resolve_layout
from geco.errors import ConfigError
from geco.evaluate import score_rows
from geco.metrics import random_expectations

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full", "recall_at_1", "recall_at_10",
               "ndcg_at_1", "ndcg_at_10", "n_queries", "n_candidates", "random_mrr_full",
               "mrr_full_vs_random"}


def H(n: int) -> float:
    return sum(1 / k for k in range(1, n + 1))


# --------------------------------------------------------------------------- Popularity by hand

# Train: b1 has tops t1, t2, t3 (the pair t1,b1 is listed twice: still 3 tops), b2 has 2,
# b3 has 1; every x* bottom is unseen in training (popularity 0).
TRAIN = [("t1", "b1"), ("t2", "b1"), ("t3", "b1"), ("t4", "b2"), ("t5", "b2"), ("t1", "b3"),
         ("t1", "b1")]
# Test rows: top, positive, neg_1..neg_9.
TEST = [
    ("q1", "b1", ["b2", "b3", "x1", "x2", "x3", "x4", "x5", "x6", "x7"]),
    ("q2", "x1", ["b1", "x2", "b2", "x3", "x4", "x5", "x6", "x7", "x8"]),
    ("q3", "b2", ["x2", "b1", "b3", "x3", "x4", "x5", "x6", "x7", "x8"]),
    ("q4", "x9", ["x1", "b3", "x2", "x3", "x4", "x5", "x6", "x7", "x8"]),
]
POP = {"b1": 3, "b2": 2, "b3": 1}


def _write_standard(root: Path) -> Path:
    """A 'standard' layout folder: files/{train,valid,test}.csv and 8x8 JPEGs for every id
    (open_dataset's preflight checks the image files exist)."""
    (root / "files").mkdir(parents=True)
    (root / "img").mkdir()
    with open(root / "files" / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["tshirt", "positive_pant"])
        w.writerows(TRAIN)
    for name in ("valid", "test"):
        with open(root / "files" / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["tshirt", "positive_pant", *(f"neg_{k}" for k in range(1, 10))])
            w.writerows([top, pos, *negs] for top, pos, negs in TEST)
    ids = {i for row in TRAIN for i in row} | {i for t, p, n in TEST for i in (t, p, *n)}
    for i in ids:
        Image.new("RGB", (8, 8), (200, 100, 50)).save(root / "img" / f"{i}.jpg")
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return _write_standard(tmp_path / "tiny")


def _hand_metrics(ties: str) -> dict[str, float]:
    """The tiny dataset's metrics worked out by hand (comments: rows q1..q4)."""
    # AUC 1-vs-1 (neg_1): q1 3>2 win, q2 0>3 loss, q3 2>0 win, q4 0=0 tie -> loss.
    auc_1vs1 = 2 / 4
    # AUC 1-vs-3 (neg_1..3): q1 3 wins; q2 0 (0<3, 0=0, 0<2); q3 2 (>0, <3, >1); q4 0 (=, <1, =).
    auc_1vs3 = 5 / 12
    # MRR 1-vs-9, as (strictly greater g, tied t): q1 (0,0); q2 (2,7); q3 (1,0); q4 (1,8).
    # Full ranking: pool = test positives in first-appearance order [b1, x1, b2, x9] with
    # popularity [3, 0, 2, 0]: q1 (0,0); q2 x1 (2,1); q3 b2 (1,0); q4 x9 (2,1).
    if ties == "expected":  # mean of 1/rank over the tied window of ranks g+1 .. g+t+1
        rr9 = [1, (H(10) - H(2)) / 8, 1 / 2, (H(10) - H(1)) / 9]
        rr_full = [1, (1 / 3 + 1 / 4) / 2, 1 / 2, (1 / 3 + 1 / 4) / 2]
    elif ties == "optimistic":  # rank g+1
        rr9 = [1, 1 / 3, 1 / 2, 1 / 2]
        rr_full = [1, 1 / 3, 1 / 2, 1 / 3]
    else:  # pessimistic: rank g+t+1
        rr9 = [1, 1 / 10, 1 / 2, 1 / 10]
        rr_full = [1, 1 / 4, 1 / 2, 1 / 4]
    return {"auc_1vs1": auc_1vs1, "auc_1vs3": auc_1vs3, "mrr_1vs9": sum(rr9) / 4,
            "mrr_full": sum(rr_full) / 4}


@pytest.mark.parametrize("ties", ["expected", "optimistic", "pessimistic"])
def test_popularity_matches_a_hand_computation(tiny, ties):
    splits = load_splits(resolve_layout(tiny), splits=("train", "test"))
    scorer = PopularityScorer()
    scorer.fit(splits["train"])
    assert scorer.counts == POP  # the duplicated (t1, b1) pair counts once
    assert scorer.score(["q"], [["b1", "b2", "b3", "zz"]]).tolist() == [[3.0, 2.0, 1.0, 0.0]]
    m = evaluate_scorer(scorer, splits["test"], ties=ties)
    for key, value in _hand_metrics(ties).items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert (m["n_queries"], m["n_candidates"]) == (4, 4)
    # Recall@1 of the full ranking: only q1's positive is alone on top.
    assert m["recall_at_1"] == pytest.approx(1 / 4)


def test_popularity_through_compare_and_its_csv(tiny, tmp_path):
    cfg = load_config(None, [f"data.root={tiny}", "data.kind=standard"])
    result = run_compare(cfg, tmp_path / "run", ["popularity"])
    hand = _hand_metrics("expected")
    got = result["models"]["popularity"]["metrics"]
    assert {k: got[k] for k in hand} == pytest.approx(hand, abs=1e-12)
    rows = list(csv.DictReader(open(tmp_path / "run" / "compare" / "compare.csv")))
    assert [r["model"] for r in rows] == ["popularity"]
    assert float(rows[0]["mrr_full"]) == pytest.approx(hand["mrr_full"], abs=1e-12)


# --------------------------------------------------------------------------- Random


def _big_split(n_rows: int = 4000, n_pool: int = 500, seed: int = 0) -> Split:
    """Ids only: n_rows rows whose positives cycle through n_pool bottoms, 9 negatives each."""
    rng = random.Random(seed)
    pool = [f"b{i}" for i in range(n_pool)]
    bottoms = [pool[r % n_pool] for r in range(n_rows)]
    negs = tuple(tuple(rng.sample([b for b in pool[:20] if b != pos], 9)) for pos in bottoms)
    return Split("test", "<big>", tuple(f"t{r}" for r in range(n_rows)), tuple(bottoms), negs,
                 tuple(range(2, n_rows + 2)))


def test_random_is_near_chance_deterministic_and_seeded(synth_small):
    test = load_splits(resolve_layout(synth_small), splits=("test",))["test"]
    a = evaluate_scorer(RandomScorer(0), test)
    assert set(a) == METRIC_KEYS | {"eval_seconds"}
    # 100 rows: loose (~4 sigma) bounds around AUC 0.5 and H_10/10.
    assert abs(a["auc_1vs1"] - 0.5) < 0.2 and abs(a["auc_1vs3"] - 0.5) < 0.15
    assert abs(a["mrr_1vs9"] - H(10) / 10) < 0.12
    again = evaluate_scorer(RandomScorer(0), test)
    other = evaluate_scorer(RandomScorer(1), test)
    drop = {"eval_seconds"}
    assert {k: v for k, v in again.items() if k not in drop} == \
        {k: v for k, v in a.items() if k not in drop}
    assert other["mrr_full"] != a["mrr_full"] and other["mrr_1vs9"] != a["mrr_1vs9"]
    # fit re-seeds: the same scorer evaluated twice repeats itself.
    scorer = RandomScorer(3)
    first = evaluate_scorer(scorer, test)
    scorer.fit(None)
    assert evaluate_scorer(scorer, test)["mrr_full"] == first["mrr_full"]


def test_random_on_a_large_split_hits_the_expected_values():
    m = evaluate_scorer(RandomScorer(7), _big_split())
    assert m["auc_1vs1"] == pytest.approx(0.5, abs=0.03)  # sd 0.008
    assert m["auc_1vs3"] == pytest.approx(0.5, abs=0.02)
    assert m["mrr_1vs9"] == pytest.approx(H(10) / 10, abs=0.015)  # 0.2929, sd ~0.004
    assert m["mrr_full"] == pytest.approx(random_expectations(500)["mrr"], abs=0.004)
    assert m["recall_at_10"] == pytest.approx(10 / 500, abs=0.01)


def test_scorers_satisfy_the_protocol():
    assert isinstance(RandomScorer(0), Scorer) and isinstance(PopularityScorer(), Scorer)


# --------------------------------------------------------------------------- score path == score_rows


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("ties", ["expected", "optimistic", "pessimistic"])
def test_score_metrics_equal_score_rows_on_dot_products(integer, ties):
    g = torch.Generator().manual_seed(11)
    n_items, n_rows, d = 40, 60, 6
    if integer:  # small integers: exact dot products and many ties
        queries = torch.randint(-2, 3, (n_rows, d), generator=g).float()
        bottoms = torch.randint(-2, 3, (n_items, d), generator=g).float()
    else:
        queries = torch.randn(n_rows, d, generator=g)
        bottoms = torch.randn(n_items, d, generator=g)
    ids = [f"i{k}" for k in range(n_items)]
    order = {b: k for k, b in enumerate(ids)}
    positives = [ids[int(k)] for k in torch.randint(0, 25, (n_rows,), generator=g)]
    negatives = [[b for b in random.Random(r).sample(ids, 10) if b != p][:9]
                 for r, p in enumerate(positives)]
    expected = score_rows(queries, bottoms, order, positives, negatives, ties=ties)

    pos_idx = torch.tensor([order[b] for b in positives])
    neg_idx = torch.tensor([[order[b] for b in n] for n in negatives])
    pos = (queries * bottoms[pos_idx]).sum(-1)
    neg = torch.einsum("rd,rkd->rk", queries, bottoms[neg_idx])
    pool_ids = list(dict.fromkeys(positives))
    pool = queries @ bottoms[torch.tensor([order[b] for b in pool_ids])].T
    pool_index = torch.tensor([pool_ids.index(b) for b in positives])
    got = score_metrics(pos, neg, pool, pool_index, ties=ties)
    assert list(got) == list(expected)
    assert got == expected


def test_evaluate_scorer_with_an_embedding_scorer_equals_score_rows():
    """A Scorer built from embeddings (no score_pool: the generic path) scores like GECo's."""
    g = torch.Generator().manual_seed(5)
    split = _big_split(n_rows=300, n_pool=80, seed=1)
    items = list(dict.fromkeys([*split.bottoms, *(b for n in split.negatives for b in n)]))
    order = {b: k for k, b in enumerate(items)}
    bottoms = torch.randint(-2, 3, (len(items), 4), generator=g).float()
    queries = torch.randint(-2, 3, (len(split), 4), generator=g).float()
    row_of = {t: r for r, t in enumerate(split.tops)}

    class Dot:
        name = "dot"

        def fit(self, train):
            pass

        def score(self, tops, candidates):
            q = queries[[row_of[t] for t in tops]]
            b = bottoms[torch.tensor([[order[c] for c in cs] for cs in candidates])]
            return torch.einsum("rd,rkd->rk", q, b)

    got = evaluate_scorer(Dot(), split, chunk_size=64)
    got.pop("eval_seconds")
    assert got == score_rows(queries, bottoms, order, list(split.bottoms),
                             [list(n) for n in split.negatives])


def test_bad_scorer_output_is_named():
    class Bad:
        name = "bad"

        def fit(self, train):
            pass

        def score(self, tops, candidates):
            return torch.full((len(tops), len(candidates[0])), float("nan"))

    with pytest.raises(ValueError, match="bad.*NaN"):
        evaluate_scorer(Bad(), _big_split(n_rows=10, n_pool=20))


# --------------------------------------------------------------------------- ablation presets


@pytest.mark.parametrize("name,key", [("ablation-no-bpr", "alpha"),
                                      ("ablation-no-infonce", "beta")])
def test_ablation_presets_state_only_what_differs(name, key):
    """A preset names its base and the one setting it changes; it resolves to the base with
    that setting at 0 and every other value equal."""
    assert yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()) == {
        "base": "synthetic-cpu.yaml", "geco": {key: 0.0}}
    base = load_config(ROOT / "configs" / "synthetic-cpu.yaml").to_dict()
    abl = load_config(ROOT / "configs" / f"{name}.yaml").to_dict()
    assert abl["geco"][key] == 0.0 and base["geco"][key] > 0
    abl["geco"][key] = base["geco"][key]
    assert abl == base


# --------------------------------------------------------------------------- geco compare


def test_cli_compare_writes_md_csv_json(synth_small, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["compare", "--run-dir", str(run), "--models", "random,popularity",
               f"data.root={synth_small}", "data.kind=standard"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| Random |" in out and "| Popularity |" in out
    md = (run / "compare" / "compare.md").read_text()
    assert "Table 2 (AUC 1-vs-1, MRR full ranking)" in md
    assert "Table 3 (AUC 1-vs-3, MRR 1-vs-9)" in md
    assert "| Model | small AUC | small MRR |" in md
    # Rows in the paper's order: Popularity above Random, in both tables.
    assert md.count("| Popularity |") == 3 and md.index("| Popularity |") < md.index("| Random |")

    rows = list(csv.DictReader(open(run / "compare" / "compare.csv")))
    assert [r["model"] for r in rows] == ["popularity", "random"]
    assert METRIC_KEYS <= set(rows[0]) and {"model", "label", "checkpoint"} <= set(rows[0])

    data = json.loads((run / "compare" / "compare.json").read_text())
    assert list(data["models"]) == ["popularity", "random"]
    assert data["config"]["data"]["root"] == str(synth_small)
    assert data["n_queries"] == 100
    rnd = data["models"]["random"]["metrics"]
    assert abs(rnd["auc_1vs1"] - 0.5) < 0.2 and abs(rnd["mrr_1vs9"] - H(10) / 10) < 0.12
    # Synthetic test bottoms never occur in training: Popularity ties everything, so its
    # ranks are exactly random and its strict AUC is 0.
    pop = data["models"]["popularity"]["metrics"]
    assert pop["auc_1vs1"] == 0 and pop["mrr_1vs9"] == pytest.approx(H(10) / 10)
    assert pop["mrr_full"] == pytest.approx(pop["random_mrr_full"])


def test_cli_compare_names_the_missing_geco_checkpoint(synth_small, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["compare", "--run-dir", str(run), "--models", "random,geco", "--no-train",
               f"data.root={synth_small}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(run / "geco" / "best.pt") in err and "geco pipeline" in err
    assert not (run / "compare").exists()


def test_model_names_are_checked():
    assert parse_models("geco, random,popularity,random") == ["geco", "popularity", "random"]
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        parse_models("random,nope")
    assert parse_models(["bpr-dae", "mgcm"]) == ["mgcm", "bpr-dae"]
    assert parse_models("all") == ["geco", "mgcm", "pix2pixcm", "bpr-dae", "popularity",
                                   "random"]
    with pytest.raises(ConfigError, match="at least one"):
        parse_models(" , ")
