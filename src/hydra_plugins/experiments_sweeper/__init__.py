"""Our Optuna sweeper for Hydra: `hydra/sweeper=experiments_optuna`."""

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """A bad sweep setting or a sweep that must stop: Hydra prints its one line, no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")
