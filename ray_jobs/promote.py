"""Registry gate: promote a candidate version to champion, roll back, or show the versions.

    python ray_jobs/promote.py promote --version 3 [--metric valid_auc_1vs1] [--margin 0.01]
    python ray_jobs/promote.py rollback
    python ray_jobs/promote.py show

Model name, gate metric, margin and tracking URI default to the config's `tracking` section
(tracking.uri, else $MLFLOW_TRACKING_URI, else runs/mlflow.db; `tracking.*` overrides). Needs
no Ray cluster, nor torch.
"""

from __future__ import annotations

import argparse
import json

from _common import run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (see configs/)")
    common.add_argument("--model", help="registered model (default: tracking.registered_model)")
    common.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri)")
    common.add_argument("overrides", nargs="*", help="tracking.key=value overrides")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("promote", parents=[common], help="run the gate on one version")
    pr.add_argument("--version", required=True, help="model version to promote")
    pr.add_argument("--metric", help="gate metric (default: tracking.gate_metric)")
    pr.add_argument("--margin", type=float, help="required lead (default: tracking.gate_margin)")
    sub.add_parser("rollback", parents=[common], help="champion back to the previous one")
    sub.add_parser("show", parents=[common], help="versions, aliases and gate tags")
    return p


def show(versions: list[dict], name: str, uri: str) -> None:
    if not versions:
        print(f"registered model {name!r} has no versions at {uri}")
    for v in versions:
        aliases = ",".join(v["aliases"]) or "-"
        print(f"version {v['version']}  aliases: {aliases}  run: {v['run_id']}")
        for key, value in sorted(v["tags"].items()):
            print(f"    {key} = {value}")


def main() -> None:
    args = build_parser().parse_args()
    from geco import registry
    from geco.settings import load_section
    from geco.tracking import TrackingConfig, check_reachable, resolve_uri

    # The tracking section alone: the gate needs neither torch nor the models.
    cfg = load_section(args.config, args.overrides, "tracking", TrackingConfig)
    uri = args.tracking_uri or resolve_uri(cfg)
    check_reachable(uri)  # an http server that does not answer: one clear line, not a retry loop
    name = args.model or cfg.registered_model
    if args.command == "promote":
        metric = args.metric or cfg.gate_metric
        margin = cfg.gate_margin if args.margin is None else args.margin
        print(json.dumps(registry.promote(uri, name, args.version, metric=metric, margin=margin),
                         indent=2))
    elif args.command == "rollback":
        print(json.dumps(registry.rollback(uri, name), indent=2))
    else:
        show(registry.describe(uri, name), name, uri)


if __name__ == "__main__":
    run(main)
