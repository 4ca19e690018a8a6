"""Config nodes that name code (`_target_`): which ones a node holds, and a refusal of any that
its place in the config does not allow.

Hydra instantiates whatever a `_target_` names: `optimizer._target_=shutil.copyfile` with
`_args_` copies a file, and only Hydra's own short blocklist stops `os.system`. So each place
that builds objects from the config (a group of the experiment, the sweeper's sampler and
pruner) names the classes it may build, and anything else is one line before any work.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from experiments.core.errors import ExperimentError


def targets(node, key: str) -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every `_target_` in the plain container `node` found at `key`,
    nested ones too (Hydra instantiates those as well)."""
    if isinstance(node, dict):
        for name, value in node.items():
            where = f"{key}.{name}" if key else str(name)
            if name == "_target_":
                yield where, value
            else:
                yield from targets(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from targets(value, f"{key}[{index}]")


def check_targets(
    node, key: str, allowed: tuple[str, ...], example: str, denied: tuple[str, ...] = ()
) -> None:
    """Refuse the first `_target_` in `node` that matches none of the regular expressions
    `allowed` (whole names), or whose last part is in `denied`; `example` says what to give."""
    for where, target in targets(node, key):
        name = str(target)
        if any(re.fullmatch(p, name) for p in allowed) and name.rsplit(".", 1)[-1] not in denied:
            continue
        if not allowed:
            raise ExperimentError(f"{where}={name}: {key} builds no object; remove the _target_")
        raise ExperimentError(f"{where}={name} is not allowed here: give {example}")
