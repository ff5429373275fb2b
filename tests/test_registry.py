"""geco.registry on a local SQLite store (no server): the pyfunc retriever logged, registered,
loaded in a fresh process and checked against the Retriever itself; the promotion gate,
rollback and the ray_jobs/promote.py CLI; lazy MLflow import and by-reference pickling."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from geco import registry
from geco.data.images import ImageFolder
from geco.data.transforms import imagenet_transform
from geco.errors import GecoError
from geco.models.geco import load_retriever

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
MODEL = "geco-retriever"
N_QUERIES = 10


def split_rows(root: Path) -> list[list[str]]:
    """Rows of the test split: top, positive bottom, negatives."""
    with open(root / "files" / "test.csv", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.fixture(scope="module", autouse=True)
def stray_store(tmp_path_factory):
    """Point MLflow's global URI at a store nobody should touch: everything here must go to
    the URI it was given (MLflow falls back to ./mlflow.db in the cwd otherwise)."""
    from mlflow.tracking._tracking_service import utils

    stray = f"sqlite:///{tmp_path_factory.mktemp('stray') / 'stray.db'}"
    previous = utils._tracking_uri
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", stray)  # the original comes back on exit
        mlflow.set_tracking_uri(stray)
        yield stray
        mlflow.set_tracking_uri(previous)
    assert not Path(stray.removeprefix("sqlite:///")).exists(), \
        "something wrote through MLflow's global tracking URI"


@pytest.fixture(scope="module")
def model_files(retriever_files, synth_small):
    files, summary = retriever_files
    cat = torch.load(files["catalogue"], weights_only=True)
    # Every bottom the test rows mention, once, in order of first appearance.
    ids = [b for row in split_rows(synth_small) for b in row[1:]]
    assert cat["ids"] == list(dict.fromkeys(ids))
    return files, summary


def new_store(tmp_path: Path) -> tuple[str, str]:
    """(tracking URI, experiment id) with artifacts kept under tmp_path, not ./mlruns."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("geco", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, exp


def new_run(uri: str, exp: str, metric: float, finished: bool = True) -> str:
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(exp).info.run_id
    client.log_metric(run_id, "valid_auc_1vs1", metric)
    if finished:
        client.set_terminated(run_id)
    return run_id


@pytest.fixture(scope="module")
def store(model_files, tmp_path_factory):
    """Version 1 of MODEL, logged and registered from a finished run."""
    files, _ = model_files
    tmp = tmp_path_factory.mktemp("mlflow")
    uri, exp = new_store(tmp)
    run_id = new_run(uri, exp, 0.6)
    out = registry.log_retriever(
        run_id, tracking_uri=uri, geco_checkpoint=files["geco"],
        generator_checkpoint=files["generator"], catalogue=files["catalogue"],
        registered_model=MODEL, metrics={"valid_auc_1vs1": 0.6})
    return uri, exp, run_id, out


PREDICT = """
import json, sys
import mlflow, pandas as pd
uri, paths, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model("models:/geco-retriever/1")
frame = pd.DataFrame({"image": paths})
first = model.predict(frame, params={"k": 10, "seed": 7})
again = model.predict(frame, params={"k": 10, "seed": 7})
raw = model.predict(pd.DataFrame({"image": [open(p, "rb").read() for p in paths]}),
                    params={"k": 10, "seed": 7})
default = model.predict(pd.DataFrame({"image": paths}))  # default params (k=10, seed=0)
mapping = model.predict({"image": list(paths)})  # a dict
assert mapping.equals(default), "dict input must rank like a DataFrame"
try:
    model.predict(pd.DataFrame({"image": [paths[0], paths[0] + ".missing"]}))
    error = None
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
json.dump({"first": first.to_dict("list"), "again": again.to_dict("list"),
           "raw": raw.to_dict("list"), "default": default.to_dict("list"), "error": error,
           "geco_file": sys.modules["geco"].__file__}, open(out, "w"))
"""


@pytest.fixture(scope="module")
def served(store, synth_small, tmp_path_factory):
    """Predictions of models:/geco-retriever/1 made in a fresh interpreter."""
    uri = store[0]
    tmp = tmp_path_factory.mktemp("served")
    paths = [str(synth_small / "img" / f"{row[0]}.jpg") for row in split_rows(synth_small)]
    out = tmp / "out.json"
    subprocess.run([sys.executable, "-c", PREDICT, uri, json.dumps(paths[:N_QUERIES]), str(out)],
                   check=True, cwd=tmp, timeout=300)
    return paths[:N_QUERIES], json.loads(out.read_text())


