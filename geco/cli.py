"""`geco` command line: data, train, evaluate, pipeline, compare, retrieve and catalogue.

Every command takes `--config FILE` and `--run-dir DIR` plus `section.key=value` overrides.
Problems the user can fix (GecoError) print one clear line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from geco import setup_logging
from geco.config import Config, load_config, save_config
from geco.errors import GecoError, one_line

log = logging.getLogger("geco")


def _common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument("--config", help="YAML config (see configs/)")
    if run_dir:
        p.add_argument("--run-dir", default="runs/default",
                       help="checkpoints, resolved config and metrics go here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. geco.tau=0.5 cigm.epochs=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geco", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_cmd",
                                                                       required=True)
    synth = data.add_parser("synth", help="write the synthetic outfit dataset")
    synth.add_argument("--out", required=True, help="output folder (files/, img/)")
    _common(synth, run_dir=False)
    from geco.data.shards import add_shard_command, add_verify_command

    add_shard_command(data)
    add_verify_command(data)
    from geco.data.check import add_check_command

    add_check_command(data)

    train = sub.add_parser("train", help="train a stage").add_subparsers(dest="stage",
                                                                         required=True)
    for stage in ("cigm", "geco"):
        t = train.add_parser(stage, help=f"train {stage.upper()}")
        t.add_argument("--no-resume", action="store_true",
                       help="start over even if the run dir holds a checkpoint")
        if stage == "geco":
            t.add_argument("--cigm", help="CIGM checkpoint (default <run-dir>/cigm/best.pt, else last.pt)")
        _common(t)

    ret = sub.add_parser("retrieve", help="rank a registered retriever's catalogue for one top "
                         "and draw the picture")
    ret.add_argument("top", help="top image (JPEG, PNG, ...)")
    ret.add_argument("--model", default="models:/geco-retriever@champion",
                     help="MLflow model URI (models:/NAME@ALIAS, models:/NAME/N, runs:/..., a "
                     "folder); registry names resolve in tracking.uri / $MLFLOW_TRACKING_URI")
    ret.add_argument("--k", type=int, default=10, help="bottoms to return")
    ret.add_argument("--seed", type=int, default=0, help="template noise seed")
    ret.add_argument("--out", help="picture path (default TOP_retrieved.png next to the top)")
    ret.add_argument("--true-bottom", action="append", default=[],
                     help="the bottom that goes with the top (framed; repeatable); default: "
                     "looked up in the split CSVs next to the top's image folder")
    ret.add_argument("--catalogue", default="", help="a catalogue (geco catalogue build; file "
                     "or s3://) instead of the one registered with the model")
    ret.add_argument("--json", action="store_true", help="print the answer as JSON")
    _common(ret, run_dir=False)

    cat = sub.add_parser("catalogue", help="bottom catalogues").add_subparsers(
        dest="catalogue_cmd", required=True)
    cb = cat.add_parser("build", help="embed a bottom inventory for a model: a versioned "
                        "catalogue a served model loads by URI")
    cb.add_argument("source", help="catalogue shards (a shard root with manifest.json), a "
                    "folder of images, or a CSV with columns id,uri (local or s3://)")
    cb.add_argument("--model", default="models:/geco-retriever@champion",
                    help="MLflow model URI of a geco retriever, or a GECo checkpoint file")
    cb.add_argument("--out", required=True, help="catalogue file (local or s3://); ending in "
                    "/ writes catalogue-<version>.pt there")
    cb.add_argument("--split", default="test", help="shards: whose catalogue shards")
    cb.add_argument("--image-base", default="", help="URL prefix of the bottoms' pictures "
                    "(<base>/<file name>; for shards <base>/<id>.jpg)")
    cb.add_argument("--on-bad-image", default="error", choices=("error", "skip"))
    cb.add_argument("--batch-size", type=int, default=64)
    _common(cb, run_dir=False)

    ev = sub.add_parser("evaluate", help="metrics of a trained GECo on a split")
    ev.add_argument("--split", default="test", choices=("valid", "test"))
    ev.add_argument("--out", help="metrics JSON (default <run-dir>/metrics_<split>.json)")
    ev.add_argument("--checkpoint", help="GECo checkpoint (default <run-dir>/geco/best.pt)")
    _common(ev)

    pipe = sub.add_parser("pipeline", help="synth (if configured) -> CIGM -> GECo -> evaluate")
    pipe.add_argument("--no-resume", action="store_true")
    _common(pipe)

    comp = sub.add_parser("compare", help="GECo and the baselines on the test split "
                          "(paper Tables 2 and 3) -> <run-dir>/compare/")
    comp.add_argument("--models", default="all",
                      help="comma-separated: geco, mgcm, pix2pixcm, bpr-dae, popularity, "
                           "random, geco-constant, geco-toponly; all (default: GECo and the "
                           "five baselines), ablations (GECo and its template ablations)")
    comp.add_argument("--split", default="test", choices=("valid", "test"))
    comp.add_argument("--no-train", action="store_true",
                      help="do not train GECo when <run-dir>/geco/best.pt is missing")
    _common(comp)
    return parser


def cmd_synth(args, cfg: Config) -> None:
    from geco.data.synth import generate

    summary = generate(Path(args.out), cfg.data.synth)
    print(json.dumps(summary, indent=2, default=str))


def cmd_train(stage: str, cfg: Config, run_dir: Path, resume: bool,
              cigm: str | None = None) -> dict:
    from geco.train.loop import train

    if cigm:
        cfg.geco.cigm_checkpoint = cigm
    if int(os.environ.get("RANK", "0")) == 0:
        save_config(cfg, run_dir / stage / "config.yaml")
    return train(cfg, stage, run_dir, resume=resume)[1]


def cmd_evaluate(cfg: Config, run_dir: Path, split: str, out: str | None,
                 checkpoint: str | None) -> dict:
    from geco.evaluate import evaluate_checkpoint, format_tables

    ckpt_path = Path(checkpoint) if checkpoint else run_dir / "geco" / "best.pt"
    ev = evaluate_checkpoint(cfg, ckpt_path, split)
    metrics = ev["metrics"]
    result = {"split": split, "dataset": ev["dataset"], "checkpoint": str(ckpt_path),
              "epoch": ev["epoch"], **metrics}
    out_path = Path(out) if out else run_dir / f"metrics_{split}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(format_tables(metrics))
    print(f"metrics written to {out_path}")
    return result


def cmd_pipeline(cfg: Config, run_dir: Path, resume: bool) -> dict:
    t0 = time.perf_counter()
    cmd_train("cigm", cfg, run_dir, resume)
    cmd_train("geco", cfg, run_dir, resume)
    result = cmd_evaluate(cfg, run_dir, "test", None, None)
    log.info("pipeline finished in %.1f min", (time.perf_counter() - t0) / 60)
    return result


def cmd_compare(cfg: Config, run_dir: Path, models: str, split: str = "test",
                train: bool = True) -> dict:
    from geco.compare import format_comparison, run_compare

    result = run_compare(cfg, run_dir, models, split=split, train_geco=train)
    print(format_comparison(result))
    print(f"comparison written to {Path(result['files']['md']).parent}/compare.{{md,csv,json}}")
    return result


def cmd_retrieve(args: argparse.Namespace, cfg: Config) -> dict:
    from geco.retrieve import retrieve
    from geco.tracking import resolve_uri

    out = retrieve(args.top, model_uri=args.model, tracking_uri=resolve_uri(cfg.tracking),
                   k=args.k, seed=args.seed, out=args.out, truth=set(args.true_bottom),
                   catalogue=args.catalogue)
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    print(f"{out['model']}: top-{len(out['results'])} bottoms for {out['top']}")
    for r in out["results"]:
        mark = "  <- true bottom" if r["true"] else ""
        print(f"{r['rank']:>4}  {r['bottom_id']:<24} {r['score']:>10.4f}  {r['image_uri']}{mark}")
    if out["truth"] and not any(r["true"] for r in out["results"]):
        print(f"     true bottom {', '.join(out['truth'])} is not in the top {args.k}")
    print(f"picture: {out['picture']}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes section.key=value overrides only before the first option that follows
    # a positional: accept them anywhere on the line.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "data":
            if args.data_cmd == "check":
                from geco.data.check import cmd_check

                cmd_check(args, cfg)
            elif args.data_cmd == "shard":
                from geco.data.shards import cmd_shard

                cmd_shard(args, cfg)
            elif args.data_cmd == "verify":
                from geco.data.shards import cmd_verify

                cmd_verify(args)
            else:
                cmd_synth(args, cfg)
            return 0
        if args.command == "retrieve":
            cmd_retrieve(args, cfg)
            return 0
        if args.command == "catalogue":
            from geco.catalogue import build
            from geco.tracking import resolve_uri

            out = build(args.model, args.source, args.out, tracking_uri=resolve_uri(cfg.tracking),
                        split=args.split, image_base=args.image_base,
                        batch_size=args.batch_size, on_bad=args.on_bad_image)
            print(json.dumps(out, indent=2, sort_keys=True))
            return 0
        run_dir = Path(args.run_dir)
        if args.command == "train":
            cmd_train(args.stage, cfg, run_dir, not args.no_resume, getattr(args, "cigm", None))
        elif args.command == "evaluate":
            cmd_evaluate(cfg, run_dir, args.split, args.out, args.checkpoint)
        elif args.command == "pipeline":
            cmd_pipeline(cfg, run_dir, not args.no_resume)
        elif args.command == "compare":
            cmd_compare(cfg, run_dir, args.models, args.split, not args.no_train)
        return 0
    except GecoError as exc:
        print(f"geco: error: {one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        from geco.train.runtime import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
