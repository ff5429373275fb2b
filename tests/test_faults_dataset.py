"""Dataset anomalies (issue 16 item 9): duplicate rows, self-pairs, negatives equal to the
positive, duplicate negatives and train/test overlap of tops are reported with counts;
evaluation splits that would corrupt metrics are refused by default (`data.anomalies`), and
`geco data check` prints the report for a dataset folder or its shards."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geco.cli import main
from geco.config import load_config
from geco.data.check import check_splits, dataset_report
from geco.data.images import ImageFolder
from geco.data.shards import ShardSpec, write_shards
from geco.data.source import open_data
from geco.data.splits import load_splits, resolve_layout
from geco.data.transforms import imagenet_transform
from geco.errors import ConfigError, DataError

TRAIN = [f"t{i},b{i}" for i in range(6)]
# Eval rows: top, positive, three negatives (the other rows' positives).
VALID = [f"v{i},vb{i}," + ",".join(f"vb{j}" for j in range(4) if j != i) for i in range(4)]
TEST = [f"s{i},sb{i}," + ",".join(f"sb{j}" for j in range(4) if j != i) for i in range(4)]
EVAL_HEADER = "tshirt,positive_pant,neg_1,neg_2,neg_3"


def _dataset(root: Path, *, train=TRAIN, valid=VALID, test=TEST) -> Path:
    """files/{train,valid,test}.csv from the rows given (header = line 1, rows from line 2)
    and a small JPEG for every id they mention."""
    (root / "files").mkdir(parents=True)
    (root / "img").mkdir()
    ids: set[str] = set()
    for name, header, rows in (("train", "tshirt,positive_pant", train),
                               ("valid", EVAL_HEADER, valid), ("test", EVAL_HEADER, test)):
        (root / "files" / f"{name}.csv").write_text("\n".join([header, *rows]) + "\n")
        ids |= {i for row in rows for i in row.split(",")}
    rng = np.random.default_rng(0)
    for i in sorted(ids):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.jpg")
    return root


def _open(root: Path, *overrides: str):
    cfg = load_config(None, [f"data.root={root}", "data.kind=standard", "data.num_workers=0",
                             "data.image_size=32", *overrides])
    return open_data(cfg.data)


def _evaluate_rows(root: Path, *overrides: str) -> int:
    """Load the test split as `geco evaluate` does (queries in batches); its row count."""
    data = _open(root, *overrides)
    queries = data.queries("test", imagenet_transform(32), batch_size=4, num_workers=0)
    return sum(len(batch["index"]) for batch in queries)


# ------------------------------------------------------------------ refused for evaluation


def test_duplicate_test_row_is_refused_naming_file_and_row(tmp_path):
    root = _dataset(tmp_path / "d", test=[*TEST, TEST[1]])  # row 2 again, at line 6
    with pytest.raises(DataError) as e:
        _evaluate_rows(root)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{root / 'files' / 'test.csv'}: 1 duplicate rows" in msg
    assert "line 6: top 's1', bottom 'sb1' as at line 3" in msg
    assert "data.anomalies=warn" in msg


def test_self_pair_in_test_is_refused(tmp_path):
    root = _dataset(tmp_path / "d", test=[*TEST, "s9,s9,sb0,sb1,sb2"])
    with pytest.raises(DataError, match=r"test\.csv: 1 rows pairing a top with itself.*"
                                        r"line 6: top 's9' is its own positive"):
        _evaluate_rows(root)


def test_negative_equal_to_positive_is_counted_and_refused(tmp_path, caplog):
    bad = "s9,sb0,sb1,sb0,sb2"  # neg_2 is the positive
    root = _dataset(tmp_path / "d", test=[*TEST, bad, bad.replace("s9", "s8")])
    report = dataset_report(_open(root).cfg)
    f = report.splits[2].findings["negative_is_positive"]
    assert (f.count, f.severity) == (2, "error")
    assert f.examples[0] == "line 6: neg_2 'sb0' is the positive"
    with pytest.raises(DataError, match=r"test\.csv: 2 rows with a negative equal to the "
                                        r"positive.*line 6: neg_2 'sb0'"):
        _evaluate_rows(root)
    # "warn" reads them anyway, with the count in the log.
    with caplog.at_level(logging.WARNING, logger="geco"):
        assert _evaluate_rows(root, "data.anomalies=warn") == 6
    assert "2 rows with a negative equal to the positive" in caplog.text


def test_warn_policy_loads_duplicates_with_counts(tmp_path, caplog):
    root = _dataset(tmp_path / "d", test=[*TEST, TEST[0], TEST[0]])
    with caplog.at_level(logging.WARNING, logger="geco"):
        assert _evaluate_rows(root, "data.anomalies=warn") == 6
    assert "test split" in caplog.text and "2 duplicate rows" in caplog.text


def test_anomalies_key_is_validated():
    with pytest.raises(ConfigError, match=r"data\.anomalies='ignore': expected one of error, warn"):
        load_config(None, ["data.anomalies=ignore"])


# ------------------------------------------------------------------ warnings with counts


def test_train_anomalies_only_warn(tmp_path, caplog):
    root = _dataset(tmp_path / "d", train=[*TRAIN, TRAIN[0], "t9,t9"])
    with caplog.at_level(logging.WARNING, logger="geco"):
        splits, _ = _open(root).splits(("train",))
    assert len(splits["train"]) == 8
    assert "train split" in caplog.text and "1 duplicate rows" in caplog.text
    assert "1 rows pairing a top with itself" in caplog.text and "line 9" in caplog.text


def test_duplicate_negatives_only_warn(tmp_path, caplog):
    root = _dataset(tmp_path / "d", test=[*TEST, "s9,sb0,sb1,sb1,sb2"])
    with caplog.at_level(logging.WARNING, logger="geco"):
        assert _evaluate_rows(root) == 5
    assert "1 rows naming a negative twice" in caplog.text
    assert "line 6: negative 'sb1' twice (top 's9')" in caplog.text


def test_train_test_overlap_is_a_warning_with_counts(tmp_path, caplog):
    # Two test rows whose tops are train tops: evaluation (test only) still compares them.
    test = [TEST[0], TEST[1], "t2,sb2,sb0,sb1,sb3", "t3,sb3,sb0,sb1,sb2"]
    root = _dataset(tmp_path / "d", test=test)
    with caplog.at_level(logging.WARNING, logger="geco"):
        assert _evaluate_rows(root) == 4
    assert "test split" in caplog.text
    assert "2 tops also in train (2 of 4 tops, 2 rows)" in caplog.text
    assert f"top 't2' at line 4 and {root / 'files' / 'train.csv'}:4" in caplog.text
    report = dataset_report(_open(root).cfg)
    overlap = report.splits[2].findings["train_overlap"]
    assert (overlap.count, overlap.severity) == (2, "warning") and not report.errors


# ------------------------------------------------------------------ geco data check


def test_cli_check_clean_dataset_exits_0(tmp_path, capsys):
    root = _dataset(tmp_path / "d")
    assert main(["data", "check", f"data.root={root}"]) == 0
    out = capsys.readouterr().out
    assert "ok: nothing the policy refuses" in out and "test" in out and "train" in out


def test_cli_check_reports_and_exits_2(tmp_path, capsys):
    root = _dataset(tmp_path / "d", train=[*TRAIN, TRAIN[0]], test=[*TEST, TEST[1]])
    assert main(["data", "check", f"data.root={root}"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("geco: error: ") and err.count("\n") == 1
    assert "test.csv" in err and "line 6" in err
    assert "refused (1 error)" in out and "warning: train split" in out
    # warn: the same report, exit 0; --json: the same counts, machine-readable.
    assert main(["data", "check", "--json", f"data.root={root}", "data.anomalies=warn"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["policy"] == "warn"
    assert report["splits"]["test"]["duplicate_rows"] == {
        "count": 1, "severity": "warning", "examples": ["line 6: top 's1', bottom 'sb1' as at line 3"]}
    assert report["splits"]["train"]["duplicate_rows"]["count"] == 1
    assert report["splits"]["test"]["rows"] == 5


def test_cli_check_reads_the_shards_metadata(tmp_path, capsys):
    root = _dataset(tmp_path / "d", test=[*TEST, TEST[1]])
    layout = resolve_layout(root)
    # write_shards takes the splits as given: shards written before the policy existed.
    splits = load_splits(layout)
    out = tmp_path / "shards"
    write_shards(splits, ImageFolder(layout.img_dir), out, ShardSpec(image_size=8), source="x")
    assert main(["data", "check", "--json", f"data.shards={out}"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["location"] == str(out) and set(report["splits"]) == {"train", "valid", "test"}
    assert report["splits"]["test"]["duplicate_rows"]["count"] == 1
    assert report["splits"]["test"]["duplicate_rows"]["examples"] == [
        "line 6: top 's1', bottom 'sb1' as at line 3"]


# ------------------------------------------------------------------ datasets we ship or read


def test_synthetic_dataset_has_no_anomalies(synth_small):
    report = check_splits(load_splits(resolve_layout(synth_small), strict=False))
    assert not report.errors and not report.warnings
    assert all(f.count == 0 for s in report.splits for f in s.findings.values())


# (dataset folder, split, check, count): what the real split files hold; all warnings.
REAL_WARNINGS = {
    "geco-splits/FashionVC": {("valid", "train_overlap"): 33, ("test", "train_overlap"): 60},
    "geco-splits/ExpReduced": {("valid", "train_overlap"): 111, ("test", "train_overlap"): 226},
    "geco-splits/FashionTaobao-TB": {("valid", "duplicate_negatives"): 79,
                                     ("test", "duplicate_negatives"): 81},
    "mango-dev": {},
}


@pytest.mark.parametrize("folder", sorted(REAL_WARNINGS))
def test_real_splits_load_under_the_default_policy(shared_data, folder):
    cfg = load_config(None, [f"data.root={shared_data / folder}"])
    report = dataset_report(cfg.data)
    assert not report.errors
    found = {(s.name, c): f.count for s in report.splits for c, f in s.findings.items() if f.count}
    assert found == REAL_WARNINGS[folder]
    assert all(s.findings[c].severity == "warning" for s in report.splits
               for c in s.findings if (s.name, c) in found)


def test_mango_dev_loads_for_training_and_evaluation(shared_data):
    # The only real dataset here with images: loaded as training and evaluation load it.
    splits, _ = _open(shared_data / "mango-dev").splits(("train", "valid", "test"))
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [3264, 350, 293]
