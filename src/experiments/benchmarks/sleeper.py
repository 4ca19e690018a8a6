"""A Hydra app whose jobs only sleep, for `python -m experiments.benchmark slots`: a sweep of
uneven trials (random sampler, joblib launcher) that costs no CPU, so that what the benchmark
measures is how busy the sweeper keeps its slots.

Each job writes when its body started and ended (`times.json` in its output dir).
"""

import json
import time
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

ConfigStore.instance().store(
    name="sleeper",
    node={
        "defaults": [
            {"override hydra/sweeper": "experiments_optuna"},
            {"override hydra/sweeper/sampler": "random"},
            {"override hydra/launcher": "joblib"},
            "_self_",
        ],
        "hydra": {
            "sweeper": {
                "direction": "minimize",
                "study_name": "slots",
                "n_trials": 16,
                "n_jobs": 4,
                "params": {"sleep": "interval(0.5, 4.0)"},
            },
            # joblib's workers: as many as the sweeper's slots (its default is one per core)
            "launcher": {"n_jobs": "${hydra.sweeper.n_jobs}"},
        },
        "sleep": 1.0,
    },
)


@hydra.main(version_base="1.3", config_path=None, config_name="sleeper")
def main(cfg: DictConfig) -> float:
    started = time.time()
    time.sleep(float(cfg.sleep))
    times = {"started": started, "ended": time.time()}
    (Path(HydraConfig.get().runtime.output_dir) / "times.json").write_text(json.dumps(times))
    return float(cfg.sleep)


if __name__ == "__main__":
    main()
