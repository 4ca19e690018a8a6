"""Our Optuna sweeper for Hydra: `hydra/sweeper=experiments_optuna`.

| module | holds |
| --- | --- |
| `optuna_sweeper` | the sweeper: ask trials, tell how each ended |
| `launching` | how trials are launched (batches, or slots kept busy) and what each job is given |
| `warm_start` | what a study starts from: another study, MLflow runs, configurations enqueued |
| `workers` | the workers of one study: joining, taking over stale trials, heartbeats |
| `samplers` | the sampler and pruner the settings configure |
| `results` | objectives and directions, returned values, results, trial table and plots |
| `space` | the search space from `hydra.sweeper.params` and the command line |
| `config` | the structured configs, compatible with hydra-optuna-sweeper's |

It reaches the project only through `experiments.sweeps.plugin` (an import contract).
"""

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """A bad sweep setting or a sweep that must stop: Hydra prints its one line, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
