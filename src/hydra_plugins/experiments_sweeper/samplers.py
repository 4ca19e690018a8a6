"""The sampler and pruner a sweep's settings configure (hydra.sweeper.sampler, .pruner)."""

import logging
import math
import sys

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.config import MOTPE_REMOVED
from hydra_plugins.experiments_sweeper.space import SearchSpace

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".optuna_sweeper")

# What hydra.sweeper.sampler and .pruner may name, nested nodes too (a PatientPruner's
# wrapped_pruner): Hydra would instantiate any target (experiments.core.targets).
ALLOWED = {
    "sampler": (
        r"(optuna\.samplers|optuna_integration)\.[A-Z]\w*",
        "auto",
        r"hydra_plugins\.experiments_sweeper\.config\.raise_motpe_removed",
    ),
    "pruner": (r"(optuna\.pruners|optuna_integration)\.[A-Z]\w*",),
}


def check_allowed(node: dict, part: str) -> None:
    """One line for a target `hydra.sweeper.<part>` may not name: a config error, which the
    project's commands end with exit 2."""
    from hydra.errors import ConfigCompositionException

    from experiments.sweeps.plugin import ExperimentError, check_targets

    try:
        check_targets(node, f"hydra.sweeper.{part}", ALLOWED[part], f"a class of optuna.{part}s")
    except ExperimentError as err:
        raise ConfigCompositionException(str(err)) from None


def check_settings(sweeper) -> None:
    """Refuse a sampler or pruner target that `hydra.sweeper` (our sweeper's) may not name."""
    for part in ("sampler", "pruner"):
        node = sweeper.get(part)  # a node, null (no pruner), or absent
        if OmegaConf.is_config(node):
            check_allowed(OmegaConf.to_container(node, resolve=True), part)


class CheckSettings(Callback):
    """Checks the sweeper's targets when a multirun starts: Hydra calls the callbacks'
    `on_multirun_start` before it builds the sweeper, so a check in `setup` alone would come
    after the MLflow callback has opened the sweep's parent run (conf/hydra/default.yaml lists
    this one first). Hydra turns a callback's exception into a warning and carries on, so a
    refusal here is its line and exit 2 (SystemExit is no Exception: it passes)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from hydra.errors import ConfigCompositionException

        if str(config.hydra.sweeper.get("_target_", "")).startswith(__name__.rsplit(".", 1)[0]):
            try:
                check_settings(config.hydra.sweeper)
            except ConfigCompositionException as err:
                print(f"error: {err}", file=sys.stderr)
                raise SystemExit(2) from None


def configured_sampler(settings, space: SearchSpace, objectives: int, seed: int | None = None):
    """The sampler `settings` configure and how many trials the study may have.

    `auto` is TPE for one objective and NSGA-II for several. A grid is built from the search
    space, and the study stops at its size. `seed` replaces the configured seed.
    """
    import functools

    import optuna
    from hydra.utils import instantiate

    node = OmegaConf.to_container(settings.sampler or {}, resolve=True)
    node = {k: v for k, v in node.items() if v is not None or k == "_target_"}
    if seed is not None:
        node["seed"] = seed
    target = node.get("_target_", "auto")
    n_trials = int(settings.n_trials)
    if target == "auto":
        chosen = optuna.samplers.NSGAIISampler if objectives > 1 else optuna.samplers.TPESampler
        return chosen(seed=node.get("seed")), n_trials
    if target.endswith("raise_motpe_removed"):
        raise SweepError(MOTPE_REMOVED)
    if target.endswith("GPSampler") and not _installed("torch"):
        raise SweepError(
            "hydra/sweeper/sampler=gp needs PyTorch, which is not installed: pip install torch "
            "(or choose tpe, random, grid, cmaes, nsgaii or qmc)"
        )
    if target.endswith("CmaEsSampler") and not _installed("cmaes"):
        raise SweepError(
            "hydra/sweeper/sampler=cmaes needs the cmaes package, which is not installed: "
            "pip install cmaes"
        )
    sampler = instantiate(node)
    if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
        grid = space.grid()
        size = math.prod(len(values) for values in grid.values())
        if size < n_trials:
            log.info("the grid has %d points: n_trials is %d, not %d", size, size, n_trials)
        return sampler(grid), min(n_trials, size)
    return sampler, n_trials


def configured_pruner(settings, objectives: int):
    """The configured pruner; none for several objectives, which Optuna cannot prune."""
    import optuna
    from hydra.utils import instantiate

    if not settings.pruner:
        return optuna.pruners.NopPruner()
    if objectives > 1:
        log.info(
            "pruning is off: Optuna prunes on one intermediate value, and this study has "
            "%d objectives",
            objectives,
        )
        return optuna.pruners.NopPruner()
    return instantiate(settings.pruner)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None
