"""On a CUDA machine: both stages run with bf16 autocast and channels_last on real photos."""

from __future__ import annotations

import pytest

from geco.cli import cmd_evaluate
from geco.config import load_config
from geco.train.loop import train

pytestmark = pytest.mark.gpu


def test_one_short_epoch_each_on_mango_dev(shared_data, tmp_path):
    data = shared_data / "mango-dev"
    if not (data / "files").is_dir():
        pytest.skip("mango-dev not present")
    cfg = load_config(None, [
        f"data.root={data}", "data.kind=standard", "data.num_workers=4",
        "cigm.epochs=1", "cigm.max_steps_per_epoch=10", "geco.epochs=1",
        "geco.max_steps_per_epoch=10", "geco.backbone.weights=imagenet",
        "geco.backbone.allow_random_init=true",
    ])
    run = tmp_path / "run"
    for stage in ("cigm", "geco"):
        _, summary = train(cfg, stage, run, resume=False)
        record = summary["history"][-1]
        assert record["samples_per_s"] > 0 and record["skipped_samples"] == 0
    m = cmd_evaluate(cfg, run, "test", str(tmp_path / "m.json"), None)
    assert 0.0 <= m["auc_1vs1"] <= 1.0 and m["n_queries"] > 0
