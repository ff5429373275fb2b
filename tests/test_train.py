"""Both training stages end to end on tiny synthetic data: checkpoints, resume, evaluation,
counted skips, and clear errors before any training for impossible settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from geco.cli import cmd_evaluate, main
from geco.errors import DataError, GecoError
from geco.train.loop import train


def train_cigm(cfg, run):
    return train(cfg, "cigm", run)[1]


def train_geco(cfg, run):
    return train(cfg, "geco", run)[1]


@pytest.fixture(scope="module")
def trained(synth_small, tiny, tmp_path_factory):
    """One CIGM epoch and one GECo epoch in a run dir shared by this module's tests."""
    run = tmp_path_factory.mktemp("run")
    train_cigm(tiny(synth_small), run)
    summary = train_geco(tiny(synth_small), run)
    return run, summary


def test_run_dir_holds_checkpoints_config_history_and_grids(trained, synth_small):
    run, summary = trained
    for stage in ("cigm", "geco"):
        ckpt = torch.load(run / stage / "last.pt", weights_only=True)
        assert ckpt["stage"] == stage and ckpt["epoch"] == 0
        assert ckpt["config"]["data"]["image_size"] == 32  # the resolved config travels along
        assert {"state", "history", "best"} <= set(ckpt)
        assert (run / stage / "samples" / "epoch_001.png").is_file()
        lines = (run / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in lines] == [1]
    ckpt = torch.load(run / "geco" / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler"} <= set(ckpt["state"])
    assert summary["best"]["metric"] == "valid_auc_1vs3"
    record = summary["history"][0]
    assert record["skipped_samples"] == 0 and record["samples_per_s"] > 0
    n_train = len((synth_small / "files" / "train.csv").read_text().splitlines()) - 1
    assert record["samples"] == n_train  # one epoch = every pair once
    assert 0.0 <= record["valid_auc_1vs1"] <= 1.0


def test_resume_continues_without_repeating_epochs(tiny, trained, synth_small, tmp_path):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = train_geco(tiny(synth_small, "geco.epochs=2"), copy)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    lines = (copy / "geco" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    # Same epochs again: nothing left to do, history unchanged.
    again = train_geco(tiny(synth_small, "geco.epochs=2"), copy)
    assert [r["epoch"] for r in again["history"]] == [1, 2]


def test_resume_refuses_a_different_config(tiny, trained, synth_small, tmp_path):
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with pytest.raises(GecoError, match="geco.alpha"):
        train_geco(tiny(synth_small, "geco.epochs=2", "geco.alpha=0.9"), copy)


def test_a_run_saved_before_new_config_sections_still_resumes(tiny, trained, synth_small, tmp_path):
    """A checkpoint written by an older geco lacks sections and keys added since (here the
    baselines, tracking and tune sections and one GECo key): they take their defaults, so the
    run resumes; a changed setting is still refused."""
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "geco" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    for section in ("baselines", "tracking", "tune"):
        del ckpt["config"][section]
    del ckpt["config"]["geco"]["global_negatives"]
    torch.save(ckpt, path)
    summary = train_geco(tiny(synth_small, "geco.epochs=2", "baselines.mgcm.features=8"), copy)
    assert [r["epoch"] for r in summary["history"]] == [1, 2]
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["geco"]["global_negatives"]
    torch.save(ckpt, path)
    with pytest.raises(GecoError, match="geco.global_negatives: False -> True"):
        train_geco(tiny(synth_small, "geco.epochs=3", "geco.global_negatives=true"), copy)


def test_evaluate_is_deterministic_and_complete(tiny, trained, synth_small, tmp_path):
    run, _ = trained
    a = cmd_evaluate(tiny(synth_small), run, "test", str(tmp_path / "a.json"), None)
    b = cmd_evaluate(tiny(synth_small, "eval.batch_size=7"), run, "test",
                     str(tmp_path / "b.json"), None)
    keys = ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full", "recall_at_10", "ndcg_at_10",
            "n_queries", "n_candidates")
    for k in keys:
        assert k in a
        assert a[k] == pytest.approx(b[k], abs=1e-6), k  # batch size changes nothing
    assert a["n_queries"] == 100 and a["n_candidates"] == 100
    on_disk = json.loads((tmp_path / "a.json").read_text())
    assert on_disk["auc_1vs1"] == a["auc_1vs1"]


def _shard_test_split(synth_small: Path, out: Path) -> Path:
    from geco.data.images import ImageFolder
    from geco.data.shards import ShardSpec, write_shards
    from geco.data.splits import load_splits, resolve_layout

    layout = resolve_layout(synth_small)
    splits = load_splits(layout, splits=("valid", "test"))
    spec = ShardSpec(image_size=32, samples_per_shard=30, catalogue_per_shard=40)
    write_shards(splits, ImageFolder(layout.img_dir), out, spec, source="synth_small")
    return out


def test_evaluate_from_shards_equals_the_folder_with_the_same_bytes(tiny, trained, synth_small,
                                                                    tmp_path):
    """Shard evaluation (eval rows + catalogue, several shards, 2 workers) scores exactly like
    folder evaluation of a folder holding the shards' own JPEG bytes; the dataset folder is not
    read at all (data.root points nowhere)."""
    run, _ = trained
    shards = _shard_test_split(synth_small, tmp_path / "shards")
    mirror = tmp_path / "mirror"
    shutil.copytree(synth_small / "files", mirror / "files")
    (mirror / "img").mkdir()
    import tarfile

    for tar in sorted(shards.glob("*test-*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext != "meta.json":
                continue
            meta = json.loads(data)
            if "id" in meta:
                (mirror / "img" / f"{meta['id']}.jpg").write_bytes(members[f"{key}.bottom.jpg"])
            else:
                (mirror / "img" / f"{meta['top']}.jpg").write_bytes(members[f"{key}.top.jpg"])
    folder = cmd_evaluate(tiny(mirror), run, "test", str(tmp_path / "f.json"), None)
    sharded = cmd_evaluate(tiny(tmp_path / "nowhere", f"data.shards={shards}",
                                "data.num_workers=2", "eval.batch_size=7"),
                           run, "test", str(tmp_path / "s.json"), None)
    for k in ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full", "recall_at_10", "ndcg_at_10",
              "n_queries", "n_candidates"):
        assert sharded[k] == pytest.approx(folder[k], abs=1e-6), k
    assert sharded["n_queries"] == 100 and sharded["skipped"] == 0
    assert str(shards) in sharded["dataset"]


def test_evaluate_from_shards_names_a_missing_catalogue_shard(tiny, trained, synth_small, tmp_path):
    run, _ = trained
    shards = _shard_test_split(synth_small, tmp_path / "shards")
    victim = sorted(shards.glob("catalogue-test-*.tar"))[-1]
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        cmd_evaluate(tiny(synth_small, f"data.shards={shards}"), run, "test", None, None)
    with pytest.raises(DataError, match="no eval split 'train'"):
        cmd_evaluate(tiny(synth_small, f"data.shards={shards}"), run, "train", None, None)


def test_unreadable_training_image_is_named_or_counted(tiny, synth_small, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    first = (data / "files" / "train.csv").read_text().splitlines()[1].split(",")
    top = first[0]
    (data / "img" / f"{top}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows_with_top = sum(1 for line in (data / "files" / "train.csv").read_text().splitlines()
                        if line.split(",")[0] == top)

    with pytest.raises(DataError, match=f"{top}.jpg"):
        train_cigm(tiny(data), tmp_path / "run-error")

    summary = train_cigm(tiny(data, "data.on_bad_image=skip"), tmp_path / "run-skip")
    assert summary["history"][0]["skipped_samples"] == rows_with_top


def test_cli_rejects_impossible_settings_before_training(synth_small, tmp_path, capsys):
    rc = main(["train", "geco", "--run-dir", str(tmp_path), f"data.root={synth_small}",
               "geco.alpha=0", "geco.beta=0"])
    assert rc == 2
    assert "alpha and beta" in capsys.readouterr().err
    assert not (tmp_path / "geco").exists()


def test_cli_names_the_missing_generator(synth_small, tmp_path, capsys):
    rc = main(["train", "geco", "--run-dir", str(tmp_path), f"data.root={synth_small}",
               "data.kind=standard", "data.image_size=32", "geco.backbone.weights=random",
               "geco.backbone.allow_random_init=true"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no CIGM generator" in err and "cigm" in err


def test_backbone_without_weights_stops_clearly(tiny, synth_small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    run = tmp_path / "run"
    train_cigm(tiny(synth_small), run)
    rc = main(["train", "geco", "--run-dir", str(run), f"data.root={synth_small}",
               "data.kind=standard", "data.image_size=32", "cigm.features=8",
               "geco.backbone.weights=imagenet"])
    assert rc == 2
    assert "allow_random_init" in capsys.readouterr().err


def test_killed_training_resumes_from_its_last_checkpoint(tiny, synth_small, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = ["train", "cigm", "--run-dir", str(run),
            *tiny.args("cigm.epochs=12", "cigm.max_steps_per_epoch=2", "cigm.n_samples=2",
                       root=synth_small)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "geco.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "cigm" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = torch.load(last, weights_only=True)
    done = before["epoch"] + 1
    assert 1 <= done < 12

    assert main(args) == 0  # same command again: picks up after the last saved epoch
    ckpt = torch.load(last, weights_only=True)
    assert [r["epoch"] for r in ckpt["history"]] == list(range(1, 13))
    # The epochs finished before the kill were kept (their records, timings included), not rerun.
    assert ckpt["history"][:done] == before["history"]
    lines = (run / "cigm" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, 13))


@pytest.mark.integration
def test_both_stages_train_from_shards_in_s3(tiny, synth_small, s3_env, tmp_path, capsys):
    """synthetic -> shards -> SeaweedFS (auth on) -> streamed into CIGM and GECo training."""
    url = f"s3://{s3_env.bucket}/train-from-s3"
    common = [f"data.root={synth_small}", "data.kind=standard", "data.image_size=32"]
    shard = ["data", "shard", "--out", url, "--image-size", "32", "--samples-per-shard", "50",
             *common]
    assert main(shard) == 0
    first = json.loads(capsys.readouterr().out)["upload"]
    assert first["transferred"] > 1 and first["skipped"] == 0
    assert main(shard) == 0  # same input, same bytes: the second upload transfers nothing
    again = json.loads(capsys.readouterr().out)["upload"]
    assert again["transferred"] == 0 and again["skipped"] == first["transferred"]
    cfg = tiny(synth_small, f"data.shards={url}", "data.num_workers=2")
    run = tmp_path / "run"
    cigm = train_cigm(cfg, run)
    geco = train_geco(tiny(synth_small, f"data.shards={url}", "data.num_workers=2"), run)
    n_train = len((synth_small / "files" / "train.csv").read_text().splitlines()) - 1
    for summary in (cigm, geco):
        record = summary["history"][0]
        assert record["skipped_samples"] == 0 and record["samples_per_s"] > 0
    # One streamed epoch = every training pair once.
    assert cigm["history"][0]["samples"] == geco["history"][0]["samples"] == n_train
    from geco.data.stream import load_manifest

    assert load_manifest(url)["splits"]["train"]["samples"] == n_train


def test_cigm_resume_ignores_geco_settings_but_not_its_own(tiny, trained, synth_small, tmp_path):
    """A sweep reuses a finished CIGM run with other GECo settings: allowed; a CIGM setting
    that changes what was trained is still refused."""
    run, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    summary = train_cigm(tiny(synth_small, "geco.alpha=0.9", "geco.batch_size=8"), copy)
    assert [h["epoch"] for h in summary["history"]] == [1]  # nothing retrained
    with pytest.raises(GecoError, match="cigm.lambda_l1"):
        train_cigm(tiny(synth_small, "cigm.lambda_l1=10"), copy)


def test_a_diverging_stage_stops_with_the_culprit_named(tiny, tmp_path):
    """The loop refuses to checkpoint an epoch whose training loss is not finite."""
    from geco.baselines.base import RowDataset
    from geco.data.source import batch_loader
    from geco.train.loop import fit
    from geco.train.runtime import init_runtime

    class Diverging:
        name, epochs, max_steps_per_epoch, depends_on, rng_seed = "toy", 2, 0, (), None
        modules: list = []

        def __init__(self):
            self.cfg = tiny(None)
            self.loader = batch_loader(RowDataset(8), batch_size=4)

        def train_step(self, batch):
            return {"loss": float("nan"), "acc": 0.5}

        def end_epoch(self, epoch, out_dir):
            return {}

        def selection(self):
            return None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(GecoError, match="train_loss not finite in epoch 1"):
        fit(Diverging(), init_runtime(tiny(None).runtime), tmp_path)
    assert not (tmp_path / "toy" / "last.pt").exists()
