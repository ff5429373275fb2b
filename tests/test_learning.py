"""Learning happens: a small CIGM + GECo run on synthetic outfits scores far above chance on
the test split, while the same run on shuffled (meaningless) pairs stays near chance."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from geco.cli import cmd_evaluate
from geco.data.synth import SynthSpec, generate
from geco.train.loop import train

pytestmark = pytest.mark.slow

SPEC = SynthSpec(n_train_tops=288, pairs_per_top=2, n_valid=96, n_test=120, image_size=64, seed=3)
# The tiny config grown until it learns: 64 px, a wider CIGM, more epochs.
LEARN = ["data.image_size=64", "cigm.features=16", "cigm.epochs=3", "geco.epochs=5",
         "geco.batch_size=32"]


def run_pipeline(tiny, data: Path, run: Path) -> dict:
    cfg = tiny(data, *LEARN)
    train(cfg, "cigm", run)
    train(cfg, "geco", run)
    return cmd_evaluate(cfg, run, "test", str(run / "metrics.json"), None)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learn") / "synth"
    generate(out, SPEC)
    return out


def test_geco_learns_the_compatibility_rule(tiny, data, tmp_path):
    m = run_pipeline(tiny, data, tmp_path / "run")
    # Chance: AUC 0.5, MRR-full = H_U/U (about 0.045 for 120 candidates).
    assert m["auc_1vs1"] >= 0.75, m
    assert m["auc_1vs3"] >= 0.75, m
    assert m["mrr_full"] >= 3 * m["random_mrr_full"], m


def test_shuffled_pairs_stay_near_chance(tiny, data, tmp_path):
    # Same images, same pipeline, but each top paired with a random bottom: nothing to learn.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    (shuffled / "img").symlink_to(data / "img")
    (shuffled / "files").mkdir()
    for name in ("valid.csv", "test.csv"):
        (shuffled / "files" / name).write_text((data / "files" / name).read_text())
    header, *rows = (data / "files" / "train.csv").read_text().splitlines()
    tops = [r.split(",")[0] for r in rows]
    bottoms = [r.split(",")[1] for r in rows]
    random.Random(0).shuffle(bottoms)
    lines = [header, *(f"{t},{b}" for t, b in zip(tops, bottoms, strict=True))]
    (shuffled / "files" / "train.csv").write_text("\n".join(lines) + "\n")
    m = run_pipeline(tiny, shuffled, tmp_path / "run")
    assert m["auc_1vs1"] <= 0.65, m
    assert m["mrr_full"] <= 2 * m["random_mrr_full"], m
