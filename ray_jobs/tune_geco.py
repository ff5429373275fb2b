"""Ray job: sweep GECo's alpha, beta, tau, gamma with Ray Tune (ASHA) over one shared CIGM.

    ray job submit --address http://127.0.0.1:8265 --runtime-env RUNTIME_ENV.json -- \
        python ray_jobs/tune_geco.py --config configs/synthetic-cpu.yaml --name sweep1 \
        tune.num_samples=8 tune.metric=auc_1vs1

Trials are ranked on the validation split (`tune.metric`); only the best trial is evaluated
on test, registered (alias candidate) and put through the promotion gate. `--cigm SOURCE`
reuses a trained CIGM (Ray checkpoint folder or .pt); otherwise stage 1 runs first (Ray
Train, resumable by name).
"""

from __future__ import annotations

from _common import load, parse_args, parser, run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cigm", default="", help="trained CIGM: Ray checkpoint folder or .pt file")
    p.add_argument("--split", default="test", help="split the best trial is evaluated on")
    args = parse_args(p)
    cfg = load(args)
    from geco.cluster.driver import connect, preflight, sweep_pipeline

    preflight(cfg)
    connect(args.address)
    sweep_pipeline(cfg, cigm=args.cigm, split=args.split)


if __name__ == "__main__":
    run(main)
