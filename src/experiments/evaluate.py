"""Re-evaluate a logged or registered model on a split, alone or against another:

    python -m experiments.evaluate model=runs:/<id>/model [split=test]
    python -m experiments.evaluate model=models:/flowers-classifier@challenger compare_to=champion

The results go to a new MLflow run tagged with the source run, with the same evaluation
artifacts as training. `compare_to` (an alias or version of the same registered model, or any
model URI) evaluates the second model on the same images and prints both accuracies, their
difference with its 95% interval, and McNemar's exact test of the paired predictions.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments import config_dir
from experiments.cli import cli_with_signals, run_cli
from experiments.pipeline.reevaluation import evaluate


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
def hydra_main(cfg: DictConfig) -> float:
    return run_cli(evaluate, cfg)


def main():
    """Entry point of `python -m experiments.evaluate`."""
    cli_with_signals(hydra_main)


if __name__ == "__main__":
    main()
