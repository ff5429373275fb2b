"""GPU smoke run: one CIGM epoch and one GECo epoch on a real dataset, then test metrics.

    python scripts/gpu_smoke.py [--data ../shared/data/mango-dev] [--run-dir runs/gpu-smoke]

Uses the paper's sizes (128 px, CIGM features 64, batch 64, bf16 autocast, channels_last) and
reports samples/s per stage. Without CUDA it says so and exits 0 (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from geco.cli import cmd_evaluate  # noqa: E402
from geco.config import load_config  # noqa: E402
from geco.train.loop import train  # noqa: E402


def default_data() -> Path:
    shared = Path(os.environ.get("GECO_SHARED_DIR", ROOT.parent / "shared"))
    return shared / "data" / "mango-dev"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(default_data()))
    ap.add_argument("--run-dir", default="runs/gpu-smoke")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    if not torch.cuda.is_available():
        print("gpu_smoke: SKIPPED (no CUDA device)")
        return 0
    if not Path(args.data, "files").is_dir():
        print(f"gpu_smoke: SKIPPED (dataset not found at {args.data})")
        return 0
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    cfg = load_config(ROOT / "configs" / "paper.yaml", [
        f"data.root={args.data}", "data.kind=standard", "data.num_workers=8",
        f"cigm.epochs={args.epochs}", f"geco.epochs={args.epochs}",
        "geco.backbone.weights=imagenet", "geco.backbone.allow_random_init=true",
        "runtime.log_every=10", *args.overrides,
    ])
    run_dir = Path(args.run_dir)
    report = {}
    for name in ("cigm", "geco"):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, summary = train(cfg, name, run_dir, resume=False)
        torch.cuda.synchronize()
        last = summary["history"][-1]
        report[name] = {"seconds": round(time.perf_counter() - t0, 1),
                        "samples_per_s": round(last["samples_per_s"], 1),
                        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
        torch.cuda.reset_peak_memory_stats()
    metrics = cmd_evaluate(cfg, run_dir, "test", str(run_dir / "metrics_test.json"), None)
    report["test"] = {k: metrics[k] for k in ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full",
                                              "n_queries", "n_candidates")}
    print("gpu_smoke report:", json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
