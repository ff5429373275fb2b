"""The run configuration: typed sections composed into one `Config`, loaded from YAML presets
that may build on a base, and overridden from the command line (read with geco.settings).

Each section is a dataclass that lives next to its consumer and validates itself (see
geco.settings): data (geco.data.source), cigm (geco.models.cigm), geco (geco.models.geco), eval
(geco.evaluate), runtime (geco.train.runtime), cluster and tune (geco.cluster.driver),
tracking (geco.tracking), baselines (geco.baselines).

A preset is a YAML mapping of sections; `base: other.yaml` (relative to the preset) names the
preset it builds on, so it states only what differs. Overrides are `section.key=value` strings
whose values are parsed as YAML (`geco.tau=0.5`, `cigm.betas=[0.5,0.999]`). Unknown keys,
wrong types and values outside a field's choices are refused with the key named, so a typo
never silently falls back to a default. The resolved config (never its `base`) is saved with
every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geco.baselines import BaselinesConfig
from geco.cluster.driver import ClusterConfig, TuneConfig
from geco.data.source import DataConfig
from geco.evaluate import EvalConfig
from geco.models.cigm import CIGMConfig
from geco.models.geco import GECoConfig
from geco.settings import build, merge, parse_overrides, read_preset
from geco.tracking import TrackingConfig
from geco.train.runtime import RuntimeConfig


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cigm: CIGMConfig = field(default_factory=CIGMConfig)
    geco: GECoConfig = field(default_factory=GECoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> Config:
        """Every section checks itself, before any work starts."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate(f.name)
        return self


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- the preset (after its bases) <- overrides, validated."""
    tree = read_preset(Path(path)) if path else {}
    return config_from_dict(merge(tree, parse_overrides(overrides or [])))


def config_from_dict(tree: dict[str, Any]) -> Config:
    return build(Config, tree).validate()


def with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config (e.g. an older checkpoint's) with every key added to `Config` since it
    was written filled in with its default: what that run did, as today's code spells it."""
    return merge(Config().to_dict(), tree)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------- resuming


def drift(old: dict[str, Any], new: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """"key: old -> new" for every setting under `keys` (dotted sections or fields) whose
    value differs between a checkpoint's config and this run's. Keys added to the config since
    the checkpoint was written take their defaults; fields declared `resumable` are ignored."""
    old = with_defaults(old)
    out: list[str] = []
    for key in keys:
        out += _differences(_lookup(old, key), _lookup(new, key), key, _field_type(key))
    return out


def _differences(a: Any, b: Any, key: str, kind: Any) -> list[str]:
    if dataclasses.is_dataclass(kind):
        a = a if isinstance(a, dict) else {}
        b = b if isinstance(b, dict) else {}
        out = []
        for f in dataclasses.fields(kind):
            if not f.metadata.get("resumable"):
                sub = typing.get_type_hints(kind)[f.name]
                out += _differences(a.get(f.name), b.get(f.name), f"{key}.{f.name}", sub)
        return out
    return [] if a == b else [f"{key}: {a!r} -> {b!r}"]


def _lookup(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _field_type(key: str) -> Any:
    kind: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(kind):
            raise ValueError(f"{key}: not a config key")
        hints = typing.get_type_hints(kind)
        if part not in hints:
            raise ValueError(f"{key}: not a config key")
        kind = hints[part]
    return kind


