"""Ray job: embed a bottom inventory for a registered model, one Ray task per shard or chunk.

    ray job submit --address http://127.0.0.1:8265 --runtime-env RUNTIME_ENV.json -- \
        python ray_jobs/build_catalogue.py s3://geco/synthetic --split test \
        --model models:/geco-retriever@champion --out s3://geco/catalogues/

The inventory is catalogue shards (a shard root), a CSV of id,uri or a folder (which every
node must see); the catalogue (catalogue-<version>.pt plus a .json summary when --out ends in
/) is what a served model loads with GECO_CATALOGUE or model_config {"catalogue": URI}.
"""

from __future__ import annotations

import json

from _common import load, parse_args, parser, run


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("source", help="catalogue shards, a CSV (id,uri) or a folder of images")
    p.add_argument("--model", default="models:/geco-retriever@champion",
                   help="MLflow model URI of a geco retriever, or a GECo checkpoint file")
    p.add_argument("--out", required=True, help="catalogue file or folder/ (local or s3://)")
    p.add_argument("--split", default="test", help="shards: whose catalogue shards")
    p.add_argument("--image-base", default="", help="URL prefix of the bottoms' pictures")
    p.add_argument("--on-bad-image", default="error", choices=("error", "skip"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="CSV/folder items per task")
    args = parse_args(p)
    cfg = load(args)
    from geco.cluster.driver import catalogue_pipeline, connect

    connect(args.address)
    out = catalogue_pipeline(cfg, args.model, args.source, args.out, split=args.split,
                             image_base=args.image_base, batch_size=args.batch_size,
                             on_bad=args.on_bad_image, chunk=args.chunk)
    print(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    run(main)
