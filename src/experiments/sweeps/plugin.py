"""Everything the Hydra sweeper plugin (`hydra_plugins.experiments_sweeper`) takes from the
project, in one place: the import contract lets the plugin reach the project only through
`experiments.sweeps`, so what it shares with a job is named here.

A signal waits for a write to the study's storage to end (a journal line, an RDB transaction):
the plugin wraps those writes in `uninterrupted`.
"""

from experiments.core.devices import DEVICE_SLOT_ENV
from experiments.core.errors import ExperimentError
from experiments.core.interrupts import uninterrupted
from experiments.core.job import defining_overrides
from experiments.core.processes import LAUNCHER_ENV, TRIAL_KEYS, Owner, as_text, this_process
from experiments.core.secrets import redact, redacted
from experiments.core.targets import check_targets
from experiments.sweeps.studies import JOURNAL_PREFIX, open_storage
from experiments.sweeps.trial import STORAGE_ENV, STUDY_ENV, TRIAL_ENV
from experiments.tracking import (
    end_stale_trial_runs,
    finished_results,
    log_study,
    tag_sweep_parent,
    tag_trial_runs,
)
from experiments.tracking import tags as T

__all__ = [
    "DEVICE_SLOT_ENV",
    "ExperimentError",
    "JOURNAL_PREFIX",
    "LAUNCHER_ENV",
    "STORAGE_ENV",
    "STUDY_ENV",
    "TRIAL_ENV",
    "TRIAL_KEYS",
    "Owner",
    "T",
    "as_text",
    "check_targets",
    "defining_overrides",
    "end_stale_trial_runs",
    "finished_results",
    "log_study",
    "open_storage",
    "redact",
    "redacted",
    "tag_sweep_parent",
    "tag_trial_runs",
    "this_process",
    "uninterrupted",
]
