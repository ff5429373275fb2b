"""Serving benchmark: catalogue ranking, and REST queries end to end through MLflow's scoring
server, as a client sees them.

1. Ranking: one query against a catalogue of `--catalogue` random bottoms (d = 128): the
   matmul plus the top-k as geco.serving.rank does it; p50/p95 over `--repeats` calls.
2. REST: for each `--sizes` (64 and 128 px), a GECo + CIGM of the demo's shape trained for a
   few steps (the weights do not change the cost), registered in a throwaway SQLite store with
   a catalogue of the synthetic test bottoms, served by infra/local/serve.sh (`mlflow models
   serve`) on 127.0.0.1; then `--n` sequential one-image requests (base64 JPEG in
   dataframe_split: decode, template, embed, rank, JSON) give p50/p95 latency, and requests
   of `--batch` images from `--clients` concurrent clients give queries/s.

    .venv/bin/python bench/bench_rest.py                    # both parts, 64 and 128 px
    .venv/bin/python bench/bench_rest.py --skip-rest        # ranking only (seconds)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def bench_ranking(n: int, k: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    emb = torch.randn(n, 128)
    q = torch.randn(1, 128)
    times = []
    for i in range(repeats + 5):
        t0 = time.perf_counter()
        scores = q @ emb.T
        torch.topk(scores, k, dim=1)
        if i >= 5:  # warm-up
            times.append((time.perf_counter() - t0) * 1e3)
    return {"catalogue": n, "k": k, "p50_ms": pct(times, 50), "p95_ms": pct(times, 95)}


def train_model(size: int, work: Path) -> dict[str, Path]:
    """A demo-shaped CIGM + GECo at `size` px, trained a few steps, and its catalogue."""
    import torch

    from geco import registry
    from geco.config import load_config
    from geco.data.source import open_data
    from geco.models.geco import load_retriever
    from geco.train.loop import train

    cfg = load_config(str(REPO / "configs" / "synthetic-cpu.yaml"), [
        f"data.image_size={size}", "cigm.epochs=1", "geco.epochs=1",
        "cigm.max_steps_per_epoch=2", "geco.max_steps_per_epoch=2", "tracking.enabled=false",
        f"data.root={REPO / 'data' / 'synthetic'}"])
    run = work / f"run{size}"
    train(cfg, "cigm", run)
    train(cfg, "geco", run)
    files = {"geco": run / "geco" / "last.pt", "generator": run / "cigm" / "last.pt",
             "catalogue": run / "catalogue.pt"}
    retriever, _ = load_retriever(files["geco"], torch.device("cpu"),
                                  generator_path=files["generator"])
    registry.build_catalogue(retriever, open_data(cfg.data), "test", files["catalogue"],
                             image_size=size)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes) -> float:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        json.loads(r.read())
    return time.perf_counter() - t0


def bench_rest(size: int, work: Path, n: int, batch: int, clients: int) -> dict:
    import mlflow

    from geco import registry

    files = train_model(size, work)
    uri = f"sqlite:///{work}/mlflow{size}.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment(f"bench{size}",
                                   artifact_location=(work / f"art{size}").as_uri())
    run_id = client.create_run(exp).info.run_id
    registry.log_retriever(run_id, tracking_uri=uri, geco_checkpoint=files["geco"],
                           generator_checkpoint=files["generator"],
                           catalogue=files["catalogue"], registered_model="bench")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "GECO_VENV_BIN": str(Path(sys.executable).parent)}
    args = ["--dir", str(work / f"stack{size}"), "--port", str(port), "--model", "models:/bench/1"]
    subprocess.run(["bash", str(REPO / "infra/local/serve.sh"), "start", *args], env=env,
                   check=True, capture_output=True, timeout=300)
    try:
        tops = sorted((REPO / "data" / "synthetic" / "img").glob("*.jpg"))[:max(n, batch)]
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in tops]
        url = f"http://127.0.0.1:{port}/invocations"

        def body(images: list[str]) -> bytes:
            return json.dumps({"dataframe_split": {"columns": ["image"],
                                                   "data": [[i] for i in images]},
                               "params": {"k": 10}}).encode()

        for i in range(3):  # warm-up
            post(url, body(b64[i:i + 1]))
        single = [post(url, body([b64[i % len(b64)]])) * 1e3 for i in range(n)]
        batched = body(b64[:batch])
        rounds = max(2, n // batch)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(lambda _: post(url, batched), range(rounds * clients)))
        qps = rounds * clients * batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(lambda i: post(url, body([b64[i % len(b64)]])), range(n)))
        qps_single = n / (time.perf_counter() - t0)
    finally:
        subprocess.run(["bash", str(REPO / "infra/local/serve.sh"), "stop", *args], env=env,
                       capture_output=True, timeout=60)
    return {"size": size, "p50_ms": pct(single, 50), "p95_ms": pct(single, 95),
            "requests": n, f"qps_batch{batch}_x{clients}": qps,
            f"qps_single_x{clients}": qps_single}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogue", type=int, default=100_000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--n", type=int, default=100, help="sequential one-image requests")
    p.add_argument("--batch", type=int, default=16, help="images per batched request")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--skip-rest", action="store_true")
    args = p.parse_args()

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs")
    r = bench_ranking(args.catalogue, args.k, args.repeats)
    print(f"ranking: 1 query x {r['catalogue']:,} bottoms, top-{r['k']}: "
          f"p50 {r['p50_ms']:.2f} ms, p95 {r['p95_ms']:.2f} ms")
    if args.skip_rest:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            out = bench_rest(size, Path(tmp), args.n, args.batch, args.clients)
            print(f"REST {size} px: one image per request p50 {out['p50_ms']:.1f} ms, "
                  f"p95 {out['p95_ms']:.1f} ms ({out['requests']} sequential); "
                  f"{args.clients} clients: {out[f'qps_single_x{args.clients}']:.1f} queries/s "
                  f"one image per request, {out[f'qps_batch{args.batch}_x{args.clients}']:.1f} "
                  f"queries/s with {args.batch} images per request")


if __name__ == "__main__":
    main()
