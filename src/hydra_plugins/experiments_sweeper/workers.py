"""The workers of one study: joining it, taking over the trials of workers that are gone, waiting
for the others, and beating the hearts of the trials this one runs."""

import contextlib
import logging

from experiments.sweeps.plugin import TRIAL_KEYS, Owner, this_process, uninterrupted

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".optuna_sweeper")


@uninterrupted
def join_workers(study, attempts: int = 50) -> int:
    """This process's number among the workers of `study`, 0 for the first.

    The study's `workers` user attr lists them. Optuna has no atomic update of an attr, so two
    workers joining at once may overwrite each other's entry: each writes, reads back, and
    writes again until it finds itself listed.
    """
    import random
    import time

    me = this_process()
    name = f"{me.host}:{me.pid}:{me.started:.2f}"
    for _ in range(attempts):
        workers = list(study.user_attrs.get("workers", []))
        if name in workers:
            return workers.index(name)
        study.set_user_attr("workers", [*workers, name])
        time.sleep(random.uniform(0.05, 0.2))  # let a racing write land before reading back
    return len(study.user_attrs.get("workers", []))


def retried_numbers(trials) -> set[int]:
    """Numbers of the trials that were failed as stale and queued again with the same params:
    they do not count toward n_trials, their retry does."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


@uninterrupted
def take_over_stale_trials(study) -> list[int]:
    """Fail the RUNNING trials whose process is gone and queue each again with its params.

    RDB storages ask Optuna's heartbeat (a process on any host); for every storage, a trial whose
    owner ran on this host and no longer exists is failed the same way, through the same retry
    callback, at once (the journal file has no heartbeat).
    The retry runs the same config, so its job resumes the interrupted run's checkpoint.
    """
    import optuna
    from optuna.trial import TrialState

    before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    # Any host's trial whose heartbeat stopped (RDB storages): failed, its retry queued.
    optuna.storages.fail_stale_trials(study)
    # This host's trials whose process is gone: known now, without waiting for a grace period.
    storage = study._storage  # Optuna's own handle: the call below has no Study-level form
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = Owner.from_dict(trial.user_attrs, TRIAL_KEYS)
        if trial.user_attrs.get("surplus") or owner is None or owner.alive():
            continue
        # Not study.tell(): this raises when another process failed the trial first, so
        # exactly one process queues its retry.
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        retry(study, trial)
    after = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    taken = sorted(t.number for t in after if t.number not in before)
    if taken:
        from experiments.sweeps.plugin import end_stale_trial_runs

        log.warning(
            "trial(s) %s were left RUNNING by processes that are gone: each runs again with the "
            "same params and resumes from its checkpoint",
            taken,
        )
        # A process on another host left its run RUNNING too: closed KILLED, so the retry's job
        # resumes it (a checkpoint folder on a shared disk holds its epochs).
        end_stale_trial_runs(study.study_name, taken)
    return taken


def wait_for_other_workers(study, storage) -> bool:
    """On an RDB storage with heartbeats, wait while other processes still run trials of the
    study; True as soon as one of them is found dead (its trial then waits to be run again).

    Without this, the last worker to run out of new trials would leave, and a trial whose
    worker died near the end would stay RUNNING until someone ran the command again.
    """
    import time

    import optuna
    from optuna.trial import TrialState

    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.get_heartbeat_interval():
        return False
    announced = False
    while True:
        others = [
            t.number
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not t.user_attrs.get("surplus")
        ]
        if not others:
            return False
        if not announced:
            log.info("waiting for trial(s) %s of other workers to end or go stale", others)
            announced = True
        time.sleep(storage.get_heartbeat_interval())
        take_over_stale_trials(study)
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return True


@contextlib.contextmanager
def heartbeats(storage, trials):
    """Record Optuna heartbeats for `trials` while their jobs run (RDB storages only).

    Not Optuna's own heartbeat thread: that one is private and serves `study.optimize`, where
    the trial runs in the same process; here the launcher runs the jobs.
    """
    import threading

    import optuna

    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.get_heartbeat_interval():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
