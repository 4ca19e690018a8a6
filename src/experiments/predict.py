"""Predict the classes of images with a logged or registered model:

    python -m experiments.predict model=models:/flowers-classifier@champion input=DIR|FILE \\
        [output=predictions.csv] [top_k=3] [batch_size=64]

Writes one row per image: its path, the predicted class, its confidence and the top-k classes
with their probabilities. A folder is read as training reads one (any depth, class folders or
not); a file that is not a decodable image is skipped, counted and named in one warning each.
The class names are the ones the model's source run recorded (`data/classes.json`), never the
order of the folders here.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from experiments import config_dir
from experiments.cli import cli_with_signals, run_cli
from experiments.pipeline.prediction import predict


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def hydra_main(cfg: DictConfig) -> int:
    return run_cli(predict, cfg)


def main():
    """Entry point of `python -m experiments.predict`."""
    cli_with_signals(hydra_main)


if __name__ == "__main__":
    main()
