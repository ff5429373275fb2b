"""Time full_ranking_metrics (Table 2 MRR protocol) on random embeddings.

Defaults are FashionTaobaoTB's test size: 7,954 queries x 5,622 unique bottoms x d = 128.
Usage: .venv/bin/python bench/bench_mrr.py [--queries N] [--candidates U] [--dim D]
       [--chunk-size C] [--repeats K]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from geco.metrics import full_ranking_metrics, random_expectations  # noqa: E402


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call (allocator, BLAS threads)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--queries", type=int, default=7954)
    ap.add_argument("--candidates", type=int, default=5622)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.queries, args.dim, generator=gen)
    c = torch.randn(args.candidates, args.dim, generator=gen)
    idx = torch.randint(0, args.candidates, (args.queries,), generator=gen)

    out = full_ranking_metrics(q, c, idx, chunk_size=args.chunk_size)
    t_full = best_of(
        lambda: full_ranking_metrics(q, c, idx, chunk_size=args.chunk_size), args.repeats
    )
    t_mm = best_of(lambda: q @ c.t(), args.repeats)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"R={args.queries} U={args.candidates} d={args.dim} chunk={args.chunk_size}, "
        f"best of {args.repeats}"
    )
    print(f"full_ranking_metrics: {t_full:.3f} s  ({args.queries / t_full:,.0f} queries/s)")
    print(f"matmul Q @ C^T alone: {t_mm:.3f} s  ({t_full / t_mm:.1f}x matmul)")
    rand = random_expectations(args.candidates)["mrr"]
    print(f"mrr_full {out['mrr_full']:.5f} (random scorer expects {rand:.5f})")


if __name__ == "__main__":
    main()