def test_registered_version_is_the_candidate(store, model_files, stray_store):
    uri, _, run_id, out = store
    assert out["version"] == 1 and out["model_uri"].startswith("models:/")
    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version_by_alias(MODEL, "candidate")
    assert int(mv.version) == 1 and mv.run_id == run_id
    assert float(mv.tags["valid_auc_1vs1"]) == 0.6
    assert client.get_run(run_id).info.status == "FINISHED"  # left as found
    # The global URI and $MLFLOW_TRACKING_URI are as they were before log_retriever.
    assert mlflow.get_tracking_uri() == stray_store == os.environ["MLFLOW_TRACKING_URI"]

    # Served checkpoints carry no optimiser or discriminator state.
    files, _ = model_files
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(MODEL, "1")))
    geco = torch.load(local / "artifacts" / "geco.pt", weights_only=True)
    cigm = torch.load(local / "artifacts" / "generator.pt", weights_only=True)
    assert list(geco["state"]) == ["model", "prior", "prior_weight"]
    assert list(cigm["state"]) == ["generator"]
    assert geco["state"]["prior"] == {}  # popularity prior off: no counts
    assert geco["config"] == torch.load(files["geco"], weights_only=True)["config"]
    with pytest.raises(GecoError, match="is not a GECO checkpoint"):
        registry.log_retriever(run_id, tracking_uri=uri, geco_checkpoint=files["generator"],
                               generator_checkpoint=files["generator"],
                               catalogue=files["catalogue"])


def test_fresh_process_predicts_topk_from_the_catalogue(served, model_files):
    _, result = served
    files, _ = model_files
    catalogue = set(torch.load(files["catalogue"], weights_only=True)["ids"])
    first = result["first"]
    # The model's own copy of geco served, not the installed package.
    assert Path(result["geco_file"]).parts[-3:] == ("code", "geco", "__init__.py")
    assert first["query"] == [q for q in range(N_QUERIES) for _ in range(10)]
    assert first["rank"] == list(range(1, 11)) * N_QUERIES
    assert set(first["bottom_id"]) <= catalogue
    for q in range(N_QUERIES):
        scores = first["score"][q * 10:(q + 1) * 10]
        assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    assert result["again"] == first  # deterministic for a given seed
    assert result["raw"] == first  # bytes in = paths in
    assert len(result["default"]["query"]) == 10 * N_QUERIES
    assert result["error"] and "row 1" in result["error"] and ".missing" in result["error"]


def test_pyfunc_ranks_like_the_retriever_itself(served, model_files, synth_small):
    """The 1-epoch model is too weak for a quality bar, so check faithfulness instead: the
    served top 10 equals a brute-force ranking of every catalogue bottom by the Retriever."""
    paths, result = served
    files, _ = model_files
    retriever, _ = load_retriever(files["geco"], torch.device("cpu"),
                                  generator_path=files["generator"])
    ids = torch.load(files["catalogue"], weights_only=True)["ids"]
    tf = imagenet_transform(32)
    images = ImageFolder(synth_small / "img")
    bottoms = retriever.bottoms(torch.stack([tf(images.load(i)) for i in ids]))
    tops = torch.stack([tf(images.load(Path(p).stem)) for p in paths])
    noise = torch.randn(1, retriever.generator.noise_dim,
                        generator=torch.Generator().manual_seed(7)).expand(len(tops), -1)
    scores = retriever.queries(tops, noise) @ bottoms.T
    for q in range(len(paths)):
        order = torch.argsort(scores[q], descending=True, stable=True)[:10]
        assert result["first"]["bottom_id"][q * 10:(q + 1) * 10] == [ids[j] for j in order]
        torch.testing.assert_close(torch.tensor(result["first"]["score"][q * 10:(q + 1) * 10],
                                                dtype=torch.float64),
                                   scores[q, order].double(), rtol=1e-4, atol=1e-3)


