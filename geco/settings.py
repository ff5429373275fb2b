"""What every config section is made of: fields that may change when a run resumes, and
checks that name the offending key.

A section is a dataclass that lives next to the code that consumes it (`DataConfig` in
geco.data.source, `GECoConfig` in geco.models.geco, ...) and validates itself in
`validate(key)`, where `key` is its dotted place in the config ("data", "baselines.mgcm").
`geco.config.Config` composes the sections. Choices are `Literal` types: the loader refuses any
other value, naming the key, so a choice list is written once, in the field's type.

This module imports nothing from geco but its errors: section modules import it freely.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, field
from typing import Any

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


def finite_nonnegative(key: str, value: float) -> None:
    require(math.isfinite(value) and value >= 0, key, value, "must be a finite number >= 0")


def learning_rate(key: str, value: float) -> None:
    require(math.isfinite(value) and value > 0, key, value,
            "learning rate must be a positive number")


def adam_betas(key: str, betas: list[float]) -> None:
    require(len(betas) == 2 and all(0 <= b < 1 for b in betas), key, betas,
            "Adam betas must be two numbers in [0, 1)")
