"""Ray job: GECo and the baselines on one dataset, in the layout of the paper's Tables 2 and 3.

    ray job submit --address http://127.0.0.1:8265 --runtime-env RUNTIME_ENV.json -- \
        python ray_jobs/compare.py --config configs/synthetic-cpu.yaml --name demo \
        data.shards=s3://geco/synthetic cluster.storage_path=s3://geco/ray

GECo is the Ray Train pipeline of train_geco.py under the same --name (restored, not
retrained, when that run finished); every other model runs as a Ray task with
cluster.cpus_per_worker (and gpus_per_worker with cluster.use_gpu), resuming from its folder
in <storage>/<name>-compare/. The tables land in <storage>/<name>-compare/compare.{md,csv,json}
and, with a tracking URI, in MLflow.
"""

from __future__ import annotations

from _common import load, parse_args, parser, run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="all",
                   help="comma-separated: geco, mgcm, pix2pixcm, bpr-dae, popularity, random, "
                        "or all (default)")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    args = parse_args(p)
    cfg = load(args)
    from geco.cluster.driver import compare_pipeline, connect, preflight
    from geco.compare import parse_models

    parse_models(args.models)  # a typo fails here, before anything starts
    preflight(cfg)
    connect(args.address)
    compare_pipeline(cfg, args.models, split=args.split)


if __name__ == "__main__":
    run(main)
