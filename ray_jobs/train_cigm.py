"""Ray job: train CIGM (stage 1) with Ray Train DDP; resumable by run name.

    ray job submit --address http://127.0.0.1:8265 --runtime-env RUNTIME_ENV.json -- \
        python ray_jobs/train_cigm.py --config configs/synthetic-cpu.yaml --name demo
"""

from __future__ import annotations

from _common import load, parse_args, parser, run


def main() -> None:
    args = parse_args(parser(__doc__.splitlines()[0]))
    cfg = load(args)
    from geco.cluster.driver import connect, preflight, reported_epochs, run_stage
    from geco.cluster.worker import checkpoint_uri

    preflight(cfg)
    connect(args.address)
    result = run_stage(cfg, "cigm")
    uri = checkpoint_uri(result.checkpoint)
    print(f"CIGM checkpoint: {uri} (epochs reported: {reported_epochs(result)})")
    print(f"  reuse it: ray_jobs/train_geco.py --cigm {uri} ...")


if __name__ == "__main__":
    run(main)
