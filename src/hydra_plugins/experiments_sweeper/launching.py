"""How the sweeper launches its trials: in batches that wait for their slowest (the basic
launcher, one job at a time, and `keep_slots_busy=false`), or with `n_jobs` slots kept busy, each
freed slot given the next trial at once; and what each job is given (its overrides, its
environment, its device slot)."""

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from experiments.sweeps.plugin import DEVICE_SLOT_ENV, TRIAL_ENV
from hydra_plugins.experiments_sweeper import SweepError
from hydra_plugins.experiments_sweeper.space import SearchSpace

log = logging.getLogger(__name__.rsplit(".", 1)[0] + ".optuna_sweeper")


# No `from __future__ import annotations` here: Hydra's plugin scan runs this module outside
# sys.modules, where a dataclass cannot resolve annotations given as text.
@dataclass
class Launching:
    """The launcher and what the sweeper does around each launch: `ask(how_many)` trials,
    `tell(trial, job_return)`, `check()` the failure rate (raises SweepError), `between()`
    launches take stale trials over, `others()` waits for other workers (True: a retry is
    queued), and `heartbeats(trials)` beats for trials while they run."""

    launcher: Any
    config: DictConfig
    jobs: int
    space: SearchSpace
    plumbing: dict[str, Any]
    ask: Callable[[int], list]
    tell: Callable[[Any, Any], None]
    check: Callable[[], None]
    between: Callable[[], Any]
    others: Callable[[], bool]
    heartbeats: Callable[[list], Any]

    def side_by_side(self, keep_slots_busy: bool) -> bool:
        """Whether to keep n_jobs trials in flight, one launch per slot from a thread of its own.

        Not with Hydra's basic launcher: it runs a job in this process (its working directory,
        Hydra's singletons, the job's signal handlers), so one job at a time, in this thread.
        """
        from hydra._internal.core_plugins.basic_launcher import BasicLauncher

        if self.jobs < 2 or isinstance(self.launcher, BasicLauncher) or not keep_slots_busy:
            return False
        at_once = launcher_jobs(self.config)
        if at_once is not None and at_once < self.jobs:
            log.warning(
                "the launcher runs %d jobs at once (hydra.launcher.n_jobs), fewer than "
                "hydra.sweeper.n_jobs=%d: the other trials wait for a free worker; set "
                "hydra.launcher.n_jobs=%d",
                at_once,
                self.jobs,
                self.jobs,
            )
        return True

    def in_batches(self) -> None:
        """Ask n_jobs trials, launch them together, wait for all, tell, and ask again: the way
        of the basic launcher (one job at a time) and of `keep_slots_busy=false`."""
        job_index = 0
        while True:
            self.between()
            trials = self.ask(self.jobs)
            if not trials:
                if self.others():
                    continue  # one of theirs died: its retry is queued for us
                break
            overrides = [
                job_overrides(self.space, trial, {**self.plumbing, **slot(i, len(trials))})
                for i, trial in enumerate(trials)
            ]
            with self.heartbeats(trials):
                returns = self.launcher.launch(overrides, initial_job_idx=job_index)
            job_index += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                self.tell(trial, ret)
                release_frames(ret)
            del returns, ret  # before the next batch runs, not after
            self.check()

    def in_slots(self) -> None:
        """Keep n_jobs trials in flight: as soon as one ends (finished, pruned or failed), it
        is told and the next trial is asked, with the study's newest results, into its slot.

        Hydra's launcher interface launches a batch and returns when all of it has ended, so
        each slot launches a batch of one from a thread of its own; this thread alone asks and
        tells (the storage's writes stay where signals are handled), and the i-th slot keeps
        its device slot `i/n_jobs`, and so its GPU, from trial to trial.
        """
        import queue
        import threading

        jobs = self.jobs
        ended: queue.Queue = queue.Queue()
        running: dict[int, Any] = {}  # slot -> its trial
        job_index, stopping = 0, None

        def launch(index: int, trial, overrides: list[str], number: int) -> None:
            try:
                with self.heartbeats([trial]):
                    (ret,) = self.launcher.launch([overrides], initial_job_idx=number)
            except BaseException as err:  # noqa: BLE001 - handed to the asking thread
                ended.put((index, err))
            else:
                ended.put((index, ret))

        while True:
            free = [i for i in range(jobs) if i not in running]
            if stopping is None and free:
                self.between()
                asked = self.ask(len(free))
                for index, trial in zip(free, asked, strict=False):
                    overrides = job_overrides(
                        self.space, trial, {**self.plumbing, **slot(index, jobs)}
                    )
                    running[index] = trial
                    threading.Thread(
                        target=launch,
                        args=(index, trial, overrides, job_index),
                        name=f"sweeper-slot-{index}",
                        daemon=True,  # a signal to this process ends the sweep, as in a batch
                    ).start()
                    job_index += 1
            if not running:
                if stopping is not None:
                    raise stopping
                if self.others():
                    continue  # one of theirs died: its retry is queued for us
                return
            index, ret = ended.get()
            trial = running.pop(index)
            if isinstance(ret, BaseException):
                stopping = stopping or ret  # the launcher itself failed
                log.error("trial %d could not be launched: %r", trial.number, ret)
                continue
            self.tell(trial, ret)
            release_frames(ret)
            del ret
            if stopping is None:
                try:
                    self.check()
                except SweepError as err:
                    stopping = err
                    if running:
                        log.warning(
                            "stopping the sweep once trial(s) %s in flight end",
                            sorted(t.number for t in running.values()),
                        )


def slot(index: int, jobs: int) -> dict[str, str]:
    """The device slot of the index-th of `jobs` jobs launched together: each takes a GPU of its
    own (experiments.core.devices.use_device_slot); none for a job launched alone."""
    return {DEVICE_SLOT_ENV: f"{index}/{jobs}"} if jobs > 1 else {}


def job_overrides(space: SearchSpace, trial, env: dict[str, Any]) -> list[str]:
    """A trial's job: the fixed overrides, the trial's params, and what it learns through its
    environment (its study, trial number and device slot)."""
    return [
        *space.fixed,
        *(f"{key}={value}" for key, value in trial.params.items()),
        *hydra_env({**env, TRIAL_ENV: trial.number}),
    ]


def launcher_jobs(config: DictConfig) -> int | None:
    """How many jobs the launcher runs at once where its config says (joblib's `n_jobs`, -1
    for every CPU core), else None."""
    at_once = OmegaConf.select(config, "hydra.launcher.n_jobs", default=None)
    if not isinstance(at_once, int):
        return None
    if at_once < 0:  # joblib's count: -1 all cores, -2 all but one, ...
        return max(1, (os.cpu_count() or 1) + 1 + at_once)
    return at_once


def hydra_env(values: dict[str, Any]) -> list[str]:
    """Overrides setting environment variables for a job through its hydra node: they are not
    task overrides, so they stay out of hydra.job.override_dirname."""
    return [f"++hydra.job.env_set.{key}={quoted(str(value))}" for key, value in values.items()]


def quoted(text: str) -> str:
    """`text` as a quoted value of Hydra's override grammar (a URL may hold = , or spaces)."""
    return "'" + text.replace("'", "\\'") + "'"


def release_frames(ret) -> None:
    """Drop the tracebacks of a pruned or failed job's exception, kept in its JobReturn.

    They hold the job's frames, and with them its model, images and features: kept until the
    next batch returns, they would add a whole job's memory to the next trial's peak.
    """
    err = ret._return_value
    while isinstance(err, BaseException):
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
