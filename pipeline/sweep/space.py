"""The search space of a sweep: a YAML file mapping config fields to distributions.

    train.lr: {loguniform: [1.0e-4, 1.0e-3]}
    train.beta1: {uniform: [0.0, 0.9]}
    model.g_ema_decay: {choice: [0.0, 0.9]}
    model.ngf: {grid: [32, 64]}

It is checked like a config before anything starts: every field must exist, every bound and
every option must be a value the config accepts for that field (so a negative learning rate is
refused here, not in trial 7 an hour later), and fields that would make the trials' scores
incomparable or their runs collide (run, runtime, data, eval, scaling) are refused with the
reason. Tune draws the values; a trial's config is the sweep's with `field=value` overrides,
type-checked as `dcgan train --set` is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import config
from pipeline.config import Config, ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "grid")
# Sections a trial may not vary, and why.
FIXED_SECTIONS = {
    "run": "each trial's run directory is the sweep's to name",
    "runtime": "every trial runs on the sweep's Ray cluster and storage",
    "data": "the reference set of every FID must be the same, or the trials' scores do not compare",
    "eval": "the provenance card of every score must be the same, or the trials' scores do not compare",
    "scaling": "the sweep sizes its concurrency from one trial's workers",
}
LEARNING_RATES = ("train.lr", "train.lr_d")  # what PBT perturbs


@dataclass(frozen=True)
class Dimension:
    field: str  # a dotted config field, e.g. train.lr
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) for uniform and loguniform; the options for choice and grid

    def to_tune(self):
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def describe(self) -> str:
        return f"{self.kind} {list(self.values)}"


def load_space(path: Path, base: Config) -> list[Dimension]:
    """The space file at `path`, checked against the sweep's config `base`."""
    try:
        raw = yaml.load(Path(path).read_text(), Loader=config._UniqueKeyLoader)
    except FileNotFoundError:
        raise ConfigError(f"space file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"space file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"space file {path}: expected a mapping of config fields to distributions, e.g. "
                          "train.lr: {loguniform: [1.0e-4, 1.0e-3]}")  # fmt: skip
    return [_dimension(path, str(field), spec, base) for field, spec in raw.items()]


def _dimension(path: Path, field: str, spec: Any, base: Config) -> Dimension:
    where = f"space file {path}: {field}"
    section = field.split(".")[0]
    if section in FIXED_SECTIONS:
        raise ConfigError(f"{where}: a sweep does not vary {section}.*: {FIXED_SECTIONS[section]}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform"):
        _check_bounds(where, kind, values)
    for value in values:  # the bounds, or every option, must be values the config accepts
        _check_value(where, field, value, base)
    return Dimension(field, kind, tuple(values))


def _check_bounds(where: str, kind: str, values: list) -> None:
    numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{where}: {kind} takes [low, high], two finite numbers, got {values!r}")
    low, high = values
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs a low bound above 0, got {low}")


def _check_value(where: str, field: str, value: Any, base: Config) -> None:
    try:
        trial_config(base, {field: value})
    except ConfigError as err:
        raise ConfigError(f"{where}: the value {value!r} is not one the config accepts: {err}") from None


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The sweep's config with a trial's values, validated as `dcgan train --set` validates."""
    raw = base.to_dict()
    for field, value in values.items():
        config.apply_override(raw, field.split("."), value)
    return config.validate(raw, "a trial's config")


def overrides(values: dict[str, Any]) -> list[str]:
    """A trial's values as `--set` arguments (JSON is YAML), e.g. for the results table."""
    return [f"{field}={json.dumps(value)}" for field, value in sorted(values.items())]


def perturbed(dimensions: list[Dimension]) -> dict[str, Any]:
    """PBT's mutations: the learning rates of the space. PBT multiplies a rate by 0.8 or 1.2,
    or draws it afresh from its range (a choice or grid of rates spans the range between its
    ends, log-uniformly: a rate is a scale)."""
    from ray import tune

    mutations = {}
    for d in dimensions:
        if d.field in LEARNING_RATES:
            low, high = min(d.values), max(d.values)
            mutations[d.field] = d.to_tune() if d.kind in ("uniform", "loguniform") else tune.loguniform(low, high)
    return mutations
