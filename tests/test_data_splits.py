"""Split readers and layouts: the real split files (docs/model.md §1.1), malformed CSVs, pairs.csv."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from geco.data.splits import (
    KINDS,
    Split,
    load_splits,
    read_split_csv,
    resolve_layout,
    split_of_top,
)
from geco.errors import ConfigError, DataError

# (dataset folder, kind, split, rows, unique tops, unique positive bottoms, negatives per row)
REAL = [
    ("FashionVC", "fashionvc", "train", 17140, 12309, 11281, 0),
    ("FashionVC", "fashionvc", "valid", 500, 500, 498, 9),
    ("FashionVC", "fashionvc", "test", 1000, 1000, 977, 9),
    ("ExpReduced", "expreduced", "train", 17140, 11291, 9575, 0),
    ("ExpReduced", "expreduced", "valid", 500, 500, 491, 9),
    ("ExpReduced", "expreduced", "test", 1000, 1000, 960, 9),
    ("FashionTaobao-TB", "fashiontaobaotb", "valid", 5571, 4464, 4105, 9),
    ("FashionTaobao-TB", "fashiontaobaotb", "test", 7954, 6238, 5622, 9),
]


@pytest.fixture(scope="module")
def real_splits(shared_data: Path) -> dict[tuple[str, str], Split]:
    out = {}
    for folder in ("FashionVC", "ExpReduced", "FashionTaobao-TB"):
        layout = resolve_layout(shared_data / "geco-splits" / folder)
        names = ("valid", "test") if folder == "FashionTaobao-TB" else ("train", "valid", "test")
        for name, split in load_splits(layout, splits=names).items():
            out[folder, name] = split
    return out


@pytest.mark.parametrize("folder,kind,name,rows,tops,bottoms,k", REAL)
def test_real_split_counts(real_splits, shared_data, folder, kind, name, rows, tops, bottoms, k):
    split = real_splits[folder, name]
    assert resolve_layout(shared_data / "geco-splits" / folder).kind == kind
    assert split.name == name
    assert (len(split), len(split.unique_tops()), len(split.unique_bottoms())) == (
        rows,
        tops,
        bottoms,
    )
    assert split.n_negatives == k
    assert (split.negatives is None) == (k == 0)
    assert len(split.lines) == rows and split.lines[0] == 2  # header is line 1


def test_real_ids_stay_strings(real_splits):
    fvc = real_splits["FashionVC", "test"]
    assert all(isinstance(i, str) and i.isdigit() for i in fvc.tops[:50])
    tb = real_splits["FashionTaobao-TB", "valid"]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in tb.tops[:50] + tb.bottoms[:50])
    # Top ids never occur as bottom ids (docs/model.md §1.1).
    assert not set(fvc.tops) & set(fvc.bottoms)


def test_tb_duplicate_negatives_are_allowed(real_splits):
    # docs/model.md §1.1: 79 (valid) and 81 (test) TB rows repeat an id among their 9 negatives.
    for name, expected in (("valid", 79), ("test", 81)):
        negs = real_splits["FashionTaobao-TB", name].negatives
        assert sum(len(set(n)) < len(n) for n in negs) == expected


def test_tb_missing_train_file_is_named(shared_data):
    layout = resolve_layout(shared_data / "geco-splits" / "FashionTaobao-TB")
    with pytest.raises(DataError, match=r"fashiontaobaotb.*train_no_dup_1vs9\.csv"):
        load_splits(layout)


def test_mango_dev_layout(shared_data):
    layout = resolve_layout(shared_data / "mango-dev")
    assert layout.kind == "standard" and layout.img_dir == shared_data / "mango-dev" / "img"
    splits = load_splits(layout)
    assert splits["train"].negatives is None
    assert splits["valid"].n_negatives == splits["test"].n_negatives == 9
    assert "-" in splits["test"].tops[0]  # MANGO ids like 43017044-05, kept verbatim


# ------------------------------------------------------------------ malformed files


def _write(tmp_path: Path, text: str, name: str = "bad.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


EVAL_HEADER = "tshirt,positive_pant,neg_1,neg_2,neg_3\n"


@pytest.mark.parametrize(
    "text,line,what",
    [
        (EVAL_HEADER + "t1,b1,n1,n2,n3\nt2,b2,n1,n2\n", 3, "expected 5 fields"),
        (EVAL_HEADER + "t1,b1,n1,n2,n3\nt2,b2,n1,n2,n3,n4\n", 3, "expected 5 fields"),
        ("tshirt,pant\nt1,b1\n", 1, "missing required column 'positive_pant'"),
        ("top,positive_pant\nt1,b1\n", 1, "missing required column 'tshirt'"),
        (EVAL_HEADER + "t1,b1,n1,n2,n3\n,b2,n1,n2,n3\n", 3, "empty id in column 'tshirt'"),
        (EVAL_HEADER + "t1, ,n1,n2,n3\n", 2, "empty id in column 'positive_pant'"),
        (EVAL_HEADER + "t1,b1,n1,,n3\n", 2, "empty id in column 'neg_2'"),
        (EVAL_HEADER + "t1,b1,n1,n2,n3\n\nt2,b2,n1,b2,n3\n", 4, "neg_2 'b2' equals the positive"),
        ("tshirt,positive_pant,neg_1,neg_3\nt1,b1,n1,n2\n", 1, "neg_1..neg_K"),
    ],
)
def test_malformed_csv_names_file_and_line(tmp_path, text, line, what):
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as e:
        read_split_csv(path, "test")
    msg = str(e.value)
    assert f"bad.csv:{line}" in msg and what in msg


def test_empty_and_header_only_files(tmp_path):
    with pytest.raises(DataError, match=r"bad\.csv.*empty file"):
        read_split_csv(_write(tmp_path, ""), "train")
    with pytest.raises(DataError, match=r"bad\.csv.*no data rows"):
        read_split_csv(_write(tmp_path, "tshirt,positive_pant\n\n"), "train")


def test_too_few_negatives(tmp_path):
    path = _write(tmp_path, "tshirt,positive_pant,neg_1,neg_2\nt,b,n1,n2\n")
    assert read_split_csv(path, "valid", min_negatives=2).n_negatives == 2
    with pytest.raises(DataError, match=r"bad\.csv:1.*at least 3 negative columns.*found 2"):
        read_split_csv(path, "valid", min_negatives=3)


def test_eval_split_needs_three_negatives(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.csv").write_text("tshirt,positive_pant\nt,b\n")
    (files / "valid.csv").write_text("tshirt,positive_pant,neg_1,neg_2\nt,b,n1,n2\n")
    (files / "test.csv").write_text(EVAL_HEADER + "t,b,n1,n2,n3\n")
    layout = resolve_layout(tmp_path)
    assert layout.kind == "standard"
    assert len(load_splits(layout, splits=("train", "test"))["test"]) == 1
    with pytest.raises(DataError, match=r"valid\.csv:1"):
        load_splits(layout)


def test_tb_columns_and_crlf_and_bom(tmp_path):
    text = (
        "\ufefftshirt,positive_pant,outfit_id,has_exploded,neg_1,neg_2,neg_3\r\n"
        "00ab,0cd0,o1,False,e1,e1,e2\r\n"  # duplicate negatives are fine (TB has them)
    )
    split = read_split_csv(_write(tmp_path, text), "valid", min_negatives=3)
    assert split.tops == ("00ab",) and split.bottoms == ("0cd0",)
    assert split.negatives == (("e1", "e1", "e2"),)


def test_split_helpers(tmp_path):
    text = EVAL_HEADER + "t1,b1,n1,n2,n3\nt2,b2,n1,n2,n3\n\nt1,b3,n1,n2,n3\nt3,b1,n4,n2,n3\n"
    split = read_split_csv(_write(tmp_path, text, "s.csv"), "test")
    assert split.unique_tops() == ["t1", "t2", "t3"]
    assert split.unique_bottoms() == ["b1", "b2", "b3"]
    assert split.lines == (2, 3, 5, 6)
    assert split.where(2).endswith("s.csv:5")
    sub = split.subset([3, 0])
    assert sub.tops == ("t3", "t1") and sub.bottoms == ("b1", "b1") and sub.lines == (6, 2)
    assert sub.negatives == (("n4", "n2", "n3"), ("n1", "n2", "n3"))
    assert sub.where(0) == split.where(3)


# ------------------------------------------------------------------ layouts


def test_resolve_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        resolve_layout(tmp_path / "nope")
    with pytest.raises(DataError, match="cannot detect"):
        resolve_layout(tmp_path)
    with pytest.raises(ConfigError, match="unknown dataset kind"):
        resolve_layout(tmp_path, "imagenet")
    (tmp_path / "pairs.csv").write_text("top,bottom\nt,b\n")
    assert resolve_layout(tmp_path).kind == "pairs"
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "devdata_tops.csv").write_text(EVAL_HEADER)
    with pytest.raises(DataError, match="several dataset kinds"):
        resolve_layout(tmp_path)
    layout = resolve_layout(tmp_path, "FashionVC")  # explicit kind, case-insensitive
    assert layout.kind == "fashionvc" and layout.test.name == "testdata_tops.csv"
    with pytest.raises(DataError, match=r"fashionvc.*missing test split file.*testdata_tops"):
        load_splits(layout, splits=("test",))
    with pytest.raises(ConfigError, match="unknown split"):
        load_splits(layout, splits=("dev",))
    assert set(KINDS) == {"fashionvc", "expreduced", "fashiontaobaotb", "standard", "pairs"}


# ------------------------------------------------------------------ pairs.csv


def _pairs(tmp_path: Path, n_tops: int = 300, per_top: int = 2) -> Path:
    lines = ["top,bottom"]
    for t in range(n_tops):
        lines += [f"t{t},b{(t * 7 + j) % 500}" for j in range(per_top)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_pairs_split_by_top_with_negatives(tmp_path):
    layout = resolve_layout(_pairs(tmp_path))
    assert layout.train == layout.valid == layout.test == tmp_path / "pairs.csv"
    splits = load_splits(layout, n_negatives=5, seed=3)
    assert sum(len(s) for s in splits.values()) == 600
    tops = {name: set(s.tops) for name, s in splits.items()}
    assert not (tops["train"] & tops["valid"] or tops["train"] & tops["test"])
    assert not tops["valid"] & tops["test"]
    assert splits["train"].negatives is None
    positives: dict[str, set[str]] = {}
    for s in splits.values():
        for t, b in zip(s.tops, s.bottoms, strict=True):
            positives.setdefault(t, set()).add(b)
    for name in ("valid", "test"):
        s = splits[name]
        assert 20 < len(s) < 120  # ~10 % of 600 rows
        pool = set(s.unique_bottoms())
        for t, negs in zip(s.tops, s.negatives, strict=True):
            assert len(negs) == len(set(negs)) == 5
            assert set(negs) <= pool and not set(negs) & positives[t]
        assert s.where(0).startswith(str(tmp_path / "pairs.csv") + ":")
    again = load_splits(layout, n_negatives=5, seed=3)
    assert again == splits
    assert load_splits(layout, n_negatives=5, seed=4)["test"].negatives != splits["test"].negatives


def test_pairs_hash_is_stable_across_processes():
    # Golden values: Python's hash() is salted per process; ours must not be.
    golden = {"a": "valid", "b": "test", "c": "train", "43017044-05": "valid", "100058394": "test"}
    assert {k: split_of_top(k) for k in golden} == golden
    code = "from geco.data.splits import split_of_top as f; print(f('b'), f('c'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONHASHSEED": "123"},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.split() == ["test", "train"]


def test_pairs_with_split_column_and_errors(tmp_path):
    rows = [
        f"t{i},b{i},{'train' if i < 20 else ('valid' if i < 30 else 'test')}" for i in range(40)
    ]
    (tmp_path / "pairs.csv").write_text("top,bottom,split\n" + "\n".join(rows) + "\n")
    splits = load_splits(resolve_layout(tmp_path), n_negatives=4)
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [20, 10, 10]
    with pytest.raises(DataError, match=r"cannot sample 12 negatives.*only 9"):
        load_splits(resolve_layout(tmp_path), n_negatives=12)
    (tmp_path / "pairs.csv").write_text("top,bottom,split\nt1,b1,holdout\n")
    with pytest.raises(DataError, match=r"pairs\.csv:2: unknown split 'holdout'"):
        load_splits(resolve_layout(tmp_path))
