"""Config: YAML presets on a base + overrides, typed, unknown keys, values outside a field's
choices and impossible settings rejected by name; what a resume compares."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from geco.config import Config, load_config, save_config
from geco.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["synthetic-cpu.yaml", "paper.yaml", "mango-dev-gpu.yaml",
                                  "ablation-no-bpr.yaml", "ablation-no-infonce.yaml"])
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
    ("data.on_bad_image=ignore", "data.on_bad_image='ignore': expected one of error, skip"),
    ("tune.metric=loss", "tune.metric"),
    ("baselines.bpr_dae.bpr_term=tanh", "baselines.bpr_dae.bpr_term"),
    ("baselines.mgcm.batch_size=3", "baselines.mgcm.batch_size"),
    ("baselines.pix2pixcm.image_size=128", "baselines.pix2pixcm.image_size"),
    ("cluster.num_workers=0", "cluster.num_workers"),
    ("tracking.on_error=ignore", "tracking.on_error"),
    ("data.decode=device", "data.decode='device': decoding on the device reads JPEG bytes from shards"),
    ("data.decode=gpu", "data.decode"),
    ("data.prefetch_factor=-1", "data.prefetch_factor"),
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


def test_on_and_off_mean_the_words_where_a_setting_takes_words(tmp_path):
    # YAML 1.1 reads on/off as booleans, on the command line and in files alike.
    cfg = load_config(None, ["runtime.amp=off", "runtime.channels_last=on"])
    assert (cfg.runtime.amp, cfg.runtime.channels_last) == ("off", "on")
    (tmp_path / "c.yaml").write_text("runtime:\n  channels_last: off\n")
    assert load_config(tmp_path / "c.yaml").runtime.channels_last == "off"
    with pytest.raises(ConfigError, match="runtime.amp=True: expected one of auto, bf16, off"):
        load_config(None, ["runtime.amp=yes"])  # no word of amp's means yes


def test_a_preset_builds_on_its_base(tmp_path):
    (tmp_path / "base.yaml").write_text("geco:\n  tau: 0.5\n  alpha: 0.5\ncigm:\n  epochs: 3\n")
    (tmp_path / "mid.yaml").write_text("base: base.yaml\ngeco:\n  alpha: 0.9\n")
    (tmp_path / "top.yaml").write_text("base: mid.yaml\ncigm:\n  epochs: 4\n")
    cfg = load_config(tmp_path / "top.yaml", ["geco.tau=0.2"])
    # Later files win key by key; overrides win over every file.
    assert (cfg.geco.alpha, cfg.geco.tau, cfg.cigm.epochs) == (0.9, 0.2, 4)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "orphan.yaml")


def test_drift_compares_what_a_stage_depends_on_and_skips_resumable_fields():
    from geco.config import drift

    old = load_config(None, ["geco.epochs=2", "data.num_workers=0"]).to_dict()
    new = load_config(None, ["geco.epochs=9", "data.num_workers=4", "tune.num_samples=3",
                             "cigm.lambda_l1=5"]).to_dict()
    # epochs and num_workers are resumable; tune is not what GECo depends on.
    assert drift(old, new, ("data", "geco")) == []
    assert drift(old, new, ("data", "cigm", "geco")) == ["cigm.lambda_l1: 100.0 -> 5.0"]
    # A key missing from an older checkpoint's config takes its default.
    del old["geco"]["global_negatives"]
    assert drift(old, new, ("geco",)) == []
    new["geco"]["global_negatives"] = True
    assert drift(old, new, ("geco",)) == ["geco.global_negatives: False -> True"]
    assert drift(old, new, ("baselines.mgcm",)) == []


def test_one_section_is_read_without_the_models():
    """ray_jobs/promote.py reads the tracking section alone: no torch import, and overrides of
    other sections are refused rather than silently ignored."""
    import subprocess
    import sys

    from geco.settings import load_section
    from geco.tracking import TrackingConfig

    code = ("import sys; from geco.settings import load_section; "
            "from geco.tracking import TrackingConfig; "
            "c = load_section('configs/synthetic-cpu.yaml', ['tracking.gate_margin=0.25'], "
            "'tracking', TrackingConfig); "
            "print(c.gate_margin, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["0.25", "False"], out.stderr
    with pytest.raises(ConfigError, match="only tracking"):
        load_section(None, ["geco.tau=0.5"], "tracking", TrackingConfig)
    with pytest.raises(ConfigError, match="tracking.on_error"):
        load_section(None, ["tracking.on_error=maybe"], "tracking", TrackingConfig)


def test_auto_loader_workers_follow_the_cpus_of_the_process(monkeypatch):
    from geco.data import source

    assert load_config(None, ["data.num_workers=3"]).data.loader_workers == 3
    # Prefetch: 2 batches of decoded images per worker; JPEG-byte batches are small, so
    # decode=device keeps more in flight (>= 8 per rank); none without workers.
    data = load_config(None, ["data.decode=device", "data.shards=s3://b/p"]).data
    assert [data.loader_prefetch(w) for w in (0, 1, 2, 16)] == [None, 8, 4, 4]
    assert load_config(None, []).data.loader_prefetch(4) == 2
    assert load_config(None, ["data.prefetch_factor=6"]).data.loader_prefetch(4) == 6
    auto = load_config(None, ["data.num_workers=-1"]).data
    monkeypatch.setattr(source.os, "sched_getaffinity", lambda pid: set(range(16)),
                        raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert auto.loader_workers == 15  # one core stays with the training process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks on the node share its 16 cores
    assert auto.loader_workers == 3
    monkeypatch.setattr(source.os, "sched_getaffinity", lambda pid: set(range(64)),
                        raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto.loader_workers == 16  # capped
    with pytest.raises(ConfigError, match="data.num_workers"):
        load_config(None, ["data.num_workers=-2"])
