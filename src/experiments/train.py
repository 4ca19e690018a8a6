"""Train one transfer-learning experiment: `python -m experiments.train [overrides]`.

Compose the config, load the task, build the backbone, train with the strategy, evaluate on the
test split and record everything in MLflow (`experiments.pipeline.run`). Returns the value named
by `optimized_metric`, which a sweeper optimizes.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments import config_dir
from experiments.cli import cli_with_signals, run_cli
from experiments.pipeline.run import train


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> float | tuple[float, ...]:
    return run_cli(train, cfg)


def main():
    """Entry point of `python -m experiments.train`: SIGTERM and SIGINT end a run cleanly."""
    cli_with_signals(hydra_main)


if __name__ == "__main__":
    main()
