"""Optuna storages, opened the same way by the sweeper and by the jobs that report to its trials.

A storage is named by a URL (`sqlite:///...`, `postgresql://...`) or `journal:<path>` for a
journal file.
"""

from __future__ import annotations

JOURNAL_PREFIX = "journal:"


def open_storage(url: str, heartbeat_interval: int | None = None, grace_period=None):
    """An Optuna storage from a URL, or from `journal:<path>` for a journal file.

    With `heartbeat_interval`, an RDB storage fails the trials of processes that stopped
    beating and queues each again with the same params (Optuna's retry callback).
    """
    import warnings

    import optuna

    # Heartbeats and their retry callback have been "experimental" since Optuna 2.8 (2021).
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    if url.startswith(JOURNAL_PREFIX):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(url[len(JOURNAL_PREFIX) :]))
    if heartbeat_interval is None:
        return _rdb_storage(url)
    return _rdb_storage(
        url,
        heartbeat_interval=int(heartbeat_interval),
        grace_period=int(grace_period) if grace_period else None,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )


def _rdb_storage(url: str, **settings):
    """Optuna's RDBStorage, created again when a worker starting beside it created the tables
    first: on an empty database, workers that start together race to create them and all but
    one fail with a duplicate type or table (PostgreSQL), or an existing table or a locked file
    (sqlite)."""
    import time

    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **settings)
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
