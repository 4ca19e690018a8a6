"""The job side of a sweep (its trial, the epochs it reports, its run name) and the storages of
Optuna studies. The Hydra plugin under `hydra_plugins/` reaches the project only through here."""
