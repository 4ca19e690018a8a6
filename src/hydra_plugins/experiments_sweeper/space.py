"""The search space: Hydra's override grammar as Optuna distributions, and the grid it spans.

`choice` is categorical; `range` is an ordered, stepped int or float distribution holding exactly
the values Hydra's basic sweeper would run (its end excluded); `shuffle(range)` is categorical;
`interval` is continuous (`int(...)` makes it integer, `tag(log, ...)` log-scaled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from hydra_plugins.experiments_sweeper import SweepError


@dataclass
class SearchSpace:
    """What every trial runs with (`fixed` overrides) and what Optuna chooses (`distributions`)."""

    fixed: list[str] = field(default_factory=list)
    distributions: dict[str, Any] = field(default_factory=dict)

    def grid(self) -> dict[str, list]:
        """Every value of each parameter, for GridSampler; continuous ones cannot be listed."""
        return {key: grid_values(key, d) for key, d in self.distributions.items()}


def search_space(params: dict[str, Any], arguments: list[str]) -> SearchSpace:
    """The space of the sweeper's `params` and the command line's overrides, in that order.

    A key's last definition wins: a value fixed on the command line takes its key out of the
    search, and a sweep there replaces the config's.
    """
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    last: dict[str, Override] = {}
    deletions = []
    for override in OverridesParser.create().parse_overrides(lines):
        if override.is_delete():
            deletions.append(override.input_line)
            continue
        key = override.get_key_element()
        last.pop(key, None)  # keep the order of last definitions
        last[key] = override
    space = SearchSpace(fixed=deletions)
    for key, override in last.items():
        if override.is_sweep_override():
            space.distributions[key] = distribution_for(override)
        else:
            space.fixed.append(override.input_line)
    return space


def distribution_for(override: Override):
    """The Optuna distribution of a sweep override."""
    import optuna.distributions as d

    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return d.CategoricalDistribution(
            sorted_if_shuffled(value, [as_override_text(v) for v in override.sweep_iterator()])
        )
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SweepError(f"{override.input_line}: the range is empty")
        step = value.step if value.step is not None else 1
        if all(isinstance(v, int) for v in (value.start, value.stop, step)):
            return d.IntDistribution(values[0], values[-1], step=step)
        return d.FloatDistribution(float(values[0]), float(values[-1]), step=float(step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return d.IntDistribution(value.start, value.end, log=log_scale)
        return d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise SweepError(
        f"{override.input_line}: not a sweep the Optuna sweeper knows; use choice(), range(), "
        f"shuffle(range()), interval() or tag(log, interval())"
    )


def sorted_if_shuffled(sweep, values: list) -> list:
    """shuffle() reorders its values on every parse: a study's space must not change with it."""
    if getattr(sweep, "shuffle", False):
        return sorted(values, key=repr)
    return values


def as_override_text(value: Any) -> Any:
    """Optuna categories must be scalars: lists and dicts travel as their override text."""
    if isinstance(value, list):
        return "[" + ",".join(str(as_override_text(v)) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{as_override_text(v)}" for k, v in value.items()) + "}"
    return value


def grid_values(key: str, distribution) -> list:
    import optuna.distributions as d

    if isinstance(distribution, d.CategoricalDistribution):
        return list(distribution.choices)
    step = getattr(distribution, "step", None)
    if step is not None:
        count = int(math.floor((distribution.high - distribution.low) / step + 1e-9)) + 1
        values = [distribution.low + i * step for i in range(count)]
        if isinstance(distribution, d.FloatDistribution):
            values = [round(v, 12) for v in values]
        return values
    raise SweepError(
        f"hydra/sweeper/sampler=grid cannot list {key}, a continuous interval: give it as "
        f"choice() or range()"
    )
