"""The served retriever over REST: a registered version served by MLflow's real scoring server
(`mlflow models serve`, started by infra/local/serve.sh as `make serve` does, from a shell
whose PATH lacks the venv) answers JPEG bytes like the in-process ranking, answers bad
requests with HTTP 400 and one clear message and keeps serving, and answers concurrent clients
correctly. Plus geco.serving's own guards and a catalogue chosen at load time."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from geco import serving
from geco.errors import GecoError
from tests.conftest import register_retriever

mlflow = pytest.importorskip("mlflow")

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "infra" / "local" / "serve.sh"
MODEL = "geco-retriever"
K = 5


def split_tops(root: Path, n: int) -> list[Path]:
    with open(root / "files" / "test.csv", newline="") as f:
        return [root / "img" / f"{row[0]}.jpg" for row in list(csv.reader(f))[1:n + 1]]


@pytest.fixture(scope="module")
def champion(retriever_files, synth_small, tmp_path_factory):
    """(tracking URI, files): version 1 of MODEL in a SQLite store, alias champion."""
    files, _ = retriever_files
    uri, client, _, out = register_retriever(
        tmp_path_factory.mktemp("serving_store"), files, MODEL,
        example_image=split_tops(synth_small, 1)[0].read_bytes())
    client.set_registered_model_alias(MODEL, "champion", str(out["version"]))
    return uri, files


def serve_sh(*args: str, env: dict[str, str], timeout: float = 300):
    return subprocess.run(["bash", str(SERVE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def server(champion, synth_small, tmp_path_factory):
    """The champion served on a free loopback port; yields (base URL, request.json path)."""
    import socket

    uri, _ = champion
    stack = tmp_path_factory.mktemp("stack")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A fresh shell: no venv on PATH (MLflow's server runs `uvicorn` from PATH).
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
           "GECO_VENV_BIN": str(Path(sys.executable).parent), "MLFLOW_TRACKING_URI": uri}
    args = ("--dir", str(stack), "--port", str(port))
    top = split_tops(synth_small, 1)[0]
    r = serve_sh("start", *args, "--image", str(top), "--k", str(K), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "served (pid" in r.stdout and f"http://127.0.0.1:{port}" in r.stdout
    assert "curl -s" in r.stdout and "request.json" in r.stdout
    try:
        yield f"http://127.0.0.1:{port}", stack / "serve" / "request.json"
    finally:
        r = serve_sh("stop", *args, env=env, timeout=60)
        assert "stopped" in r.stdout, r.stdout + r.stderr


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/invocations", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def frame(*images: bytes) -> dict:
    return {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b).decode()] for b in images]}}


@pytest.fixture(scope="module")
def expected(champion, synth_small):
    """In-process answers (top path -> DataFrame) from the same checkpoints and catalogue."""
    _, files = champion
    bundle = serving.load_bundle(files["geco"], files["generator"], files["catalogue"])
    tops = split_tops(synth_small, 6)
    return {p: serving.rank(bundle, [str(p)], k=K) for p in tops}


def check(answer: list[dict], want) -> None:
    assert [a["bottom_id"] for a in answer] == want["bottom_id"].tolist()
    assert [a["image_uri"] for a in answer] == want["image_uri"].tolist()
    torch.testing.assert_close(torch.tensor([a["score"] for a in answer]),
                               torch.tensor(want["score"].tolist()), rtol=1e-4, atol=1e-3)


@pytest.mark.integration  # a real scoring server
def test_served_answers_jpeg_bytes_like_the_retriever(server, expected):
    url, request = server
    status, body = post(url, request.read_bytes())  # the curl that serve.sh printed
    assert status == 200, body
    first = next(iter(expected))
    check(body["predictions"], expected[first])
    assert all(Path(a["image_uri"]).is_file() for a in body["predictions"])

    tops = list(expected)
    status, body = post(url, {**frame(*(p.read_bytes() for p in tops)), "params": {"k": K}})
    assert status == 200, body
    for q, p in enumerate(tops):
        check([a for a in body["predictions"] if a["query"] == q], expected[p])
    # MLflow's other JSON layout: "inputs" (base64 reaches the model still encoded).
    status, body = post(url, {"inputs": {"image": [base64.b64encode(first.read_bytes())
                                                   .decode()]}, "params": {"k": K}})
    assert status == 200, body
    check(body["predictions"], expected[first])


def big_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5000, 4000), (90, 40, 40)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


@pytest.mark.integration  # a real scoring server
def test_bad_requests_get_400_with_one_clear_message(server, expected):
    url, _ = server
    good = next(iter(expected)).read_bytes()
    cases = [
        (frame(b"GIF? no, plain text"), "row 0", "not an image file"),
        (frame(b""), "row 0", "empty (0 bytes)"),
        (frame(big_jpeg()), "5000x4000 (20.0 MP)", "send a smaller one"),
        ({"dataframe_split": {"columns": ["image"], "data": []}}, "no images", ""),
        ({**frame(good), "params": {"k": 0}}, "k must be", ">= 1, got 0"),
        ({**frame(good), "params": {"k": -3}}, "k must be", "got -3"),
        ({**frame(good, b"junk"), "params": {"k": 2}}, "row 1", "not an image file"),
        # A path is not read on the server: to MLflow it is malformed base64.
        ({"dataframe_split": {"columns": ["image"], "data": [["/etc/passwd"]]}}, "image", ""),
        (b"{not json", "", ""),
    ]
    for body, *needles in cases:
        status, answer = post(url, body)
        assert status == 400, (needles, status, answer)
        message = answer.get("message", "")
        assert all(n in message for n in needles), (needles, message)
        assert "Failed to predict data" not in message and len(message) < 400, message
        assert "root:" not in message  # nothing of /etc/passwd
        # ... and the server keeps serving.
        assert post(url, frame(good))[0] == 200


@pytest.mark.integration  # a real scoring server
def test_concurrent_clients_get_their_own_answers(server, expected):
    url, _ = server
    tops = list(expected) * 4

    def ask(p: Path):
        return p, post(url, {**frame(p.read_bytes()), "params": {"k": K}})

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, tops))
    for p, (status, body) in answers:
        assert status == 200, body
        check(body["predictions"], expected[p])


def test_catalogue_is_chosen_at_load_time(champion, retriever_files, tmp_path, expected):
    """model_config {"catalogue": ...} (or $GECO_CATALOGUE for `mlflow models serve`) swaps
    the inventory without a new model version."""
    uri, files = champion
    cat = torch.load(files["catalogue"], weights_only=True)
    keep = slice(0, 7)
    small = {**cat, "ids": cat["ids"][keep], "embeddings": cat["embeddings"][keep],
             "image_uris": cat["image_uris"][keep]}
    torch.save(small, tmp_path / "small.pt")
    location = mlflow.MlflowClient(uri).get_model_version_download_uri(MODEL, "1")
    model = mlflow.pyfunc.load_model(location, model_config={"catalogue": str(tmp_path / "small.pt")})
    top = next(iter(expected))
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [top.read_bytes()]}), params={"k": 20})
    assert len(out) == 7 and set(out["bottom_id"]) == set(small["ids"])


def test_serving_guards(retriever_files, synth_small, tmp_path):
    files, _ = retriever_files
    bundle = serving.load_bundle(files["geco"], files["generator"], files["catalogue"])
    top = str(split_tops(synth_small, 1)[0])
    n = len(bundle.ids)
    assert len(serving.rank(bundle, [top], k=n + 5)) == n  # k capped by the catalogue
    with pytest.raises(GecoError, match="k must be a whole number >= 1"):
        serving.rank(bundle, [top], k=0)
    with pytest.raises(GecoError, match="row 1: expected image bytes or a file path"):
        serving.rank(bundle, [top, 3.5])
    with pytest.raises(GecoError, match=r"row 0 \(bytes\)"):
        serving.rank(bundle, [b"not an image"])
    with pytest.raises(GecoError, match="no 'image' column"):
        serving.rank(bundle, __import__("pandas").DataFrame({"path": [top]}))
    # Served (allow_paths=False) a string is base64, never a path on this host.
    with pytest.raises(GecoError, match=r"row 0 \(bytes\)"):
        serving.rank(bundle, [top], allow_paths=False)
    b64 = base64.b64encode(Path(top).read_bytes())
    assert serving.rank(bundle, [b64], allow_paths=False).equals(serving.rank(bundle, [top]))

    cat = torch.load(files["catalogue"], weights_only=True)
    for change, match in (({"image_size": 64}, "embedded at 64 px"),
                          ({"embeddings": cat["embeddings"][:, :5]}, "model has 128-d"),
                          ({"image_uris": cat["image_uris"][:3]}, "3 image URIs for")):
        torch.save({**cat, **change}, tmp_path / "bad.pt")
        with pytest.raises(GecoError, match=match):
            serving.load_bundle(files["geco"], files["generator"], tmp_path / "bad.pt")


def test_geco_retrieve_prints_the_ranking_and_draws_it(champion, synth_small, expected,
                                                        tmp_path):
    from PIL import Image

    uri, _ = champion
    top = next(iter(expected))
    want = expected[top]
    framed = want["bottom_id"][1]  # said to be the true bottom: drawn framed, second cell
    out = tmp_path / "picture.png"
    r = subprocess.run(
        [sys.executable, "-m", "geco.cli", "retrieve", str(top), "--k", str(K), "--json",
         "--out", str(out), "--true-bottom", framed, f"tracking.uri={uri}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert [a["bottom_id"] for a in answer["results"]] == want["bottom_id"].tolist()
    assert [a["true"] for a in answer["results"]] == [b == framed for b in want["bottom_id"]]
    with Image.open(out) as im:
        # top | template | K bottoms, 128 px cells with 4 px gaps; the frame is green.
        assert im.size[0] == (K + 2) * (128 + 4) + 4
        x0 = 4 + 3 * (128 + 4)  # the rank-2 cell
        assert im.getpixel((x0 - 2, 18 + 4 + 64)) == (0, 170, 0)
        assert im.getpixel((4 + 2 * (128 + 4) - 2, 18 + 4 + 64)) != (0, 170, 0)

    r = subprocess.run([sys.executable, "-m", "geco.cli", "retrieve", str(tmp_path / "no.jpg"),
                        f"tracking.uri={uri}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "top image not found" in r.stderr
