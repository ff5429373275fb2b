"""Shared argument handling for the Ray job entrypoints (kept thin: the work is in geco.cluster)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# `ray job submit --working-dir .` runs from a copy of the repository: make `geco` importable
# from it even where the package is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--name", help="Ray run name prefix (cluster.name); same name = resume")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else auto)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def parse_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """p.parse_args, taking section.key=value overrides anywhere on the line (argparse keeps
    them only before the first option that follows a positional)."""
    args, extra = p.parse_known_args()
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]
    return args


def load(args):
    from geco.config import load_config

    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"cluster.name={args.name}")
    return load_config(args.config, overrides)


def run(main) -> None:
    """Run `main()`; a geco error ends the job with one clear message and exit status 2."""
    from geco import setup_logging
    from geco.errors import GecoError, one_line

    setup_logging()
    try:
        main()
    except GecoError as exc:
        print(f"geco: error: {one_line(_cause(exc))}", file=sys.stderr)
        sys.exit(2)


def _cause(exc: BaseException) -> BaseException:
    """The geco error inside a Ray task's error (which is also an instance of it, but prints
    the task's traceback), else `exc` itself."""
    cause = getattr(exc, "cause", None)
    from geco.errors import GecoError

    return cause if isinstance(cause, GecoError) else exc
