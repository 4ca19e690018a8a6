"""The job side of our Optuna sweeper: report each epoch to this job's trial, so it can prune."""

from __future__ import annotations


def trial_callbacks(cfg) -> list:
    """Keras callbacks reporting to the Optuna trial this job runs, or [] outside a sweep."""
    if not cfg.get("sweeper_trial"):
        return []
    raise NotImplementedError
