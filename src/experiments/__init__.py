"""Transfer-learning image classification experiments: Keras 3, Hydra, MLflow and Optuna."""

import os
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def project_root() -> str:
    """The project root: $EXPERIMENTS_ROOT, else this source checkout, else the launch directory."""
    if os.environ.get("EXPERIMENTS_ROOT"):
        return str(Path(os.environ["EXPERIMENTS_ROOT"]).expanduser().resolve())
    if (_SOURCE_ROOT / "conf" / "config.yaml").is_file():
        return str(_SOURCE_ROOT)
    return os.getcwd()


def config_dir() -> str:
    """The directory holding config.yaml: ./conf of a checkout, or the copy inside a wheel."""
    checkout = _SOURCE_ROOT / "conf"
    if (checkout / "config.yaml").is_file():
        return str(checkout)
    return str(Path(__file__).resolve().parent / "conf")


def compose_project_config(overrides: list[str] | None = None):
    """conf/config.yaml composed with `overrides`: the settings of commands that are not Hydra
    apps (compare, benchmark), so that they find the same store and folders as a run."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


# Registered on import so that every entry point and Hydra's compose API resolve ${project_root:}.
OmegaConf.register_new_resolver("project_root", project_root, replace=True)