def test_gate_promotes_refuses_and_rolls_back(store, model_files):
    files, _ = model_files
    uri, exp, _, _ = store
    name = "gate-test"
    client = mlflow.MlflowClient(uri)

    def version(metric: float, tagged: bool = True) -> int:
        run_id = new_run(uri, exp, metric, finished=tagged)
        out = registry.log_retriever(
            run_id, tracking_uri=uri, geco_checkpoint=files["geco"],
            generator_checkpoint=files["generator"], catalogue=files["catalogue"],
            registered_model=name, metrics={"valid_auc_1vs1": metric} if tagged else None)
        # A run still open elsewhere (the training driver's) stays open.
        assert client.get_run(run_id).info.status == ("FINISHED" if tagged else "RUNNING")
        return out["version"]

    champion = lambda: int(client.get_model_version_by_alias(name, "champion").version)  # noqa: E731
    gate = dict(metric="valid_auc_1vs1", margin=0.1)

    assert version(0.6) == 1
    d = registry.promote(uri, name, 1, **gate)
    assert d["gate.decision"] == "accepted" and "no champion" in d["gate.reason"]
    assert champion() == 1

    assert version(0.5, tagged=False) == 2  # metric read from the run, not a tag
    d = registry.promote(client, name, 2, **gate)
    assert d["gate.decision"] == "refused" and d["champion"] == 1 and champion() == 1
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.decision"] == "refused" and tags["gate.candidate"] == "0.5"
    assert tags["gate.champion"] == "0.6" and tags["gate.margin"] == "0.1"
    assert "does not beat" in tags["gate.reason"]

    assert version(0.8) == 3
    d = registry.promote(uri, name, 3, metric="valid_auc_1vs1", margin=0.3)  # 0.8 <= 0.9
    assert d["gate.decision"] == "refused" and champion() == 1
    d = registry.promote(uri, name, 3, **gate)
    assert d["gate.decision"] == "accepted" and champion() == 3
    assert client.get_model_version(name, "3").tags[registry.PREVIOUS_TAG] == "1"
    d = registry.promote(uri, name, 3, **gate)  # already the champion: nothing decided
    assert d["gate.decision"] == "unchanged" and "already champion" in d["gate.reason"]
    assert client.get_model_version(name, "3").tags["gate.decision"] == "accepted"

    assert registry.rollback(uri, name) == {"name": name, "champion": 1, "rolled_back_from": 3}
    assert champion() == 1
    assert client.get_model_version(name, "3").tags["gate.rolled_back_to"] == "1"
    assert client.get_model_version(name, "1").tags["gate.rolled_back_from"] == "3"
    with pytest.raises(GecoError, match="nothing to roll back"):
        registry.rollback(uri, name)
    with pytest.raises(GecoError, match="no version 9"):
        registry.promote(uri, name, 9, **gate)
    with pytest.raises(GecoError, match="no 'valid_mrr_full'"):
        registry.promote(uri, name, 2, metric="valid_mrr_full", margin=0.0)


def promote_cli(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / "promote.py"), *args, "--tracking-uri", uri,
         "--model", "cli-test"], capture_output=True, text=True, timeout=120)


def test_promote_cli(store):
    uri, exp, _, out = store
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("cli-test")
    # A plain artifact location as source: a models:/m-... source would make the registry
    # look the logged model up through the *global* tracking URI, not this client's.
    source = client.get_model_version_download_uri(MODEL, "1")
    for metric in (0.7, 0.75):
        client.create_model_version("cli-test", source, run_id=new_run(uri, exp, 0.0),
                                    tags={"valid_auc_1vs1": str(metric)})

    r = promote_cli(uri, "promote", "--version", "1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["gate.decision"] == "accepted"
    r = promote_cli(uri, "promote", "--version", "2", "tracking.gate_margin=0.1")  # config
    assert r.returncode == 0 and json.loads(r.stdout)["gate.decision"] == "refused"
    r = promote_cli(uri, "promote", "--version", "2", "--margin", "0.01")
    assert json.loads(r.stdout)["gate.decision"] == "accepted"

    r = promote_cli(uri, "show")
    assert r.returncode == 0, r.stderr
    assert "version 2  aliases: champion" in r.stdout and "gate.decision = accepted" in r.stdout

    r = promote_cli(uri, "rollback")
    assert r.returncode == 0 and json.loads(r.stdout)["champion"] == 1

    for args, message in ((("promote", "--version", "7"), "no version 7 (versions: 1, 2)"),
                          (("rollback",), "nothing to roll back")):
        r = promote_cli(uri, *args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
        assert r.stderr.startswith("geco: error: ") and message in r.stderr


def test_logged_model_is_code_with_a_binary_signature(store):
    """Models from code: the logged model is geco's source (no pickle, no requirement on a
    package named geco), a binary "image" input, params k/seed and a serving input example."""
    code = ("import sys, geco.registry, geco.serving; "
            "assert not {'mlflow', 'ray', 'torch'} & set(sys.modules), 'imported too much'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    uri = store[0]
    # download_artifacts("models:/m-...", tracking_uri=uri) would look the model up through
    # the global tracking URI: ask this store's registry where the files are instead.
    location = mlflow.MlflowClient(uri).get_model_version_download_uri(MODEL, "1")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location))
    assert not (local / "python_model.pkl").exists()
    assert (local / "serving_model.py").is_file() and (local / "code/geco/serving.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text().split()
    assert not [r for r in reqs if r.split("==")[0] == "geco"] and any(
        r.startswith("torch==") for r in reqs)
    info = mlflow.models.get_model_info(str(local))
    assert info.signature.inputs.to_dict() == [{"type": "binary", "name": "image",
                                                "required": True}]
    assert {p.name: p.default for p in info.signature.params} == {"k": 10, "seed": 0}
    assert "image_uri" in info.signature.outputs.input_names()
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["params"] == {"k": 10, "seed": 0}
    jpeg = base64.b64decode(example["dataframe_split"]["data"][0][0])
    assert jpeg[:2] == b"\xff\xd8"  # a JPEG, as a client sends it
    # An old version (the pyfunc class pickled by reference) still finds its class.
    from geco import serving

    assert registry.GecoRetrieverModel is serving.GecoRetrieverModel
