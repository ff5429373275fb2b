"""Serving benchmark: the registered retriever (an MLflow pyfunc) queried like a user would.

Loads `--model-uri` (default models:/geco-retriever@champion) from the tracking server in
$MLFLOW_TRACKING_URI, queries the first `--n` test tops of a dataset folder (paths, batches of
`--batch`), and reports the load time, queries/s, and how often the true bottom of each top is
in the returned top `--k` (the served counterpart of recall@k).

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 .venv/bin/python bench/bench_serving.py \
        --data data/synthetic --n 200
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-uri", default="models:/geco-retriever@champion")
    p.add_argument("--data", default="data/synthetic", help="dataset folder (standard layout)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    import mlflow

    rows = list(csv.reader((Path(args.data) / "files" / "test.csv").open()))[1:args.n + 1]
    queries = [(str(Path(args.data) / "img" / f"{r[0]}.jpg"), r[1]) for r in rows]
    t0 = time.perf_counter()
    model = mlflow.pyfunc.load_model(args.model_uri)
    load_s = time.perf_counter() - t0
    hits, t1 = 0, time.perf_counter()
    for i in range(0, len(queries), args.batch):
        chunk = queries[i:i + args.batch]
        out = model.predict({"image": [q for q, _ in chunk]}, params={"k": args.k})
        for j, (_, bottom) in enumerate(chunk):
            hits += bottom in set(out[out["query"] == j]["bottom_id"])
    serve_s = time.perf_counter() - t1
    print(f"{args.model_uri}: loaded in {load_s:.1f} s; {len(queries)} queries in {serve_s:.2f} s "
          f"({len(queries) / serve_s:.1f} queries/s, batch {args.batch}); true bottom in the "
          f"top {args.k}: {hits}/{len(queries)} = {hits / len(queries):.3f}")


if __name__ == "__main__":
    main()
