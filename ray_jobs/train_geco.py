"""Ray job: CIGM, then GECo with the frozen generator, then test metrics; resumable by name.

    ray job submit --address http://127.0.0.1:8265 --runtime-env RUNTIME_ENV.json -- \
        python ray_jobs/train_geco.py --config configs/synthetic-cpu.yaml --name demo

`--cigm SOURCE` skips stage 1 and uses a trained generator: a CIGM Ray checkpoint folder
(local or s3://, printed by train_cigm.py) or a CIGM .pt file (`geco train cigm` output).
"""

from __future__ import annotations

from _common import load, parse_args, parser, run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cigm", default="", help="trained CIGM: Ray checkpoint folder or .pt file")
    p.add_argument("--split", default="test", help="split evaluated at the end (default test)")
    args = parse_args(p)
    cfg = load(args)
    from geco.cluster.driver import connect, preflight, train_pipeline

    preflight(cfg)  # bad data or credentials fail here, before any worker starts
    connect(args.address)
    train_pipeline(cfg, cigm=args.cigm, split=args.split)


if __name__ == "__main__":
    run(main)
