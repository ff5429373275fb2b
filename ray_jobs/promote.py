"""Registry gate: promote a candidate version to champion, roll back, or show the versions.

    python ray_jobs/promote.py promote --version 3 [--metric valid_auc_1vs1] [--margin 0.01]
    python ray_jobs/promote.py rollback
    python ray_jobs/promote.py show

The margin must be finite and >= 0 unless --force (recorded as gate.forced). Promoting the
champion itself is a no-op. Every decision and alias move is appended to the registry's
audit trail (gate.history.* tags), which `show` prints after the versions.

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
    pr.add_argument("--force", action="store_true",
                    help="gate with a NaN, infinite or negative margin anyway (recorded)")
    sub.add_parser("rollback", parents=[common], help="champion back to the previous one")
    sub.add_parser("show", parents=[common],
                   help="versions, aliases, gate tags and the audit trail")
    return p


def _num(x) -> str:
    return f"{x:.6g}" if isinstance(x, int | float) else str(x)


def _metric_line(r: dict) -> str:
    if r.get("metric") is None:
        return ""
    if r.get("champion_value") is None:
        return f" ({r['metric']} {_num(r.get('value'))})"
    forced = " FORCED" if r.get("forced") else ""
    return (f" ({r['metric']} {_num(r.get('value'))} vs {_num(r['champion_value'])},{forced} "
            f"margin {r.get('margin')})")


def format_record(r: dict) -> str:
    """One line of the trail: when, what, which alias moved where, and who."""
    if "raw" in r:
        return f"{r.get('time')}  (unreadable) {r['raw']}"
    old, new = r.get("from_version"), r.get("to_version")
    alias, action = r.get("alias"), str(r.get("action"))
    move = f"{alias} {old or 'none'} -> {new}" if old != new else f"{alias} stays {old or 'none'}"
    what = f"version {r.get('version')} {r.get('decision')}: {move}" if action == "promote" \
        else move
    return (f"{r.get('time')}  {action:<8}  {what}{_metric_line(r)}  "
            f"by {r.get('user')}@{r.get('host')}")


def show(versions: list[dict], trail: list[dict], name: str, uri: str) -> None:
    if not versions:
        print(f"registered model {name!r} has no versions at {uri}")
    for v in versions:
        aliases = ",".join(v["aliases"]) or "-"
        print(f"version {v['version']}  aliases: {aliases}  run: {v['run_id']}")
        for key, value in sorted(v["tags"].items()):
            print(f"    {key} = {value}")
    if trail:
        print(f"trail of {name!r} (oldest first):")
        for record in trail:
            print(f"  {format_record(record)}")


def main() -> None:
    args = build_parser().parse_args()
    from geco import registry
    from geco.settings import load_section
    from geco.tracking import TrackingConfig, check_reachable, resolve_uri

    # The tracking section alone: the gate needs neither torch nor the models.
    cfg = load_section(args.config, args.overrides, "tracking", TrackingConfig)
    uri = args.tracking_uri or resolve_uri(cfg)
    if args.command == "promote":
        margin = cfg.gate_margin if args.margin is None else args.margin
        # Bad input fails first, named as the user gave it.
        registry.check_margin(margin, force=args.force, name="tracking.gate_margin"
                              if args.margin is None else "--margin")
    check_reachable(uri)  # an http server that does not answer: one clear line, not a retry loop
    name = args.model or cfg.registered_model
    if args.command == "promote":
        metric = args.metric or cfg.gate_metric
        print(json.dumps(registry.promote(uri, name, args.version, metric=metric, margin=margin,
                                          force=args.force), indent=2))
    elif args.command == "rollback":
        print(json.dumps(registry.rollback(uri, name), indent=2))
    else:
        show(registry.describe(uri, name), registry.trail(uri, name), name, uri)


if __name__ == "__main__":
    run(main)
