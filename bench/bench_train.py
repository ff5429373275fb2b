"""End-to-end training throughput per stage (CIGM, GECo): samples/s of geco's training path
next to a plain baseline of the same models, in the same run, so the speed-up is a ratio.

- **geco**: the stage as `geco train` / a Ray worker runs it: pairs streamed from WebDataset
  shards (a folder or s3://), `runtime.amp`/`channels_last` at their defaults (bf16 autocast
  and channels_last on CUDA, fp32 on CPU), pinned memory and non-blocking copies on CUDA,
  `--batch-size` and `--loader-workers` DataLoader workers.
- **geco-devdec** (`--decode both`/`device`): the geco path with `data.decode=device`: the
  loader hands over JPEG bytes and the training device decodes them (nvJPEG on a GPU).
- **plain**: the same stage class and networks on the dataset folder's loose JPEGs (PIL, a
  map-style DataLoader), fp32, no channels_last, batch 64.

Each measurement is one epoch of at most `--steps` steps after `--warmup` untimed steps
(the training loop's own samples/s: data wait included, validation excluded). By default a
synthetic dataset is drawn at --image-size into a temporary folder and sharded there;
`--shards URL` (with `--root FOLDER`, the same data as loose files) measures existing data.
Prints a table and writes JSON (`--out`).

    .venv/bin/python bench/bench_train.py                     # CPU here, GPU when there is one
    .venv/bin/python bench/bench_train.py --device cuda --batch-size 256 --loader-workers 12 \
        --pairs 40000 --steps 200
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geco.config import load_config  # noqa: E402
from geco.data.synth import SynthSpec, generate  # noqa: E402
from geco.train.loop import fit, make_stage  # noqa: E402
from geco.train.runtime import init_runtime  # noqa: E402


def measure(stage_name: str, overrides: list[str], run_dir: Path, steps: int, warmup: int,
            generator: Path | None = None) -> dict:
    """samples/s of one capped epoch of `stage_name` (after `warmup` untimed steps)."""
    cfg = load_config(None, overrides)
    rt = init_runtime(cfg.runtime)
    section = getattr(cfg, stage_name)
    if warmup:
        section.max_steps_per_epoch, section.epochs = warmup, 1
        stage = make_stage(stage_name, cfg, rt, run_dir / "warmup", generator=generator)
        stage.end_epoch = lambda epoch, out: {}  # validation is not what is measured
        fit(stage, rt, run_dir / "warmup", resume=False)
    section.max_steps_per_epoch, section.epochs = steps, 1
    stage = make_stage(stage_name, cfg, rt, run_dir, generator=generator)
    stage.end_epoch = lambda epoch, out: {}
    t0 = time.perf_counter()
    summary = fit(stage, rt, run_dir, resume=False)
    record = summary["history"][-1]
    return {"samples_per_s": record["samples_per_s"], "samples": record["samples"],
            "steps": record["steps"], "seconds": time.perf_counter() - t0,
            "batch_size": section.batch_size, "device": str(rt.device),
            "amp": str(rt.amp_dtype), "channels_last": rt.channels_last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="existing shard root (folder or s3://); default: synthesise")
    p.add_argument("--root", help="the same data as a dataset folder (for the plain baseline)")
    p.add_argument("--pairs", type=int, default=2048, help="synthetic train pairs")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="geco path batch size")
    p.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stages", default="cigm,geco")
    p.add_argument("--device", default="auto")
    p.add_argument("--features", type=int, default=64, help="CIGM width (paper: 64)")
    p.add_argument("--decode", choices=("cpu", "device", "both"), default="cpu",
                   help="where the geco path decodes JPEGs (both: measure each)")
    p.add_argument("--out", default="runs/bench/bench_train.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from geco.cli import main as geco_main

    with tempfile.TemporaryDirectory(prefix="geco-bench-train-") as tmp:
        root, shards = args.root, args.shards
        if shards is not None and root is None:
            raise SystemExit("--shards needs --root (the same data as loose files) for the "
                             "plain baseline")
        if shards is None:
            root = str(Path(tmp) / "data")
            generate(Path(root), SynthSpec(n_train_tops=max(args.pairs, 72), pairs_per_top=1,
                                           n_valid=72, n_test=72, image_size=args.image_size))
            shards = str(Path(tmp) / "shards")
            assert geco_main(["data", "shard", "--out", shards, "--image-size",
                              str(args.image_size), f"data.root={root}",
                              "data.kind=standard"]) == 0
        common = [f"data.image_size={args.image_size}", "data.kind=standard",
                  f"runtime.device={args.device}", "runtime.log_every=1000000",
                  f"cigm.features={args.features}", "geco.backbone.weights=random",
                  "geco.backbone.allow_random_init=true", "tracking.enabled=false"]
        fast = [*common, f"data.shards={shards}", f"data.num_workers={args.loader_workers}",
                f"cigm.batch_size={args.batch_size}", f"geco.batch_size={args.batch_size}"]
        plain = [*common, f"data.root={root}", "data.shards=",
                 f"data.num_workers={args.loader_workers}", "runtime.amp=off",
                 "runtime.channels_last=off", "cigm.batch_size=64", "geco.batch_size=64"]
        paths = {"cpu": [("geco", fast)],
                 "device": [("geco-devdec", [*fast, "data.decode=device"])],
                 "both": [("geco", fast), ("geco-devdec", [*fast, "data.decode=device"])],
                 }[args.decode] + [("plain", plain)]
        results: dict[str, dict] = {}
        stages = args.stages.split(",")
        generator = None
        if "geco" in stages:  # GECo needs a generator: one step of CIGM gives its shape
            gen_dir = Path(tmp) / "gen"
            cfg = [*plain, "cigm.max_steps_per_epoch=1", "cigm.epochs=1"]
            assert geco_main(["train", "cigm", "--run-dir", str(gen_dir), *cfg]) == 0
            generator = gen_dir / "cigm" / "last.pt"
        for stage in stages:
            gen = generator if stage == "geco" else None
            for path, overrides in paths:
                results[f"{stage}/{path}"] = measure(stage, overrides, Path(tmp) / stage / path,
                                                     args.steps, args.warmup, gen)
    print(f"{'stage':6} {'path':11} {'batch':>5} {'device':7} {'amp':15} {'samples/s':>10}")
    for key, r in results.items():
        stage, path = key.split("/")
        print(f"{stage:6} {path:11} {r['batch_size']:5d} {r['device']:7} {r['amp']:15} "
              f"{r['samples_per_s']:10.1f}")
    ratios = {f"{s}/{path}": results[f"{s}/{path}"]["samples_per_s"]
              / results[f"{s}/plain"]["samples_per_s"]
              for s in args.stages.split(",") for path, _ in paths if path != "plain"}
    for key, ratio in ratios.items():
        print(f"{key}: / plain baseline = {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "results": results, "ratios": ratios, "args": vars(args),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
