"""How a config section is written, read and checked: fields that may change when a run
resumes, checks that name the offending key, and the YAML/override reading every section goes
through (presets with a `base`, `section.key=value` overrides, typed values).

A section is a dataclass that lives next to the code that consumes it (`DataConfig` in
geco.data.source, `GECoConfig` in geco.models.geco, ...) and validates itself in
`validate(key)`, where `key` is its dotted place in the config ("data", "baselines.mgcm").
`geco.config.Config` composes the sections. Choices are `Literal` types: the loader refuses any
other value, naming the key, so a choice list is written once, in the field's type.

This module imports nothing from geco but its errors: section modules import it freely, and
a tool that needs one section (ray_jobs/promote.py: `tracking`) reads it with `load_section`
without importing the models behind the others.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any

import yaml

from geco.errors import ConfigError


def resumable(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field whose value may change between a run and its resumption without making the
    checkpoint another model (how long to train, how many loader workers, ...). Every other
    field of a section a stage depends on is compared when the stage resumes."""
    return field(default=default, default_factory=default_factory,
                 metadata={"resumable": True})


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise ConfigError "key=value: why" unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def at_least(key: str, value: int | float, low: int | float, why: str = "") -> None:
    require(value >= low, key, value, f"must be >= {low}" + (f" ({why})" if why else ""))


def check_seed(key: str, value: int) -> None:
    at_least(key, value, 0, "seeds are non-negative integers")


def check_max_steps(key: str, value: int) -> None:
    at_least(key, value, 0, "0 = the whole epoch; a cap must be >= 1 step")


def finite_nonnegative(key: str, value: float) -> None:
    require(math.isfinite(value) and value >= 0, key, value, "must be a finite number >= 0")


def learning_rate(key: str, value: float) -> None:
    require(math.isfinite(value) and value > 0, key, value,
            "learning rate must be a positive number")


def adam_betas(key: str, betas: list[float]) -> None:
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas), key, betas,
            "Adam betas must be two numbers in [0, 1)")


# --------------------------------------------------------------------------- reading


def load_section(path: str | Path | None, overrides: list[str], name: str, cls: type) -> Any:
    """Section `name` of a preset (after its bases) and of `overrides`, built as `cls` and
    validated; other sections are not read. Overrides must all be `name.*`."""
    tree = read_preset(Path(path)) if path else {}
    over = parse_overrides(overrides)
    other = sorted(set(over) - {name})
    if other:
        raise ConfigError(f"override {other[0]}.*: only {name}.* settings apply here")
    section = build(cls, merge(tree.get(name) or {}, over.get(name, {})), name + ".")
    section.validate(name)
    return section


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
    return merge(read_preset(path.parent / base, (*_seen, path.resolve())), tree)


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



def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return build(annotation, value, key + ".")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads on/off/yes/no as booleans: `runtime.amp=off` means the word.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in choices), value)
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
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        # No setting means anything with NaN or infinity: refused here, once for every
        # section, before it could crash an epoch later.
        require(math.isfinite(value), key, value, "must be a finite number")
        return float(value)
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
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


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
