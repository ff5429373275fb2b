"""Config: YAML + overrides, typed, unknown keys and impossible settings rejected by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geco.config import Config, load_config, save_config
from geco.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["synthetic-cpu.yaml", "paper.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_nested():
    cfg = load_config(ROOT / "configs" / "synthetic-cpu.yaml",
                      ["geco.tau=0.5", "cigm.betas=[0.4, 0.9]", "geco.backbone.weights=/x.pth",
                       "data.synth.seed=7"])
    assert cfg.geco.tau == 0.5 and cfg.cigm.betas == [0.4, 0.9]
    assert cfg.geco.backbone.weights == "/x.pth" and cfg.data.synth.seed == 7
    # The shipped file's other values survive an override of a sibling key.
    assert cfg.geco.backbone.allow_random_init is True


@pytest.mark.parametrize("override, culprit", [
    ("geco.alhpa=1", "geco.alhpa"),
    ("geco.epochs=three", "geco.epochs"),
    ("geco.lr=fast", "geco.lr"),
    ("geco.alpha=0", None),  # fine alone (beta > 0)
    ("geco.tau=0", "tau"),
    ("geco.tau=-1", "tau"),
    ("cigm.lambda_l1=-5", "lambda"),
    ("data.image_size=100", "data.image_size"),
    ("geco.lr=0", "geco.lr"),
    ("eval.ties=random", "eval.ties"),
    ("geco.selection_metric=loss", "geco.selection_metric"),
    ("geco.betas=[0.5]", "geco.betas"),
])
def test_bad_values_name_the_setting(override, culprit):
    if culprit is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config(None, [override])


def test_alpha_and_beta_zero_rejected():
    with pytest.raises(ConfigError, match="alpha and beta"):
        load_config(None, ["geco.alpha=0", "geco.beta=0"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "synthetic-cpu.yaml", ["geco.gamma=0.5"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["geco"]["gamma"] == 0.5


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("geco: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_exponent_without_dot_is_a_number():
    # YAML 1.1 would read 1e-4 as a string; users type it that way.
    assert load_config(None, ["geco.lr=1e-4"]).geco.lr == 1e-4
