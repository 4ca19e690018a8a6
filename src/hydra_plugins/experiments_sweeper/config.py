"""The sweeper's structured configs: `hydra/sweeper=experiments_optuna` and the sampler groups.

The groups and their typed settings are hydra-optuna-sweeper's (`hydra/sweeper/sampler=tpe`,
`random`, `grid`, `cmaes`, `nsgaii`, `gp`, `qmc`), so its users' configs carry over with only
the sweeper's name changed. `auto`, our default, is TPE for one objective and NSGA-II for several.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, NoReturn  # noqa: UP035 - OmegaConf reads these annotations

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class SamplerConfig:
    _target_: str = MISSING


@dataclass
class AutoSamplerConfig(SamplerConfig):
    """TPE for one objective, NSGA-II for several, with their defaults and this seed."""

    _target_: str = "auto"
    seed: int | None = None


@dataclass
class TPESamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.TPESampler"
    seed: int | None = None
    consider_prior: bool | None = None
    prior_weight: float | None = None
    consider_magic_clip: bool | None = None
    consider_endpoints: bool | None = None
    n_startup_trials: int = 10
    n_ei_candidates: int = 24
    multivariate: bool = False
    warn_independent_sampling: bool | None = None


@dataclass
class RandomSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = None


@dataclass
class GridSamplerConfig(SamplerConfig):
    """The grid is built from `params` when the sweep starts; continuous params are refused."""

    _target_: str = "optuna.samplers.GridSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """Needs the `cmaes` package (installed with this one)."""

    _target_: str = "optuna.samplers.CmaEsSampler"
    seed: int | None = None
    x0: Dict[str, Any] | None = None  # noqa: UP006
    sigma0: float | None = None
    independent_sampler: Any | None = None
    warn_independent_sampling: bool = True
    consider_pruned_trials: bool = False
    restart_strategy: Any | None = None
    inc_popsize: int = 2
    use_separable_cma: bool = False
    source_trials: Any | None = None


@dataclass
class NSGAIISamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.NSGAIISampler"
    seed: int | None = None
    population_size: int = 50
    mutation_prob: float | None = None
    crossover_prob: float = 0.9
    swapping_prob: float = 0.5
    constraints_func: Any | None = None


@dataclass
class GPSamplerConfig(SamplerConfig):
    """Needs PyTorch, which this package does not install: `pip install torch`."""

    _target_: str = "optuna.samplers.GPSampler"
    seed: int | None = None
    independent_sampler: Any | None = None
    n_startup_trials: int = 10
    deterministic_objective: bool = False
    constraints_func: Any | None = None
    warn_independent_sampling: bool = True


@dataclass
class QMCSamplerConfig(SamplerConfig):
    _target_: str = "optuna.samplers.QMCSampler"
    seed: int | None = None
    qmc_type: str = "sobol"
    scramble: bool = False
    independent_sampler: Any | None = None
    warn_asynchronous_seeding: bool = True
    warn_independent_sampling: bool = True


MOTPE_REMOVED = (
    "hydra/sweeper/sampler=motpe: the MOTPE sampler was removed in Optuna 4.0; use "
    "hydra/sweeper/sampler=tpe (TPE handles several objectives) or nsgaii"
)


def raise_motpe_removed(*args: Any, **kwargs: Any) -> NoReturn:
    raise ValueError(MOTPE_REMOVED)


@dataclass
class MOTPESamplerConfig(SamplerConfig):
    """Kept so that upstream configs naming it stop with one line saying what to use instead."""

    _target_: str = "hydra_plugins.experiments_sweeper.config.raise_motpe_removed"


SAMPLERS = {
    "auto": AutoSamplerConfig,
    "tpe": TPESamplerConfig,
    "random": RandomSamplerConfig,
    "grid": GridSamplerConfig,
    "cmaes": CmaEsSamplerConfig,
    "nsgaii": NSGAIISamplerConfig,
    "gp": GPSamplerConfig,
    "qmc": QMCSamplerConfig,
    "motpe": MOTPESamplerConfig,
}


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.experiments_sweeper.optuna_sweeper.OptunaSweeper"
    _recursive_: bool = False  # the sweeper builds its sampler and pruner itself
    defaults: List[Any] = field(default_factory=lambda: [{"sampler": "auto"}])  # noqa: UP006
    sampler: Any = MISSING
    pruner: Any = field(
        default_factory=lambda: {
            "_target_": "optuna.pruners.MedianPruner",
            "n_startup_trials": 5,
            "n_warmup_steps": 1,
        }
    )
    # minimize or maximize, or a list of them (one per objective); null: for each metric of
    # optimized_metric, minimize a loss, a time, a size or a parameter count, else maximize.
    direction: Any = None
    # Any Optuna storage URL (sqlite:///..., postgresql://...); null: a journal in the sweep dir.
    storage: Any = None
    study_name: str | None = "experiments"
    n_trials: int = 20
    # Trials in flight at once through the launcher (parallel with joblib or submitit).
    n_jobs: int = 1
    # With a launcher that runs jobs side by side, a slot that frees gets the next trial at once;
    # false: batches of n_jobs that wait for their slowest trial (hydra-optuna-sweeper's way).
    keep_slots_busy: bool = True
    max_failure_rate: float = 0.5
    # RDB storages: a trial whose process stops beating this long is failed and run again by
    # another process (Optuna's heartbeat). The journal file has none: a trial whose process on
    # this host is gone is taken over instead.
    heartbeat_interval: int = 60
    grace_period: Any = None  # null: 2 x heartbeat_interval
    params: Dict[str, Any] | None = None  # noqa: UP006
    # A dotted path to a function (cfg, trial) -> None that suggests more params for each trial.
    custom_search_space: str | None = None
    # What the study starts from: {storage: URL, study_name: NAME} (another study), {run: ID}
    # or {experiment: NAME} (MLflow), {enqueue: [{key: value}, ...]}, or a list of them.
    warm_start: Any = None


def register() -> None:
    store = ConfigStore.instance()
    store.store(
        group="hydra/sweeper",
        name="experiments_optuna",
        node=OptunaSweeperConf,
        provider="experiments",
    )
    for name, node in SAMPLERS.items():
        store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="experiments")
