"""A pure-Python task for the sweeper's own tests, in hydra-optuna-sweeper's example form.

`returns` picks what the job gives back: the sphere, two objectives, or a wrong type.
"""

import time

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    if cfg.get("error"):
        raise RuntimeError("cfg.error is True")
    if cfg.get("sleep"):  # a job that takes a while, so that workers run beside each other
        time.sleep(float(cfg.sleep))
    x, y = float(cfg.x), float(cfg.y)
    returns = {
        "sphere": lambda: x**2 + y**2 + float(cfg.get("w", 0)) ** 2,
        "two": lambda: (x**2 + y**2, (x - 2) ** 2 + (y - 1) ** 2),
        "none": lambda: None,
        "text": lambda: "not a number",
        "list": lambda: [x, y],
    }
    return returns[cfg.returns]()


def configure(cfg: DictConfig, trial) -> None:
    """custom_search_space: w is drawn close to x, and z only exists through this function."""
    x = float(trial.params["x"])
    trial.suggest_float("+w", x - cfg.max_w_from_x, x + cfg.max_w_from_x)


if __name__ == "__main__":
    main()
