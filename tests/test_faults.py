"""Faults and bad input, the way a hostile user or an unlucky operator meets them (issue 16):
a run killed mid-epoch resumes to the same bits, a full disk while checkpointing, impossible
settings, an evaluation that lost rows to skips. The shard, registry and dataset cases live
in test_faults_shards.py, test_faults_registry.py and test_faults_dataset.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geco.cli import cmd_evaluate, main
from geco.config import load_config
from geco.errors import ConfigError, DataError, GecoError
from geco.train.runtime import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _geco(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "geco.cli", *args], env=env, **kw)


def _states_equal(a: dict, b: dict, where: str = "") -> list[str]:
    """Paths of the tensors/values that differ between two (nested) state dicts."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _states_equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{where}: length"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _states_equal(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a):
        return [] if torch.equal(a, b) else [where]
    return [] if a == b else [where]


# --- exact resume ---------------------------------------------------------------------------

def test_a_run_killed_mid_epoch_resumes_to_the_same_bits(tiny, synth_small, tmp_path):
    """GECo (template noise, shuffled pairs, 2 loader workers) killed in the middle of its
    second epoch and run again ends with weights, optimiser and scheduler bit-identical
    to an uninterrupted run's: everything random derives from (seed, epoch, rank, worker)."""
    cigm_run = tmp_path / "cigm-run"
    assert main(["train", "cigm", "--run-dir", str(cigm_run),
                 *tiny.args("cigm.max_steps_per_epoch=2", root=synth_small)]) == 0
    cigm = cigm_run / "cigm" / "last.pt"

    def args(run: Path) -> list[str]:
        return ["train", "geco", "--run-dir", str(run), "--cigm", str(cigm),
                *tiny.args("geco.epochs=2", "geco.max_steps_per_epoch=6", "data.num_workers=2",
                           "runtime.log_every=1", root=synth_small)]

    steady = _geco(args(tmp_path / "steady"), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)

    killed = tmp_path / "killed"
    proc = _geco(args(killed), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in proc.stdout:  # progress lines, one per step
        seen.append(line)
        if "[geco] epoch 2/2 step 3/6" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    assert load_checkpoint(killed / "geco" / "last.pt")["epoch"] == 0  # mid-epoch 2

    assert main(args(killed)) == 0  # the same command again resumes after epoch 1
    assert steady.wait(timeout=600) == 0
    a = load_checkpoint(tmp_path / "steady" / "geco" / "last.pt")
    b = load_checkpoint(killed / "geco" / "last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert _states_equal(a["state"], b["state"]) == []
    strip = ("samples_per_s", "seconds")  # timings differ, nothing else may
    assert [{k: v for k, v in r.items() if k not in strip} for r in a["history"]] == \
        [{k: v for k, v in r.items() if k not in strip} for r in b["history"]]


# --- checkpoint writes ------------------------------------------------------------------------

def test_a_full_disk_while_checkpointing_names_the_file_and_keeps_the_last_one(
        tiny, synth_small, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "cigm", "--run-dir", str(run),
            *tiny.args("cigm.max_steps_per_epoch=2", root=synth_small)]
    assert main(args) == 0
    last = run / "cigm" / "last.pt"
    before = last.read_bytes()
    # The next write lands on /dev/full: every write fails with ENOSPC, as on a full disk.
    tmp = last.with_suffix(".pt.tmp")
    tmp.symlink_to("/dev/full")
    capsys.readouterr()
    assert main([*args, "cigm.epochs=2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("geco: error: cannot write checkpoint")
    assert str(last) in err[-1] and "No space left on device" in err[-1]
    assert "inline_container" not in "\n".join(err)
    assert not tmp.exists() and not tmp.is_symlink()  # no partial file left filling the disk
    assert last.read_bytes() == before and load_checkpoint(last)["epoch"] == 0
    assert main([*args, "cigm.epochs=2"]) == 0  # space again: the run goes on
    assert load_checkpoint(last)["epoch"] == 1


def test_a_write_error_mid_file_removes_the_partial_file(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stops the write half-way with an OS error (EFBIG)."""
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"w": torch.zeros(8)})
    script = (
        "import resource, signal, torch\n"
        "from pathlib import Path\n"
        "from geco.train.runtime import save_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        f"save_checkpoint(Path({str(path)!r}), {{'w': torch.zeros(1_000_000)}})\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    assert f"GecoError: cannot write checkpoint {path}: File too large" in out.stderr
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["w"].shape == (8,)


# --- settings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, culprit", [
    ("geco.lr_gamma=.nan", "geco.lr_gamma"),
    ("geco.lr_gamma=0", "geco.lr_gamma"),
    ("geco.lr=.inf", "geco.lr"),
    ("cigm.lambda_l1=.nan", "cigm.lambda_l1"),
    ("geco.max_steps_per_epoch=-1", "geco.max_steps_per_epoch"),
    ("cigm.max_steps_per_epoch=-3", "cigm.max_steps_per_epoch"),
    ("baselines.mgcm.max_steps_per_epoch=-1", "baselines.mgcm.max_steps_per_epoch"),
    ("cigm.noise_dim=0", "cigm.noise_dim"),
    ("cigm.n_samples=0", "cigm.n_samples"),
    ("runtime.device=tpu", "runtime.device"),
    ("runtime.device=cuda:x", "runtime.device"),
    ("runtime.log_every=0", "runtime.log_every"),
    ("runtime.seed=-1", "runtime.seed"),
    ("eval.seed=-5", "eval.seed"),
    ("eval.min_coverage=0", "eval.min_coverage"),
    ("eval.min_coverage=1.5", "eval.min_coverage"),
    ("data.num_workers=-2", "data.num_workers"),
    ("data.synth.n_test=-1", "data.synth.n_test"),
    ("data.synth.jpeg_quality=0", "data.synth.jpeg_quality"),
    ("cluster.eval_cpus=.nan", "cluster.eval_cpus"),
    ("cluster.eval_gpus=-1", "cluster.eval_gpus"),
    ("cluster.gpus_per_worker=-1", "cluster.gpus_per_worker"),
    ("tune.cpus_per_trial=0", "tune.cpus_per_trial"),
    ("tune.max_concurrent=-1", "tune.max_concurrent"),
    ("tracking.gate_margin=-0.1", "tracking.gate_margin"),
    ("tracking.gate_margin=.nan", "tracking.gate_margin"),
    ("tracking.gate_metric=valid_accuracy", "tracking.gate_metric"),
    ("geco.popularity_search=[0.1, .nan]", "geco.popularity_search"),
])
def test_impossible_settings_are_refused_naming_the_key(override, culprit):
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        load_config(None, [override])


def test_the_cli_refuses_them_before_any_work(synth_small, tmp_path, capsys):
    for bad in ("geco.lr_gamma=.nan", "geco.max_steps_per_epoch=-1", "runtime.device=tpu"):
        rc = main(["train", "geco", "--run-dir", str(tmp_path / "run"),
                   f"data.root={synth_small}", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and bad.split("=")[0] in err[0], err
    assert not (tmp_path / "run").exists()


# --- evaluation over part of a split ------------------------------------------------------------

def test_evaluation_refuses_metrics_over_part_of_a_split(tiny, synth_small, retriever_files,
                                                          tmp_path, capsys):
    files, _ = retriever_files
    run = files["geco"].parent.parent
    data = tmp_path / "data"
    shutil.copytree(synth_small, data)
    rows = [line.split(",") for line in (data / "files" / "test.csv").read_text().splitlines()[1:]]
    # Three positive bottoms of the test split go missing.
    victims = list(dict.fromkeys(r[1] for r in rows))[:3]
    for item in victims:
        (data / "img" / f"{item}.jpg").unlink()
    lost = sum(1 for r in rows if set(victims) & set(r[1:]))

    with pytest.raises(DataError, match=f"{victims[0]}|{victims[1]}|{victims[2]}"):
        cmd_evaluate(tiny(data), run, "test", str(tmp_path / "e.json"), None)  # error mode

    skip = tiny(data, "data.on_missing_image=skip")  # rows with missing images dropped
    with pytest.raises(DataError, match=rf"scored {len(rows) - lost} of the {len(rows)} test "
                                        r"rows .*eval.min_coverage=1"):
        cmd_evaluate(skip, run, "test", str(tmp_path / "s.json"), None)
    assert not (tmp_path / "s.json").exists()  # no tables, no metrics file

    capsys.readouterr()
    rc = main(["evaluate", "--run-dir", str(run), "--out", str(tmp_path / "cli.json"),
               *tiny.args("data.on_missing_image=skip", root=data)])
    out = capsys.readouterr()
    assert rc == 2 and "Table 2" not in out.out
    assert "geco: error:" in out.err and "min_coverage" in out.err

    # Asked for explicitly, a partial evaluation is reported, and says what it left out.
    part = cmd_evaluate(tiny(data, "data.on_missing_image=skip", "eval.min_coverage=0.5"), run,
                        "test", str(tmp_path / "p.json"), None)
    on_disk = json.loads((tmp_path / "p.json").read_text())
    for m in (part, on_disk):
        assert m["rows_total"] == len(rows) and m["rows_scored"] == len(rows) - lost
        assert m["rows_unreadable"] == lost and m["rows_missing_candidates"] == 0
        assert m["n_queries"] == len(rows) - lost

    full = cmd_evaluate(tiny(synth_small), run, "test", str(tmp_path / "f.json"), None)
    assert full["rows_scored"] == full["rows_total"] == len(rows)


def test_a_lost_catalogue_shard_in_skip_mode_is_not_a_smaller_split(tiny, synth_small,
                                                                    retriever_files, tmp_path):
    """The issue's case: shards, on_bad_image=skip, one catalogue shard gone. Its bottoms are
    skipped, the rows naming them cannot be scored, and the metrics of the rest are refused."""
    from tests.test_train import _shard_test_split

    files, _ = retriever_files
    run = files["geco"].parent.parent
    shards = _shard_test_split(synth_small, tmp_path / "shards")
    victim = sorted(shards.glob("catalogue-test-*.tar"))[0]
    victim.unlink()
    cfg = tiny(synth_small, f"data.shards={shards}", "data.on_bad_image=skip")
    with pytest.raises(DataError, match=r"scored \d+ of the 100 test rows"):
        cmd_evaluate(cfg, run, "test", None, None)
    cfg.eval.min_coverage = 0.01
    part = cmd_evaluate(cfg, run, "test", str(tmp_path / "p.json"), None)
    assert part["rows_total"] == 100 and 0 < part["rows_scored"] < 100
    assert part["rows_missing_candidates"] == 100 - part["rows_scored"]
    assert part["candidates_unreadable"] > 0


def test_a_checkpoint_folder_that_cannot_be_made_is_named():
    with pytest.raises(GecoError, match="cannot write checkpoint"):
        save_checkpoint(Path("/proc/geco-cannot-write-here/last.pt"), {"w": torch.zeros(1)})


def test_an_error_in_a_loader_worker_is_reported_in_one_line(capsys, tmp_path):
    """torch re-raises a worker's error with its traceback as the message; the CLI prints the
    original line."""
    from torch.utils.data import DataLoader, Dataset

    from geco.errors import one_line

    class Broken(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int):
            raise DataError(f"{tmp_path}/train-000.tar: sha256 differs from the manifest")

    with pytest.raises(DataError) as info:
        list(DataLoader(Broken(), num_workers=1))
    assert "Traceback" in str(info.value)
    assert one_line(info.value) == f"{tmp_path}/train-000.tar: sha256 differs from the manifest"


def test_n_negatives_that_a_split_file_overrides_is_said(tiny, synth_small, caplog):
    from geco.data.source import open_data

    data = open_data(tiny(synth_small, "data.n_negatives=5").data)
    assert data.split("test").n_negatives == 9  # the file's negatives, as written
    said = [r.getMessage() for r in caplog.records if "data.n_negatives=5" in r.getMessage()]
    assert len(said) == 1 and "test.csv" in said[0] and "9 negatives" in said[0]
    caplog.clear()
    open_data(tiny(synth_small).data).split("test")
    assert not any("n_negatives" in r.getMessage() for r in caplog.records)
