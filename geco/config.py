"""The run configuration: typed sections composed into one `Config`, loaded from YAML presets
that may build on a base, and overridden from the command line.

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
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geco.baselines import BaselinesConfig
from geco.cluster.driver import ClusterConfig, TuneConfig
from geco.data.source import DataConfig
from geco.errors import ConfigError
from geco.evaluate import EvalConfig
from geco.models.cigm import CIGMConfig
from geco.models.geco import GECoConfig
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
    return config_from_dict(_merge(tree, parse_overrides(overrides or [])))


def read_preset(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's tree merged over its `base` (recursively); `base` itself is removed."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"config bases form a cycle: {chain}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: base must be a file name, got {base!r}")
    return _merge(read_preset(path.parent / base, (*_seen, path.resolve())), tree)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {exc}") from None
        _set_path(tree, key.strip(), value)
    return tree


def config_from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, tree).validate()


def with_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """A saved config (e.g. an older checkpoint's) with every key added to `Config` since it
    was written filled in with its default: what that run did, as today's code spells it."""
    return _merge(Config().to_dict(), tree)


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


# --------------------------------------------------------------------------- typing


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_type,) = typing.get_args(annotation)[:1] or (Any,)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (known in this section: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
